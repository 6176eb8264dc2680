"""hyperbroker: arm64 SMCCC hypercalls forwarded by KVM, brokered by one policy-driven service.

The top level holds the vocabulary every part shares (`smccc`, `kvm`, `calls`); the parts are
subpackages: `agent`, `broker`, `handlers`, `tee`, with `wire` (codecs and generated protobuf),
`runtime` (loop, metrics, TLS), `cli` and `testing`. docs/architecture.md is the map.
"""

__version__ = "0.1.0"

"""hyperbroker: arm64 SMCCC hypercalls forwarded by KVM, brokered by one policy-driven service.

This package holds what every part shares and nothing that runs a server: the SMCCC and KVM
vocabulary (`smccc`, `kvm`), the call and result types (`calls`), the VMM wire codec
(`vmm_protocol`), the generated protobuf modules (`hyperbroker.v1`) and the command line.
"""

__version__ = "0.1.0"

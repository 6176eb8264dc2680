"""The policy engine: YAML policy text in, validated profiles and their compiled forms out.

model (what a policy is), abis (the named ABIs the installed handlers declare), loading (text
to a Policy, every error collected), checks (what KVM cannot see: whole ABIs, overlaps,
discovery that never lies), compiling (kernel filter records, dispatch table, the agent's view)
and rendering (JSON for people and tools). Validation mirrors kvm_smccc_set_filter() exactly
(Linux arch/arm64/kvm/hypercalls.c) and every refusal names the profile, the rules, the ranges
and the errno KVM would answer. Pure: it knows nothing of files, sockets, gRPC streams or how a
VMM installs the records.
"""

from hyperbroker.broker.policy.compiling import static_answers, to_proto
from hyperbroker.broker.policy.loading import load_policy
from hyperbroker.broker.policy.model import (
    DEFAULT_PROFILE,
    KERNEL,
    KERNEL_SERVED,
    NOT_SUPPORTED_FALLBACK,
    Action,
    DiscoveryClaim,
    DispatchEntry,
    Policy,
    PolicyError,
    PolicyInvalid,
    Profile,
    Rule,
)
from hyperbroker.broker.policy.rendering import discovery_name, to_json

__all__ = [
    "DEFAULT_PROFILE", "KERNEL", "KERNEL_SERVED", "NOT_SUPPORTED_FALLBACK", "Action",
    "DiscoveryClaim", "DispatchEntry", "Policy", "PolicyError", "PolicyInvalid", "Profile",
    "Rule", "discovery_name", "load_policy", "static_answers", "to_json", "to_proto",
]

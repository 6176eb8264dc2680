"""What the Hyper-V persona tells a guest about itself, and what it may truthfully claim.

The feature registers are discovery: every privilege or feature bit they carry promises a register
or a hypercall (hyperv_init, arch/arm64/hyperv/mshyperv.c; the TLFS feature registers,
include/hyperv/hvgdk_mini.h). The persona accepts only bits it serves, so a configuration cannot
make it lie, and `claims()` lists what the bits promise so a test can call each. Pure values; no
state, no registers in flight."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from hyperbroker.handlers.hyperv import abi

# Privilege bit -> the hypercall codes it promises (HV_PARTITION_PRIVILEGE_MASK).
PRIVILEGE_HYPERCALLS: Mapping[int, frozenset[int]] = {
    abi.HV_MSR_HYPERCALL_AVAILABLE: frozenset({abi.HVCALL_GET_VP_REGISTERS,
                                               abi.HVCALL_SET_VP_REGISTERS}),
    abi.HV_ACCESS_PARTITION_ID: frozenset({abi.HVCALL_GET_PARTITION_ID}),
    abi.HV_POST_MESSAGES: frozenset({abi.HVCALL_POST_MESSAGE}),
    abi.HV_SIGNAL_EVENTS: frozenset({abi.HVCALL_SIGNAL_EVENT}),
}
# Privilege bit -> the synthetic registers it promises.
PRIVILEGE_REGISTERS: Mapping[int, frozenset[int]] = {
    abi.HV_MSR_TIME_REF_COUNT_AVAILABLE: frozenset({abi.HV_REGISTER_TIME_REF_COUNT}),
    abi.HV_MSR_VP_INDEX_AVAILABLE: frozenset({abi.HV_REGISTER_VP_INDEX}),
    abi.HV_MSR_HYPERCALL_AVAILABLE: frozenset({abi.HV_REGISTER_GUEST_OS_ID}),
}
# Misc feature bit -> the synthetic registers it promises.
MISC_REGISTERS: Mapping[int, frozenset[int]] = {
    abi.HV_FEATURE_GUEST_CRASH_MSR_AVAILABLE: frozenset(
        range(abi.HV_REGISTER_GUEST_CRASH_P0, abi.HV_REGISTER_GUEST_CRASH_CTL + 1)),
}

SERVED_PRIVILEGES = 0
for _bit in (*PRIVILEGE_HYPERCALLS, *PRIVILEGE_REGISTERS):
    SERVED_PRIVILEGES |= _bit
SERVED_MISC = 0
for _bit in MISC_REGISTERS:
    SERVED_MISC |= _bit

# Not served, so never advertised: the SynIC (no message or event delivery into the guest),
# synthetic timers, the reference TSC page, VP runtime. Their registers may still be read and
# written (HV_REGISTER_* in include/hyperv/hvgdk_mini.h).


@dataclass(frozen=True, slots=True)
class HypervisorVersion:
    """HV_REGISTER_HYPERVISOR_VERSION (= CPUID 0x40000002; hv_hypervisor_version_info)."""

    build: int = 20348
    major: int = 10
    minor: int = 0
    service_pack: int = 0
    service_branch: int = 0
    service_number: int = 0

    def value(self) -> int:
        low = self.build | self.minor << 32 | self.major << 48
        high = self.service_pack | (self.service_number & 0xFF_FFFF) << 32 | (
            self.service_branch << 56)
        return low | high << 64


@dataclass(frozen=True, slots=True)
class PersonaConfig:
    version: HypervisorVersion = HypervisorVersion()
    privileges: int = SERVED_PRIVILEGES  # HV_PARTITION_PRIVILEGE_MASK, 64 bits
    misc_features: int = SERVED_MISC  # bits 95:64 of PRIVILEGES_AND_FEATURES_INFO
    hints: int = 0  # FEATURES_INFO bits 31:0: recommendations, not promises
    partition_id: int | None = None  # None: allocated fleet-wide on first use
    connections: frozenset[int] | None = None  # SynIC connection IDs accepted; None: any
    crash_records: int = 8  # crash events kept per VM for the Admin API

    def privileges_value(self) -> int:
        """PRIVILEGES_AND_FEATURES_INFO: privileges in 63:0, misc features in 95:64."""
        return self.privileges | self.misc_features << 64

    def has(self, privilege: int) -> bool:
        return bool(self.privileges & privilege)

    def claims(self) -> dict[str, frozenset[int]]:
        """What the feature registers promise: hypercall codes and register names."""
        calls: set[int] = set()
        registers: set[int] = set()
        for bit, codes in PRIVILEGE_HYPERCALLS.items():
            if self.privileges & bit:
                calls |= codes
        for bit, names in PRIVILEGE_REGISTERS.items():
            if self.privileges & bit:
                registers |= names
        for bit, names in MISC_REGISTERS.items():
            if self.misc_features & bit:
                registers |= names
        return {"hypercalls": frozenset(calls), "registers": frozenset(registers)}

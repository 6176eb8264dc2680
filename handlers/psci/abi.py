"""PSCI 1.3 vocabulary: function IDs, return codes, versions, power-state and MPIDR encodings.

Everything here mirrors Arm DEN0022 (Power State Coordination Interface) as Linux spells it in
include/uapi/linux/psci.h and as KVM serves it in arch/arm64/kvm/psci.c. Pure values and decoders:
nothing here knows about vCPU state, VMM actions or handlers.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from hyperbroker.smccc import FunctionRange

# include/uapi/linux/psci.h: PSCI_0_2_FN_BASE, PSCI_0_2_64BIT.
FN_BASE = 0x8400_0000
FN64_BASE = 0xC400_0000


# PSCI 0.2+ is functions 0x00..0x1F of the standard secure service, SMC32 and SMC64 (Arm DEN0022;
# kvmtool forwards exactly these): the ABI is this range, whole.
RANGES = (FunctionRange(FN_BASE, 0x20), FunctionRange(FN64_BASE, 0x20))


def fn(n: int) -> int:
    """PSCI_0_2_FN(n): the SMC32 ID of function number n."""
    return FN_BASE + n


def fn64(n: int) -> int:
    """PSCI_0_2_FN64(n): the SMC64 ID of function number n."""
    return FN64_BASE + n


# Function IDs (include/uapi/linux/psci.h).
PSCI_VERSION = fn(0)
CPU_SUSPEND = fn(1)
CPU_SUSPEND64 = fn64(1)
CPU_OFF = fn(2)
CPU_ON = fn(3)
CPU_ON64 = fn64(3)
AFFINITY_INFO = fn(4)
AFFINITY_INFO64 = fn64(4)
MIGRATE = fn(5)
MIGRATE64 = fn64(5)
MIGRATE_INFO_TYPE = fn(6)
MIGRATE_INFO_UP_CPU = fn(7)
MIGRATE_INFO_UP_CPU64 = fn64(7)
SYSTEM_OFF = fn(8)
SYSTEM_RESET = fn(9)
PSCI_FEATURES = fn(10)  # PSCI 1.0
SYSTEM_SUSPEND = fn(14)  # PSCI 1.0
SYSTEM_SUSPEND64 = fn64(14)
SYSTEM_RESET2 = fn(18)  # PSCI 1.1
SYSTEM_RESET2_64 = fn64(18)
SYSTEM_OFF2 = fn(21)  # PSCI 1.3
SYSTEM_OFF2_64 = fn64(21)

# SMCCC_VERSION lives in the Arm architecture range KVM keeps
# (Documentation/virt/kvm/devices/vm.rst). Linux asks PSCI_FEATURES about it before trusting SMCCC
# 1.1 (psci_init_smccc), so a userspace PSCI must claim it even though the kernel, not this handler,
# answers it.
SMCCC_VERSION = 0x8000_0000

FUNCTION_NAMES: Mapping[int, str] = {
    PSCI_VERSION: "PSCI_VERSION",
    CPU_SUSPEND: "PSCI_CPU_SUSPEND",
    CPU_SUSPEND64: "PSCI_CPU_SUSPEND64",
    CPU_OFF: "PSCI_CPU_OFF",
    CPU_ON: "PSCI_CPU_ON",
    CPU_ON64: "PSCI_CPU_ON64",
    AFFINITY_INFO: "PSCI_AFFINITY_INFO",
    AFFINITY_INFO64: "PSCI_AFFINITY_INFO64",
    MIGRATE: "PSCI_MIGRATE",
    MIGRATE64: "PSCI_MIGRATE64",
    MIGRATE_INFO_TYPE: "PSCI_MIGRATE_INFO_TYPE",
    MIGRATE_INFO_UP_CPU: "PSCI_MIGRATE_INFO_UP_CPU",
    MIGRATE_INFO_UP_CPU64: "PSCI_MIGRATE_INFO_UP_CPU64",
    SYSTEM_OFF: "PSCI_SYSTEM_OFF",
    SYSTEM_RESET: "PSCI_SYSTEM_RESET",
    PSCI_FEATURES: "PSCI_FEATURES",
    fn(11): "PSCI_CPU_FREEZE",
    fn(12): "PSCI_CPU_DEFAULT_SUSPEND",
    fn64(12): "PSCI_CPU_DEFAULT_SUSPEND64",
    fn(13): "PSCI_NODE_HW_STATE",
    fn64(13): "PSCI_NODE_HW_STATE64",
    SYSTEM_SUSPEND: "PSCI_SYSTEM_SUSPEND",
    SYSTEM_SUSPEND64: "PSCI_SYSTEM_SUSPEND64",
    fn(15): "PSCI_SET_SUSPEND_MODE",
    fn(16): "PSCI_STAT_RESIDENCY",
    fn64(16): "PSCI_STAT_RESIDENCY64",
    fn(17): "PSCI_STAT_COUNT",
    fn64(17): "PSCI_STAT_COUNT64",
    SYSTEM_RESET2: "PSCI_SYSTEM_RESET2",
    SYSTEM_RESET2_64: "PSCI_SYSTEM_RESET2_64",
    fn(19): "PSCI_MEM_PROTECT",
    fn(20): "PSCI_MEM_PROTECT_CHECK_RANGE",
    fn64(20): "PSCI_MEM_PROTECT_CHECK_RANGE64",
    SYSTEM_OFF2: "PSCI_SYSTEM_OFF2",
    SYSTEM_OFF2_64: "PSCI_SYSTEM_OFF2_64",
}


class PsciError(enum.IntEnum):
    """PSCI return codes (include/uapi/linux/psci.h), negative, sign-extended
    in x0."""

    NOT_SUPPORTED = -1
    INVALID_PARAMS = -2
    DENIED = -3
    ALREADY_ON = -4
    ON_PENDING = -5
    INTERNAL_FAILURE = -6
    NOT_PRESENT = -7
    DISABLED = -8
    INVALID_ADDRESS = -9


SUCCESS = 0


class AffinityState(enum.IntEnum):
    """AFFINITY_INFO answers: PSCI_0_2_AFFINITY_LEVEL_* in include/uapi/linux/psci.h."""

    ON = 0
    OFF = 1
    ON_PENDING = 2


# MIGRATE_INFO_TYPE answer PSCI_0_2_TOS_MP: a Trusted OS is absent or needs no migration, which
# is also what KVM answers (arch/arm64/kvm/psci.c); MIGRATE and MIGRATE_INFO_UP_CPU are then
# optional and this service leaves them out.
TOS_MP = 2

# SYSTEM_RESET2 reset_type (PSCI_1_1_RESET_TYPE_*): bit 31 set = vendor-specific.
RESET_TYPE_SYSTEM_WARM_RESET = 0
RESET_TYPE_VENDOR_START = 0x8000_0000

# SYSTEM_OFF2 type and PSCI_FEATURES(SYSTEM_OFF2) bitmap bit (PSCI_1_3_OFF_TYPE_HIBERNATE_OFF).
# KVM also takes type 0 as HIBERNATE_OFF, as PSCI 1.3 F.b requires of an implementation.
OFF_TYPE_HIBERNATE_OFF = 0x1

# MPIDR_HWID_BITMASK (arch/arm64/include/asm/cputype.h): Aff3 in 39:32, Aff2..Aff0 in 23:0.
MPIDR_HWID_BITMASK = 0xFF_00FF_FFFF
MPIDR_LEVEL_BITS = 8


def affinity_mask(level: int) -> int:
    """psci_affinity_mask(): the MPIDR bits that matter at `level` (0..3), 0 for a bad level.

    Every field at or above `level` is compared, the ones below it ignored.
    """
    if not 0 <= level <= 3:
        return 0
    return MPIDR_HWID_BITMASK & ~((1 << (level * MPIDR_LEVEL_BITS)) - 1) & ((1 << 64) - 1)


def kvm_default_mpidr(vcpu: int) -> int:
    """The affinity KVM gives vCPU `vcpu` (arch/arm64/kvm/sys_regs.c reset_mpidr), RES1 bit dropped.

    Sixteen vCPUs per Aff0 cluster, because GICv3 ICC_SGIxR can target 16 CPUs per level-0 group.
    """
    return (vcpu & 0x0F) | ((vcpu >> 4) & 0xFF) << 8 | ((vcpu >> 12) & 0xFF) << 16


def version(major: int, minor: int) -> int:
    """PSCI_VERSION(maj, min): bits 31:16 major, 15:0 minor."""
    return (major << 16) | minor


VERSIONS: Mapping[str, int] = {
    "0.2": version(0, 2),
    "1.0": version(1, 0),
    "1.1": version(1, 1),
    "1.2": version(1, 2),
    "1.3": version(1, 3),
}


@dataclass(frozen=True, slots=True)
class PowerState:
    """A CPU_SUSPEND power_state in the original format (PSCI_FEATURES flag bit 1 = 0).

    include/uapi/linux/psci.h: StateID 15:0, StateType 16 (1 = powerdown), PowerLevel 25:24;
    every other bit is reserved and must be zero (DEN0022 §5.4.2).
    """

    state_id: int
    powerdown: bool
    level: int


POWER_STATE_ID_MASK = 0xFFFF
POWER_STATE_TYPE_BIT = 1 << 16
POWER_STATE_AFFL_SHIFT = 24
POWER_STATE_AFFL_MASK = 0x3 << POWER_STATE_AFFL_SHIFT
POWER_STATE_RESERVED = 0xFFFF_FFFF & ~(
    POWER_STATE_ID_MASK | POWER_STATE_TYPE_BIT | POWER_STATE_AFFL_MASK
)


def decode_power_state(raw: int) -> PowerState | None:
    """power_state (a uint32 in both conventions: bits above 31 are not part of it), or None
    when a reserved bit is set."""
    raw &= 0xFFFF_FFFF
    if raw & POWER_STATE_RESERVED:
        return None
    return PowerState(
        state_id=raw & POWER_STATE_ID_MASK,
        powerdown=bool(raw & POWER_STATE_TYPE_BIT),
        level=(raw & POWER_STATE_AFFL_MASK) >> POWER_STATE_AFFL_SHIFT,
    )

"""The persona's synthetic register file: which registers exist, their values and write rules.

Every register of HV_REGISTER_*, include/hyperv/hvgdk_mini.h is held, with the TLFS rules: read-only
registers refuse writes; a 64-bit register refuses a value with bits beyond 64 ("bits beyond the
architectural size of the register are zeroed", HvCallSetVpRegisters); reserved bits must be
zero where the register defines them; VP_INDEX is the VP's own index; TIME_REF_COUNT counts
100 ns units since the partition's first hypercall, from a monotonic clock, and never goes back.
Reads and writes update the call's PartitionState; a write may yield effects (a crash report) for
the adapter to carry out. Nothing here does I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from hyperbroker.handlers.hyperv import abi
from hyperbroker.handlers.hyperv.abi import HvStatus
from hyperbroker.handlers.hyperv.partition import PartitionState
from hyperbroker.handlers.hyperv.persona import PersonaConfig

U64 = (1 << 64) - 1
TIME_UNIT_NS = 100  # HV_CLOCK_HZ = NSEC_PER_SEC / 100


class Access(enum.Enum):
    RO = "ro"
    RW = "rw"
    WO = "wo"  # EOM: a write is an action, a read gives 0


class Scope(enum.Enum):
    PARTITION = "partition"
    VP = "vp"


@dataclass(frozen=True, slots=True)
class RegisterSpec:
    label: str
    access: Access
    scope: Scope
    writable: int = U64  # bits a write may set; any other set bit is INVALID_REGISTER_VALUE
    default: int = 0


# SINTx (hvgdk_mini.h union hv_synic_sint): vector 7:0, masked 16, auto_eoi 17, polling 18,
# as_intercept 19, proxy 20; 15:8 and 63:21 reserved. Masked at reset.
SINT_WRITABLE = 0xFF | 0x1F << 16

REGISTERS: Mapping[int, RegisterSpec] = {
    abi.HV_REGISTER_HYPERVISOR_VERSION: RegisterSpec("HYPERVISOR_VERSION", Access.RO,
                                                     Scope.PARTITION),
    abi.HV_REGISTER_PRIVILEGES_AND_FEATURES_INFO: RegisterSpec(
        "PRIVILEGES_AND_FEATURES_INFO", Access.RO, Scope.PARTITION),
    abi.HV_REGISTER_FEATURES_INFO: RegisterSpec("FEATURES_INFO", Access.RO, Scope.PARTITION),
    **{abi.HV_REGISTER_GUEST_CRASH_P0 + i: RegisterSpec(f"GUEST_CRASH_P{i}", Access.RW,
                                                        Scope.PARTITION) for i in range(5)},
    abi.HV_REGISTER_GUEST_CRASH_CTL: RegisterSpec("GUEST_CRASH_CTL", Access.RW, Scope.PARTITION),
    abi.HV_REGISTER_GUEST_OS_ID: RegisterSpec("GUEST_OS_ID", Access.RW, Scope.PARTITION),
    abi.HV_REGISTER_VP_INDEX: RegisterSpec("VP_INDEX", Access.RO, Scope.VP),
    abi.HV_REGISTER_TIME_REF_COUNT: RegisterSpec("TIME_REF_COUNT", Access.RO, Scope.PARTITION),
    abi.HV_REGISTER_REFERENCE_TSC: RegisterSpec("REFERENCE_TSC", Access.RW, Scope.PARTITION),
    **{abi.HV_REGISTER_SINT0 + i: RegisterSpec(f"SINT{i}", Access.RW, Scope.VP, SINT_WRITABLE,
                                               abi.HV_SYNIC_SINT_MASKED) for i in range(16)},
    abi.HV_REGISTER_SCONTROL: RegisterSpec("SCONTROL", Access.RW, Scope.VP, 0x1),
    abi.HV_REGISTER_SVERSION: RegisterSpec("SVERSION", Access.RO, Scope.VP,
                                           default=abi.HV_SYNIC_VERSION_1),
    abi.HV_REGISTER_SIEFP: RegisterSpec("SIEFP", Access.RW, Scope.VP),  # 11:1 preserved
    abi.HV_REGISTER_SIMP: RegisterSpec("SIMP", Access.RW, Scope.VP),
    abi.HV_REGISTER_EOM: RegisterSpec("EOM", Access.WO, Scope.VP),
    abi.HV_REGISTER_VSM_VP_STATUS: RegisterSpec("VSM_VP_STATUS", Access.RO, Scope.VP),
}

# What a read of GUEST_CRASH_CTL reports: the crash actions this hypervisor takes (hv_common_init
# reads it and registers the kmsg dumper only if CRASH_NOTIFY_MSG is set).
CRASH_CTL_CAPABILITIES = abi.HV_CRASH_CTL_CRASH_NOTIFY | abi.HV_CRASH_CTL_CRASH_NOTIFY_MSG
CRASH_MESSAGE_MAX = abi.HV_PAGE_SIZE  # hv_kmsg_dump writes at most one page


@dataclass(frozen=True, slots=True)
class CrashReport:
    """A write to GUEST_CRASH_CTL asked for a crash report (hyperv_report_panic, hv_kmsg_dump)."""

    vp: int
    notify: bool  # CRASH_NOTIFY: P0..P4 hold the error, guest id, PC, SP
    message_gpa: int | None  # CRASH_NOTIFY_MSG: the panic text is at P3, P4 bytes long
    message_length: int
    params: tuple[int, int, int, int, int]
    guest_os_id: int


def time_ref_count(state: PartitionState, now_ns: int) -> int:
    """TIME_REF_COUNT: 100 ns units since the epoch, monotonic even across clock domains.

    If the broker's monotonic clock went back (a restart on another machine), the epoch is moved
    so that the count resumes from the last value given instead of jumping back.
    """
    if state.time_epoch_ns is None:
        state.time_epoch_ns = now_ns
    count = (now_ns - state.time_epoch_ns) // TIME_UNIT_NS
    if count < state.time_last:
        state.time_epoch_ns = now_ns - state.time_last * TIME_UNIT_NS
        count = state.time_last
    state.time_last = count
    return count


def read(config: PersonaConfig, state: PartitionState, vp: int, name: int,
         now_ns: int) -> int | HvStatus:
    """The 128-bit value of register `name` of VP `vp`, or the status refusing the read."""
    spec = REGISTERS.get(name)
    if spec is None:
        return HvStatus.INVALID_PARAMETER
    match name:
        case abi.HV_REGISTER_HYPERVISOR_VERSION:
            return config.version.value()
        case abi.HV_REGISTER_PRIVILEGES_AND_FEATURES_INFO:
            return config.privileges_value()
        case abi.HV_REGISTER_FEATURES_INFO:
            return config.hints
        case abi.HV_REGISTER_GUEST_CRASH_CTL:
            return CRASH_CTL_CAPABILITIES
        case abi.HV_REGISTER_GUEST_OS_ID:
            return state.guest_os_id
        case abi.HV_REGISTER_VP_INDEX:
            return vp
        case abi.HV_REGISTER_TIME_REF_COUNT:
            return time_ref_count(state, now_ns)
        case abi.HV_REGISTER_REFERENCE_TSC:
            return state.reference_tsc
    if abi.HV_REGISTER_GUEST_CRASH_P0 <= name <= abi.HV_REGISTER_GUEST_CRASH_P4:
        return state.crash_params[name - abi.HV_REGISTER_GUEST_CRASH_P0]
    if spec.access is Access.WO:
        return 0
    return state.vp_registers.get(vp, {}).get(name, spec.default)


def write(config: PersonaConfig, state: PartitionState, vp: int, name: int,
          value: int) -> list[CrashReport] | HvStatus:
    """Store `value` in register `name` of VP `vp`; the effects to carry out, or the refusal."""
    spec = REGISTERS.get(name)
    if spec is None:
        return HvStatus.INVALID_PARAMETER
    if spec.access is Access.RO:
        return HvStatus.ACCESS_DENIED
    if value >> 64:
        return HvStatus.INVALID_PARAMETER  # every writable register here is 64 bits wide
    if value & ~spec.writable:
        return HvStatus.INVALID_REGISTER_VALUE
    if name == abi.HV_REGISTER_GUEST_CRASH_CTL:
        return _crash_control(state, vp, value)
    if name == abi.HV_REGISTER_GUEST_OS_ID:
        state.guest_os_id = value
    elif name == abi.HV_REGISTER_REFERENCE_TSC:
        state.reference_tsc = value  # stored only: the TSC page is not offered (no privilege)
    elif abi.HV_REGISTER_GUEST_CRASH_P0 <= name <= abi.HV_REGISTER_GUEST_CRASH_P4:
        state.crash_params[name - abi.HV_REGISTER_GUEST_CRASH_P0] = value
    elif name == abi.HV_REGISTER_EOM:
        state.eoms += 1
    else:
        state.vp(vp)[name] = value
    return []


def _crash_control(state: PartitionState, vp: int, value: int) -> list[CrashReport]:
    """GUEST_CRASH_CTL writes are actions, not stored: CRASH_NOTIFY and/or CRASH_NOTIFY_MSG."""
    notify = bool(value & abi.HV_CRASH_CTL_CRASH_NOTIFY)
    with_message = bool(value & abi.HV_CRASH_CTL_CRASH_NOTIFY_MSG)
    if not (notify or with_message):
        return []
    p = state.crash_params
    return [CrashReport(
        vp=vp,
        notify=notify,
        message_gpa=p[3] if with_message else None,
        message_length=min(p[4], CRASH_MESSAGE_MAX) if with_message else 0,
        params=(p[0], p[1], p[2], p[3], p[4]),
        guest_os_id=state.guest_os_id,
    )]

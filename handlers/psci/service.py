"""The userspace PSCI 1.3 service as a pure function: a call's registers and the VM's power state
in, a typed answer (x0, VMM actions, the new power state) out.

Decoding follows KVM's own PSCI (arch/arm64/kvm/psci.c; include/uapi/linux/psci.h,
arch/arm64/kvm/psci.c): SMC32 functions see only the low 32 bits of x1..x3, PSCI_FEATURES is true
exactly for the functions served, SYSTEM_* calls preload x0 with INTERNAL_FAILURE in case the VMM
resumes the vCPU instead of carrying the action out. The work itself (starting, stopping, suspending
vCPUs, ending the VM) is a VMM action (hyperbroker.calls.ActionKind). Nothing here touches the store
or the broker."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from hyperbroker.calls import ActionKind, VmmAction
from hyperbroker.handlers.psci import abi
from hyperbroker.handlers.psci.abi import PsciError
from hyperbroker.handlers.psci.power import Power, VmPower
from hyperbroker.smccc import is_smc64

U32 = 0xFFFF_FFFF


@dataclass(frozen=True, slots=True)
class AddressRange:
    """[base, base + size) of guest-physical addresses."""

    base: int
    size: int

    def __contains__(self, address: object) -> bool:
        return isinstance(address, int) and self.base <= address < self.base + self.size


@dataclass(frozen=True, slots=True)
class PsciConfig:
    """What a policy may set for one PSCI handler instance (validated by the adapter)."""

    version: int = abi.VERSIONS["1.3"]
    system_suspend: bool = True
    system_off2: bool = True
    boot_vcpus: frozenset[int] = frozenset({0})
    mpidrs: tuple[int, ...] | None = None  # vCPU index -> affinity; None: KVM's reset_mpidr
    entry_ranges: tuple[AddressRange, ...] = ()  # where entry points may lie; empty: anywhere

    @property
    def minor(self) -> int:
        return self.version & 0xFFFF

    @property
    def major(self) -> int:
        return self.version >> 16

    def at_least(self, major: int, minor: int) -> bool:
        return (self.major, self.minor) >= (major, minor)

    def mpidr(self, vcpu: int) -> int | None:
        if self.mpidrs is None:
            return abi.kvm_default_mpidr(vcpu)
        return self.mpidrs[vcpu] if vcpu < len(self.mpidrs) else None

    def vcpu_of(self, mpidr: int, nr_vcpus: int) -> int | None:
        """kvm_mpidr_to_vcpu(): the vCPU whose affinity is exactly `mpidr`."""
        for i in range(nr_vcpus):
            if self.mpidr(i) == mpidr:
                return i
        return None

    def entry_valid(self, address: int) -> bool:
        return not self.entry_ranges or any(address in r for r in self.entry_ranges)


# The functions PSCI 0.2 makes mandatory, with the SMC64 forms a 64-bit caller uses (Arm
# DEN0022); PSCI_FEATURES joins them from 1.0.
MANDATORY_0_2: frozenset[int] = frozenset({
    abi.PSCI_VERSION, abi.CPU_SUSPEND, abi.CPU_SUSPEND64, abi.CPU_OFF, abi.CPU_ON, abi.CPU_ON64,
    abi.AFFINITY_INFO, abi.AFFINITY_INFO64, abi.SYSTEM_OFF, abi.SYSTEM_RESET,
})


def served_functions(config: PsciConfig) -> frozenset[int]:
    """Every PSCI function ID this configuration answers with anything but NOT_SUPPORTED."""
    ids = set(MANDATORY_0_2) | {abi.MIGRATE_INFO_TYPE}
    if config.at_least(1, 0):
        ids.add(abi.PSCI_FEATURES)
        if config.system_suspend:
            ids |= {abi.SYSTEM_SUSPEND, abi.SYSTEM_SUSPEND64}
    if config.at_least(1, 1):
        ids |= {abi.SYSTEM_RESET2, abi.SYSTEM_RESET2_64}
    if config.at_least(1, 3) and config.system_off2:
        ids |= {abi.SYSTEM_OFF2, abi.SYSTEM_OFF2_64}
    return frozenset(ids)


def feature_flags(config: PsciConfig, fid: int) -> int | PsciError:
    """PSCI_FEATURES(fid) (DEN0022 §5.15): 0 or the function's flags if served, else NOT_SUPPORTED.

    CPU_SUSPEND: 0 = original power_state format, platform-coordinated mode only.
    SYSTEM_OFF2: the bitmap of supported off types (HIBERNATE_OFF), as KVM answers.
    SMCCC_VERSION: served by the kernel for every profile (the architecture range stays KVM's).
    """
    fid &= U32
    if fid == abi.SMCCC_VERSION:
        return 0
    if fid not in served_functions(config):
        return PsciError.NOT_SUPPORTED
    if fid in (abi.SYSTEM_OFF2, abi.SYSTEM_OFF2_64):
        return abi.OFF_TYPE_HIBERNATE_OFF
    return 0


def discovery_claims(config: PsciConfig) -> Mapping[int, frozenset[int]]:
    """What each PSCI discovery call tells the guest is served, by discovery function ID.

    PSCI_VERSION promises the functions that version makes mandatory; PSCI_FEATURES (1.0+) is
    true for exactly the IDs listed. A policy check proves each claimed ID is served.
    """
    mandatory = set(MANDATORY_0_2)
    claims: dict[int, frozenset[int]] = {}
    if config.at_least(1, 0):
        mandatory.add(abi.PSCI_FEATURES)
        claims[abi.PSCI_FEATURES] = served_functions(config) | {abi.SMCCC_VERSION}
    claims[abi.PSCI_VERSION] = frozenset(mandatory)
    return claims


# Typed requests: one per function, arguments already narrowed to the caller's convention.


@dataclass(frozen=True, slots=True)
class Version:
    pass


@dataclass(frozen=True, slots=True)
class Features:
    queried: int


@dataclass(frozen=True, slots=True)
class CpuSuspend:
    power_state: int
    entry: int
    context: int


@dataclass(frozen=True, slots=True)
class CpuOff:
    pass


@dataclass(frozen=True, slots=True)
class CpuOn:
    target: int
    entry: int
    context: int


@dataclass(frozen=True, slots=True)
class AffinityInfo:
    target: int
    lowest_level: int


@dataclass(frozen=True, slots=True)
class MigrateInfoType:
    pass


@dataclass(frozen=True, slots=True)
class SystemOff:
    pass


@dataclass(frozen=True, slots=True)
class SystemReset:
    pass


@dataclass(frozen=True, slots=True)
class SystemReset2:
    reset_type: int
    cookie: int


@dataclass(frozen=True, slots=True)
class SystemOff2:
    off_type: int
    cookie: int


@dataclass(frozen=True, slots=True)
class SystemSuspend:
    entry: int
    context: int


@dataclass(frozen=True, slots=True)
class Unsupported:
    fid: int


Request = (
    Version | Features | CpuSuspend | CpuOff | CpuOn | AffinityInfo | MigrateInfoType
    | SystemOff | SystemReset | SystemReset2 | SystemOff2 | SystemSuspend | Unsupported
)


def decode(config: PsciConfig, fid: int, x: Sequence[int]) -> Request:
    """Registers -> request. Functions this configuration does not serve decode as Unsupported,
    so the answer and PSCI_FEATURES can never disagree."""
    if fid not in served_functions(config):
        return Unsupported(fid)
    width = (1 << 64) - 1 if is_smc64(fid) else U32  # kvm_psci_narrow_to_32bit for SMC32
    a1, a2, a3 = ((x[i] if i < len(x) else 0) & width for i in (1, 2, 3))
    match fid:
        case abi.PSCI_VERSION:
            return Version()
        case abi.PSCI_FEATURES:
            return Features(a1)
        case abi.CPU_SUSPEND | abi.CPU_SUSPEND64:
            return CpuSuspend(a1, a2, a3)
        case abi.CPU_OFF:
            return CpuOff()
        case abi.CPU_ON | abi.CPU_ON64:
            return CpuOn(a1, a2, a3)
        case abi.AFFINITY_INFO | abi.AFFINITY_INFO64:
            return AffinityInfo(a1, a2)
        case abi.MIGRATE_INFO_TYPE:
            return MigrateInfoType()
        case abi.SYSTEM_OFF:
            return SystemOff()
        case abi.SYSTEM_RESET:
            return SystemReset()
        case abi.SYSTEM_RESET2 | abi.SYSTEM_RESET2_64:
            return SystemReset2(a1 & U32, a2)  # reset_type is a uint32 in both conventions
        case abi.SYSTEM_OFF2 | abi.SYSTEM_OFF2_64:
            return SystemOff2(a1 & U32, a2)
        case abi.SYSTEM_SUSPEND | abi.SYSTEM_SUSPEND64:
            return SystemSuspend(a1, a2)
    return Unsupported(fid)  # pragma: no cover - served_functions and the match agree


@dataclass(frozen=True, slots=True)
class Answer:
    """x0 for the guest, what the VMM must do, and the power state to store (None: unchanged)."""

    x0: int
    actions: tuple[VmmAction, ...] = ()
    power: VmPower | None = None
    error: bool = False


def _error(code: PsciError, power: VmPower | None = None) -> Answer:
    return Answer(int(code), power=power, error=True)


def transition(
    config: PsciConfig, request: Request, caller: int, power: VmPower, boot: VmPower
) -> Answer:
    """One PSCI call by vCPU `caller` against the VM's power state.

    `power` already includes the evidence of this call (VmPower.observe); `boot` is the state a
    reset returns to. The returned power is None when nothing changed.
    """
    nr = len(power.vcpus)
    match request:
        case Version():
            return Answer(config.version)
        case Features(queried):
            flags = feature_flags(config, queried)
            return _error(flags) if isinstance(flags, PsciError) else Answer(flags)
        case MigrateInfoType():
            return Answer(abi.TOS_MP)
        case CpuSuspend(raw, entry, context):
            # DEN0022 §5.4.2: an implementation may downgrade a powerdown request to standby and
            # return SUCCESS after the call; like KVM (kvm_psci_vcpu_suspend) this one always
            # does. The action still carries the powerdown entry point for the VMM's records.
            state = abi.decode_power_state(raw)
            if state is None:
                return _error(PsciError.INVALID_PARAMS)
            if state.powerdown and not config.entry_valid(entry):
                return _error(PsciError.INVALID_ADDRESS)
            wake = (entry, context) if state.powerdown else (0, 0)
            return Answer(abi.SUCCESS, (VmmAction(ActionKind.CPU_SUSPEND, caller, *wake),))
        case CpuOff():
            # Returns only if the VMM fails to stop the vCPU: that is an internal failure.
            return Answer(int(PsciError.INTERNAL_FAILURE),
                          (VmmAction(ActionKind.CPU_OFF, caller),), power.stop(caller))
        case CpuOn(target_mpidr, entry, context):
            if target_mpidr & ~abi.MPIDR_HWID_BITMASK:  # kvm_psci_valid_affinity
                return _error(PsciError.INVALID_PARAMS)
            target = config.vcpu_of(target_mpidr, nr)
            if target is None:
                return _error(PsciError.INVALID_PARAMS)
            if power.state(target) is Power.ON:
                return _error(PsciError.ALREADY_ON)
            if power.state(target) is Power.ON_PENDING:
                return _error(PsciError.ON_PENDING)
            if not config.entry_valid(entry):
                return _error(PsciError.INVALID_ADDRESS)
            return Answer(abi.SUCCESS, (VmmAction(ActionKind.CPU_ON, target, entry, context),),
                          power.start(caller, target))
        case AffinityInfo(target_affinity, level):
            if target_affinity & ~abi.MPIDR_HWID_BITMASK:
                return _error(PsciError.INVALID_PARAMS)
            mask = abi.affinity_mask(level)
            if not mask:
                return _error(PsciError.INVALID_PARAMS)
            members = [i for i in range(nr)
                       if (m := config.mpidr(i)) is not None
                       and m & mask == target_affinity & mask]
            if not members:
                return _error(PsciError.INVALID_PARAMS)
            return Answer(int(power.affinity(members)))
        case SystemOff():
            return Answer(int(PsciError.INTERNAL_FAILURE), (VmmAction(ActionKind.SYSTEM_OFF),),
                          power.all_off())
        case SystemReset():
            return Answer(int(PsciError.INTERNAL_FAILURE), (VmmAction(ActionKind.SYSTEM_RESET),),
                          boot)
        case SystemReset2(reset_type, cookie):
            # Architectural types other than SYSTEM_WARM_RESET are reserved (KVM psci.c); vendor
            # types (bit 31) go to the VMM, which knows what they mean.
            if abi.RESET_TYPE_SYSTEM_WARM_RESET < reset_type < abi.RESET_TYPE_VENDOR_START:
                return _error(PsciError.INVALID_PARAMS)
            return Answer(int(PsciError.INTERNAL_FAILURE),
                          (VmmAction(ActionKind.SYSTEM_RESET2, 0, cookie, reset_type),), boot)
        case SystemOff2(off_type, cookie):
            # 0 and HIBERNATE_OFF both mean HIBERNATE_OFF; the cookie must be zero (KVM psci.c).
            if off_type not in (0, abi.OFF_TYPE_HIBERNATE_OFF) or cookie:
                return _error(PsciError.INVALID_PARAMS)
            return Answer(int(PsciError.INTERNAL_FAILURE),
                          (VmmAction(ActionKind.SYSTEM_OFF2, 0, 0, abi.OFF_TYPE_HIBERNATE_OFF),),
                          power.all_off())
        case SystemSuspend(entry, context):
            # DEN0022 §5.20: every other core must be OFF; the system resumes at the entry point.
            if not config.entry_valid(entry):
                return _error(PsciError.INVALID_ADDRESS)
            if not power.others_off(caller):
                return _error(PsciError.DENIED)
            return Answer(int(PsciError.INTERNAL_FAILURE),
                          (VmmAction(ActionKind.SYSTEM_SUSPEND, caller, entry, context),))
        case Unsupported():
            return _error(PsciError.NOT_SUPPORTED)
    raise AssertionError(f"unhandled request {request!r}")  # pragma: no cover


def static_x0(config: PsciConfig, ids: Sequence[int]) -> dict[int, int]:
    """x0 for every ID of `ids` whose answer needs neither arguments nor state."""
    out: dict[int, int] = {abi.PSCI_VERSION: config.version, abi.MIGRATE_INFO_TYPE: abi.TOS_MP}
    served = served_functions(config)
    for fid in ids:
        if fid not in served:
            out[fid] = int(PsciError.NOT_SUPPORTED)
    return out

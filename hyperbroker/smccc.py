"""SMCCC vocabulary: function-ID encoding, owners, return codes, the named ABI ranges.

Everything here mirrors Arm DEN0028 (SMC Calling Convention) as the Linux header
include/linux/arm-smccc.h spells it (include/linux/arm-smccc.h). It knows nothing of KVM ioctls,
policy files or handlers; those build on it. An ABI inside the SMCCC space (PSCI, TRNG, FF-A,
OP-TEE, ...) is defined by the handler package that serves it, not here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import NewType

FunctionId = NewType("FunctionId", int)

# DEN0028 Table 2-1 / arm-smccc.h ARM_SMCCC_CALL_VAL.
FAST_CALL_BIT = 1 << 31
SMC64_BIT = 1 << 30
OWNER_SHIFT = 24
OWNER_MASK = 0x3F
MBZ_MASK = 0x00FF0000  # bits 23:16 must be zero (bit 16 is the SMCCC 1.3 SVE hint)
FUNC_MASK = 0xFFFF

# arm-smccc.h ARM_SMCCC_OWNER_*.
OWNER_ARCH = 0
OWNER_CPU = 1
OWNER_SIP = 2
OWNER_OEM = 3
OWNER_STANDARD = 4
OWNER_STANDARD_HYP = 5
OWNER_VENDOR_HYP = 6
OWNER_TRUSTED_APP = 48  # ..49
OWNER_TRUSTED_OS = 50  # ..63
OWNER_TRUSTED_OS_END = 63

OWNER_NAMES: Mapping[int, str] = {
    OWNER_ARCH: "arch",
    OWNER_CPU: "cpu",
    OWNER_SIP: "sip",
    OWNER_OEM: "oem",
    OWNER_STANDARD: "std",
    OWNER_STANDARD_HYP: "std-hyp",
    OWNER_VENDOR_HYP: "vendor-hyp",
}

# arm-smccc.h SMCCC_RET_*; negative codes travel sign-extended to 64 bits, as KVM writes them.
U64_MASK = (1 << 64) - 1
RET_SUCCESS = 0
RET_NOT_SUPPORTED = -1
RET_NOT_REQUIRED = -2
RET_INVALID_PARAMETER = -3
NOT_SUPPORTED_U64 = RET_NOT_SUPPORTED & U64_MASK  # 0xFFFF_FFFF_FFFF_FFFF

# ARM_SMCCC_VERSION_1_x.
VERSION_1_0 = 0x10000
VERSION_1_1 = 0x10001
VERSION_1_2 = 0x10002

NR_ARGS = 18  # x0..x17: the widest register set SMCCC 1.2 moves in either direction
SMCCC_1_1_RESULT_MASK = 0xF  # x0..x3
SMCCC_1_2_RESULT_MASK = (1 << NR_ARGS) - 1  # x0..x17


def call_value(fast: bool, smc64: bool, owner: int, number: int) -> FunctionId:
    """ARM_SMCCC_CALL_VAL(type, cc, owner, fn)."""
    return FunctionId(
        (FAST_CALL_BIT if fast else 0)
        | (SMC64_BIT if smc64 else 0)
        | ((owner & OWNER_MASK) << OWNER_SHIFT)
        | (number & FUNC_MASK)
    )


def is_fast(fid: int) -> bool:
    return bool(fid & FAST_CALL_BIT)


def is_smc64(fid: int) -> bool:
    return bool(fid & SMC64_BIT)


def owner(fid: int) -> int:
    return (fid >> OWNER_SHIFT) & OWNER_MASK


def number(fid: int) -> int:
    return fid & FUNC_MASK


def to_u64(value: int) -> int:
    """A signed return code as the 64-bit register value the guest reads."""
    return value & U64_MASK


def to_s64(value: int) -> int:
    value &= U64_MASK
    return value - (1 << 64) if value >> 63 else value


def to_s32(value: int) -> int:
    value &= 0xFFFF_FFFF
    return value - (1 << 32) if value >> 31 else value


@dataclass(frozen=True, slots=True, order=True)
class FunctionRange:
    """The half-open range [base, base + count) of 32-bit function IDs, as KVM's filter counts."""

    base: int
    count: int

    @property
    def end(self) -> int:
        """One past the last ID; may be 2**32 for a range ending at 0xFFFFFFFF."""
        return self.base + self.count

    @property
    def last(self) -> int:
        return self.base + self.count - 1

    def is_valid(self) -> bool:
        """Non-empty, inside the 32-bit space, not wrapping (kvm_smccc_set_filter's EINVAL test)."""
        return 0 <= self.base <= 0xFFFF_FFFF and self.count > 0 and self.end <= 1 << 32

    def __contains__(self, fid: object) -> bool:
        return isinstance(fid, int) and self.base <= fid < self.end

    def overlaps(self, other: FunctionRange) -> bool:
        return self.base < other.end and other.base < self.end

    def covers(self, other: FunctionRange) -> bool:
        return self.base <= other.base and other.end <= self.end

    def __str__(self) -> str:
        return f"[{self.base:#010x}, {self.end:#010x})"


def merge_ranges(ranges: Iterable[FunctionRange]) -> list[FunctionRange]:
    """The union of `ranges` as sorted, disjoint, non-adjacent ranges."""
    out: list[FunctionRange] = []
    for r in sorted(ranges):
        if out and r.base <= out[-1].end:
            last = out[-1]
            out[-1] = FunctionRange(last.base, max(last.end, r.end) - last.base)
        else:
            out.append(r)
    return out


def subtract_ranges(
    whole: FunctionRange, parts: Iterable[FunctionRange]
) -> Iterator[FunctionRange]:
    """The pieces of `whole` that none of `parts` cover, in order."""
    cursor = whole.base
    for p in merge_ranges(parts):
        if p.end <= cursor or p.base >= whole.end:
            continue
        if p.base > cursor:
            yield FunctionRange(cursor, p.base - cursor)
        cursor = max(cursor, p.end)
    if cursor < whole.end:
        yield FunctionRange(cursor, whole.end - cursor)


# Ranges KVM keeps for itself and pre-inserts in every filter (hypercalls.c
# kvm_smccc_filter_insert_reserved; Documentation/virt/kvm/devices/vm.rst): a filter touching them
# is EEXIST.
RESERVED_ARCH_RANGES: tuple[FunctionRange, ...] = (
    FunctionRange(0x8000_0000, 0x1_0000),  # SMC32 arch calls
    FunctionRange(0xC000_0000, 0x1_0000),  # SMC64 arch calls
)


def _owner_ranges(owner_id: int, fast: bool = True, yielding: bool = False) -> list[FunctionRange]:
    out = []
    for is_fast_call in [True] * fast + [False] * yielding:
        for smc64 in (False, True):
            out.append(FunctionRange(call_value(is_fast_call, smc64, owner_id, 0), 0x1_0000))
    return out


# The SMCCC service owners (DEN0028 table 6-1) as a policy may name them whole: fast calls, SMC32
# and SMC64 (the vendor-hyp service, owner 6, also its yielding calls). An ABI inside one of
# these is named by the handler that serves it (handlers.api.Abi), not here.
OWNER_SERVICES: Mapping[str, tuple[FunctionRange, ...]] = {
    "vendor-hyp": tuple(sorted(_owner_ranges(OWNER_VENDOR_HYP, fast=True, yielding=True))),
    "std-hyp": tuple(_owner_ranges(OWNER_STANDARD_HYP)),
    "sip": tuple(_owner_ranges(OWNER_SIP)),
    "oem": tuple(_owner_ranges(OWNER_OEM)),
}

# The Arm-architecture calls, inside the ranges KVM keeps (DEN0028 §7; arm-smccc.h
# ARM_SMCCC_VERSION_FUNC_ID, ARM_SMCCC_ARCH_FEATURES_FUNC_ID, ARM_SMCCC_ARCH_SOC_ID_FUNC_ID,
# ARM_SMCCC_ARCH_WORKAROUND_{1,2,3}): named for the CLI and metric labels.
ARCH_FUNCTIONS: Mapping[int, str] = {
    0x8000_0000: "SMCCC_VERSION",
    0x8000_0001: "SMCCC_ARCH_FEATURES",
    0x8000_0002: "SMCCC_ARCH_SOC_ID",
    0x8000_8000: "SMCCC_ARCH_WORKAROUND_1",
    0x8000_7FFF: "SMCCC_ARCH_WORKAROUND_2",
    0x8000_3FFF: "SMCCC_ARCH_WORKAROUND_3",
}
SMCCC_VERSION = 0x8000_0000
SMCCC_ARCH_FEATURES = 0x8000_0001


def default_function_name(fid: int) -> str:
    """A bounded label for an ID nobody named: its conduit width and owner."""
    width = "64" if is_smc64(fid) else "32"
    kind = "fast" if is_fast(fid) else "yield"
    own = owner(fid)
    if own in OWNER_NAMES:
        who = OWNER_NAMES[own]
    elif OWNER_TRUSTED_APP <= own < OWNER_TRUSTED_OS:
        who = "trusted-app"
    elif own >= OWNER_TRUSTED_OS:
        who = "trusted-os"
    else:
        who = "reserved"  # owners 7..47 (DEN0028 table 6-1)
    return f"{who}-{kind}{width}"


def parse_function(text: str, names: Mapping[int, str] = ARCH_FUNCTIONS) -> int:
    """A function ID from one of `names` (any case) or an integer literal (0x..., decimal)."""
    name = text.strip()
    by_name = {n.upper(): fid for fid, n in names.items()}
    if name.upper() in by_name:
        return by_name[name.upper()]
    try:
        value = int(name, 0)
    except ValueError:
        raise ValueError(f"unknown function {text!r}: not a known name nor an integer") from None
    if not 0 <= value <= 0xFFFF_FFFF:
        raise ValueError(f"function ID {text!r} does not fit in 32 bits")
    return value


def uuid_to_regs(uuid_bytes: bytes) -> tuple[int, int, int, int]:
    """A UUID as SMCCC returns it in w0..w3: byte b[4r+0] in bits 7:0 of register r.

    This is smccc_uuid_to_reg() in Linux (include/linux/arm-smccc.h, KVM's vendor hypervisor
    service)."""
    if len(uuid_bytes) != 16:
        raise ValueError("a UUID is 16 bytes")
    return tuple(int.from_bytes(uuid_bytes[4 * r : 4 * r + 4], "little") for r in range(4))  # type: ignore[return-value]

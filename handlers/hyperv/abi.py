"""Hyper-V on arm64 as a Linux guest sees it: UID, HV_FUNC_ID, control word, status codes,
call codes, synthetic register names and the feature bits of the privilege registers.

Mirrors the Hyper-V TLFS as Linux uses it on arm64: detection and register conventions in
arch/arm64/hyperv/ (mshyperv.c, hv_core.c), HV_FUNC_ID in arch/arm64/include/asm/mshyperv.h, the
control word, status codes and synthetic registers in include/hyperv/hvgdk_mini.h. Values and
decoders only: no register file, no memory, no handler."""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from hyperbroker.smccc import uuid_to_regs

# VENDOR_HYP_CALL_UID answers Hyper-V's UUID; Linux compares it with
# UUID_INIT(0x58ba324d, 0x6447, 0x24cd, 0x75, 0x6c, 0xef, 0x8e, 0x24, 0x70, 0x59, 0x16).
VENDOR_HYP_CALL_UID = 0x8600_FF01
HYPERV_UID = uuid.UUID("58ba324d-6447-24cd-756c-ef8e24705916")

# ARM_SMCCC_CALL_VAL(STD_CALL, SMC_64, OWNER_VENDOR_HYP, 1).
HV_FUNC_ID = 0x4600_0001

# KVM's vendor-hyp discovery (include/linux/arm-smccc.h): hidden
# behind Hyper-V's UID.
KVM_FEATURES = 0x8600_0000

FUNCTION_NAMES: Mapping[int, str] = {
    VENDOR_HYP_CALL_UID: "VENDOR_HYP_CALL_UID",
    HV_FUNC_ID: "HV_FUNC_ID",
}


def hyperv_uid_regs() -> tuple[int, int, int, int]:
    """x0..x3 = 0x4d32ba58, 0xcd244764, 0x8eef6c75, 0x16597024."""
    return uuid_to_regs(HYPERV_UID.bytes)


class HvStatus(enum.IntEnum):
    """HV_STATUS_*, returned in bits 15:0 of x0."""

    SUCCESS = 0x0
    INVALID_HYPERCALL_CODE = 0x2
    INVALID_HYPERCALL_INPUT = 0x3
    INVALID_ALIGNMENT = 0x4
    INVALID_PARAMETER = 0x5
    ACCESS_DENIED = 0x6
    INVALID_PARTITION_STATE = 0x7
    OPERATION_DENIED = 0x8
    UNKNOWN_PROPERTY = 0x9
    PROPERTY_VALUE_OUT_OF_RANGE = 0xA
    INSUFFICIENT_MEMORY = 0xB
    INVALID_PARTITION_ID = 0xD
    INVALID_VP_INDEX = 0xE
    NOT_FOUND = 0x10
    INVALID_PORT_ID = 0x11
    INVALID_CONNECTION_ID = 0x12
    INSUFFICIENT_BUFFERS = 0x13
    NOT_ACKNOWLEDGED = 0x14
    INVALID_VP_STATE = 0x15
    NO_RESOURCES = 0x1D
    PROCESSOR_FEATURE_NOT_SUPPORTED = 0x20
    INVALID_LP_INDEX = 0x41
    INVALID_REGISTER_VALUE = 0x50
    OPERATION_FAILED = 0x71
    TIME_OUT = 0x78
    CALL_PENDING = 0x79
    VTL_ALREADY_ENABLED = 0x86


# Call codes (hvgdk_mini.h HVCALL_*).
HVCALL_GET_PARTITION_ID = 0x0046
HVCALL_GET_VP_REGISTERS = 0x0050
HVCALL_SET_VP_REGISTERS = 0x0051
HVCALL_POST_MESSAGE = 0x005C
HVCALL_SIGNAL_EVENT = 0x005D

CALL_NAMES: Mapping[int, str] = {
    HVCALL_GET_PARTITION_ID: "HvCallGetPartitionId",
    HVCALL_GET_VP_REGISTERS: "HvCallGetVpRegisters",
    HVCALL_SET_VP_REGISTERS: "HvCallSetVpRegisters",
    HVCALL_POST_MESSAGE: "HvCallPostMessage",
    HVCALL_SIGNAL_EVENT: "HvCallSignalEvent",
}

# HV_HYPERCALL_*.
CODE_MASK = 0xFFFF
FAST_BIT = 1 << 16
VARHEAD_SHIFT = 17
VARHEAD_MASK = 0x3FF << VARHEAD_SHIFT  # 26:17
RSVD0_MASK = 0x1F << 27  # 31:27, including HV_HYPERCALL_NESTED (bit 31): not on arm64
REP_COUNT_SHIFT = 32
REP_COUNT_MASK = 0xFFF << REP_COUNT_SHIFT  # 43:32
RSVD1_MASK = 0xF << 44  # 47:44
REP_START_SHIFT = 48
REP_START_MASK = 0xFFF << REP_START_SHIFT  # 59:48
RSVD2_MASK = 0xF << 60  # 63:60
RESERVED_MASK = RSVD0_MASK | RSVD1_MASK | RSVD2_MASK


@dataclass(frozen=True, slots=True)
class Control:
    """The hypercall input value in x1."""

    code: int
    fast: bool
    varhead_size: int  # in 8-byte units
    rep_count: int
    rep_start: int
    reserved: int  # the reserved bits as found; must be zero

    @classmethod
    def decode(cls, x1: int) -> Control:
        return cls(
            code=x1 & CODE_MASK,
            fast=bool(x1 & FAST_BIT),
            varhead_size=(x1 & VARHEAD_MASK) >> VARHEAD_SHIFT,
            rep_count=(x1 & REP_COUNT_MASK) >> REP_COUNT_SHIFT,
            rep_start=(x1 & REP_START_MASK) >> REP_START_SHIFT,
            reserved=x1 & RESERVED_MASK,
        )

    def encode(self) -> int:
        return (self.code | (FAST_BIT if self.fast else 0) | self.varhead_size << VARHEAD_SHIFT
                | self.rep_count << REP_COUNT_SHIFT | self.rep_start << REP_START_SHIFT
                | self.reserved)


def result_value(status: HvStatus, reps_completed: int = 0) -> int:
    """The hypercall output value in x0: Result 15:0, Reps completed 43:32 (the total, counted
    from the start of the list, not from the rep start index)."""
    return int(status) | (reps_completed & 0xFFF) << REP_COUNT_SHIFT


HV_PARTITION_ID_SELF = (1 << 64) - 1  # ((u64)-1)
HV_PARTITION_ID_INVALID = 0
HV_VP_INDEX_SELF = 0xFFFF_FFFE  # ((u32)-2)
HV_PAGE_SIZE = 4096  # HV_HYP_PAGE_SIZE: hypercall input and output never cross one
HV_MESSAGE_PAYLOAD_BYTE_COUNT = 240
HV_EVENT_FLAGS_COUNT = 256 * 8  # flags per SINT in the SIEF page (Linux hyperv_vmbus.h)

# Synthetic register names (hvgdk_mini.h enum hv_register_name).
HV_REGISTER_HYPERVISOR_VERSION = 0x0000_0100
HV_REGISTER_PRIVILEGES_AND_FEATURES_INFO = 0x0000_0200
HV_REGISTER_FEATURES_INFO = 0x0000_0201
HV_REGISTER_GUEST_CRASH_P0 = 0x0000_0210
HV_REGISTER_GUEST_CRASH_P4 = 0x0000_0214
HV_REGISTER_GUEST_CRASH_CTL = 0x0000_0215
HV_REGISTER_GUEST_OS_ID = 0x0009_0002
HV_REGISTER_VP_INDEX = 0x0009_0003
HV_REGISTER_TIME_REF_COUNT = 0x0009_0004
HV_REGISTER_REFERENCE_TSC = 0x0009_0017
HV_REGISTER_SINT0 = 0x000A_0000
HV_REGISTER_SINT15 = 0x000A_000F
HV_REGISTER_SCONTROL = 0x000A_0010
HV_REGISTER_SVERSION = 0x000A_0011
HV_REGISTER_SIEFP = 0x000A_0012
HV_REGISTER_SIMP = 0x000A_0013
HV_REGISTER_EOM = 0x000A_0014
HV_REGISTER_VSM_VP_STATUS = 0x000D_0003

# HV_PARTITION_PRIVILEGE_MASK bits 31:0 (the "features" Linux reads, = CPUID 0x40000003 EAX).
HV_MSR_VP_RUNTIME_AVAILABLE = 1 << 0
HV_MSR_TIME_REF_COUNT_AVAILABLE = 1 << 1
HV_MSR_SYNIC_AVAILABLE = 1 << 2
HV_MSR_SYNTIMER_AVAILABLE = 1 << 3
HV_MSR_HYPERCALL_AVAILABLE = 1 << 5
HV_MSR_VP_INDEX_AVAILABLE = 1 << 6
HV_MSR_REFERENCE_TSC_AVAILABLE = 1 << 9
# HV_PARTITION_PRIVILEGE_MASK bits 63:32 (= EBX), shifted into place.
HV_ACCESS_PARTITION_ID = 1 << (32 + 1)
HV_POST_MESSAGES = 1 << (32 + 4)
HV_SIGNAL_EVENTS = 1 << (32 + 5)
# Misc features, bits 95:64 of PRIVILEGES_AND_FEATURES_INFO on arm64, as a 32-bit word.
HV_FEATURE_GUEST_CRASH_MSR_AVAILABLE = 1 << 8  # arm64 value (hvgdk_mini.h CONFIG_ARM64)
# FEATURES_INFO bit 0, UseHvRegisterForReset, is always false on arm64.
HV_HINT_USE_HV_REGISTER_FOR_RESET = 1 << 0

# HV_CRASH_CTL_REG_CONTENTS.
HV_CRASH_CTL_CRASH_NOTIFY_MSG = 1 << 62
HV_CRASH_CTL_CRASH_NOTIFY = 1 << 63

HV_SYNIC_VERSION_1 = 0x1
HV_SYNIC_SINT_MASKED = 1 << 16

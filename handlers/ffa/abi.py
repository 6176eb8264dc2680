"""FF-A vocabulary: function IDs, versions, error codes, and the typed answers folded to registers.

Everything here mirrors Arm DEN0077A (FF-A v1.0/v1.1/v1.2) as Linux (include/linux/arm_ffa.h),
Hafnium (inc/vmapi/hf/ffa.h), TF-A (include/services/ffa_svc.h) and Xen (xen/arch/arm/tee/ffa*)
encode it. It is pure data and pure functions: it knows nothing of handler state, guest memory,
partitions or the broker.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from hyperbroker.smccc import U64_MASK, FunctionRange

W_MASK = 0xFFFF_FFFF  # wN is the low 32 bits of xN (Arm DEN0028, SMC32 calls)

# Function IDs (include/linux/arm_ffa.h FFA_SMC_32/FFA_SMC_64): SMC32 = 0x84000000 | fn,
# SMC64 = 0xC4000000 | fn.
# FF-A is the fast functions 0x60..0xFF of the standard secure service, SMC32 and SMC64: what
# pKVM treats as FF-A (Linux arch/arm64/kvm/hyp/include/nvhe/ffa.h FFA_MIN_FUNC_NUM 0x60,
# FFA_MAX_FUNC_NUM 0xFF; 0x7F in older kernels). DEN0077A allocates 0x60..0x90 so far. The ABI
# is this range, whole.
RANGES = (FunctionRange(0x8400_0060, 0xA0), FunctionRange(0xC400_0060, 0xA0))
FFA_ERROR = 0x8400_0060
FFA_SUCCESS_32 = 0x8400_0061
FFA_SUCCESS_64 = 0xC400_0061
FFA_INTERRUPT = 0x8400_0062
FFA_VERSION = 0x8400_0063
FFA_FEATURES = 0x8400_0064
FFA_RX_RELEASE = 0x8400_0065
FFA_RXTX_MAP_32 = 0x8400_0066
FFA_RXTX_MAP_64 = 0xC400_0066
FFA_RXTX_UNMAP = 0x8400_0067
FFA_PARTITION_INFO_GET = 0x8400_0068
FFA_ID_GET = 0x8400_0069
FFA_MSG_POLL = 0x8400_006A
FFA_MSG_WAIT = 0x8400_006B
FFA_YIELD = 0x8400_006C
FFA_RUN = 0x8400_006D
FFA_MSG_SEND = 0x8400_006E
FFA_MSG_SEND_DIRECT_REQ_32 = 0x8400_006F
FFA_MSG_SEND_DIRECT_REQ_64 = 0xC400_006F
FFA_MSG_SEND_DIRECT_RESP_32 = 0x8400_0070
FFA_MSG_SEND_DIRECT_RESP_64 = 0xC400_0070
FFA_MEM_DONATE_32 = 0x8400_0071
FFA_MEM_DONATE_64 = 0xC400_0071
FFA_MEM_LEND_32 = 0x8400_0072
FFA_MEM_LEND_64 = 0xC400_0072
FFA_MEM_SHARE_32 = 0x8400_0073
FFA_MEM_SHARE_64 = 0xC400_0073
FFA_MEM_RETRIEVE_REQ_32 = 0x8400_0074
FFA_MEM_RETRIEVE_REQ_64 = 0xC400_0074
FFA_MEM_RETRIEVE_RESP = 0x8400_0075
FFA_MEM_RELINQUISH = 0x8400_0076
FFA_MEM_RECLAIM = 0x8400_0077
FFA_MEM_OP_PAUSE = 0x8400_0078
FFA_MEM_OP_RESUME = 0x8400_0079
FFA_MEM_FRAG_RX = 0x8400_007A
FFA_MEM_FRAG_TX = 0x8400_007B
FFA_NORMAL_WORLD_RESUME = 0x8400_007C
FFA_NOTIFICATION_BITMAP_CREATE = 0x8400_007D
FFA_NOTIFICATION_BITMAP_DESTROY = 0x8400_007E
FFA_NOTIFICATION_BIND = 0x8400_007F
FFA_NOTIFICATION_UNBIND = 0x8400_0080
FFA_NOTIFICATION_SET = 0x8400_0081
FFA_NOTIFICATION_GET = 0x8400_0082
FFA_NOTIFICATION_INFO_GET_32 = 0x8400_0083
FFA_NOTIFICATION_INFO_GET_64 = 0xC400_0083
FFA_RX_ACQUIRE = 0x8400_0084
FFA_SPM_ID_GET = 0x8400_0085
FFA_MSG_SEND2 = 0x8400_0086
FFA_SECONDARY_EP_REGISTER_32 = 0x8400_0087
FFA_SECONDARY_EP_REGISTER_64 = 0xC400_0087
FFA_MEM_PERM_GET_32 = 0x8400_0088
FFA_MEM_PERM_GET_64 = 0xC400_0088
FFA_MEM_PERM_SET_32 = 0x8400_0089
FFA_MEM_PERM_SET_64 = 0xC400_0089
FFA_CONSOLE_LOG_32 = 0x8400_008A
FFA_CONSOLE_LOG_64 = 0xC400_008A
FFA_PARTITION_INFO_GET_REGS = 0xC400_008B  # SMC64 only
FFA_EL3_INTR_HANDLE = 0x8400_008C
FFA_MSG_SEND_DIRECT_REQ2 = 0xC400_008D  # SMC64 only
FFA_MSG_SEND_DIRECT_RESP2 = 0xC400_008E  # SMC64 only

# A bounded set of names (metrics labels, the CLI): every ID above, as Linux, TF-A and Hafnium
# name them.
FUNCTION_NAMES: Mapping[int, str] = {
    value: name
    for name, value in sorted(globals().items())
    if name.startswith("FFA_") and isinstance(value, int) and value > 0xFFFF
}
OTHER_FUNCTION = "FFA_OTHER"  # an ID in the FF-A ranges that none of the above names


def function_name(fid: int) -> str:
    return FUNCTION_NAMES.get(fid, OTHER_FUNCTION)


# Version encoding (DEN0077A §13.2 FFA_VERSION; Linux FFA_MAJOR_VERSION_MASK, Hafnium
# FFA_VERSION_MBZ_BIT): major bits[30:16], minor bits[15:0], bit 31 must be zero.
VERSION_MBZ = 1 << 31
VERSION_MAJOR_SHIFT = 16
VERSION_MAJOR_MASK = 0x7FFF
VERSION_MINOR_MASK = 0xFFFF
VERSION_1_0 = 0x1_0000
VERSION_1_1 = 0x1_0001
VERSION_1_2 = 0x1_0002
OUR_VERSION = VERSION_1_2  # the callee's own highest version, what FFA_VERSION returns


def make_version(major: int, minor: int) -> int:
    return (major << VERSION_MAJOR_SHIFT) | minor


def version_major(version: int) -> int:
    return (version >> VERSION_MAJOR_SHIFT) & VERSION_MAJOR_MASK


def version_minor(version: int) -> int:
    return version & VERSION_MINOR_MASK



class FfaError(enum.IntEnum):
    """Error codes, carried in w2 of FFA_ERROR (Linux FFA_RET_*; Hafnium adds NOT_READY)."""

    NOT_SUPPORTED = -1
    INVALID_PARAMETERS = -2
    NO_MEMORY = -3
    BUSY = -4
    INTERRUPTED = -5
    DENIED = -6
    RETRY = -7
    ABORTED = -8
    NO_DATA = -9
    NOT_READY = -10


class FeatureId(enum.IntEnum):
    """FFA_FEATURES feature IDs (DEN0077A v1.2 §13.3; w1 bit 31 clear, ID in bits[7:0])."""

    NPI = 1  # notification pending interrupt
    SRI = 2  # schedule receiver interrupt
    MEI = 3  # managed exit interrupt


# Bit 15 set marks a secure endpoint (SP), a convention DEN0077A suggests (v1.2 §6.1; Xen
# FFA_ID_IS_SECURE); 0 is the hypervisor; 0xFFFF is TF-A's SPMD (SPMD_DIRECT_MSG_ENDPOINT_ID).
ENDPOINT_SECURE_BIT = 0x8000
ENDPOINT_ID_MASK = 0xFFFF
HYPERVISOR_ID = 0
SPMD_ID = 0xFFFF
DEFAULT_SPMC_ID = 0x8000  # Hafnium's and TF-A's usual SPMC ID


def is_secure(endpoint_id: int) -> bool:
    return bool(endpoint_id & ENDPOINT_SECURE_BIT)


def pack_target(source: int, destination: int) -> int:
    """w1 of direct messages: source in bits[31:16], destination in [15:0] (Linux
    PACK_TARGET_INFO)."""
    return ((source & ENDPOINT_ID_MASK) << 16) | (destination & ENDPOINT_ID_MASK)


def unpack_target(w1: int) -> tuple[int, int]:
    return (w1 >> 16) & ENDPOINT_ID_MASK, w1 & ENDPOINT_ID_MASK


# Memory handles (DEN0077A v1.1 §10.9.2): bit 63 says who allocated it (1 = hypervisor,
# 0 = SPMC; Xen FFA_HANDLE_HYP_FLAG, Hafnium FFA_MEMORY_HANDLE_ALLOCATOR_BIT).
HANDLE_HYPERVISOR_BIT = 1 << 63
INVALID_HANDLE = U64_MASK


def join_handle(low: int, high: int) -> int:
    """The handle from w1/w2 (RECLAIM, FRAG_TX) or w2/w3 (SUCCESS): Linux PACK_HANDLE."""
    return ((high & W_MASK) << 32) | (low & W_MASK)


def split_handle(handle: int) -> tuple[int, int]:
    return handle & W_MASK, (handle >> 32) & W_MASK


# Partition property bits (DEN0077A v1.2 Table 6.2; Hafnium FFA_PARTITION_*).
PROP_DIRECT_REQ_RECV = 1 << 0
PROP_DIRECT_REQ_SEND = 1 << 1
PROP_INDIRECT_MSG = 1 << 2
PROP_NOTIFICATIONS = 1 << 3
PROP_VM_CREATED = 1 << 6
PROP_VM_DESTROYED = 1 << 7
PROP_AARCH64 = 1 << 8
PROP_DIRECT_REQ2_RECV = 1 << 9  # v1.2
PROP_DIRECT_REQ2_SEND = 1 << 10  # v1.2
PROPS_V1_2_ONLY = PROP_DIRECT_REQ2_RECV | PROP_DIRECT_REQ2_SEND

# w2 bit 31 of a direct message marks a framework message (Linux FFA_MSG_FLAG_FRAMEWORK).
DIRECT_MSG_FRAMEWORK = 1 << 31

# FFA_PARTITION_INFO_GET flags (w5); bit 0 "return count only" exists from v1.1 (DEN0077A v1.1
# Table 13.34; Hafnium FFA_PARTITION_COUNT_FLAG).
PARTITION_INFO_COUNT_ONLY = 1 << 0

# Result widths: FF-A results live in w0..w7; SMCCC 1.2 calls (v1.2) may use x0..x17 (Linux
# struct arm_smccc_1_2_regs; Xen zeroes x8..x17 for v1.2 guests).
NARROW_WIDTH = 8
WIDE_WIDTH = 18


@dataclass(frozen=True, slots=True)
class Success:
    """FFA_SUCCESS (or its SMC64 form) with x1.. as given; unset registers are zero."""

    args: tuple[int, ...] = ()
    smc64: bool = False

    def registers(self) -> tuple[int, ...]:
        return (FFA_SUCCESS_64 if self.smc64 else FFA_SUCCESS_32, *self.args)


@dataclass(frozen=True, slots=True)
class Failure:
    """FFA_ERROR: w1 = 0, w2 = the code zero-extended from 32 bits, as Hafnium and Xen write it."""

    code: FfaError

    def registers(self) -> tuple[int, ...]:
        return (FFA_ERROR, 0, int(self.code) & W_MASK)


@dataclass(frozen=True, slots=True)
class VersionAnswer:
    """FFA_VERSION's answer: the version itself in w0 (never FFA_SUCCESS), or NOT_SUPPORTED."""

    version: int | None  # None: NOT_SUPPORTED, -1 in x0 as SMCCC spells it

    def registers(self) -> tuple[int, ...]:
        if self.version is None:
            return (int(FfaError.NOT_SUPPORTED) & U64_MASK,)
        return (self.version,)


@dataclass(frozen=True, slots=True)
class FragRx:
    """FFA_MEM_FRAG_RX: w1/w2 = handle, w3 = bytes received so far, w4 = 0 (Hafnium, pKVM)."""

    handle: int
    received: int

    def registers(self) -> tuple[int, ...]:
        low, high = split_handle(self.handle)
        return (FFA_MEM_FRAG_RX, low, high, self.received, 0)


@dataclass(frozen=True, slots=True)
class DirectResponse:
    """FFA_MSG_SEND_DIRECT_RESP(_64/2): w1 = responder << 16 | requester, then the payload."""

    fid: int
    responder: int
    requester: int
    payload: tuple[int, ...]  # x3..x7 (RESP) or x4..x17 (RESP2)

    def registers(self) -> tuple[int, ...]:
        target = pack_target(self.responder, self.requester)
        if self.fid == FFA_MSG_SEND_DIRECT_RESP2:
            return (self.fid, target, 0, 0, *self.payload)  # x2/x3 MBZ in RESP2
        return (self.fid, target, 0, *self.payload)


Answer = Success | Failure | VersionAnswer | FragRx | DirectResponse

"""The OP-TEE SMC ABI: function IDs, return codes, capabilities, and the fast calls as values.

Everything here mirrors OP-TEE's optee_smc.h and core/arch/arm/tee/entry_fast.c as
core/arch/arm/include/sm/optee_smc.h lists them. The fast calls that depend only on their registers
and the proxy's configuration are answered by `fast_call`; the yielding calls that carry a message
(CALL_WITH_ARG and friends) are handled by handlers.optee.std. No I/O, no guest memory.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from hyperbroker.smccc import FunctionRange

U32 = 0xFFFF_FFFF

# OP-TEE's SMC ABI (optee_os core/arch/arm/include/sm/optee_smc.h): the Trusted OS owner 50,
# fast and yielding SMC32 calls, plus the owner-63 Trusted OS API calls (CALLS_COUNT, CALLS_UID,
# CALLS_REVISION at 0xFF00..0xFF03 as DEN0028 §6.2 places them). The ABI is these, whole.
RANGES = (
    FunctionRange(0x3200_0000, 0x1_0000),
    FunctionRange(0xB200_0000, 0x1_0000),
    FunctionRange(0xBF00_0000, 0x1_0000),
)

# Function IDs: OPTEE_SMC_CALL_VAL(type, SMC32, owner, fn).
CALLS_COUNT = 0xBF00_FF00
CALLS_UID = 0xBF00_FF01
CALLS_REVISION = 0xBF00_FF03
GET_OS_UUID = 0xB200_0000
GET_OS_REVISION = 0xB200_0001
RETURN_FROM_RPC = 0x3200_0003
CALL_WITH_ARG = 0x3200_0004
GET_SHM_CONFIG = 0xB200_0007
L2CC_MUTEX = 0xB200_0008
EXCHANGE_CAPABILITIES = 0xB200_0009
DISABLE_SHM_CACHE = 0xB200_000A
ENABLE_SHM_CACHE = 0xB200_000B
BOOT_SECONDARY = 0xB200_000C
VM_CREATED = 0xB200_000D
VM_DESTROYED = 0xB200_000E
GET_THREAD_COUNT = 0xB200_000F
ENABLE_ASYNC_NOTIF = 0xB200_0010
GET_ASYNC_NOTIF_VALUE = 0xB200_0011
CALL_WITH_RPC_ARG = 0x3200_0012
CALL_WITH_REGD_ARG = 0x3200_0013
GET_PROTMEM_CONFIG = 0xB200_0014

FUNCTION_NAMES: Mapping[int, str] = {
    CALLS_COUNT: "OPTEE_CALLS_COUNT",
    CALLS_UID: "OPTEE_CALLS_UID",
    CALLS_REVISION: "OPTEE_CALLS_REVISION",
    GET_OS_UUID: "OPTEE_GET_OS_UUID",
    GET_OS_REVISION: "OPTEE_GET_OS_REVISION",
    RETURN_FROM_RPC: "OPTEE_RETURN_FROM_RPC",
    CALL_WITH_ARG: "OPTEE_CALL_WITH_ARG",
    GET_SHM_CONFIG: "OPTEE_GET_SHM_CONFIG",
    L2CC_MUTEX: "OPTEE_L2CC_MUTEX",
    EXCHANGE_CAPABILITIES: "OPTEE_EXCHANGE_CAPABILITIES",
    DISABLE_SHM_CACHE: "OPTEE_DISABLE_SHM_CACHE",
    ENABLE_SHM_CACHE: "OPTEE_ENABLE_SHM_CACHE",
    BOOT_SECONDARY: "OPTEE_BOOT_SECONDARY",
    VM_CREATED: "OPTEE_VM_CREATED",
    VM_DESTROYED: "OPTEE_VM_DESTROYED",
    GET_THREAD_COUNT: "OPTEE_GET_THREAD_COUNT",
    ENABLE_ASYNC_NOTIF: "OPTEE_ENABLE_ASYNC_NOTIF",
    GET_ASYNC_NOTIF_VALUE: "OPTEE_GET_ASYNC_NOTIF_VALUE",
    CALL_WITH_RPC_ARG: "OPTEE_CALL_WITH_RPC_ARG",
    CALL_WITH_REGD_ARG: "OPTEE_CALL_WITH_REGD_ARG",
    GET_PROTMEM_CONFIG: "OPTEE_GET_PROTMEM_CONFIG",
}

# The yielding calls that start or resume a message (thread_optee_smc.c std_smc_entry); any other
# yielding ID is EBADCMD there.
STD_CALLS = frozenset({RETURN_FROM_RPC, CALL_WITH_ARG, CALL_WITH_RPC_ARG, CALL_WITH_REGD_ARG})


class SmcReturn(enum.IntEnum):
    """OPTEE_SMC_RETURN_* in a0. Unsigned 32-bit: never sign-extended."""

    OK = 0x0
    ETHREAD_LIMIT = 0x1
    EBUSY = 0x2
    ERESUME = 0x3
    EBADADDR = 0x4
    EBADCMD = 0x5
    ENOMEM = 0x6
    ENOTAVAIL = 0x7
    UNKNOWN_FUNCTION = 0xFFFF_FFFF


# RPC returns are 0xFFFF0000 | func; the normal world resumes with RETURN_FROM_RPC.
RPC_PREFIX = 0xFFFF_0000
RPC_FUNC_ALLOC = 0
RPC_FUNC_FREE = 2
RPC_FUNC_FOREIGN_INTR = 4
RPC_FUNC_CMD = 5
RPC_FOREIGN_INTR = RPC_PREFIX | RPC_FUNC_FOREIGN_INTR


def is_rpc(a0: int) -> bool:
    """OPTEE_SMC_RETURN_IS_RPC."""
    a0 &= U32
    return a0 != SmcReturn.UNKNOWN_FUNCTION and a0 & 0xFFFF_0000 == RPC_PREFIX


# OPTEE_MSG_UID_0..3, OPTEE_MSG_OS_OPTEE_UUID_0..3, OPTEE_MSG_REVISION_MAJOR/MINOR.
MSG_UID = (0x384F_B3E0, 0xE7F8_11E3, 0xAF63_0002, 0xA5D5_C51B)
OS_UUID = (0x4861_78E0, 0xE7F8_11E3, 0xBC5E_0002, 0xA5D5_C51B)
MSG_REVISION = (2, 0)

# Capabilities.
NSEC_CAP_UNIPROCESSOR = 1 << 0
SEC_CAP_HAVE_RESERVED_SHM = 1 << 0
SEC_CAP_UNREGISTERED_SHM = 1 << 1
SEC_CAP_DYNAMIC_SHM = 1 << 2
SEC_CAP_VIRTUALIZATION = 1 << 3
SEC_CAP_MEMREF_NULL = 1 << 4
SEC_CAP_ASYNC_NOTIF = 1 << 5
SEC_CAP_RPC_ARG = 1 << 6
SEC_CAP_RPMB_PROBE = 1 << 7
SEC_CAP_PROTMEM = 1 << 8
SEC_CAP_DYNAMIC_PROTMEM = 1 << 9

# What a guest of the proxy gets: dynamic shared memory and NULL memrefs. No reserved carve-out
# (guests have none to share), no RPC_ARG (so Linux keeps one message per page and calls
# ENABLE_SHM_CACHE, the probe order the lab recorded), no async notification (no interrupt to
# deliver it). Xen's mediator hides the same bits.
GUEST_SEC_CAPS = SEC_CAP_DYNAMIC_SHM | SEC_CAP_MEMREF_NULL

# OP-TEE core/arch/arm/include/kernel/thread_private_arch.h THREAD_RPC_MAX_NUM_PARAMS: the size
# of the RPC argument that follows the message with CALL_WITH_RPC_ARG / CALL_WITH_REGD_ARG.
THREAD_RPC_MAX_NUM_PARAMS = 4


@dataclass(frozen=True, slots=True)
class FastConfig:
    """What the fast calls report, from the handler's configuration."""

    thread_count: int
    os_revision: tuple[int, int]


@dataclass(frozen=True, slots=True)
class Answer:
    """Registers a0.. of an answer; `error` when a0 is an ABI error rather than a result."""

    regs: tuple[int, ...]
    error: bool = False


UNKNOWN = Answer((SmcReturn.UNKNOWN_FUNCTION,), error=True)


def calls_count() -> int:
    """OPTEE_SMC_CALLS_COUNT: the functions this proxy answers with something other than
    UNKNOWN_FUNCTION (OP-TEE counts its generic calls the same way, entry_fast.c)."""
    return len(IMPLEMENTED)


def exchange_capabilities(nsec_caps: int) -> Answer:
    """OPTEE_SMC_EXCHANGE_CAPABILITIES, entry_fast.c tee_entry_exchange_capabilities: an unknown
    normal-world bit is
    ENOTAVAIL; otherwise OK, a1 = secure caps, a2 = max notification value, a3 = RPC params."""
    if nsec_caps & U32 & ~NSEC_CAP_UNIPROCESSOR:
        return Answer((SmcReturn.ENOTAVAIL,), error=True)
    return Answer((SmcReturn.OK, GUEST_SEC_CAPS, 0, 0))


def fast_call(fid: int, x1: int, config: FastConfig) -> Answer | None:
    """The answer to a fast call that needs neither state nor guest memory; None otherwise."""
    if fid == CALLS_COUNT:
        return Answer((calls_count(),))
    if fid == CALLS_UID:
        return Answer(MSG_UID)
    if fid == CALLS_REVISION:
        return Answer(MSG_REVISION)
    if fid == GET_OS_UUID:
        return Answer(OS_UUID)
    if fid == GET_OS_REVISION:
        major, minor = config.os_revision
        return Answer((major, minor, 0))  # a2: build id, 0 = none
    if fid == GET_THREAD_COUNT:
        return Answer((SmcReturn.OK, config.thread_count))
    if fid == EXCHANGE_CAPABILITIES:
        return exchange_capabilities(x1)
    if fid == GET_SHM_CONFIG:
        # No static shared memory for guests (Xen's mediator answers the same).
        return Answer((SmcReturn.ENOTAVAIL,), error=True)
    if fid == BOOT_SECONDARY:
        # OP-TEE without CFG_BOOT_SECONDARY_REQUEST (entry_fast.c tee_entry_boot_secondary).
        return Answer((SmcReturn.ENOTAVAIL,), error=True)
    return None


def shm_cache(fid: int, busy: bool) -> Answer:
    """DISABLE_SHM_CACHE / ENABLE_SHM_CACHE (entry_fast.c). The proxy caches no shared
    memory, so DISABLE always ends with ENOTAVAIL ("cache empty") and ENABLE with OK; both are
    EBUSY while one of the VM's messages is running, as OP-TEE answers when a thread is not free.
    The Linux driver loops until it gets exactly these (measured with a real Linux guest on the
    KVM bed)."""
    if busy:
        return Answer((SmcReturn.EBUSY,))
    if fid == DISABLE_SHM_CACHE:
        return Answer((SmcReturn.ENOTAVAIL,))
    return Answer((SmcReturn.OK,))


def reg_pair(high: int, low: int) -> int:
    """reg_pair_to_64: two 32-bit registers (SMC32 calls use the low halves) as one value."""
    return (high & U32) << 32 | (low & U32)


# The IDs answered with something other than UNKNOWN_FUNCTION.
IMPLEMENTED = frozenset({
    CALLS_COUNT, CALLS_UID, CALLS_REVISION, GET_OS_UUID, GET_OS_REVISION, GET_THREAD_COUNT,
    EXCHANGE_CAPABILITIES, GET_SHM_CONFIG, BOOT_SECONDARY, DISABLE_SHM_CACHE, ENABLE_SHM_CACHE,
    RETURN_FROM_RPC, CALL_WITH_ARG, CALL_WITH_RPC_ARG, CALL_WITH_REGD_ARG,
})

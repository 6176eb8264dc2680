"""struct optee_msg_arg and struct optee_msg_param: layout, parsing, and the fields written back.

Layout and constants from OP-TEE core/include/optee_msg.h (core/include/optee_msg.h). Parsing takes
bytes read from guest memory and never fails with an exception: a header is always 32 bytes and
every 32-byte parameter is some attribute plus three 64-bit words; what the words mean is decided
by handlers.optee.std. Write-back produces `Patch`es (offset within the message, bytes) for only
the fields OP-TEE itself updates (entry_std.c): ret, ret_origin, session, and per parameter the
value a/b or the memref size.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

HEADER_SIZE = 32
PARAM_SIZE = 32
MAX_NUM_PARAMS = (4096 - HEADER_SIZE) // PARAM_SIZE  # OPTEE_MSG_MAX_NUM_PARAMS = 127


def arg_size(num_params: int) -> int:
    """OPTEE_MSG_GET_ARG_SIZE."""
    return HEADER_SIZE + PARAM_SIZE * num_params


# Field offsets in the header.
OFF_CMD = 0
OFF_FUNC = 4
OFF_SESSION = 8
OFF_CANCEL_ID = 12
OFF_RET = 20
OFF_RET_ORIGIN = 24
OFF_NUM_PARAMS = 28
# Field offsets in a parameter: attr, then the union's three words (tmem buf_ptr/size/shm_ref,
# rmem offs/size/shm_ref, value a/b/c).
OFF_ATTR = 0
OFF_WORD_A = 8
OFF_WORD_B = 16
OFF_WORD_C = 24

# Attribute types (attr bits 7:0) and flags.
ATTR_TYPE_NONE = 0x0
ATTR_TYPE_VALUE_INPUT = 0x1
ATTR_TYPE_VALUE_OUTPUT = 0x2
ATTR_TYPE_VALUE_INOUT = 0x3
ATTR_TYPE_RMEM_INPUT = 0x5
ATTR_TYPE_RMEM_OUTPUT = 0x6
ATTR_TYPE_RMEM_INOUT = 0x7
ATTR_TYPE_TMEM_INPUT = 0x9
ATTR_TYPE_TMEM_OUTPUT = 0xA
ATTR_TYPE_TMEM_INOUT = 0xB
ATTR_TYPE_MASK = 0xFF
ATTR_META = 1 << 8
ATTR_NONCONTIG = 1 << 9
ATTR_CACHE_SHIFT = 16
ATTR_CACHE_MASK = 0x7
ATTR_CACHE_PREDEFINED = 0

VALUE_TYPES = frozenset({ATTR_TYPE_VALUE_INPUT, ATTR_TYPE_VALUE_OUTPUT, ATTR_TYPE_VALUE_INOUT})
RMEM_TYPES = frozenset({ATTR_TYPE_RMEM_INPUT, ATTR_TYPE_RMEM_OUTPUT, ATTR_TYPE_RMEM_INOUT})
TMEM_TYPES = frozenset({ATTR_TYPE_TMEM_INPUT, ATTR_TYPE_TMEM_OUTPUT, ATTR_TYPE_TMEM_INOUT})

# Non-contiguous buffers: 4 KiB page lists of 511 entries and a next-page pointer.
NONCONTIG_PAGE_SIZE = 4096
PAGE_MASK = NONCONTIG_PAGE_SIZE - 1
PAGELIST_ENTRIES_PER_PAGE = NONCONTIG_PAGE_SIZE // 8 - 1

# Commands.
CMD_OPEN_SESSION = 0
CMD_INVOKE_COMMAND = 1
CMD_CLOSE_SESSION = 2
CMD_CANCEL = 3
CMD_REGISTER_SHM = 4
CMD_UNREGISTER_SHM = 5
CMD_DO_BOTTOM_HALF = 6
CMD_STOP_ASYNC_NOTIF = 7

COMMAND_NAMES = {
    CMD_OPEN_SESSION: "open_session",
    CMD_INVOKE_COMMAND: "invoke_command",
    CMD_CLOSE_SESSION: "close_session",
    CMD_CANCEL: "cancel",
    CMD_REGISTER_SHM: "register_shm",
    CMD_UNREGISTER_SHM: "unregister_shm",
}

_HEADER = struct.Struct("<8I")
_PARAM = struct.Struct("<4Q")


@dataclass(frozen=True, slots=True)
class MsgHeader:
    cmd: int
    func: int
    session: int
    cancel_id: int
    pad: int
    ret: int
    ret_origin: int
    num_params: int

    @classmethod
    def parse(cls, raw: bytes) -> MsgHeader:
        """The first 32 bytes of `raw` (which must hold at least that many)."""
        return cls(*_HEADER.unpack_from(raw, 0))

    def pack(self) -> bytes:
        return _HEADER.pack(self.cmd, self.func, self.session, self.cancel_id, self.pad,
                            self.ret, self.ret_origin, self.num_params)


@dataclass(frozen=True, slots=True)
class MsgParam:
    """One parameter: the 64-bit attribute and the union as three 64-bit words."""

    attr: int
    a: int = 0
    b: int = 0
    c: int = 0

    @property
    def type(self) -> int:
        return self.attr & ATTR_TYPE_MASK

    @classmethod
    def parse(cls, raw: bytes, offset: int = 0) -> MsgParam:
        return cls(*_PARAM.unpack_from(raw, offset))

    def pack(self) -> bytes:
        return _PARAM.pack(self.attr, self.a, self.b, self.c)


def parse_params(raw: bytes, num_params: int) -> tuple[MsgParam, ...]:
    """`num_params` parameters from `raw`, which starts at the first parameter."""
    return tuple(MsgParam.parse(raw, PARAM_SIZE * i) for i in range(num_params))


@dataclass(frozen=True, slots=True)
class Patch:
    """Bytes to store at `offset` bytes into the message."""

    offset: int
    data: bytes


def patch_result(ret: int, origin: int | None) -> Patch:
    """ret, and ret_origin unless None (OP-TEE's register_shm leaves ret_origin alone)."""
    if origin is None:
        return Patch(OFF_RET, struct.pack("<I", ret & 0xFFFF_FFFF))
    return Patch(OFF_RET, struct.pack("<II", ret & 0xFFFF_FFFF, origin & 0xFFFF_FFFF))


def patch_session(session: int) -> Patch:
    return Patch(OFF_SESSION, struct.pack("<I", session & 0xFFFF_FFFF))


def patch_value(index: int, a: int, b: int) -> Patch:
    """value.a and value.b of parameter `index` (copy_out_param writes these two, not c)."""
    return Patch(HEADER_SIZE + PARAM_SIZE * index + OFF_WORD_A,
                 struct.pack("<QQ", a & 0xFFFF_FFFF_FFFF_FFFF, b & 0xFFFF_FFFF_FFFF_FFFF))


def patch_size(index: int, size: int) -> Patch:
    """tmem.size / rmem.size of parameter `index`."""
    return Patch(HEADER_SIZE + PARAM_SIZE * index + OFF_WORD_B,
                 struct.pack("<Q", size & 0xFFFF_FFFF_FFFF_FFFF))


def build_arg(header: MsgHeader, params: tuple[MsgParam, ...] = ()) -> bytes:
    """A whole message, as a guest driver lays it out (tests, the guest-side client)."""
    return header.pack() + b"".join(p.pack() for p in params)

"""Yielding calls: an OP-TEE message from guest memory to the TEE backend and back.

Three steps, each a plain function:

1. `locate_*` finds the message (CALL_WITH_ARG / CALL_WITH_RPC_ARG: a page-aligned guest address;
   CALL_WITH_REGD_ARG: a registered buffer and an offset) and reads it, or gives the SMC error
   OP-TEE gives (thread_optee_smc.c std_entry_with_parg / std_entry_with_regd_arg).
2. `decode` checks the message as OP-TEE's entry_std.c does, in the same order, copying the
   guest's input buffers in. It yields either a `Completion` at once (errors, REGISTER_SHM ...),
   an SMC error (unknown command: EBADCMD), or `Work` for the backend.
3. handlers.optee.completion runs the work against the backend and applies the `Completion`
   to the VM's state.

Every guest-supplied count, length, offset, page list and cookie is checked before use, and
nothing here raises for guest input. Only `decode` and `locate_*` read guest memory (through the
GuestMemory they are given); nothing here writes it.
"""

from __future__ import annotations

import asyncio
import struct
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from hyperbroker.handlers.api import GuestMemory, GuestMemoryError
from hyperbroker.handlers.optee import msg
from hyperbroker.handlers.optee.abi import THREAD_RPC_MAX_NUM_PARAMS, SmcReturn
from hyperbroker.handlers.optee.backend import (
    TeeParam,
)
from hyperbroker.handlers.optee.shm import (
    PageListError,
    Run,
    SharedBuffer,
    read_page_list,
    read_runs,
    split_runs,
)
from hyperbroker.handlers.optee.state import SessionRecord, VmTeeState
from hyperbroker.tee.gp import (
    ANONYMOUS_LOGINS,
    NORMAL_WORLD_LOGINS,
    NUM_PARAMS,
    Origin,
    ParamType,
    TeeResult,
)

T = TypeVar("T")
U32 = 0xFFFF_FFFF
META_VALUE_INPUT = msg.ATTR_META | msg.ATTR_TYPE_VALUE_INPUT
REGISTER_SHM_ATTR = msg.ATTR_TYPE_TMEM_OUTPUT | msg.ATTR_NONCONTIG
ALIGN = 8  # alignof(struct optee_msg_arg): its parameters hold u64s


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-call and per-VM bounds on what a guest may make the proxy hold or move."""

    # Bytes a message's memory parameters move: input sizes read plus output capacities written
    # (INOUT counts twice). The broker allows 1 MiB of guest-memory traffic per call; 960 KiB
    # leaves room for the message and page lists and still carries GP's 512 KiB minimum buffer.
    max_memref_bytes: int = 960 << 10
    max_shm_buffers: int = 256  # registered buffers per VM
    max_shm_buffer_pages: int = 4096  # pages of one buffer (16 MiB)
    max_shm_pages: int = 16384  # registered pages per VM (64 MiB; Xen's MAX_TOTAL_SMH_BUF_PG)
    max_sessions: int = 0  # sessions per VM asked of the backend; 0: the backend's own limit


# 1. Locating the message ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    header: msg.MsgHeader
    params: tuple[msg.MsgParam, ...]
    runs: tuple[Run, ...]  # guest ranges holding the message, header first
    cookie: int | None = None  # the registered buffer it lives in (CALL_WITH_REGD_ARG)

    @property
    def command(self) -> str:
        return msg.COMMAND_NAMES.get(self.header.cmd, "other")


async def _read_message(memory: GuestMemory,
                        runs_of: Callable[[int], list[Run] | None],
                        extra: int) -> tuple[msg.MsgHeader, tuple[msg.MsgParam, ...],
                                             list[Run]] | SmcReturn:
    """Header, then parameters; `runs_of(n)` maps the first n bytes of the message to guest
    ranges (None when they are not all inside the buffer); `extra` bytes must follow it."""
    head_runs = runs_of(msg.HEADER_SIZE)
    if head_runs is None:
        return SmcReturn.EBADADDR
    try:
        header = msg.MsgHeader.parse(await read_runs(memory, head_runs))
        if header.num_params > msg.MAX_NUM_PARAMS:
            return SmcReturn.EBADADDR
        size = msg.arg_size(header.num_params)
        runs = runs_of(size)
        if runs is None or runs_of(size + extra) is None:
            return SmcReturn.EBADADDR
        raw = await read_runs(memory, split_runs(runs, msg.HEADER_SIZE, size - msg.HEADER_SIZE))
    except GuestMemoryError:
        return SmcReturn.EBADADDR
    return header, msg.parse_params(raw, header.num_params), runs


async def locate_parg(memory: GuestMemory, parg: int, with_rpc_arg: bool) -> Message | SmcReturn:
    """CALL_WITH_ARG / CALL_WITH_RPC_ARG with the message at guest address `parg`.

    With dynamic shared memory OP-TEE maps exactly one page at parg: parg must be page aligned
    and the message (and, with RPC_ARG, the RPC argument after it) must fit in that page.
    """
    if parg & msg.PAGE_MASK:
        return SmcReturn.EBADADDR
    extra = msg.arg_size(THREAD_RPC_MAX_NUM_PARAMS) if with_rpc_arg else 0

    def runs_of(n: int) -> list[Run] | None:
        return [(parg, n)] if n <= msg.NONCONTIG_PAGE_SIZE else None

    found = await _read_message(memory, runs_of, extra)
    if isinstance(found, SmcReturn):
        return found
    header, params, runs = found
    return Message(header, params, tuple(runs))


async def locate_regd(memory: GuestMemory, state: VmTeeState, cookie: int,
                      offset: int) -> Message | SmcReturn:
    """CALL_WITH_REGD_ARG: the message `offset` bytes into registered buffer `cookie`, followed
    by room for the RPC argument (std_entry_with_regd_arg always expects one)."""
    buffer = state.shm.get(cookie)
    if buffer is None or offset % ALIGN:
        return SmcReturn.EBADADDR

    def runs_of(n: int) -> list[Run] | None:
        return buffer.runs(offset, n)

    found = await _read_message(memory, runs_of, msg.arg_size(THREAD_RPC_MAX_NUM_PARAMS))
    if isinstance(found, SmcReturn):
        return found
    header, params, runs = found
    return Message(header, params, tuple(runs), cookie)


# 2. Decoding ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Slot:
    """A TA parameter of the message: what the backend gets, and where its outputs go."""

    index: int  # position in the message (open session: after the two meta parameters)
    param: TeeParam  # as sent, inputs filled in
    runs: tuple[Run, ...] = ()  # memory reference: the client's buffer, `capacity` bytes
    capacity: int = 0
    cookie: int | None = None  # RMEM: the registered buffer


@dataclass(frozen=True, slots=True)
class Opened:
    backend: int
    epoch: int
    ta: str


@dataclass(frozen=True, slots=True)
class Closed:
    gid: int


@dataclass(frozen=True, slots=True)
class CloseUndelivered:
    """The guest's session is gone; the backend's is closed later (VmTeeState.orphans)."""

    gid: int
    backend: int
    epoch: int


@dataclass(frozen=True, slots=True)
class Lost:
    gid: int


@dataclass(frozen=True, slots=True)
class Registered:
    cookie: int
    buffer: SharedBuffer


@dataclass(frozen=True, slots=True)
class Unregistered:
    cookie: int


Effect = Opened | Closed | CloseUndelivered | Lost | Registered | Unregistered


@dataclass(frozen=True, slots=True)
class Completion:
    """The outcome of a message, before it is written back."""

    command: str
    ret: int
    origin: int | None  # None: ret_origin stays as the guest left it (OP-TEE register_shm)
    effect: Effect | None = None
    set_session: bool = False  # OPEN_SESSION writes the session field, 0 on failure
    slots: tuple[Slot, ...] = ()
    outputs: tuple[TeeParam, ...] = ()  # the backend's parameters, matching `slots`
    orphans_closed: frozenset[tuple[int, int]] = frozenset()
    backend_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class OpenWork:
    ta: uuid.UUID
    login: int
    client: uuid.UUID
    cancel_id: int
    slots: tuple[Slot, ...]


@dataclass(frozen=True, slots=True)
class InvokeWork:
    gid: int
    session: SessionRecord
    func: int
    cancel_id: int
    slots: tuple[Slot, ...]


@dataclass(frozen=True, slots=True)
class CloseWork:
    gid: int
    session: SessionRecord


@dataclass(frozen=True, slots=True)
class CancelWork:
    gid: int
    session: SessionRecord
    cancel_id: int


@dataclass(frozen=True, slots=True)
class UnregisterWork:
    """UNREGISTER_SHM of a buffer running messages still use: OP-TEE waits for them."""

    cookie: int
    users: tuple[asyncio.Future[Completion], ...] = field(default=())


Work = OpenWork | InvokeWork | CloseWork | CancelWork | UnregisterWork


def _tee_error(command: str, ret: TeeResult, *, set_session: bool = False) -> Completion:
    return Completion(command, ret, Origin.TEE, set_session=set_session)


def _memref_type(msg_type: int, base: int) -> ParamType:
    return ParamType(ParamType.MEMREF_INPUT + msg_type - base)


async def copy_in(memory: GuestMemory, state: VmTeeState, params: Sequence[msg.MsgParam],
                  first_index: int, limits: Limits) -> tuple[Slot, ...] | TeeResult:
    """OP-TEE entry_std.c copy_in_params: message parameters to TA parameters.

    At most four; no META flag; VALUE as is (a, b truncated to 32 bits as TEE_Param does); TMEM
    with buf_ptr 0 is a NULL memref, with NONCONTIG a page list, otherwise refused (no static
    shared memory); RMEM must name a registered buffer and stay inside it (SECURITY if not).
    Then the proxy's own bound on bytes moved, then the input bytes are read.
    """
    if len(params) > NUM_PARAMS:
        return TeeResult.BAD_PARAMETERS
    slots: list[Slot] = []
    total = 0
    for i, p in enumerate(params):
        index = first_index + i
        if p.attr & msg.ATTR_META:
            return TeeResult.BAD_PARAMETERS
        kind = p.type
        if kind == msg.ATTR_TYPE_NONE:
            slots.append(Slot(index, TeeParam()))
        elif kind in msg.VALUE_TYPES:
            slots.append(Slot(index, TeeParam(ParamType(kind), a=p.a & U32, b=p.b & U32)))
        elif kind in msg.TMEM_TYPES:
            ptype = _memref_type(kind, msg.ATTR_TYPE_TMEM_INPUT)
            buf_ptr, size = p.a, p.b
            if buf_ptr == 0:
                slots.append(Slot(index, TeeParam(ptype, null=True)))
                continue
            if not p.attr & msg.ATTR_NONCONTIG:
                return TeeResult.BAD_PARAMETERS
            found = await read_page_list(memory.read, buf_ptr, size, limits.max_shm_buffer_pages)
            if isinstance(found, PageListError):
                return TeeResult.BAD_PARAMETERS
            runs = found.runs(0, size) or []
            slots.append(Slot(index, TeeParam(ptype, size=size), tuple(runs), size))
            total += size * (2 if ptype == ParamType.MEMREF_INOUT else 1)
        elif kind in msg.RMEM_TYPES:
            ptype = _memref_type(kind, msg.ATTR_TYPE_RMEM_INPUT)
            offs, size, cookie = p.a, p.b, p.c
            buffer = state.shm.get(cookie)
            if buffer is None:
                return TeeResult.BAD_PARAMETERS
            rmem_runs = buffer.runs(offs, size)
            if rmem_runs is None:
                return TeeResult.SECURITY
            slots.append(Slot(index, TeeParam(ptype, size=size), tuple(rmem_runs), size, cookie))
            total += size * (2 if ptype == ParamType.MEMREF_INOUT else 1)
        else:
            return TeeResult.BAD_PARAMETERS
    if total > limits.max_memref_bytes:
        return TeeResult.OUT_OF_MEMORY
    out: list[Slot] = []
    for s in slots:
        if s.param.type in (ParamType.MEMREF_INPUT, ParamType.MEMREF_INOUT) and not s.param.null:
            try:
                data = await read_runs(memory, s.runs)
            except GuestMemoryError:
                return TeeResult.BAD_PARAMETERS
            s = Slot(s.index, TeeParam(s.param.type, data=data, size=s.capacity), s.runs,
                     s.capacity, s.cookie)
        out.append(s)
    return tuple(out)


def _uuid_from_value(p: msg.MsgParam) -> uuid.UUID:
    """tee_uuid_from_octets on value.a, value.b: the 16 octets as they lie in memory."""
    return uuid.UUID(bytes=struct.pack("<QQ", p.a, p.b))


async def decode(memory: GuestMemory, state: VmTeeState, message: Message, limits: Limits,
                 users: Callable[[int], tuple[asyncio.Future[Completion], ...]]
                 ) -> Completion | Work | SmcReturn:
    """Check a message as OP-TEE's __tee_entry_std would; `users(cookie)` are the running
    messages that use a registered buffer."""
    h, params, command = message.header, message.params, message.command
    if h.cmd == msg.CMD_OPEN_SESSION:
        # get_open_session_meta, then copy_in_params on the rest.
        if len(params) < 2 or params[0].attr != META_VALUE_INPUT \
                or params[1].attr != META_VALUE_INPUT:
            return _tee_error(command, TeeResult.BAD_PARAMETERS, set_session=True)
        login = params[1].c & U32
        if login not in NORMAL_WORLD_LOGINS:
            return _tee_error(command, TeeResult.BAD_PARAMETERS, set_session=True)
        client = uuid.UUID(int=0) if login in ANONYMOUS_LOGINS else _uuid_from_value(params[1])
        slots = await copy_in(memory, state, params[2:], 2, limits)
        if isinstance(slots, TeeResult):
            return _tee_error(command, slots, set_session=True)
        return OpenWork(_uuid_from_value(params[0]), login, client, h.cancel_id, slots)
    if h.cmd == msg.CMD_INVOKE_COMMAND:
        slots = await copy_in(memory, state, params, 0, limits)
        if isinstance(slots, TeeResult):
            return _tee_error(command, slots)
        rec = state.sessions.get(h.session)
        if rec is None:
            return _tee_error(command, TeeResult.BAD_PARAMETERS)
        if rec.lost:
            return _tee_error(command, TeeResult.TARGET_DEAD)
        return InvokeWork(h.session, rec, h.func, h.cancel_id, slots)
    if h.cmd == msg.CMD_CLOSE_SESSION:
        if params:
            return _tee_error(command, TeeResult.BAD_PARAMETERS)
        rec = state.sessions.get(h.session)
        if rec is None:
            return _tee_error(command, TeeResult.ITEM_NOT_FOUND)
        if rec.lost:  # closing a dead session succeeds (tee_ta_close_session, panicked TA)
            return Completion(command, TeeResult.SUCCESS, Origin.TEE, Closed(h.session))
        return CloseWork(h.session, rec)
    if h.cmd == msg.CMD_CANCEL:
        if params:
            return _tee_error(command, TeeResult.BAD_PARAMETERS)
        rec = state.sessions.get(h.session)
        if rec is None:
            return _tee_error(command, TeeResult.BAD_PARAMETERS)
        if rec.lost:
            return Completion(command, TeeResult.SUCCESS, Origin.TEE)
        return CancelWork(h.session, rec, h.cancel_id)
    if h.cmd == msg.CMD_REGISTER_SHM:
        return await _register(memory, state, params, limits, command)
    if h.cmd == msg.CMD_UNREGISTER_SHM:
        if len(params) != 1:
            return _tee_error(command, TeeResult.BAD_PARAMETERS)
        cookie = params[0].c  # rmem.shm_ref
        if cookie not in state.shm:
            return Completion(command, TeeResult.BAD_PARAMETERS, None)
        in_use = users(cookie)
        if in_use:
            return UnregisterWork(cookie, in_use)
        return Completion(command, TeeResult.SUCCESS, None, Unregistered(cookie))
    # DO_BOTTOM_HALF and STOP_ASYNC_NOTIF need ASYNC_NOTIF, protected memory is not offered, and
    # anything else is unknown: __tee_entry_std fails and the SMC returns EBADCMD.
    return SmcReturn.EBADCMD


async def _register(memory: GuestMemory, state: VmTeeState, params: Sequence[msg.MsgParam],
                    limits: Limits, command: str) -> Completion:
    """entry_std.c register_shm: one TMEM_OUTPUT|NONCONTIG parameter; only ret is written.
    The proxy also refuses a cookie already registered and bounds buffers and pages per VM."""

    def fail(ret: TeeResult) -> Completion:
        return Completion(command, ret, None)

    if len(params) != 1 or params[0].attr != REGISTER_SHM_ATTR:
        return fail(TeeResult.BAD_PARAMETERS)
    buf_ptr, size, cookie = params[0].a, params[0].b, params[0].c
    if cookie in state.shm:
        return fail(TeeResult.BAD_PARAMETERS)
    if len(state.shm) >= limits.max_shm_buffers:
        return fail(TeeResult.OUT_OF_MEMORY)
    found = await read_page_list(memory.read, buf_ptr, size, limits.max_shm_buffer_pages)
    if found is PageListError.TOO_LARGE:
        return fail(TeeResult.OUT_OF_MEMORY)
    if isinstance(found, PageListError):
        return fail(TeeResult.BAD_PARAMETERS)
    if state.shm_pages + found.num_pages > limits.max_shm_pages:
        return fail(TeeResult.OUT_OF_MEMORY)
    return Completion(command, TeeResult.SUCCESS, None, Registered(cookie, found))

"""Property tests over guest-supplied bytes: messages, page lists, and the state they leave.

Whatever a guest puts in an optee_msg_arg or a page list, the proxy answers with an OP-TEE
return code (and, when it accepted the message, a TEE result in it), never raises, and leaves a
consistent per-VM state (core/include/optee_msg.h).
"""

from __future__ import annotations

import asyncio
import struct
import tempfile
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hyperbroker.calls import Call
from hyperbroker.handlers.optee import abi, msg
from hyperbroker.handlers.optee.abi import SmcReturn
from hyperbroker.handlers.optee.shm import PageListError, SharedBuffer, pages_needed, read_page_list
from hyperbroker.handlers.optee.state import VmTeeState
from hyperbroker.tee.uuids import DEVICE_ENUM_PTA, SECURE_STORAGE_TA
from hyperbroker.testing.context import FakeGuestMemory
from hyperbroker.testing.optee import DRIVER_BASE, RAM_BASE, RAM_SIZE, Harness

T = TypeVar("T")
STATE_DIR = Path(tempfile.mkdtemp(prefix="optee-fuzz-"))
PARG = RAM_BASE + 0x10000
LIST_PAGE = RAM_BASE + 0x20000
DATA_PAGE = RAM_BASE + 0x30000
U64 = st.integers(0, 2**64 - 1)
U32 = st.integers(0, 2**32 - 1)

# Values that reach deeper checks than uniform random words do.
WORDS = st.one_of(
    U64,
    st.sampled_from([0, 1, 16, 4096, 2**32, 2**64 - 1, PARG, LIST_PAGE, LIST_PAGE | 0x10,
                     DATA_PAGE, RAM_BASE + RAM_SIZE, RAM_BASE + RAM_SIZE - 8]),
)
ATTRS = st.one_of(
    U64,
    st.sampled_from([msg.ATTR_TYPE_NONE, msg.ATTR_TYPE_VALUE_INPUT, msg.ATTR_TYPE_VALUE_INOUT,
                     msg.ATTR_TYPE_RMEM_OUTPUT, msg.ATTR_TYPE_TMEM_INPUT,
                     msg.ATTR_TYPE_TMEM_INOUT | msg.ATTR_NONCONTIG,
                     msg.ATTR_TYPE_TMEM_OUTPUT | msg.ATTR_NONCONTIG,
                     msg.ATTR_META | msg.ATTR_TYPE_VALUE_INPUT]),
)
PARAMS = st.builds(msg.MsgParam, ATTRS, WORDS, WORDS, WORDS)
HEADERS = st.builds(
    msg.MsgHeader,
    st.one_of(st.integers(0, 12), U32), U32, st.one_of(st.integers(0, 4), U32), U32, U32, U32, U32,
    st.one_of(st.integers(0, 8), st.integers(0, 300)),
)
SMC_ANSWERS = {SmcReturn.OK, SmcReturn.EBADADDR, SmcReturn.EBADCMD, SmcReturn.EBUSY,
               SmcReturn.ETHREAD_LIMIT, SmcReturn.ERESUME}


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def uuid_meta(ta: bytes, login: int = 0) -> list[msg.MsgParam]:
    a, b = struct.unpack("<QQ", ta)
    meta = msg.ATTR_META | msg.ATTR_TYPE_VALUE_INPUT
    return [msg.MsgParam(meta, a, b, 0), msg.MsgParam(meta, 0, 0, login)]


async def deliver(h: Harness, fid: int, header: msg.MsgHeader, params: list[msg.MsgParam],
                  list_bytes: bytes, a3: int = 0) -> tuple[int, VmTeeState, msg.MsgHeader]:
    g = h.guest()
    g.memory.poke(LIST_PAGE, list_bytes.ljust(4096, b"\0")[:4096])
    raw = msg.build_arg(header, tuple(params))[:4096]
    g.memory.poke(PARG, raw)
    x = (fid, 0, PARG, a3) + (0,) * 14
    result = await h.handler.handle(Call(0, 1, fid, x), g.ctx)
    g.memory.commit()
    state = VmTeeState.from_json(g.ctx.state.get())
    assert VmTeeState.from_json(state.to_json()) == state
    return result.x[0], state, msg.MsgHeader.parse(g.memory.peek(PARG, 32))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fid=st.sampled_from([abi.CALL_WITH_ARG, abi.CALL_WITH_RPC_ARG]), header=HEADERS,
       params=st.lists(PARAMS, max_size=8), list_bytes=st.binary(max_size=4096))
def test_any_message_gets_an_optee_answer(fid: int, header: msg.MsgHeader,
                                          params: list[msg.MsgParam], list_bytes: bytes) -> None:
    a0, _, out = run(deliver(Harness(STATE_DIR, {"yield_ms": 0}), fid, header, params,
                             list_bytes))
    assert a0 in SMC_ANSWERS
    if a0 != SmcReturn.OK:
        assert out.ret == header.ret  # an SMC error leaves the message alone


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ta=st.sampled_from([DEVICE_ENUM_PTA.bytes, SECURE_STORAGE_TA.bytes, bytes(16)]),
       login=st.one_of(st.sampled_from([0, 1, 4, 0x8000_0000]), U64),
       params=st.lists(PARAMS, max_size=5), list_bytes=st.binary(max_size=4096))
def test_any_open_session_gets_a_tee_result(ta: bytes, login: int, params: list[msg.MsgParam],
                                            list_bytes: bytes) -> None:
    n = 2 + len(params)
    header = msg.MsgHeader(msg.CMD_OPEN_SESSION, 0, 0, 0, 0, 0xAAAA, 0xBBBB, n)

    async def go() -> None:
        h = Harness(STATE_DIR, {"yield_ms": 0})
        a0, state, out = await deliver(h, abi.CALL_WITH_ARG, header,
                                       uuid_meta(ta, login) + params, list_bytes)
        assert a0 == SmcReturn.OK
        assert out.ret != 0xAAAA and out.ret_origin != 0xBBBB  # always answered in the message
        assert (out.ret == 0) == (out.session != 0) == bool(state.sessions)
        for session in state.sessions.values():
            assert session.ta in (str(SECURE_STORAGE_TA), str(DEVICE_ENUM_PTA))

    run(go())


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size=st.integers(0, 3 * 4096), offset=st.integers(0, 4095), a3=U32,
       body=st.binary(min_size=32, max_size=600))
def test_any_registered_message_gets_an_optee_answer(size: int, offset: int, a3: int,
                                                     body: bytes) -> None:
    async def go() -> None:
        h = Harness(STATE_DIR, {"yield_ms": 0})
        g = h.guest()
        shm = g.driver.alloc_buffer(max(size, 1), offset=offset)
        await g.driver.register(shm)
        g.driver.fill(shm, body[: shm.size])
        x = (abi.CALL_WITH_REGD_ARG, shm.cookie >> 32, shm.cookie & 0xFFFF_FFFF, a3) + (0,) * 14
        result = await h.handler.handle(Call(0, 1, abi.CALL_WITH_REGD_ARG, x), g.ctx)
        assert result.x[0] in SMC_ANSWERS

    run(go())


@settings(max_examples=200, deadline=None)
@given(list_bytes=st.binary(min_size=0, max_size=3 * 4096), buf_ptr_offset=st.integers(0, 4095),
       size=st.integers(-1, 4 * 511 * 4096), max_pages=st.integers(1, 2048))
def test_any_page_list_gives_a_buffer_or_an_error(list_bytes: bytes, buf_ptr_offset: int,
                                                  size: int, max_pages: int) -> None:
    memory = FakeGuestMemory(regions={RAM_BASE: bytearray(RAM_SIZE)})
    memory.poke(DRIVER_BASE, list_bytes)
    buf_ptr = DRIVER_BASE | buf_ptr_offset
    found = run(read_page_list(memory.read, buf_ptr, size, max_pages))
    if isinstance(found, PageListError):
        return
    assert isinstance(found, SharedBuffer)
    assert found.num_pages == pages_needed(buf_ptr, size) <= max_pages
    assert found.page_offset == buf_ptr_offset and found.size == size
    for gpa, n in found.extents:
        assert gpa % 4096 == 0 and n > 0


@settings(max_examples=300, deadline=None)
@given(pages=st.lists(st.integers(0, 2**40).map(lambda p: p * 4096), min_size=1, max_size=40),
       page_offset=st.integers(0, 4095), data=st.data())
def test_buffer_runs_cover_exactly_the_bytes_asked(pages: list[int], page_offset: int,
                                                   data: st.DataObject) -> None:
    size = data.draw(st.integers(1, len(pages) * 4096 - page_offset))
    buf = SharedBuffer.from_pages(page_offset, size, pages)
    assert SharedBuffer.from_json(buf.to_json()) == buf
    offset = data.draw(st.integers(0, size))
    length = data.draw(st.integers(0, size - offset))
    runs = buf.runs(offset, length)
    assert runs is not None and sum(n for _, n in runs) == length
    for gpa, n in runs:  # every byte lies inside one of the buffer's pages
        first, last = gpa // 4096 * 4096, (gpa + n - 1) // 4096 * 4096
        assert first in pages and last in pages
    assert buf.runs(offset, size - offset + 1) is None


@given(header=HEADERS, params=st.lists(PARAMS, max_size=6))
def test_message_layout_round_trips(header: msg.MsgHeader, params: list[msg.MsgParam]) -> None:
    raw = msg.build_arg(header, tuple(params))
    assert len(raw) == msg.arg_size(len(params))
    assert msg.MsgHeader.parse(raw) == header
    assert msg.parse_params(raw[32:], len(params)) == tuple(params)


@given(ops=st.lists(st.tuples(st.sampled_from(["add", "drop", "lost", "orphan"]),
                              st.integers(1, 6), st.integers(1, 3)), max_size=30))
def test_state_transitions_round_trip_through_json(ops: list[tuple[str, int, int]]) -> None:
    state = VmTeeState()
    for op, a, b in ops:
        if op == "add":
            state, gid = state.add_session(a, b, "ta")
            assert state.sessions[gid].backend == a
            again, same = state.add_session(a, b, "ta")
            assert (again, same) == (state, gid)  # idempotent
        elif op == "drop":
            state = state.drop_session(a)
        elif op == "lost":
            state = state.mark_lost(a)
        else:
            state = state.add_orphan(a, b)
        assert VmTeeState.from_json(state.to_json()) == state
        assert 0 not in state.sessions

"""OP-TEE messages through the proxy, per command and per error path.

Each test drives OpteeHandler through FakeContext against the real reference TEE in-process
(handlers.optee.testing.Harness). Sections cited are reference/optee.md; "entry_std.c" and
"thread_optee_smc.c" are OP-TEE core/tee/entry_std.c and core/arch/arm/kernel/thread_optee_smc.c,
whose checks and result codes the proxy reproduces.
"""

from __future__ import annotations

import asyncio
import struct
import uuid
from pathlib import Path

import pytest

from hyperbroker.calls import Call, Result
from hyperbroker.handlers.optee import abi, msg, std
from hyperbroker.handlers.optee.abi import SmcReturn
from hyperbroker.handlers.optee.state import VmTeeState
from hyperbroker.tee.gp import Login, Origin, ParamType, TeeResult
from hyperbroker.tee.ta import VmIdentity
from hyperbroker.tee.uuids import SECURE_STORAGE_TA
from hyperbroker.testing.context import MemoryState
from hyperbroker.testing.optee import (
    ECHO_FILL,
    ECHO_INOUT,
    ECHO_MIRROR,
    ECHO_PANIC,
    ECHO_SLEEP,
    ECHO_TA,
    RAM_BASE,
    Guest,
    Harness,
    wait_until,
)
from hyperbroker.testing.optee_guest import GuestParam

PARG = RAM_BASE + 0x10000  # a page-aligned message address below the driver model's pages
META = msg.ATTR_META | msg.ATTR_TYPE_VALUE_INPUT
U32 = 0xFFFF_FFFF


def meta_params(ta: uuid.UUID, login: int = Login.PUBLIC) -> list[msg.MsgParam]:
    a, b = struct.unpack("<QQ", ta.bytes)
    return [msg.MsgParam(META, a, b, 0), msg.MsgParam(META, 0, 0, login)]


def header(cmd: int, n: int, *, session: int = 0, func: int = 0, cancel_id: int = 0,
           ret: int = 0xDEAD, origin: int = 0xBEEF) -> msg.MsgHeader:
    return msg.MsgHeader(cmd, func, session, cancel_id, 0, ret, origin, n)


async def smc(h: Harness, g: Guest, *regs: int, vcpu: int = 0) -> Result:
    x = tuple(regs) + (0,) * (18 - len(regs))
    result = await h.handler.handle(Call(vcpu, 1, regs[0], x), g.ctx)
    g.memory.commit()
    return result


async def send(h: Harness, g: Guest, hdr: msg.MsgHeader, params: list[msg.MsgParam],
               fid: int = abi.CALL_WITH_ARG, parg: int = PARG
               ) -> tuple[Result, msg.MsgHeader, tuple[msg.MsgParam, ...]]:
    g.memory.poke(parg, msg.build_arg(hdr, tuple(params)))
    r = await smc(h, g, fid, parg >> 32, parg & U32)
    raw = g.memory.peek(parg, msg.arg_size(len(params)))
    return r, msg.MsgHeader.parse(raw), msg.parse_params(raw[32:], len(params))


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


@pytest.fixture
def g(h: Harness) -> Guest:
    return h.guest()


async def open_echo(g: Guest) -> int:
    r = await g.driver.open_session(ECHO_TA)
    assert r.ret == TeeResult.SUCCESS
    return r.session


# Locating the message (thread_optee_smc.c std_entry_with_parg / std_entry_with_regd_arg) -------


async def test_message_address_must_be_page_aligned(h: Harness, g: Guest) -> None:
    # §4.4: "OP-TEE ABI requirement"; dynamic SHM maps one page at parg.
    r, _, _ = await send(h, g, header(msg.CMD_OPEN_SESSION, 2), meta_params(ECHO_TA),
                         parg=PARG + 8)
    assert r.x[0] == SmcReturn.EBADADDR


async def test_message_outside_guest_ram_is_ebadaddr(h: Harness, g: Guest) -> None:
    r = await smc(h, g, abi.CALL_WITH_ARG, 0, 0x1000)
    assert r.x[0] == SmcReturn.EBADADDR


async def test_more_than_127_parameters_is_ebadaddr(h: Harness, g: Guest) -> None:
    # §2.1 OPTEE_MSG_MAX_NUM_PARAMS.
    g.memory.poke(PARG, header(msg.CMD_INVOKE_COMMAND, 128).pack())
    assert (await smc(h, g, abi.CALL_WITH_ARG, 0, PARG)).x[0] == SmcReturn.EBADADDR


async def test_127_parameters_still_fit_and_reach_the_checks(h: Harness, g: Guest) -> None:
    r, out, _ = await send(h, g, header(msg.CMD_INVOKE_COMMAND, 127),
                           [msg.MsgParam(0)] * 127)
    assert r.x[0] == SmcReturn.OK
    assert (out.ret, out.ret_origin) == (TeeResult.BAD_PARAMETERS, Origin.TEE)


async def test_with_rpc_arg_needs_room_for_the_rpc_argument(h: Harness, g: Guest) -> None:
    # std_entry_with_parg(with_rpc_arg): the message and THREAD_RPC_MAX_NUM_PARAMS after it.
    fits = 127 - abi.THREAD_RPC_MAX_NUM_PARAMS - 1
    r, out, _ = await send(h, g, header(msg.CMD_CLOSE_SESSION, fits), [msg.MsgParam(0)] * fits,
                           fid=abi.CALL_WITH_RPC_ARG)
    assert r.x[0] == SmcReturn.OK and out.ret == TeeResult.BAD_PARAMETERS
    r, _, _ = await send(h, g, header(msg.CMD_CLOSE_SESSION, fits + 2),
                         [msg.MsgParam(0)] * (fits + 2), fid=abi.CALL_WITH_RPC_ARG)
    assert r.x[0] == SmcReturn.EBADADDR


async def test_regd_arg_with_an_unknown_cookie_is_ebadaddr(h: Harness, g: Guest) -> None:
    assert (await smc(h, g, abi.CALL_WITH_REGD_ARG, 0, 0x1234, 0)).x[0] == SmcReturn.EBADADDR


async def test_regd_arg_reads_and_answers_inside_the_registered_buffer(
        h: Harness, g: Guest) -> None:
    # CALL_WITH_REGD_ARG: a1/a2 = cookie, a3 = offset; the message may span its pages.
    shm = g.driver.alloc_buffer(3 * 4096, offset=0x100)
    assert await g.driver.register(shm) == TeeResult.SUCCESS
    offset = 4096 - 64  # the header straddles two (non-contiguous) pages
    g.driver.fill(shm, msg.build_arg(header(msg.CMD_OPEN_SESSION, 2), tuple(meta_params(ECHO_TA))),
                  offset)
    r = await smc(h, g, abi.CALL_WITH_REGD_ARG, shm.cookie >> 32, shm.cookie & U32, offset)
    assert r.x[0] == SmcReturn.OK
    out = msg.MsgHeader.parse(g.driver.read(shm, offset, 32))
    assert (out.ret, out.ret_origin) == (TeeResult.SUCCESS, Origin.TRUSTED_APP)
    assert out.session != 0


async def test_regd_arg_offset_must_be_aligned_and_leave_room(h: Harness, g: Guest) -> None:
    shm = g.driver.alloc_buffer(4096)
    assert await g.driver.register(shm) == TeeResult.SUCCESS
    hi, lo = shm.cookie >> 32, shm.cookie & U32
    assert (await smc(h, g, abi.CALL_WITH_REGD_ARG, hi, lo, 4)).x[0] == SmcReturn.EBADADDR
    g.driver.fill(shm, header(msg.CMD_CLOSE_SESSION, 0).pack(), 4096 - 64)
    # 32 bytes of message, but no room for the RPC argument after it.
    assert (await smc(h, g, abi.CALL_WITH_REGD_ARG, hi, lo, 4096 - 64)).x[0] == \
        SmcReturn.EBADADDR


async def test_unknown_command_is_ebadcmd_and_leaves_the_message_alone(
        h: Harness, g: Guest) -> None:
    # entry_std.c __tee_entry_std default: EBADCMD (DO_BOTTOM_HALF needs ASYNC_NOTIF).
    for cmd in (msg.CMD_DO_BOTTOM_HALF, msg.CMD_STOP_ASYNC_NOTIF, 11, 0xFFFF):
        r, out, _ = await send(h, g, header(cmd, 0), [])
        assert r.x[0] == SmcReturn.EBADCMD
        assert (out.ret, out.ret_origin) == (0xDEAD, 0xBEEF)


# OPEN_SESSION (§2.3; entry_std.c entry_open_session) ------------------------------------------


async def test_open_session_needs_two_meta_parameters(h: Harness, g: Guest) -> None:
    r, out, _ = await send(h, g, header(msg.CMD_OPEN_SESSION, 1, session=77),
                           meta_params(ECHO_TA)[:1])
    assert r.x[0] == SmcReturn.OK
    assert (out.ret, out.ret_origin, out.session) == (TeeResult.BAD_PARAMETERS, Origin.TEE, 0)


async def test_open_session_meta_attributes_must_be_exact(h: Harness, g: Guest) -> None:
    params = meta_params(ECHO_TA)
    params[1] = msg.MsgParam(msg.ATTR_TYPE_VALUE_INPUT, 0, 0, 0)  # META flag missing
    _, out, _ = await send(h, g, header(msg.CMD_OPEN_SESSION, 2), params)
    assert out.ret == TeeResult.BAD_PARAMETERS


async def test_open_session_refuses_an_unknown_login(h: Harness, g: Guest) -> None:
    _, out, _ = await send(h, g, header(msg.CMD_OPEN_SESSION, 2), meta_params(ECHO_TA, login=3))
    assert (out.ret, out.ret_origin) == (TeeResult.BAD_PARAMETERS, Origin.TEE)


async def test_open_session_to_an_unknown_ta_is_item_not_found(h: Harness, g: Guest) -> None:
    _, out, _ = await send(h, g, header(msg.CMD_OPEN_SESSION, 2, session=5),
                           meta_params(uuid.uuid4()))
    assert (out.ret, out.ret_origin, out.session) == (TeeResult.ITEM_NOT_FOUND, Origin.TEE, 0)


async def test_open_session_gives_a_session_with_ta_origin(h: Harness, g: Guest) -> None:
    _, out, _ = await send(h, g, header(msg.CMD_OPEN_SESSION, 2), meta_params(ECHO_TA))
    assert (out.ret, out.ret_origin) == (TeeResult.SUCCESS, Origin.TRUSTED_APP)
    state = VmTeeState.from_json(g.ctx.state.get())
    assert state.sessions[out.session].ta == str(ECHO_TA)


async def test_open_session_with_more_than_four_ta_parameters(h: Harness, g: Guest) -> None:
    _, out, _ = await send(h, g, header(msg.CMD_OPEN_SESSION, 7),
                           meta_params(ECHO_TA) + [msg.MsgParam(0)] * 5)
    assert (out.ret, out.session) == (TeeResult.BAD_PARAMETERS, 0)


async def test_open_session_with_login_user_is_accepted(h: Harness, g: Guest) -> None:
    r = await g.driver.open_session(ECHO_TA, login=Login.USER, client=uuid.uuid4())
    assert r.ret == TeeResult.SUCCESS


# INVOKE_COMMAND and parameters (§2.2; entry_std.c copy_in_params, copy_out_param) -------------


async def test_invoke_on_an_unknown_session_is_bad_parameters(h: Harness, g: Guest) -> None:
    _, out, _ = await send(h, g, header(msg.CMD_INVOKE_COMMAND, 0, session=999), [])
    assert (out.ret, out.ret_origin) == (TeeResult.BAD_PARAMETERS, Origin.TEE)


async def test_value_parameters_in_every_direction(h: Harness, g: Guest) -> None:
    session = await open_echo(g)
    mem = g.driver.alloc_buffer(16)
    assert await g.driver.register(mem) == TeeResult.SUCCESS
    g.driver.fill(mem, b"abcd")
    params = [
        msg.MsgParam(msg.ATTR_TYPE_RMEM_INPUT, 0, 4, mem.cookie),
        msg.MsgParam(msg.ATTR_TYPE_RMEM_OUTPUT, 8, 8, mem.cookie),
        msg.MsgParam(msg.ATTR_TYPE_VALUE_INOUT, 0x1_0000_0010, 20, 0xC0C0),
        msg.MsgParam(msg.ATTR_TYPE_VALUE_OUTPUT, 1, 2, 0xC1C1),
    ]
    _, out, p = await send(h, g, header(msg.CMD_INVOKE_COMMAND, 4, session=session,
                                        func=ECHO_MIRROR), params)
    assert (out.ret, out.ret_origin) == (TeeResult.SUCCESS, Origin.TRUSTED_APP)
    # a, b are 32-bit for a TA (the high word of a is dropped); c is never written back.
    assert (p[2].a, p[2].b, p[2].c) == (0x11, 21, 0xC0C0)
    assert (p[3].a, p[3].b, p[3].c) == (4, 7, 0xC1C1)
    assert p[1].b == 4 and g.driver.read(mem, 8, 4) == b"abcd"
    assert p[0] == params[0]  # inputs untouched


@pytest.mark.parametrize("memref", ["rmem", "tmem"])
async def test_memory_parameters_in_every_direction(tmp_path: Path, memref: str) -> None:
    h = Harness(tmp_path)
    g = h.guest(memref=memref)
    session = await open_echo(g)
    data = bytes(range(256)) * 40  # 10 KiB over non-contiguous pages
    r = await g.driver.invoke(session, ECHO_MIRROR, [
        GuestParam.mem_in(data), GuestParam.mem_out(len(data) + 100),
        GuestParam.value_inout(1, 2), GuestParam.value_out()])
    assert r.ret == TeeResult.SUCCESS
    assert r.params[1].size == len(data) and r.outputs[1] == data
    r = await g.driver.invoke(session, ECHO_INOUT, [GuestParam.mem_inout(b"hello")])
    assert r.ret == TeeResult.SUCCESS and r.outputs[0] == b"olleh"


async def test_short_buffer_reports_the_size_and_writes_no_bytes(h: Harness, g: Guest) -> None:
    session = await open_echo(g)
    r = await g.driver.invoke(session, ECHO_FILL, [GuestParam.value_in(100),
                                                   GuestParam.mem_out(10)])
    assert (r.ret, r.origin) == (TeeResult.SHORT_BUFFER, Origin.TRUSTED_APP)
    assert r.params[1].size == 100 and r.outputs[1] == bytes(10)


async def test_null_memref_learns_the_needed_size(h: Harness, g: Guest) -> None:
    # MEMREF_NULL (§1.2): TMEM with buf_ptr 0 is a NULL reference of size 0.
    session = await open_echo(g)
    r = await g.driver.invoke(session, ECHO_FILL, [
        GuestParam.value_in(33), GuestParam(ParamType.MEMREF_OUTPUT, null=True)])
    assert r.ret == TeeResult.SHORT_BUFFER and r.params[1].size == 33


@pytest.mark.parametrize(("param", "ret"), [
    (msg.MsgParam(msg.ATTR_META | msg.ATTR_TYPE_VALUE_INPUT), TeeResult.BAD_PARAMETERS),
    (msg.MsgParam(msg.ATTR_TYPE_TMEM_INPUT, RAM_BASE, 16, 0), TeeResult.BAD_PARAMETERS),
    (msg.MsgParam(msg.ATTR_TYPE_RMEM_INPUT, 0, 16, 0x5555), TeeResult.BAD_PARAMETERS),
    (msg.MsgParam(4), TeeResult.BAD_PARAMETERS),
    (msg.MsgParam(8), TeeResult.BAD_PARAMETERS),
    (msg.MsgParam(0xC), TeeResult.BAD_PARAMETERS),
])
async def test_parameters_opt_ee_refuses(h: Harness, g: Guest, param: msg.MsgParam,
                                         ret: TeeResult) -> None:
    # META outside OPEN_SESSION, contiguous TMEM (no static SHM), unknown cookie, unknown types.
    session = await open_echo(g)
    _, out, _ = await send(h, g, header(msg.CMD_INVOKE_COMMAND, 1, session=session), [param])
    assert (out.ret, out.ret_origin) == (ret, Origin.TEE)


async def test_rmem_outside_its_buffer_is_a_security_error(h: Harness, g: Guest) -> None:
    # set_rmem_param: offs + size beyond the registered buffer is TEE_ERROR_SECURITY.
    session = await open_echo(g)
    shm = g.driver.alloc_buffer(100)
    assert await g.driver.register(shm) == TeeResult.SUCCESS
    for offs, size in ((0, 101), (50, 51), (2**64 - 1, 2)):
        _, out, _ = await send(h, g, header(msg.CMD_INVOKE_COMMAND, 1, session=session),
                               [msg.MsgParam(msg.ATTR_TYPE_RMEM_INPUT, offs, size, shm.cookie)])
        assert (out.ret, out.ret_origin) == (TeeResult.SECURITY, Origin.TEE)


async def test_page_list_errors_are_bad_parameters(h: Harness, g: Guest) -> None:
    session = await open_echo(g)
    list_page = g.driver.pages.alloc()[0]
    g.memory.poke(list_page, struct.pack("<Q", RAM_BASE + 0x123))  # unaligned entry
    for buf_ptr in (list_page, 0x1000):  # bad entry; list outside guest RAM
        _, out, _ = await send(h, g, header(msg.CMD_INVOKE_COMMAND, 1, session=session), [
            msg.MsgParam(msg.ATTR_TYPE_TMEM_INPUT | msg.ATTR_NONCONTIG, buf_ptr, 16, 1)])
        assert (out.ret, out.ret_origin) == (TeeResult.BAD_PARAMETERS, Origin.TEE)


async def test_memory_parameters_over_the_limit_are_out_of_memory(tmp_path: Path) -> None:
    h = Harness(tmp_path, {"max_memref_bytes": 4096})
    g = h.guest()
    session = await open_echo(g)
    r = await g.driver.invoke(session, ECHO_MIRROR, [GuestParam.mem_in(b"x" * 3000),
                                                     GuestParam.mem_out(3000)])
    assert (r.ret, r.origin) == (TeeResult.OUT_OF_MEMORY, Origin.TEE)


async def test_the_largest_message_stays_within_the_brokers_memory_budget(
        h: Harness, g: Guest) -> None:
    # The broker allows 1 MiB of guest-memory reads plus writes per call (docs/architecture.md).
    session = await open_echo(g)
    half = std.Limits().max_memref_bytes // 2
    src, dst = g.driver.alloc_buffer(half), g.driver.alloc_buffer(half + 1)
    for shm in (src, dst):
        assert await g.driver.register(shm) == TeeResult.SUCCESS
    g.driver.fill(src, b"\x5a" * half)
    for out_size, ret in ((half, TeeResult.SUCCESS), (half + 1, TeeResult.OUT_OF_MEMORY)):
        params = [msg.MsgParam(msg.ATTR_TYPE_RMEM_INPUT, 0, half, src.cookie),
                  msg.MsgParam(msg.ATTR_TYPE_RMEM_OUTPUT, 0, out_size, dst.cookie)]
        g.memory.poke(PARG, msg.build_arg(header(msg.CMD_INVOKE_COMMAND, 2, session=session,
                                                 func=ECHO_MIRROR), tuple(params)))
        g.memory.reads.clear()
        x = (abi.CALL_WITH_ARG, 0, PARG) + (0,) * 15
        assert (await h.handler.handle(Call(0, 1, abi.CALL_WITH_ARG, x), g.ctx)).x[0] == 0
        moved = sum(n for _, n in g.memory.reads) + sum(len(d) for _, d in
                                                        g.memory.pending_writes)
        assert moved <= 1 << 20
        g.memory.commit()
        assert msg.MsgHeader.parse(g.memory.peek(PARG, 32)).ret == ret


async def test_ta_errors_carry_the_trusted_app_origin(h: Harness, g: Guest) -> None:
    session = await open_echo(g)
    r = await g.driver.invoke(session, 0x777)
    assert (r.ret, r.origin) == (TeeResult.NOT_IMPLEMENTED, Origin.TRUSTED_APP)


async def test_a_panicked_ta_session_is_dead_until_closed(h: Harness, g: Guest) -> None:
    # As after a TA panic in OP-TEE: TARGET_DEAD from TEE, and closing still succeeds.
    session = await open_echo(g)
    r = await g.driver.invoke(session, ECHO_PANIC)
    assert (r.ret, r.origin) == (TeeResult.TARGET_DEAD, Origin.TEE)
    r = await g.driver.invoke(session, ECHO_MIRROR)
    assert (r.ret, r.origin) == (TeeResult.TARGET_DEAD, Origin.TEE)
    assert (await g.driver.close_session(session)).ret == TeeResult.SUCCESS


# CLOSE_SESSION and CANCEL (entry_std.c entry_close_session, entry_cancel) --------------------


async def test_close_session_with_parameters_is_bad_parameters(h: Harness, g: Guest) -> None:
    session = await open_echo(g)
    _, out, _ = await send(h, g, header(msg.CMD_CLOSE_SESSION, 1, session=session),
                           [msg.MsgParam(0)])
    assert (out.ret, out.ret_origin) == (TeeResult.BAD_PARAMETERS, Origin.TEE)


async def test_close_of_an_unknown_session_is_item_not_found(h: Harness, g: Guest) -> None:
    r = await g.driver.close_session(4242)
    assert (r.ret, r.origin) == (TeeResult.ITEM_NOT_FOUND, Origin.TEE)


async def test_close_session_forgets_it(h: Harness, g: Guest) -> None:
    session = await open_echo(g)
    assert (await g.driver.close_session(session)).ret == TeeResult.SUCCESS
    assert (await g.driver.invoke(session, ECHO_MIRROR)).ret == TeeResult.BAD_PARAMETERS
    assert h.service.session_count(VmIdentity(g.ctx.vm.host, g.ctx.vm.name)) == 0


async def test_cancel_with_parameters_or_unknown_session_is_bad_parameters(
        h: Harness, g: Guest) -> None:
    session = await open_echo(g)
    _, out, _ = await send(h, g, header(msg.CMD_CANCEL, 1, session=session), [msg.MsgParam(0)])
    assert (out.ret, out.ret_origin) == (TeeResult.BAD_PARAMETERS, Origin.TEE)
    r = await g.driver.cancel(999, 1)
    assert (r.ret, r.origin) == (TeeResult.BAD_PARAMETERS, Origin.TEE)


async def test_cancel_stops_a_running_invoke(tmp_path: Path) -> None:
    h = Harness(tmp_path, {"yield_ms": 5})
    g = h.guest()
    session = await open_echo(g)
    sleeper = asyncio.ensure_future(g.driver.invoke(session, ECHO_SLEEP,
                                                    [GuestParam.value_in(10_000)], cancel_id=9))
    await wait_until(lambda: h.handler.threads.running(g.ctx.vm.key) > 0)
    r = await g.driver.cancel(session, 9)
    assert (r.ret, r.origin) == (TeeResult.SUCCESS, Origin.TEE)
    done = await asyncio.wait_for(sleeper, 5)
    assert (done.ret, done.origin) == (TeeResult.CANCEL, Origin.TRUSTED_APP)


# REGISTER_SHM / UNREGISTER_SHM (entry_std.c register_shm, unregister_shm) ---------------------


async def test_register_shm_records_the_pages(h: Harness, g: Guest) -> None:
    shm = g.driver.alloc_buffer(5000, offset=0x80)
    assert await g.driver.register(shm) == TeeResult.SUCCESS
    buf = VmTeeState.from_json(g.ctx.state.get()).shm[shm.cookie]
    assert (buf.page_offset, buf.size, buf.num_pages) == (0x80, 5000, 2)
    assert buf.runs(0, 5000) == [(shm.pages[0] + 0x80, 4096 - 0x80),
                                 (shm.pages[1], 5000 - (4096 - 0x80))]


async def test_register_shm_errors_leave_ret_origin_alone(h: Harness, g: Guest) -> None:
    shm = g.driver.alloc_buffer(4096)
    buf_ptr, _ = g.driver.page_list(shm.pages, 0)
    good = msg.MsgParam(msg.ATTR_TYPE_TMEM_OUTPUT | msg.ATTR_NONCONTIG, buf_ptr, 4096, 7)
    cases = [
        [msg.MsgParam(msg.ATTR_TYPE_TMEM_INPUT | msg.ATTR_NONCONTIG, buf_ptr, 4096, 7)],
        [good, good],
        [msg.MsgParam(good.attr, buf_ptr, 0, 7)],  # size 0
        [msg.MsgParam(good.attr, 0x1000, 4096, 7)],  # list outside RAM
    ]
    for params in cases:
        _, out, _ = await send(h, g, header(msg.CMD_REGISTER_SHM, len(params)), params)
        assert (out.ret, out.ret_origin) == (TeeResult.BAD_PARAMETERS, 0xBEEF)
    _, out, _ = await send(h, g, header(msg.CMD_REGISTER_SHM, 1), [good])
    assert out.ret == TeeResult.SUCCESS
    _, out, _ = await send(h, g, header(msg.CMD_REGISTER_SHM, 1), [good])  # same cookie again
    assert out.ret == TeeResult.BAD_PARAMETERS


async def test_register_shm_limits_are_out_of_memory(tmp_path: Path) -> None:
    h = Harness(tmp_path, {"max_shm_buffers": 2, "max_shm_buffer_pages": 4,
                           "max_shm_pages": 6})
    g = h.guest()
    assert await g.driver.register(g.driver.alloc_buffer(5 * 4096)) == TeeResult.OUT_OF_MEMORY
    assert await g.driver.register(g.driver.alloc_buffer(4 * 4096)) == TeeResult.SUCCESS
    assert await g.driver.register(g.driver.alloc_buffer(3 * 4096)) == TeeResult.OUT_OF_MEMORY
    assert await g.driver.register(g.driver.alloc_buffer(2 * 4096)) == TeeResult.SUCCESS
    assert await g.driver.register(g.driver.alloc_buffer(1)) == TeeResult.OUT_OF_MEMORY


async def test_unregister_shm(h: Harness, g: Guest) -> None:
    shm = g.driver.alloc_buffer(100)
    assert await g.driver.register(shm) == TeeResult.SUCCESS
    assert await g.driver.unregister(shm) == TeeResult.SUCCESS
    assert await g.driver.unregister(shm) == TeeResult.BAD_PARAMETERS
    _, out, _ = await send(h, g, header(msg.CMD_UNREGISTER_SHM, 0), [])
    assert (out.ret, out.ret_origin) == (TeeResult.BAD_PARAMETERS, Origin.TEE)


async def test_unregister_waits_for_the_messages_using_the_buffer(tmp_path: Path) -> None:
    # mobj_reg_shm_release_by_cookie waits until the buffer is no longer used.
    h = Harness(tmp_path, {"yield_ms": 5})
    g = h.guest()
    session = await open_echo(g)
    shm = g.driver.alloc_buffer(4096)
    assert await g.driver.register(shm) == TeeResult.SUCCESS
    sleeper = asyncio.ensure_future(g.driver.send(
        header(msg.CMD_INVOKE_COMMAND, 2, session=session, func=ECHO_SLEEP),
        [msg.MsgParam(msg.ATTR_TYPE_VALUE_INPUT, 200), msg.MsgParam(msg.ATTR_TYPE_RMEM_OUTPUT,
                                                                     0, 16, shm.cookie)]))
    await wait_until(lambda: h.handler.threads.running(g.ctx.vm.key) > 0)
    assert await g.driver.unregister(shm) == TeeResult.SUCCESS
    assert sleeper.done()  # the unregister only finished after the invoke did
    assert shm.cookie not in VmTeeState.from_json(g.ctx.state.get()).shm


# Threads: ETHREAD_LIMIT, foreign-interrupt RPCs, RETURN_FROM_RPC (§1.3, §1.4) ----------------


async def test_a_slow_backend_yields_and_the_guest_resumes(tmp_path: Path) -> None:
    h = Harness(tmp_path, {"yield_ms": 5})
    g = h.guest()
    h.backend.delay = 0.05
    r = await g.driver.open_session(SECURE_STORAGE_TA)
    assert r.ret == TeeResult.SUCCESS and g.driver.rpc_yields > 0


async def test_return_from_rpc_without_a_thread_is_eresume(h: Harness, g: Guest) -> None:
    assert (await smc(h, g, abi.RETURN_FROM_RPC, 0, PARG, 0)).x[0] == SmcReturn.ERESUME


async def test_over_the_thread_count_is_ethread_limit_with_registers_kept(
        tmp_path: Path) -> None:
    h = Harness(tmp_path, {"yield_ms": 1, "thread_count": 1})
    g = h.guest()
    h.backend.delay = 0.5
    g.memory.poke(PARG, msg.build_arg(header(msg.CMD_OPEN_SESSION, 2),
                                      tuple(meta_params(ECHO_TA))))
    first = await smc(h, g, abi.CALL_WITH_ARG, 0, PARG)
    assert first.x[:4] == (abi.RPC_FOREIGN_INTR, 0, PARG, 0)
    second = await smc(h, g, abi.CALL_WITH_ARG, 0, PARG + 0x1000, vcpu=1)
    assert second.x[0] == SmcReturn.ETHREAD_LIMIT and second.mask == 0x1
    # While a message runs the SHM cache calls are EBUSY, as with a busy OP-TEE thread.
    assert (await smc(h, g, abi.DISABLE_SHM_CACHE)).x[0] == SmcReturn.EBUSY
    again = await smc(h, g, abi.CALL_WITH_ARG, 0, PARG)
    assert again.x[0] == SmcReturn.EBUSY  # the same message while it is still in flight
    h.backend.delay = 0
    while True:
        resumed = await smc(h, g, abi.RETURN_FROM_RPC, *first.x[1:4])
        if resumed.x[0] != abi.RPC_FOREIGN_INTR:
            break
    assert resumed.x[0] == SmcReturn.OK
    assert msg.MsgHeader.parse(g.memory.peek(PARG, 32)).ret == TeeResult.SUCCESS


async def test_messages_a_guest_never_resumes_do_not_pile_up(tmp_path: Path) -> None:
    h = Harness(tmp_path, {"yield_ms": 1, "thread_count": 2})
    g = h.guest()
    h.backend.delay = 0.01
    for i in range(12):
        parg = PARG + i * 0x1000
        g.memory.poke(parg, msg.build_arg(header(msg.CMD_OPEN_SESSION, 2),
                                          tuple(meta_params(ECHO_TA))))
        assert (await smc(h, g, abi.CALL_WITH_ARG, 0, parg)).x[0] == abi.RPC_FOREIGN_INTR
        await wait_until(lambda: h.handler.threads.running(g.ctx.vm.key) == 0)
    # At most 2 x thread_count finished threads, plus those that were running when trimmed.
    assert len(list(h.handler.threads.threads(g.ctx.vm.key))) <= 3 * 2


async def test_an_answer_the_broker_dropped_is_given_again_on_return_from_rpc(
        h: Harness, g: Guest) -> None:
    # The agent gave the guest the "foreign-interrupt" fallback (a0 only) before the answer
    # arrived: the answer's writes and state were dropped; the guest then resumes with a1..a3.
    g.memory.poke(PARG, msg.build_arg(header(msg.CMD_OPEN_SESSION, 2),
                                      tuple(meta_params(ECHO_TA))))
    before = g.ctx.state.get()
    x = (abi.CALL_WITH_ARG, 0, PARG, 0) + (0,) * 14
    answered = await h.handler.handle(Call(0, 1, abi.CALL_WITH_ARG, x), g.ctx)
    assert answered.x[0] == SmcReturn.OK
    g.memory.pending_writes.clear()
    g.ctx.state = MemoryState(before)
    fallback = h.handler.named_fallbacks()["foreign-interrupt"]
    regs = [fallback.x[i] if fallback.mask >> i & 1 else x[i] for i in range(4)]
    resumed = await smc(h, g, abi.RETURN_FROM_RPC, *regs[1:4])
    assert resumed.x[0] == SmcReturn.OK
    out = msg.MsgHeader.parse(g.memory.peek(PARG, 32))
    assert out.ret == TeeResult.SUCCESS
    assert out.session in VmTeeState.from_json(g.ctx.state.get()).sessions


async def test_a_broker_restart_keeps_sessions_and_registrations(h: Harness, g: Guest) -> None:
    session = await open_echo(g)
    shm = g.driver.alloc_buffer(64)
    assert await g.driver.register(shm) == TeeResult.SUCCESS
    h.restart_broker()
    r = await g.driver.invoke(session, ECHO_MIRROR, [GuestParam.mem_in(b"still here"),
                                                     GuestParam.mem_out(32)])
    assert r.ret == TeeResult.SUCCESS and r.outputs[1] == b"still here"
    assert await g.driver.unregister(shm) == TeeResult.SUCCESS

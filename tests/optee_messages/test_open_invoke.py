"""OP-TEE messages through the proxy: locating the message, OPEN_SESSION, INVOKE_COMMAND.

Each test drives OpteeHandler through FakeContext against the real reference TEE in-process
(hyperbroker.testing.optee.Harness). "entry_std.c" and "thread_optee_smc.c" are OP-TEE's
core/tee/entry_std.c and core/arch/arm/kernel/thread_optee_smc.c, whose checks and result codes
the proxy reproduces; layouts are core/include/optee_msg.h's.
"""

from __future__ import annotations

import struct
import uuid
from pathlib import Path

import pytest

from hyperbroker.calls import Call
from hyperbroker.handlers.optee import abi, msg, std
from hyperbroker.handlers.optee.abi import SmcReturn
from hyperbroker.handlers.optee.state import VmTeeState
from hyperbroker.tee.gp import Login, Origin, ParamType, TeeResult
from hyperbroker.testing.optee import (
    ECHO_FILL,
    ECHO_INOUT,
    ECHO_MIRROR,
    ECHO_PANIC,
    ECHO_TA,
    RAM_BASE,
    Guest,
    Harness,
)
from hyperbroker.testing.optee_guest import GuestParam

from .support import PARG, U32, header, meta_params, open_echo, send, smc

# Locating the message (thread_optee_smc.c std_entry_with_parg / std_entry_with_regd_arg) -------


async def test_message_address_must_be_page_aligned(h: Harness, g: Guest) -> None:
    # OP-TEE ABI requirement (thread_optee_smc.c): dynamic SHM maps one page at parg.
    r, _, _ = await send(h, g, header(msg.CMD_OPEN_SESSION, 2), meta_params(ECHO_TA),
                         parg=PARG + 8)
    assert r.x[0] == SmcReturn.EBADADDR


async def test_message_outside_guest_ram_is_ebadaddr(h: Harness, g: Guest) -> None:
    r = await smc(h, g, abi.CALL_WITH_ARG, 0, 0x1000)
    assert r.x[0] == SmcReturn.EBADADDR


async def test_more_than_127_parameters_is_ebadaddr(h: Harness, g: Guest) -> None:
    # optee_msg.h OPTEE_MSG_MAX_NUM_PARAMS.
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


# OPEN_SESSION (entry_std.c entry_open_session) ------------------------------------------------


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


# INVOKE_COMMAND and parameters (entry_std.c copy_in_params, copy_out_param) --------------------


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
    # OPTEE_SMC_SEC_CAP_MEMREF_NULL: TMEM with buf_ptr 0 is a NULL reference of size 0.
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

"""OP-TEE messages through the proxy: CLOSE_SESSION, CANCEL, shared memory, threads and RPCs.

Same harness and sources as test_open_invoke.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from hyperbroker.calls import Call
from hyperbroker.handlers.optee import abi, msg
from hyperbroker.handlers.optee.abi import SmcReturn
from hyperbroker.handlers.optee.state import VmTeeState
from hyperbroker.tee.gp import Origin, TeeResult
from hyperbroker.tee.ta import VmIdentity
from hyperbroker.tee.uuids import SECURE_STORAGE_TA
from hyperbroker.testing.context import MemoryState
from hyperbroker.testing.optee import (
    ECHO_MIRROR,
    ECHO_SLEEP,
    ECHO_TA,
    Guest,
    Harness,
    wait_until,
)
from hyperbroker.testing.optee_guest import GuestParam

from .support import PARG, header, meta_params, open_echo, send, smc

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
    done = await asyncio.wait_for(sleeper, 30)
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


# Threads: ETHREAD_LIMIT, foreign-interrupt RPCs, RETURN_FROM_RPC (optee_smc.h) -------------------


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

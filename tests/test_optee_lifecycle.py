"""Lifecycle of the OP-TEE proxy: VMs going away, the TEE service restarting or unreachable,
and the metrics that show it (issue 5 items 4 and 6)."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

from hyperbroker.handlers.optee.grpc_backend import OpteePlugin
from hyperbroker.handlers.optee.state import VmTeeState
from hyperbroker.tee import server
from hyperbroker.tee.apps import BUILTIN, storage
from hyperbroker.tee.apps.storage import CMD_CREATE, CMD_READ
from hyperbroker.tee.gp import Origin, TeeResult
from hyperbroker.tee.ta import VmIdentity
from hyperbroker.tee.uuids import SECURE_STORAGE_TA
from hyperbroker.testing.metrics import HANDLERS as REGISTRY
from hyperbroker.testing.optee import (
    ECHO_MIRROR,
    ECHO_SLEEP,
    ECHO_TA,
    EchoTa,
    Guest,
    Harness,
    guest_of,
    wait_until,
)
from hyperbroker.testing.optee_guest import GuestParam


def vm_of(g: Guest) -> VmIdentity:
    return VmIdentity(g.ctx.vm.host, g.ctx.vm.name)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def open_ok(g: Guest, ta: uuid.UUID = ECHO_TA) -> int:
    r = await g.driver.open_session(ta)
    assert r.ret == TeeResult.SUCCESS
    return r.session


# VM destroyed -----------------------------------------------------------------------------------


async def test_vm_destroyed_closes_sessions_and_drops_registrations(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    g = h.guest()
    await open_ok(g)
    await open_ok(g, SECURE_STORAGE_TA)
    assert await g.driver.register(g.driver.alloc_buffer(8192)) == TeeResult.SUCCESS
    assert h.service.session_count(vm_of(g)) == 2
    await h.handler.vm_destroyed(g.ctx)
    assert h.service.session_count(vm_of(g)) == 0
    assert g.ctx.state.get() is None
    assert "vm_destroyed" in h.backend.calls


async def test_vm_destroyed_stops_the_vms_running_messages(tmp_path: Path) -> None:
    h = Harness(tmp_path, {"yield_ms": 5})
    g = h.guest()
    session = await open_ok(g)
    sleeper = asyncio.ensure_future(g.driver.invoke(session, ECHO_SLEEP,
                                                    [GuestParam.value_in(30_000)]))
    await wait_until(lambda: h.handler.threads.running(g.ctx.vm.key) > 0)
    await h.handler.vm_destroyed(g.ctx)
    assert h.handler.threads.running(g.ctx.vm.key) == 0
    assert h.service.session_count(vm_of(g)) == 0
    sleeper.cancel()


async def test_vm_destroyed_with_the_service_down_still_cleans_up(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    g = h.guest()
    await open_ok(g)
    h.backend.down = True
    before = sample("hyperbroker_tee_backend_failures_total", command="vm_destroyed",
                    reason="unavailable")
    await h.handler.vm_destroyed(g.ctx)  # no exception, no hang
    assert g.ctx.state.get() is None
    assert sample("hyperbroker_tee_backend_failures_total", command="vm_destroyed",
                  reason="unavailable") == before + 1


async def test_the_next_boot_of_the_vm_replaces_the_old_sessions(tmp_path: Path) -> None:
    # The service missed VM_DESTROYED: the next incarnation's VM_CREATED closes what was left.
    h = Harness(tmp_path)
    g = h.guest()
    await open_ok(g)
    await open_ok(g)
    h.backend.down = True
    await h.handler.vm_destroyed(g.ctx)
    h.backend.down = False
    reborn = h.guest()  # same host and name, empty state: a new boot
    await open_ok(reborn)
    assert h.service.session_count(vm_of(reborn)) == 1


# The TEE service restarting or unreachable --------------------------------------------------------


async def test_service_restart_reports_sessions_lost_with_target_dead(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    g = h.guest()
    session = await open_ok(g, SECURE_STORAGE_TA)
    r = await g.driver.invoke(session, CMD_CREATE, [GuestParam.mem_in(b"k"),
                                                    GuestParam.mem_in(b"kept")])
    assert r.ret == TeeResult.SUCCESS
    h.restart_service()
    r = await g.driver.invoke(session, CMD_READ, [GuestParam.mem_in(b"k"),
                                                  GuestParam.mem_out(16)])
    assert (r.ret, r.origin) == (TeeResult.TARGET_DEAD, Origin.TEE)
    calls = len(h.backend.calls)
    r = await g.driver.invoke(session, CMD_READ, [GuestParam.mem_in(b"k"),
                                                  GuestParam.mem_out(16)])
    assert (r.ret, r.origin) == (TeeResult.TARGET_DEAD, Origin.TEE)
    assert len(h.backend.calls) == calls  # known dead: answered without the service
    assert (await g.driver.cancel(session, 1)).ret == TeeResult.SUCCESS
    assert (await g.driver.close_session(session)).ret == TeeResult.SUCCESS
    fresh = await open_ok(g, SECURE_STORAGE_TA)  # the VM registers again by itself
    assert fresh != session
    r = await g.driver.invoke(fresh, CMD_READ, [GuestParam.mem_in(b"k"), GuestParam.mem_out(16)])
    assert r.ret == TeeResult.SUCCESS and r.outputs[1] == b"kept"  # objects survive


async def test_an_unreachable_service_is_a_communication_error(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    g = h.guest()
    session = await open_ok(g)
    h.backend.down = True
    r = await g.driver.open_session(ECHO_TA)
    assert (r.ret, r.origin, r.session) == (TeeResult.COMMUNICATION, Origin.COMMS, 0)
    r = await g.driver.invoke(session, ECHO_MIRROR)
    assert (r.ret, r.origin) == (TeeResult.COMMUNICATION, Origin.COMMS)
    h.backend.down = False
    r = await g.driver.invoke(session, ECHO_MIRROR, [GuestParam.mem_in(b"x"),
                                                     GuestParam.mem_out(1)])
    assert r.ret == TeeResult.SUCCESS  # the session outlived the outage


async def test_a_close_the_service_missed_is_sent_again_later(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    g = h.guest()
    session = await open_ok(g)
    h.backend.down = True
    r = await g.driver.close_session(session)
    assert (r.ret, r.origin) == (TeeResult.COMMUNICATION, Origin.COMMS)
    state = VmTeeState.from_json(g.ctx.state.get())
    assert session not in state.sessions and len(state.orphans) == 1
    assert h.service.session_count(vm_of(g)) == 1
    h.backend.down = False
    await open_ok(g)  # the next message to the service closes the orphan first
    assert not VmTeeState.from_json(g.ctx.state.get()).orphans
    assert h.service.session_count(vm_of(g)) == 1


async def test_a_silent_service_costs_at_most_the_timeout(tmp_path: Path) -> None:
    # A real gRPC service whose TA never answers in time: the deadline bounds the guest's wait.
    running = await server.start("127.0.0.1:0", tmp_path / "tee", apps=(*BUILTIN, EchoTa))
    handler = OpteePlugin({"backend": f"127.0.0.1:{running.port}", "timeout_ms": 300,
                            "yield_ms": 0})
    g = guest_of(handler)
    try:
        session = await open_ok(g)
        started = time.monotonic()
        r = await g.driver.invoke(session, ECHO_SLEEP, [GuestParam.value_in(20_000)])
        assert (r.ret, r.origin) == (TeeResult.COMMUNICATION, Origin.COMMS)
        assert time.monotonic() - started < 10  # the 300 ms timeout, not the 20 s call
    finally:
        await handler.close()
        await running.stop(grace=0)


async def test_a_service_that_is_not_there_costs_at_most_the_timeout() -> None:
    handler = OpteePlugin({"backend": "127.0.0.1:9", "timeout_ms": 300, "yield_ms": 0})
    g = guest_of(handler)
    started = time.monotonic()
    r = await g.driver.open_session(ECHO_TA)
    assert (r.ret, r.origin) == (TeeResult.COMMUNICATION, Origin.COMMS)
    assert time.monotonic() - started < 10  # bounded by the timeout, with room for load
    await handler.close()


# Metrics ----------------------------------------------------------------------------------------


async def test_metrics_count_sessions_per_ta_latency_parts_and_errors(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    g = h.guest()
    open_before = sample("hyperbroker_tee_sessions_open", ta="secure-storage")
    backend_before = sample("hyperbroker_tee_call_seconds_count", command="invoke_command",
                            part="backend")
    proxy_before = sample("hyperbroker_tee_call_seconds_count", command="invoke_command",
                          part="proxy")
    errors_before = sample("hyperbroker_tee_errors_total", code="ITEM_NOT_FOUND",
                           origin="TRUSTED_APP")
    session = await open_ok(g, SECURE_STORAGE_TA)
    assert sample("hyperbroker_tee_sessions_open", ta="secure-storage") == open_before + 1
    r = await g.driver.invoke(session, storage.CMD_DELETE, [GuestParam.mem_in(b"absent")])
    assert r.ret == TeeResult.ITEM_NOT_FOUND
    assert sample("hyperbroker_tee_errors_total", code="ITEM_NOT_FOUND",
                  origin="TRUSTED_APP") == errors_before + 1
    assert sample("hyperbroker_tee_call_seconds_count", command="invoke_command",
                  part="backend") == backend_before + 1
    assert sample("hyperbroker_tee_call_seconds_count", command="invoke_command",
                  part="proxy") >= proxy_before + 1
    await g.driver.close_session(session)
    assert sample("hyperbroker_tee_sessions_open", ta="secure-storage") == open_before

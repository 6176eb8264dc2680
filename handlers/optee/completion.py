"""Yielding calls, step 3: the work against the TEE backend, and its completion applied.

`run` does the `Work` handlers.optee.std decoded against a handlers.optee.backend.TeeBackend and
yields a `Completion`; `finish` applies a completion to the VM's state and says what to write
back to the guest: ret, ret_origin, session, output values, output sizes and output bytes.
Nothing here reads or writes guest memory; the handler writes what `finish` returns.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from hyperbroker.handlers.optee import msg
from hyperbroker.handlers.optee.backend import (
    BackendStatus,
    BackendUnavailable,
    CancelRequest,
    CloseRequest,
    InvokeRequest,
    OpenSessionRequest,
    TeeBackend,
    TeeVm,
)
from hyperbroker.handlers.optee.shm import Run, split_runs
from hyperbroker.handlers.optee.state import VmTeeState
from hyperbroker.handlers.optee.std import (
    U32,
    CancelWork,
    Closed,
    CloseUndelivered,
    CloseWork,
    Completion,
    Effect,
    InvokeWork,
    Limits,
    Lost,
    Opened,
    OpenWork,
    Registered,
    Unregistered,
    UnregisterWork,
    Work,
)
from hyperbroker.tee.gp import Origin, ParamType, TeeResult

T = TypeVar("T")


def work_command(work: Work) -> str:
    return {OpenWork: "open_session", InvokeWork: "invoke_command", CloseWork: "close_session",
            CancelWork: "cancel", UnregisterWork: "unregister_shm"}[type(work)]


class BackendTimer:
    """Adds up the time spent waiting for the backend during one message."""

    def __init__(self) -> None:
        self.seconds = 0.0

    async def __call__(self, pending: Awaitable[T]) -> T:
        started = time.perf_counter()
        try:
            return await pending
        finally:
            self.seconds += time.perf_counter() - started


async def run(work: Work, backend: TeeBackend, vm: TeeVm, orphans: Sequence[tuple[int, int]],
              register_first: bool, limits: Limits,
              on_failure: Callable[[str, str], None]) -> Completion:
    """Do `work` against the backend. Never raises for an unreachable or misbehaving backend:
    the guest gets TEEC_ERROR_COMMUNICATION from TEEC_ORIGIN_COMMS, as Linux reports a failed
    SMC itself. `on_failure(command, reason)` counts backend failures."""
    command = work_command(work)
    timer = BackendTimer()
    if isinstance(work, UnregisterWork):
        if work.users:
            await asyncio.wait(work.users)
        return Completion(command, TeeResult.SUCCESS, None, Unregistered(work.cookie))
    closed: set[tuple[int, int]] = set()
    try:
        for backend_id, epoch in orphans:
            await timer(backend.close_session(CloseRequest(vm, backend_id, epoch)))
            closed.add((backend_id, epoch))
    except BackendUnavailable as e:
        on_failure("close_orphan", e.reason)
    try:
        done = await _run(work, backend, vm, register_first, limits, timer)
    except BackendUnavailable as e:
        on_failure(command, e.reason)
        effect: Effect | None = None
        if isinstance(work, CloseWork):
            effect = CloseUndelivered(work.gid, work.session.backend, work.session.epoch)
        done = Completion(command, TeeResult.COMMUNICATION, Origin.COMMS, effect,
                          set_session=isinstance(work, OpenWork))
    return Completion(done.command, done.ret, done.origin, done.effect, done.set_session,
                      done.slots, done.outputs, frozenset(closed), timer.seconds)


async def _run(work: Work, backend: TeeBackend, vm: TeeVm, register_first: bool,
               limits: Limits, timer: BackendTimer) -> Completion:
    command = work_command(work)
    if isinstance(work, OpenWork):
        request = OpenSessionRequest(vm, work.ta, work.login, work.client, work.cancel_id,
                                     tuple(s.param for s in work.slots))
        if register_first:
            await timer(backend.vm_created(vm, limits.max_sessions))
        reply = await timer(backend.open_session(request))
        if reply.status == BackendStatus.VM_UNKNOWN:  # the service restarted: register again
            await timer(backend.vm_created(vm, limits.max_sessions))
            reply = await timer(backend.open_session(request))
        if reply.status != BackendStatus.OK:
            raise BackendUnavailable("protocol", f"open session answered {reply.status.name}")
        effect = None
        if reply.ret == TeeResult.SUCCESS:
            if not reply.session:
                raise BackendUnavailable("protocol", "open session succeeded with session 0")
            effect = Opened(reply.session, reply.epoch, str(work.ta))
        return Completion(command, reply.ret, reply.origin, effect, True, work.slots,
                          reply.params)
    if isinstance(work, InvokeWork):
        invoke = InvokeRequest(vm, work.session.backend, work.session.epoch, work.func,
                               work.cancel_id, tuple(s.param for s in work.slots))
        reply = await timer(backend.invoke_command(invoke))
        if reply.status != BackendStatus.OK:  # the session died with the service
            return Completion(command, TeeResult.TARGET_DEAD, Origin.TEE, Lost(work.gid))
        return Completion(command, reply.ret, reply.origin, None, False, work.slots,
                          reply.params)
    if isinstance(work, CloseWork):
        close = CloseRequest(vm, work.session.backend, work.session.epoch)
        reply = await timer(backend.close_session(close))
        if reply.status != BackendStatus.OK:
            return Completion(command, TeeResult.SUCCESS, Origin.TEE, Closed(work.gid))
        return Completion(command, reply.ret, reply.origin, Closed(work.gid))
    assert isinstance(work, CancelWork)
    cancel = CancelRequest(vm, work.session.backend, work.session.epoch, work.cancel_id)
    reply = await timer(backend.cancel(cancel))
    if reply.status != BackendStatus.OK:
        return Completion(command, TeeResult.SUCCESS, Origin.TEE, Lost(work.gid))
    return Completion(command, reply.ret, reply.origin)


@dataclass(frozen=True, slots=True)
class Delivery:
    state: VmTeeState
    patches: tuple[msg.Patch, ...]  # into the message
    writes: tuple[tuple[tuple[Run, ...], bytes], ...]  # output bytes into client buffers
    opened: str | None = None  # TA of a session that became open (metrics)
    closed: str | None = None  # TA of a session that stopped being open (metrics)


def finish(state: VmTeeState, done: Completion) -> Delivery:
    """Apply a completion to the VM's state; the fields and bytes to write back."""
    new, session, opened, closed = state, 0, None, None
    effect = done.effect
    if isinstance(effect, Opened):
        new, session = state.add_session(effect.backend, effect.epoch, effect.ta)
        opened = effect.ta if new is not state else None
    elif isinstance(effect, Closed | CloseUndelivered | Lost):
        rec = state.sessions.get(effect.gid)
        if isinstance(effect, Lost):
            new = state.mark_lost(effect.gid)
        else:
            new = state.drop_session(effect.gid)
            if isinstance(effect, CloseUndelivered) and rec is not None and not rec.lost:
                new = new.add_orphan(effect.backend, effect.epoch)
        closed = rec.ta if rec is not None and not rec.lost else None
    elif isinstance(effect, Registered):
        if effect.cookie not in state.shm:
            new = state.register(effect.cookie, effect.buffer)
    elif isinstance(effect, Unregistered):
        new = state.unregister(effect.cookie)
    new = new.forget_orphans(done.orphans_closed)

    patches = [msg.patch_result(done.ret, done.origin)]
    if done.set_session:
        patches.append(msg.patch_session(session))
    writes: list[tuple[tuple[Run, ...], bytes]] = []
    if len(done.outputs) == len(done.slots):
        for slot, out in zip(done.slots, done.outputs, strict=True):
            kind = slot.param.type
            if kind in (ParamType.VALUE_OUTPUT, ParamType.VALUE_INOUT):
                patches.append(msg.patch_value(slot.index, out.a & U32, out.b & U32))
            elif kind in (ParamType.MEMREF_OUTPUT, ParamType.MEMREF_INOUT):
                patches.append(msg.patch_size(slot.index, out.size))
                if out.data and len(out.data) <= slot.capacity and slot.runs:
                    runs = tuple(split_runs(slot.runs, 0, len(out.data)))
                    writes.append((runs, out.data))
    return Delivery(new, tuple(patches), tuple(writes), opened, closed)

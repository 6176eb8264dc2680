"""Dispatch: from a received call to a queued result, once per (vCPU, seq).

The Dispatcher routes a call through its VM's profile to a handler, runs it (eagerly where the
handler allows), folds failures into the rule's fallback, and batches state writes per host so
they are committed, under the host's lease, before the results that depend on them leave. It
gives each handler call a CallCtx (broker.context); hosts, leases and the VMs' lifecycle are
its base, broker.hosts. This module knows handlers only through handlers.api and the wire only
through broker_pb2 and wire.vmm.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from hyperbroker.broker import metrics, peers
from hyperbroker.broker.context import CallCtx
from hyperbroker.broker.hosts import Hosts
from hyperbroker.broker.peers import host_peer, note
from hyperbroker.broker.policy_versions import PolicyRegistry
from hyperbroker.broker.sessions import (
    NO_SEQ,
    FrameWriter,
    HostSession,
    VcpuRecord,
    VmSession,
    stored_result,
)
from hyperbroker.broker.store import Store
from hyperbroker.calls import NOT_SUPPORTED, ActionKind, Call, Outcome, Result
from hyperbroker.handlers.api import Handler
from hyperbroker.runtime.drive import run_eagerly
from hyperbroker.runtime.fairqueue import Admit, FairQueue
from hyperbroker.wire.v1 import broker_pb2
from hyperbroker.wire.vmm import CALL, ResultSource, pack_result

__all__ = ["CallCtx", "DispatchInfo", "Dispatcher", "FrameWriter", "HostSession"]


DISPATCH_CACHE_LIMIT = 4096
# A vCPU has one call in flight, so a VM's queue holds about one call per vCPU; beyond this the
# call falls back at once rather than holding memory.
FAIR_MAX_QUEUED_PER_VM = 512
OUTCOME_NAMES = [o.name.lower() for o in Outcome]
RESET_ACTIONS = frozenset({ActionKind.SYSTEM_RESET, ActionKind.SYSTEM_RESET2})
SOURCE_BROKER = int(ResultSource.BROKER)


@dataclass(slots=True)
class DispatchInfo:
    """Everything the hot path needs for one function ID under one profile, bound once."""

    handler: Handler | None
    handler_name: str
    function: str
    fallback: Result
    timeout_s: float
    observe: list[Callable[..., None]]  # Histogram.observe of each Outcome's child
    windows: list[deque[float]]  # each Outcome's recent latencies, for the Admin API


# host, vm, its vCPU record, vcpu, seq, dispatch info, fid, flags, x0..x17, t_frame
QueuedCall = tuple[HostSession, VmSession, VcpuRecord, int, int, DispatchInfo, int, int,
                   tuple[int, ...], int]


class Dispatcher(Hosts):
    def __init__(self, store: Store, policies: PolicyRegistry, *, vm_rate: float = 0.0,
                 vm_burst: float = 0.0, reregister_grace_s: float = 60.0,
                 broker_id: str = "broker", lease_ttl_s: float = 30.0,
                 fair_queue: bool = True) -> None:
        super().__init__(store, policies, reregister_grace_s=reregister_grace_s,
                         broker_id=broker_id, lease_ttl_s=lease_ttl_s)
        # Calls per second one VM may have handled, with bursts up to vm_burst; 0: no limit.
        # Over it, a VM's calls wait in its fair queue (or, with fair_queue off, fall back at
        # once), released in round-robin order as its bucket refills.
        self.vm_rate = vm_rate
        self.fair: FairQueue[VmSession, QueuedCall] | None = (
            FairQueue(vm_rate, vm_burst,
                      max_queued=FAIR_MAX_QUEUED_PER_VM if fair_queue else 0)
            if vm_rate else None)
        self._fair_timer: asyncio.TimerHandle | None = None
        self.in_flight = 0
        self.calls = 0
        self.duplicates = 0
        self.handler_errors = 0
        self.recent: dict[tuple[str, str, str], deque[float]] = {}
        self._no_handler: dict[str, DispatchInfo] = {}
        # Read at scrape time: nothing to update on the hot path.
        metrics.CALLS_IN_FLIGHT.set_function(lambda: self.in_flight)

    # ---- calls ---------------------------------------------------------------------------
    def dispatch_info(self, vm: VmSession, fid: int) -> DispatchInfo:
        info = vm.cache.get(fid)
        if info is not None:
            return info
        policy = vm.pv.policy
        profile = policy.profiles[vm.profile]
        entry = profile.lookup(fid)
        if entry is None:
            info = self._unrouted(policy.function_name(fid))
        else:
            handler = policy.handlers[entry.handler]
            function = policy.function_name(fid)
            info = DispatchInfo(handler, entry.handler, function, entry.rule.fallback,
                                entry.rule.deadline_us / 1e6,
                                *self._bind(entry.handler, function))
        if len(vm.cache) < DISPATCH_CACHE_LIMIT:
            vm.cache[fid] = info
        return info

    def _bind(self, handler: str, function: str
              ) -> tuple[list[Callable[..., None]], list[deque[float]]]:
        """The metric children and stats windows of (handler, function), once per outcome."""
        observe = [metrics.CALL_DURATION.labels(handler, function, o).observe
                   for o in OUTCOME_NAMES]
        windows = [self.recent.setdefault((handler, function, o), deque(maxlen=2048))
                   for o in OUTCOME_NAMES]
        return observe, windows

    def _unrouted(self, function: str) -> DispatchInfo:
        info = self._no_handler.get(function)
        if info is None:
            info = DispatchInfo(None, "none", function, NOT_SUPPORTED, 0.0,
                                *self._bind("none", function))
            self._no_handler[function] = info
        return info

    def on_calls(self, host: HostSession, records: bytes, t_frame: int) -> None:
        """Dispatch every `struct hb_call` record of a frame. The stream reader writes what
        this queued as soon as it returns (BrokerService.Connect), so nothing wakes the writer."""
        if len(records) % CALL.size:
            note("call_records", host_peer(host.host), "%d bytes of call records from %s, not a "
                 "multiple of %d; dropped", len(records), host.peer, CALL.size)
            return
        n = 0
        for v in CALL.iter_unpack(records):
            n += 1
            self.dispatch(host, v[0], v[1], v[2], v[3], v[4], v[6:], t_frame)
        metrics.BATCH_SIZE.observe(n)

    def dispatch(self, host: HostSession, vm_id: int, vcpu: int, seq: int, fid: int, flags: int,
                 x: tuple[int, ...], t_frame: int) -> None:
        self.calls += 1
        host.calls += 1
        vm = host.vms.get(vm_id)
        if vm is None or vcpu >= vm.nr_vcpus:
            note("unknown_vm", host_peer(host.host), "call for unknown vm %d / vcpu %d from %s "
                 "refused", vm_id, vcpu, host.peer)
            host.queue_result(self._record(vm_id, vcpu, seq, NOT_SUPPORTED, 0, 0, None), None)
            return
        rec = vm.vcpus[vcpu]
        if seq == rec.last_seq and rec.last_result is not None:
            self.duplicates += 1
            metrics.DUPLICATE_CALLS.inc()
            host.queue_result(rec.last_result, rec.last_writes)
            return
        if seq == rec.in_flight_seq:
            self.duplicates += 1
            metrics.DUPLICATE_CALLS.inc()
            return  # the running call's result goes to the host's current stream
        info = self.dispatch_info(vm, fid)
        vm.calls += 1
        rec.calls += 1
        handler = info.handler
        if handler is None:
            t_now = time.monotonic_ns()
            self._finish(host, vm, rec, vcpu, seq, info, None, NOT_SUPPORTED, None, t_frame,
                         t_now)
            return
        fair = self.fair
        if fair is not None:
            now = time.monotonic_ns()
            queued = (host, vm, rec, vcpu, seq, info, fid, flags, x, t_frame)
            admit = fair.offer(vm, queued, now, t_frame + int(info.timeout_s * 1e9))
            if admit is Admit.QUEUED:
                rec.in_flight_seq = seq  # a re-sent copy is a duplicate while it waits
                self._arm_fair(now)
                return
            if admit is Admit.REFUSED:
                self._fall_back(queued)
                return
        self._start(host, vm, rec, vcpu, seq, info, fid, flags, x, t_frame)

    def _start(self, host: HostSession, vm: VmSession, rec: VcpuRecord, vcpu: int, seq: int,
               info: DispatchInfo, fid: int, flags: int, x: tuple[int, ...],
               t_frame: int) -> None:
        handler = info.handler
        assert handler is not None
        call = Call(vcpu, seq, fid, x, flags)
        ctx = CallCtx(self, host, vm, info.handler_name)
        ctx.call = call
        rec.in_flight_seq = seq
        self.in_flight += 1
        t_start = time.monotonic_ns()

        def done(result: Result | None, exc: BaseException | None) -> None:
            self.in_flight -= 1
            self._finish(host, vm, rec, vcpu, seq, info, ctx, result, exc, t_frame, t_start)
            host.wake()

        if handler.eager:
            task = run_eagerly(handler.handle(call, ctx), done)
        else:
            task = asyncio.ensure_future(self._run(handler.handle(call, ctx), info.timeout_s))
            task.add_done_callback(lambda t: done(*_task_outcome(t)))
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # ---- the fair queue (runtime.fairqueue): VMs over their rate wait their turn ---------
    def _arm_fair(self, now: int) -> None:
        assert self.fair is not None
        at = self.fair.next_event_ns(now)
        if at is None or self._fair_timer is not None:
            return
        self._fair_timer = asyncio.get_running_loop().call_later(
            max(0.0, (at - now) / 1e9), self._release)

    def _release(self) -> None:
        self._fair_timer = None
        assert self.fair is not None
        now = time.monotonic_ns()
        released, expired = self.fair.poll(now)
        woken: set[HostSession] = set()
        for q in expired:
            self._fall_back(q)
            woken.add(q[0])
        for host, vm, rec, vcpu, seq, info, fid, flags, x, t_frame in released:
            if host.vms.get(vm.vm_id) is not vm or rec.in_flight_seq != seq:
                continue  # the VM is gone or was reset while its call waited
            rec.in_flight_seq = NO_SEQ
            self._start(host, vm, rec, vcpu, seq, info, fid, flags, x, t_frame)
            woken.add(host)
        for host in woken:
            host.wake()
        self._arm_fair(now)

    def _fall_back(self, q: QueuedCall) -> None:
        """Over its rate, past its deadline or its queue full: the rule's fallback."""
        host, vm, rec, vcpu, seq, info = q[:6]
        metrics.RATE_LIMITED.inc()
        fb = info.fallback
        self._finish(host, vm, rec, vcpu, seq, info, None,
                     Result(fb.x, fb.mask, Outcome.FALLBACK), None, q[9], time.monotonic_ns())

    def forget_vm(self, vm: VmSession) -> None:
        if self.fair is not None:
            self.fair.forget(vm)

    @staticmethod
    async def _run(coro: Coroutine[Any, Any, Result], timeout_s: float) -> Result:
        async with asyncio.timeout(timeout_s):
            return await coro

    def _finish(self, host: HostSession, vm: VmSession, rec: VcpuRecord, vcpu: int, seq: int,
                info: DispatchInfo, ctx: CallCtx | None, result: Result | None,
                exc: BaseException | None, t_frame: int, t_start: int) -> None:
        if exc is not None or not isinstance(result, Result):
            self.handler_errors += 1
            metrics.HANDLER_ERRORS.labels(info.handler_name).inc()
            # A guest can make its calls fail as often as it likes: within its host's budget.
            peer = host_peer(host.host)
            if exc is None:
                peers.log.error(peer, "handler %s returned %r for %s, not a Result",
                                info.handler_name, result, info.function)
            elif isinstance(exc, TimeoutError):
                peers.log.error(peer, "handler %s: %s on vm %s timed out", info.handler_name,
                                info.function, vm.info.key)
            else:
                peers.log.error(peer, "handler %s failed on %s from vm %s vcpu %d",
                                info.handler_name, info.function, vm.info.key, vcpu,
                                exc_info=exc)
            fb = info.fallback
            result = Result(fb.x, fb.mask, Outcome.INTERNAL_ERROR)
            if ctx is not None:
                ctx.writes.clear()  # a failed call changes no guest memory, and no state
                ctx.roll_back()
        t_end = time.monotonic_ns()
        writes = None
        if ctx is not None and ctx.writes:
            writes = broker_pb2.ResultWrites(vm_id=vm.vm_id, vcpu=vcpu, seq=seq,
                                             writes=ctx.writes)
        record = self._record(vm.vm_id, vcpu, seq, result, t_start - t_frame, t_end - t_start,
                              ctx)
        if result.actions and any(a.kind in RESET_ACTIONS for a in result.actions):
            # The handlers forget the boot before the VMM learns of the reset, so the rebooted
            # guest's first call already finds them clean.
            self._spawn(self._reset_then(host, vm, lambda: host.queue_result(record, writes)))
        else:
            host.queue_result(record, writes)
        if ctx is not None and ctx.durable:
            host.batch.last_results[(vm.key, vcpu)] = (seq, stored_result(record, writes))
        rec.last_seq = seq
        rec.last_result = record
        rec.last_writes = writes
        rec.last_call = ((info.handler_name, ctx.call, result)
                         if ctx is not None and ctx.durable and ctx.call is not None else None)
        rec.in_flight_seq = NO_SEQ
        seconds = (t_end - t_frame) / 1e9
        info.observe[result.outcome](seconds)
        info.windows[result.outcome].append(seconds)

    @staticmethod
    def _record(vm_id: int, vcpu: int, seq: int, result: Result, queued_ns: int,
                handler_ns: int, ctx: CallCtx | None) -> bytes:
        """The `struct hb_result` record (and its actions) the agent hands to the VMM."""
        mem_ns, mem_trips = (ctx.memory_ns, ctx.memory_round_trips) if ctx is not None else (0, 0)
        return pack_result(vm_id, vcpu, seq, result.outcome, result.mask, result.x, 0, 0,
                           queued_ns, handler_ns, mem_ns, mem_trips, SOURCE_BROKER,
                           result.actions)



def _task_outcome(task: asyncio.Task[Result]) -> tuple[Result | None, BaseException | None]:
    if task.cancelled():
        return None, asyncio.CancelledError()
    exc = task.exception()
    return (None, exc) if exc is not None else (task.result(), None)

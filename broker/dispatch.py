"""Dispatch: from a received call to a queued result, once per (vCPU, seq).

The Dispatcher routes a call through its VM's profile to a handler, runs it (eagerly where the
handler allows), folds failures into the rule's fallback, and batches state writes so they are
committed before the results that depend on them leave. It registers, resets and destroys VMs
(broker.sessions holds them) and gives each handler call a CallCtx (broker.context). This module
knows handlers only through handlers.api and the wire only through broker_pb2 and wire.vmm.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from hyperbroker.broker import metrics
from hyperbroker.broker.context import CallCtx, StateDoc
from hyperbroker.broker.policy_versions import PolicyRegistry
from hyperbroker.broker.sessions import (
    NO_SEQ,
    FrameWriter,
    HostSession,
    VcpuRecord,
    VmSession,
    load_stored_result,
    regions_of,
    stored_result,
)
from hyperbroker.broker.store import Store, StoreBatch
from hyperbroker.calls import NOT_SUPPORTED, ActionKind, Call, Outcome, Result
from hyperbroker.handlers.api import Handler
from hyperbroker.runtime.drive import run_eagerly
from hyperbroker.wire.v1 import broker_pb2
from hyperbroker.wire.vmm import CALL, ResultSource, pack_result

__all__ = ["CallCtx", "DispatchInfo", "Dispatcher", "FrameWriter", "HostSession"]

log = logging.getLogger("hyperbroker.broker")

DISPATCH_CACHE_LIMIT = 4096
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


class Dispatcher:
    def __init__(self, store: Store, policies: PolicyRegistry, *, vm_rate: float = 0.0,
                 vm_burst: float = 0.0, reregister_grace_s: float = 60.0) -> None:
        self.reregister_grace_s = reregister_grace_s
        self.store = store
        # Calls per second one VM may have handled, with bursts up to vm_burst; 0: no limit.
        self.vm_rate = vm_rate
        self.vm_burst = vm_burst or vm_rate
        self.policies = policies
        self.batch = StoreBatch()
        self.hosts: dict[str, HostSession] = {}
        self._shared: dict[str, StateDoc] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.in_flight = 0
        self.calls = 0
        self.duplicates = 0
        self.handler_errors = 0
        self.recent: dict[tuple[str, str, str], deque[float]] = {}
        self._no_handler: dict[str, DispatchInfo] = {}
        # Read at scrape time: nothing to update on the hot path.
        metrics.CALLS_IN_FLIGHT.set_function(lambda: self.in_flight)

    # ---- state ---------------------------------------------------------------------------
    def shared_doc(self, handler_name: str) -> StateDoc:
        doc = self._shared.get(handler_name)
        if doc is None:
            doc = StateDoc(handler_name, self.store.load_shared_state(handler_name))
            self._shared[handler_name] = doc
        return doc

    def flush_store(self) -> None:
        if self.batch:
            batch, self.batch = self.batch, StoreBatch()
            self.store.commit(batch)

    # ---- hosts and VMs -------------------------------------------------------------------
    def host(self, name: str) -> HostSession:
        session = self.hosts.get(name)
        if session is None:
            session = self.hosts[name] = HostSession(name)
        return session

    def expire_hosts(self, expiry_s: float) -> None:
        """Hosts whose agent has been away longer than `expiry_s` are gone: clean up their VMs."""
        now = time.monotonic()
        for name, session in list(self.hosts.items()):
            if session.writer is not None or session.disconnected_at is None:
                continue
            if now - session.disconnected_at < expiry_s:
                continue
            log.warning("host %s away for %.0f s: destroying its %d VMs", name,
                        now - session.disconnected_at, len(session.vms))
            for vm_id in list(session.vms):
                self.destroy_vm(session, vm_id)
            del self.hosts[name]

    def register_vm(self, host: HostSession, reg: broker_pb2.VmRegistered) -> None:
        pv = self.policies.get(reg.policy_version)
        if pv is None:
            host.queue_rejected(reg.vm_id, f"policy version {reg.policy_version} is unknown to "
                                           "this broker")
            return
        if reg.policy_digest and reg.policy_digest != pv.policy.digest:
            host.queue_rejected(reg.vm_id, f"policy version {reg.policy_version} of this broker "
                                           "is not the text the VM's filter was compiled from "
                                           "(different store?)")
            return
        if (reg.profile or "default") not in pv.policy.profiles:
            host.queue_rejected(reg.vm_id, f"profile {reg.profile!r} is not in policy version "
                                           f"{reg.policy_version}")
            return
        if not 0 < reg.nr_vcpus <= 512:
            host.queue_rejected(reg.vm_id, f"nr_vcpus {reg.nr_vcpus} outside 1..512")
            return
        old = host.vms.get(reg.vm_id)
        if old is not None:
            if old.name == reg.name and old.incarnation == reg.incarnation:
                old.generation = host.generation
                return  # a re-registration after reconnecting: the session lives on
            # The agent reused the handle for another registration: the old boot is over.
            log.info("vm %s (id %d) replaced by a new registration %s", old.info.key, old.vm_id,
                     reg.name)
            self.destroy_vm(host, reg.vm_id)
        for vm_id, held in list(host.vms.items()):
            if (held.name == reg.name and held.incarnation == reg.incarnation
                    and held.nr_vcpus == reg.nr_vcpus and held.regions == regions_of(reg)):
                # The same boot under a new handle (a restarted agent numbers VMs afresh).
                del host.vms[vm_id]
                held.vm_id, held.generation = reg.vm_id, host.generation
                for rec in held.vcpus:
                    rec.rename(reg.vm_id)
                host.vms[reg.vm_id] = held
                log.info("vm %s resumed as id %d", held.info.key, reg.vm_id)
                return
            if held.name == reg.name:
                self.destroy_vm(host, vm_id)  # the same name, another boot: that one is over
        vm = VmSession(host.host, reg, pv)
        vm.generation = host.generation
        vm.tokens = self.vm_burst
        for vcpu, (seq, blob) in self.store.load_last_results(vm.key).items():
            if vcpu < vm.nr_vcpus:
                rec = vm.vcpus[vcpu]
                rec.last_result, rec.last_writes = load_stored_result(blob)
                rec.last_seq = seq
                rec.rename(vm.vm_id)  # the agent may have given the VM a new handle since
        host.vms[reg.vm_id] = vm
        metrics.VMS.inc()
        log.info("vm %s registered (id %d, profile %s, policy v%d, %d vCPUs)", vm.info.key,
                 vm.vm_id, vm.profile, pv.version, vm.nr_vcpus)

    def reconcile(self, host: HostSession, live: dict[int, str]) -> None:
        """The agent's list of its VMs (AgentHello.live_vms): every VM held for the host that
        is not in it, or is there as another incarnation, ended while the stream was down."""
        for vm_id, vm in list(host.vms.items()):
            if live.get(vm_id) != vm.incarnation:
                log.info("vm %s is no longer on host %s: destroying it", vm.info.key, host.host)
                self.destroy_vm(host, vm_id)

    def divergent(self, host: HostSession, vm_id: int, vcpu: int, seq: int) -> None:
        """The agent answered (vm, vcpu, seq) with its fallback before this broker's result
        arrived: if that result changed state, its handler undoes it."""
        metrics.DIVERGENT_RESULTS.inc()
        vm = host.vms.get(vm_id)
        if vm is None or vcpu >= vm.nr_vcpus:
            return
        rec = vm.vcpus[vcpu]
        if rec.last_seq != seq or rec.last_call is None:
            log.info("vm %s vcpu %d seq %d: the guest got the fallback; nothing to undo",
                     vm.info.key, vcpu, seq)
            return
        name, call, result = rec.last_call
        rec.last_call = None
        # Stepped at once: the guest's retry may be in this same frame, right behind the report.
        task = run_eagerly(self._undo(host, vm, name, call, result), lambda r, e: None)
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _undo(self, host: HostSession, vm: VmSession, name: str, call: Call,
                    result: Result) -> None:
        ctx = CallCtx(self, host, vm, name)
        try:
            await vm.pv.policy.handlers[name].undo(call, result, ctx)
        except Exception:
            log.exception("handler %s failed to undo %#x seq %d of vm %s", name,
                          call.function_id, call.seq, vm.info.key)
            return
        log.warning("vm %s vcpu %d: %s undid fid %#x seq %d, whose result the guest never saw",
                    vm.info.key, call.vcpu, name, call.function_id, call.seq)
        self.flush_store()

    def adopt(self, host: HostSession) -> None:
        """A new agent process says hello for the host: its VMMs register again the VMs that
        still run (the same boot IDs resume them); after the grace, the others are gone."""
        host.generation += 1
        asyncio.get_running_loop().call_later(self.reregister_grace_s, self._sweep, host,
                                              host.generation)

    def _sweep(self, host: HostSession, generation: int) -> None:
        if host.generation != generation:
            return  # yet another agent process came since: its own sweep decides
        for vm_id, vm in list(host.vms.items()):
            if vm.generation < generation:
                log.info("vm %s was not registered again after its agent restarted: destroying "
                         "it", vm.info.key)
                self.destroy_vm(host, vm_id)

    def destroy_vm(self, host: HostSession, vm_id: int) -> None:
        vm = host.vms.pop(vm_id, None)
        if vm is None:
            return
        metrics.VMS.dec()
        self._spawn(self._cleanup_vm(host, vm))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def reset_vm(self, host: HostSession, vm_id: int, request_id: int) -> None:
        """The VMM reset the VM by itself (HB_MSG_VM_RESET); answered once handlers forgot it."""
        vm = host.vms.get(vm_id)
        if vm is None:
            host.queue_reset_done(request_id)  # nothing to forget here
            return
        self._spawn(self._reset_then(host, vm, lambda: host.queue_reset_done(request_id)))

    async def _reset_then(self, host: HostSession, vm: VmSession,
                          then: Callable[[], None]) -> None:
        """Every handler of the VM's profile forgets per-boot state; then `then` (the answer)."""
        policy = vm.pv.policy
        for name in sorted({r.handler for r in policy.profiles[vm.profile].rules if r.handler}):
            try:
                await policy.handlers[name].vm_reset(CallCtx(self, host, vm, name))
            except Exception:
                log.exception("handler %s failed to reset vm %s", name, vm.info.key)
        log.info("vm %s reset", vm.info.key)
        then()
        host.wake()

    async def _cleanup_vm(self, host: HostSession, vm: VmSession) -> None:
        """Run every handler's vm_destroyed hook, then drop the VM's records."""
        policy = vm.pv.policy
        profile = policy.profiles[vm.profile]
        used = {r.handler for r in profile.rules if r.handler}
        for name in sorted(used):
            ctx = CallCtx(self, host, vm, name)
            try:
                await policy.handlers[name].vm_destroyed(ctx)
            except Exception:
                log.exception("handler %s failed to clean up vm %s", name, vm.info.key)
        for state_key in [k for k in self.batch.vm_state if k[0] == vm.key]:
            del self.batch.vm_state[state_key]
        for result_key in [k for k in self.batch.last_results if k[0] == vm.key]:
            del self.batch.last_results[result_key]
        self.flush_store()
        self.store.forget_vm(vm.key)
        log.info("vm %s destroyed", vm.info.key)

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
            log.error("host %s sent %d bytes of call records, not a multiple of %d; dropped",
                      host.host, len(records), CALL.size)
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
            log.warning("host %s: call for unknown vm %d / vcpu %d refused", host.host, vm_id,
                        vcpu)
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
        if self.vm_rate and not self._admit(vm):
            metrics.RATE_LIMITED.inc()
            fb = info.fallback
            t_now = time.monotonic_ns()
            self._finish(host, vm, rec, vcpu, seq, info, None,
                         Result(fb.x, fb.mask, Outcome.FALLBACK), None, t_frame, t_now)
            return
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

    def _admit(self, vm: VmSession) -> bool:
        """Token bucket per VM: one guest flooding calls cannot starve the others."""
        now = time.monotonic_ns()
        vm.tokens = min(self.vm_burst, vm.tokens + (now - vm.refilled_ns) * self.vm_rate / 1e9)
        vm.refilled_ns = now
        if vm.tokens < 1.0:
            return False
        vm.tokens -= 1.0
        return True

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
            if exc is None:
                log.error("handler %s returned %r for %s, not a Result", info.handler_name,
                          result, info.function)
            elif isinstance(exc, TimeoutError):
                log.error("handler %s: %s on vm %s timed out", info.handler_name, info.function,
                          vm.info.key)
            else:
                log.error("handler %s failed on %s from vm %s vcpu %d", info.handler_name,
                          info.function, vm.info.key, vcpu, exc_info=exc)
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
            self.batch.last_results[(vm.key, vcpu)] = (seq, stored_result(record, writes))
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

    async def drain(self, timeout_s: float) -> None:
        """Wait for running handlers (and VM clean-ups) to finish, at most `timeout_s`."""
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout_s)
        self.flush_store()


def _task_outcome(task: asyncio.Task[Result]) -> tuple[Result | None, BaseException | None]:
    if task.cancelled():
        return None, asyncio.CancelledError()
    exc = task.exception()
    return (None, exc) if exc is not None else (task.result(), None)

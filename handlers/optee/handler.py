"""The OP-TEE proxy handler: the OP-TEE SMC ABI for guests, a TEE service behind it.

Fast calls are answered from handlers.optee.abi. Yielding calls carry a message in guest memory:
handlers.optee.std locates and checks it, the TEE backend serves it, and the answer (ret, origin,
session, outputs) is written back with the result. A message the backend takes longer than
`yield_ms` to serve returns to the guest as a foreign-interrupt RPC and is picked up by
RETURN_FROM_RPC (handlers.optee.threads), so a slow TEE never holds a vCPU for long. Per-VM
state (sessions, registered shared memory) lives in ctx.state; a destroyed VM's sessions are
closed at the service and its registrations dropped.

This class is the ABI and its state; the TEE service it fronts is a TeeBackend given to it. The
installed `optee` plugin (handlers.optee.grpc_backend.OpteePlugin) reaches the service over gRPC
and adds the transport's keys (`backend`, `tls_*`, `timeout_ms`: docs/tee-proxy.md).

Configuration (policy `config:`): `yield_ms` (0: never yield), `thread_count`
(GET_THREAD_COUNT and the per-VM limit on messages in flight), `max_sessions` (per VM, 0: the
service's), `max_memref_bytes`,
`max_shm_buffers`, `max_shm_buffer_pages`, `max_shm_pages`, `os_revision` ("major.minor"),
`ta_names` (TA UUID -> metrics label).
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from hyperbroker.calls import Call, Outcome, Result
from hyperbroker.handlers.api import Abi, CallContext, GuestMemoryError, Handler, HandlerConfigError
from hyperbroker.handlers.optee import abi, completion, metrics, std
from hyperbroker.handlers.optee.abi import SmcReturn
from hyperbroker.handlers.optee.backend import BackendUnavailable, TeeBackend, TeeVm
from hyperbroker.handlers.optee.shm import split_runs, write_runs
from hyperbroker.handlers.optee.state import VmTeeState
from hyperbroker.handlers.optee.threads import Key, Thread, ThreadTable
from hyperbroker.smccc import is_fast
from hyperbroker.tee.uuids import WELL_KNOWN

U32 = 0xFFFF_FFFF

CONFIG_KEYS = (
    "yield_ms", "thread_count", "max_sessions", "max_memref_bytes", "max_shm_buffers",
    "max_shm_buffer_pages", "max_shm_pages", "os_revision", "ta_names",
)

# Calls whose answer depends on the function ID alone.
STATIC_IDS = (
    abi.CALLS_COUNT, abi.CALLS_UID, abi.CALLS_REVISION, abi.GET_OS_UUID, abi.GET_OS_REVISION,
    abi.GET_THREAD_COUNT, abi.GET_SHM_CONFIG, abi.BOOT_SECONDARY, abi.L2CC_MUTEX,
    abi.VM_CREATED, abi.VM_DESTROYED, abi.ENABLE_ASYNC_NOTIF, abi.GET_ASYNC_NOTIF_VALUE,
    abi.GET_PROTMEM_CONFIG,
)


def _fold(answer: abi.Answer) -> Result:
    return Result.regs(*answer.regs, outcome=Outcome.GUEST_ERROR if answer.error else Outcome.OK)


def _smc_error(code: SmcReturn) -> Result:
    metrics.smc_error(code.name).inc()
    if code == SmcReturn.ETHREAD_LIMIT:  # A1-a7 preserved
        return Result((int(code),), mask=0x1, outcome=Outcome.GUEST_ERROR)
    return Result.regs(int(code), outcome=Outcome.GUEST_ERROR)


class OpteeHandler(Handler):
    plugin = "optee"
    abi = Abi("optee", abi.RANGES, abi.FUNCTION_NAMES)

    @classmethod
    def config_keys(cls) -> Sequence[str]:
        return CONFIG_KEYS

    def __init__(self, config: Mapping[str, Any], *, backend: TeeBackend | None = None) -> None:
        super().__init__(config)
        c = self.config
        self.yield_s = config_int(c, "yield_ms", 20, 0, 600_000) / 1000
        self.thread_count = config_int(c, "thread_count", 8, 1, 1024)
        self.limits = std.Limits(
            max_memref_bytes=config_int(c, "max_memref_bytes", std.Limits().max_memref_bytes, 0,
                                  64 << 20),
            max_shm_buffers=config_int(c, "max_shm_buffers", 256, 1, 1 << 16),
            max_shm_buffer_pages=config_int(c, "max_shm_buffer_pages", 4096, 1, 1 << 20),
            max_shm_pages=config_int(c, "max_shm_pages", 16384, 1, 1 << 24),
            max_sessions=config_int(c, "max_sessions", 0, 0, 1 << 16),
        )
        self.fast = abi.FastConfig(self.thread_count, _revision(c.get("os_revision", "4.0")))
        self.ta_names = dict(WELL_KNOWN)
        self.ta_names.update(_ta_names(c.get("ta_names", {})))
        self.backend = backend if backend is not None else self.connect()
        self.threads: ThreadTable[std.Completion] = ThreadTable()

    def connect(self) -> TeeBackend:
        """The TEE backend when none is given; this class has no transport of its own."""
        raise HandlerConfigError(
            "no TEE backend: give one to OpteeHandler, or use the installed optee plugin "
            "(handlers.optee.grpc_backend.OpteePlugin), which reaches a TEE service over gRPC")

    def static_answers(self) -> Mapping[int, Result]:
        return {fid: _fold(abi.fast_call(fid, 0, self.fast) or abi.UNKNOWN) for fid in STATIC_IDS}

    def named_fallbacks(self) -> Mapping[str, Result]:
        return {
            # For the yielding range: only a0 is written, so a1..a3 keep the call's registers and
            # the guest comes back with RETURN_FROM_RPC naming the message (handlers.optee.threads).
            "foreign-interrupt": Result((abi.RPC_FOREIGN_INTR,), mask=0x1,
                                        outcome=Outcome.FALLBACK),
            "unknown-function": Result.regs(SmcReturn.UNKNOWN_FUNCTION, outcome=Outcome.FALLBACK),
        }

    def _ta_label(self, ta: str) -> str:
        try:
            return self.ta_names.get(uuid.UUID(ta), "other")
        except ValueError:
            return "other"

    # Calls -------------------------------------------------------------------------------------

    async def handle(self, call: Call, ctx: CallContext) -> Result:
        fid = call.function_id
        answer = abi.fast_call(fid, call.arg(1), self.fast)
        if answer is not None:
            return _fold(answer)
        if fid in (abi.DISABLE_SHM_CACHE, abi.ENABLE_SHM_CACHE):
            return _fold(abi.shm_cache(fid, busy=self.threads.running(ctx.vm.key) > 0))
        if fid in abi.STD_CALLS:
            return await self._std(call, ctx)
        if is_fast(fid):
            return _fold(abi.UNKNOWN)
        return _smc_error(SmcReturn.EBADCMD)  # std_smc_entry: an unknown yielding call

    async def _std(self, call: Call, ctx: CallContext) -> Result:
        started, vm = time.perf_counter(), ctx.vm.key
        fid = call.function_id
        key: Key = (call.arg(1) & U32, call.arg(2) & U32, call.arg(3) & U32)
        if fid == abi.RETURN_FROM_RPC:
            thread = self.threads.get(vm, key)
            if thread is None:  # no such thread (thread_resume_from_rpc fails): ERESUME
                return _smc_error(SmcReturn.ERESUME)
            return await self._finish(ctx, thread, started)
        earlier = self.threads.get(vm, key)
        if earlier is not None and earlier.running:
            return _smc_error(SmcReturn.EBUSY)  # the guest reused a message still in flight
        if self.threads.running(vm) >= self.thread_count:
            return _smc_error(SmcReturn.ETHREAD_LIMIT)
        state = VmTeeState.from_json(ctx.state.get())
        if fid == abi.CALL_WITH_REGD_ARG:
            message = await std.locate_regd(ctx.memory, state, abi.reg_pair(key[0], key[1]),
                                            key[2])
        else:
            message = await std.locate_parg(ctx.memory, abi.reg_pair(key[0], key[1]),
                                            fid == abi.CALL_WITH_RPC_ARG)
        if isinstance(message, SmcReturn):
            return _smc_error(message)

        def users(cookie: int) -> tuple[asyncio.Future[std.Completion], ...]:
            return tuple(t.task for t in self.threads.users_of(vm, cookie))

        decoded = await std.decode(ctx.memory, state, message, self.limits, users)
        if isinstance(decoded, SmcReturn):
            return _smc_error(decoded)
        cookies = {message.cookie} if message.cookie is not None else set()
        future: asyncio.Future[std.Completion]
        if isinstance(decoded, std.Completion):
            future = asyncio.get_running_loop().create_future()
            future.set_result(decoded)
        else:
            register_first = False
            if not state.incarnation:  # this boot of the VM reaches the service for the first time
                state = dataclasses.replace(state, incarnation=secrets.token_hex(16))
                ctx.state.put(state.to_json())
                register_first = True
            if isinstance(decoded, std.OpenWork | std.InvokeWork):
                cookies |= {s.cookie for s in decoded.slots if s.cookie is not None}
            tee_vm = TeeVm(ctx.vm.host, ctx.vm.name, state.incarnation)
            future = asyncio.ensure_future(completion.run(
                decoded, self.backend, tee_vm, state.orphans, register_first, self.limits,
                lambda command, reason: metrics.backend_failure(command, reason).inc()))
            metrics.THREADS.inc()
            future.add_done_callback(lambda _: metrics.THREADS.dec())
        started_thread: Thread[std.Completion] = Thread(key, future, frozenset(cookies), message)
        self.threads.add(vm, started_thread, keep=2 * self.thread_count)
        return await self._finish(ctx, started_thread, started)

    async def _finish(self, ctx: CallContext, thread: Thread[std.Completion],
                      started: float) -> Result:
        """Wait up to yield_ms for the thread, then answer, or yield with a foreign interrupt."""
        message = thread.context
        assert isinstance(message, std.Message)
        waited = 0.0
        if not thread.task.done():
            before = time.perf_counter()
            await asyncio.wait((thread.task,), timeout=self.yield_s or None)
            waited = time.perf_counter() - before
        proxy_seconds = time.perf_counter() - started - waited
        metrics.call_seconds(message.command, "proxy").observe(proxy_seconds)
        if not thread.task.done():
            metrics.YIELDS.inc()
            return Result.regs(abi.RPC_FOREIGN_INTR, *thread.key)
        if thread.task.cancelled():  # the VM was destroyed meanwhile
            return _smc_error(SmcReturn.ERESUME)
        done = thread.task.result()
        state = VmTeeState.from_json(ctx.state.get())
        delivery = completion.finish(state, done)
        try:
            for patch in delivery.patches:
                runs = split_runs(message.runs, patch.offset, len(patch.data))
                write_runs(ctx.memory, runs, patch.data)
            for buffer_runs, data in delivery.writes:
                write_runs(ctx.memory, buffer_runs, data)
        except GuestMemoryError:  # the guest took the memory away meanwhile (Xen: EBADADDR)
            return _smc_error(SmcReturn.EBADADDR)
        if delivery.state != state:
            ctx.state.put(delivery.state.to_json())
        if delivery.opened is not None:
            metrics.sessions(self._ta_label(delivery.opened)).inc()
        if delivery.closed is not None:
            metrics.sessions(self._ta_label(delivery.closed)).dec()
        if done.backend_seconds:
            metrics.call_seconds(done.command, "backend").observe(done.backend_seconds)
        if done.ret:
            metrics.error(done.ret, done.origin or 0).inc()
        self.threads.delivered(ctx.vm.key, thread, ctx.now_ns(), keep=2 * self.thread_count)
        return Result.regs(SmcReturn.OK)

    # Lifecycle ---------------------------------------------------------------------------------

    async def vm_destroyed(self, ctx: CallContext) -> None:
        """Stop the VM's messages, close its sessions at the service, drop its registrations."""
        await self._forget_boot(ctx)

    async def vm_reset(self, ctx: CallContext) -> None:
        """A new boot knows none of the old one's sessions, shared memory or threads: they go as
        at destruction, and the boot's first message registers a new incarnation."""
        await self._forget_boot(ctx)

    async def _forget_boot(self, ctx: CallContext) -> None:
        self.threads.forget(ctx.vm.key)
        state = VmTeeState.from_json(ctx.state.get())
        for rec in state.sessions.values():
            if not rec.lost:
                metrics.sessions(self._ta_label(rec.ta)).dec()
        if state.incarnation:
            try:
                await self.backend.vm_destroyed(
                    TeeVm(ctx.vm.host, ctx.vm.name, state.incarnation))
            except BackendUnavailable as e:
                # The service closes them when this incarnation is replaced or it restarts.
                metrics.backend_failure("vm_destroyed", e.reason).inc()
                ctx.log.warning("TEE service did not hear that %s is gone: %s", ctx.vm.key, e)
        if ctx.state.get() is not None:
            ctx.state.put(None)

    async def close(self) -> None:
        self.threads.forget_all()
        await self.backend.close()


# Configuration helpers ---------------------------------------------------------------------------


def config_int(config: Mapping[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise HandlerConfigError(f"{key}: {value!r} is not an integer in [{low}, {high}]")
    return value


def _revision(text: object) -> tuple[int, int]:
    try:
        major, minor = (int(p) for p in str(text).split("."))
    except ValueError:
        raise HandlerConfigError(f"os_revision: {text!r} is not 'major.minor'") from None
    if not (0 <= major <= U32 and 0 <= minor <= U32):
        raise HandlerConfigError(f"os_revision: {text!r} does not fit in 32 bits")
    return major, minor


def _ta_names(raw: object) -> dict[uuid.UUID, str]:
    if not isinstance(raw, Mapping):
        raise HandlerConfigError("ta_names: expected a mapping of TA UUID to name")
    out = {}
    for k, v in raw.items():
        try:
            out[uuid.UUID(str(k))] = str(v)
        except ValueError:
            raise HandlerConfigError(f"ta_names: {k!r} is not a UUID") from None
    return out

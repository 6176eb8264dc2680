"""The FF-A handler: a guest-facing FF-A v1.0-v1.2 endpoint, folded into registers.

The adapter between the broker and the pure FF-A modules. For each call it loads the VM's `VmState`
from ctx.state, runs the version gate and the call's transition, does the guest-memory reads and
writes and the partition round trip the transition asks for, stores the new state only when it
changed, and folds the typed answer into registers: FFA_SUCCESS/FFA_ERROR/the version in x0..x7, or
x0..x17 for v1.2 callers and SMCCC 1.2 results (include/linux/arm_ffa.h).
Calls of one VM are serialised (an in-process lock per VM; the state itself is always in the store).
Every guest input is answered with an FF-A error, never an exception. It knows nothing of gRPC or
sockets."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, ClassVar

from hyperbroker.calls import Call, Outcome, Result
from hyperbroker.handlers.api import Abi, CallContext, GuestMemoryError, Handler
from hyperbroker.handlers.ffa import (
    abi,
    config,
    discovery,
    endpoints,
    mailbox,
    memshare,
    messaging,
    metrics,
    version,
)
from hyperbroker.handlers.ffa.abi import Answer, Failure, FfaError, FragRx, Success
from hyperbroker.handlers.ffa.partitions import MAX_READ
from hyperbroker.handlers.ffa.sharedmem import GuestShares
from hyperbroker.handlers.ffa.state import VmState

Step = tuple[VmState, Answer | FfaError]
Route = Callable[[Call, CallContext, VmState], Awaitable[Step]]


def _pad(regs: tuple[int, ...], width: int) -> tuple[int, ...]:
    return regs + (0,) * (width - len(regs))


def error_result(code: FfaError) -> Result:
    """FFA_ERROR(code) in x0..x7: the same for every caller, so the agent may serve it."""
    return Result.regs(*_pad(Failure(code).registers(), abi.NARROW_WIDTH),
                       outcome=Outcome.GUEST_ERROR)


async def _read(ctx: CallContext, gpa: int, length: int) -> bytes:
    out = bytearray()
    for at in range(0, length, MAX_READ):
        out += await ctx.memory.read(gpa + at, min(MAX_READ, length - at))
    return bytes(out)


async def _probe(ctx: CallContext, addresses: Sequence[int]) -> bool:
    """Whether one byte at each address is guest memory of this VM."""
    try:
        for a in addresses:
            await ctx.memory.read(a, 1)
    except GuestMemoryError:
        return False
    return True


# Calls that hand pages to a partition and answer with a handle once the descriptor is whole.
SENDS = frozenset({abi.FFA_MEM_SHARE_32, abi.FFA_MEM_SHARE_64, abi.FFA_MEM_LEND_32,
                   abi.FFA_MEM_LEND_64, abi.FFA_MEM_FRAG_TX})


class FfaHandler(Handler):
    """The FF-A endpoint with the built-in partition kinds; the installed plugin
    (handlers.ffa.remote.FfaPlugin) adds remote partitions."""

    plugin = "ffa"
    abi = Abi("ffa", abi.RANGES, abi.FUNCTION_NAMES)
    partition_kinds: ClassVar[Mapping[str, config.PartitionKind]] = config.BUILTIN_KINDS

    @classmethod
    def config_keys(cls) -> Sequence[str]:
        return config.KEYS

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(cfg)
        self.settings = config.parse(self.config, self.partition_kinds)
        self.partitions = self.settings.partitions
        self._locks: dict[str, asyncio.Lock] = {}
        self._routes: dict[int, Route] = {
            abi.FFA_FEATURES: self._features,
            abi.FFA_ID_GET: self._id_get,
            abi.FFA_SPM_ID_GET: self._spm_id_get,
            abi.FFA_RXTX_MAP_32: self._rxtx_map,
            abi.FFA_RXTX_MAP_64: self._rxtx_map,
            abi.FFA_RXTX_UNMAP: self._rxtx_unmap,
            abi.FFA_RX_RELEASE: self._rx_release,
            abi.FFA_PARTITION_INFO_GET: self._partition_info_get,
            abi.FFA_PARTITION_INFO_GET_REGS: self._partition_info_get_regs,
            abi.FFA_MEM_SHARE_32: self._mem_send,
            abi.FFA_MEM_SHARE_64: self._mem_send,
            abi.FFA_MEM_LEND_32: self._mem_send,
            abi.FFA_MEM_LEND_64: self._mem_send,
            abi.FFA_MEM_FRAG_TX: self._mem_frag_tx,
            abi.FFA_MEM_RECLAIM: self._mem_reclaim,
            **{fid: self._direct_req for fid in messaging.REQUEST_FIDS},
            **{fid: self._direct_resp for fid in messaging.RESPONSE_FIDS},
        }
        assert set(self._routes) | {abi.FFA_VERSION} == set(version.SERVED_SINCE)

    # ---- the Handler interface -------------------------------------------------------------
    def function_name(self, fid: int) -> str | None:
        if not any(fid in r for r in self.ranges):
            return None
        return abi.function_name(fid)

    def served_functions(self) -> frozenset[int]:
        """The IDs of this handler's ranges a caller at our version gets anything but
        FFA_ERROR(NOT_SUPPORTED) from, once it has called FFA_VERSION."""
        return frozenset(fid for fid in version.SERVED_SINCE
                         if version.served_at(fid, abi.OUR_VERSION))

    def discovery_claims(self) -> Mapping[int, frozenset[int]]:
        """Discovery function ID -> the function IDs it tells the guest are served: FFA_FEATURES
        answers FFA_SUCCESS for every served function at the caller's version, and a
        caller at our version hears all of them."""
        return {abi.FFA_FEATURES: self.served_functions()}

    def static_answers(self) -> Mapping[int, Result]:
        """Every FF-A ID this endpoint does not serve: FFA_ERROR(NOT_SUPPORTED) in any state."""
        return {
            fid: error_result(FfaError.NOT_SUPPORTED)
            for fid in abi.FUNCTION_NAMES
            if fid not in version.SERVED_SINCE and any(fid in r for r in self.ranges)
        }

    def named_fallbacks(self) -> Mapping[str, Result]:
        return {
            "busy": error_result(FfaError.BUSY),
            "retry": error_result(FfaError.RETRY),
            "aborted": error_result(FfaError.ABORTED),
            "not_supported": error_result(FfaError.NOT_SUPPORTED),
        }

    async def handle(self, call: Call, ctx: CallContext) -> Result:
        fid = call.function_id
        if fid not in version.SERVED_SINCE:
            return self._error(fid, FfaError.NOT_SUPPORTED)
        lock = self._locks.setdefault(ctx.vm.key, asyncio.Lock())
        async with lock:
            return await self._handle(call, ctx)

    async def vm_destroyed(self, ctx: CallContext) -> None:
        """Reclaim every share, unmap the buffers, free the endpoint ID (issue 4 item 3)."""
        lock = self._locks.setdefault(ctx.vm.key, asyncio.Lock())
        async with lock:
            state = VmState.from_json(ctx.state.get())
            for share in state.shares:
                metrics.count(metrics.RECLAIMS, "vm_destroyed")
                metrics.count(metrics.PAGES_RECLAIMED, "vm_destroyed", amount=share.pages)
            if state.endpoint_id is not None:
                for p in self.partitions:
                    await p.vm_destroyed(ctx.vm.key, state.endpoint_id)
                await ctx.ids.release(endpoints.POOL)
            if ctx.state.get() is not None:
                ctx.state.put(None)
        self._locks.pop(ctx.vm.key, None)

    async def undo(self, call: Call, result: Result, ctx: CallContext) -> None:
        """A share or lend the guest never saw complete is reclaimed, so its retry, which
        offers the same pages again, is not DENIED as a second share of them."""
        if call.function_id not in SENDS or result.x[0] not in (abi.FFA_SUCCESS_32,
                                                                abi.FFA_SUCCESS_64):
            return
        handle = abi.join_handle(result.x[2], result.x[3])
        async with self._locks.setdefault(ctx.vm.key, asyncio.Lock()):
            before = VmState.from_json(ctx.state.get())
            share = before.share(handle)
            if share is None:
                return
            metrics.count(metrics.RECLAIMS, "undo")
            metrics.count(metrics.PAGES_RECLAIMED, "undo", amount=share.pages)
            self._save(ctx, before, before.without_share(handle))

    async def vm_reset(self, ctx: CallContext) -> None:
        """A reboot: shares reclaimed, buffers unmapped, version free to negotiate again. The
        endpoint ID and the handle counter stay, so IDs are stable for the VM's life and no
        handle is ever given out twice."""
        lock = self._locks.setdefault(ctx.vm.key, asyncio.Lock())
        async with lock:
            state = VmState.from_json(ctx.state.get())
            for share in state.shares:
                metrics.count(metrics.RECLAIMS, "vm_reset")
                metrics.count(metrics.PAGES_RECLAIMED, "vm_reset", amount=share.pages)
            if state.endpoint_id is not None:
                for p in self.partitions:
                    await p.vm_destroyed(ctx.vm.key, state.endpoint_id)
            fresh = VmState(endpoint_id=state.endpoint_id, handle_counter=state.handle_counter)
            if fresh != state:
                ctx.state.put(fresh.to_json())

    async def close(self) -> None:
        for p in self.partitions:
            await p.close()

    # ---- dispatch and folding --------------------------------------------------------------
    async def _handle(self, call: Call, ctx: CallContext) -> Result:
        fid = call.function_id
        before = VmState.from_json(ctx.state.get())
        if fid == abi.FFA_VERSION:
            state, version_answer = version.negotiate(before, call.arg(1))
            self._save(ctx, before, state)
            if version_answer.version is None:
                metrics.count(metrics.ERRORS, abi.function_name(fid),
                              FfaError.NOT_SUPPORTED.name)
                return Result.regs(*_pad(version_answer.registers(), abi.NARROW_WIDTH),
                                   outcome=Outcome.GUEST_ERROR)
            return self._fold(fid, version_answer, state)
        admitted = version.admit(before, fid)
        if isinstance(admitted, FfaError):
            return self._error(fid, admitted)
        state = admitted
        if state.endpoint_id is None:
            endpoint_id = await ctx.ids.allocate(endpoints.POOL, endpoints.FIRST_VM_ID,
                                                 endpoints.LAST_VM_ID)
            if endpoint_id is None:
                return self._error(fid, FfaError.NO_MEMORY)
            state = replace(state, endpoint_id=endpoint_id)
        state, answer = await self._routes[fid](call, ctx, state)
        self._save(ctx, before, state)
        return self._fold(fid, answer, state)

    @staticmethod
    def _save(ctx: CallContext, before: VmState, after: VmState) -> None:
        if after != before:
            ctx.state.put(after.to_json())

    def _error(self, fid: int, code: FfaError) -> Result:
        metrics.count(metrics.ERRORS, abi.function_name(fid), code.name)
        return error_result(code)

    def _fold(self, fid: int, answer: Answer | FfaError, state: VmState) -> Result:
        if isinstance(answer, FfaError):
            return self._error(fid, answer)
        regs = answer.registers()
        wide = (state.version or 0) >= abi.VERSION_1_2 or len(regs) > abi.NARROW_WIDTH
        return Result.regs(*_pad(regs, abi.WIDE_WIDTH if wide else abi.NARROW_WIDTH))

    @staticmethod
    def _own_id(state: VmState) -> int:
        assert state.endpoint_id is not None  # allocated before any route runs
        return state.endpoint_id

    @staticmethod
    def _version(state: VmState) -> int:
        assert state.version is not None  # admitted calls have a version
        return state.version

    # ---- discovery -------------------------------------------------------------
    async def _features(self, call: Call, ctx: CallContext, state: VmState) -> Step:
        return state, discovery.features(self._version(state), call.arg(1),
                                         self.settings.max_rxtx_pages)

    async def _id_get(self, call: Call, ctx: CallContext, state: VmState) -> Step:
        return state, discovery.id_get(self._own_id(state))

    async def _spm_id_get(self, call: Call, ctx: CallContext, state: VmState) -> Step:
        return state, discovery.spm_id_get(self.settings.spmc_id)

    async def _partition_info_get(self, call: Call, ctx: CallContext, state: VmState) -> Step:
        plan = discovery.partition_info_get(
            self._version(state), self.partitions, *(call.arg(i) for i in range(1, 6))
        )
        if isinstance(plan, FfaError) or plan.descriptors is None:
            return state, plan if isinstance(plan, FfaError) else plan.answer()
        rx = mailbox.acquire_rx(state, len(plan.descriptors))
        if isinstance(rx, FfaError):
            return state, rx
        try:
            ctx.memory.write(rx.rx, plan.descriptors)
        except GuestMemoryError:
            return state, FfaError.ABORTED  # RX was guest memory when it was mapped
        return mailbox.hand_over_rx(state), plan.answer()

    async def _partition_info_get_regs(self, call: Call, ctx: CallContext, state: VmState
                                       ) -> Step:
        return state, discovery.partition_info_get_regs(
            self.partitions, call.arg(1), call.arg(2), call.arg(3)
        )

    # ---- RX/TX buffers --------------------------------------------------------------
    async def _rxtx_map(self, call: Call, ctx: CallContext, state: VmState) -> Step:
        req = mailbox.decode_map(call.function_id, call.arg(1), call.arg(2), call.arg(3))
        error = mailbox.check_map(state, req, self.settings.max_rxtx_pages)
        if error is not None:
            return state, error
        ends = [req.tx, req.tx + req.size - 1, req.rx, req.rx + req.size - 1]
        if not await _probe(ctx, ends):
            return state, FfaError.INVALID_PARAMETERS  # not the VM's memory
        return mailbox.map_buffers(state, req), Success()

    async def _rxtx_unmap(self, call: Call, ctx: CallContext, state: VmState) -> Step:
        return self._step(state, mailbox.unmap(state, call.arg(1) & abi.W_MASK,
                                               self._own_id(state)))

    async def _rx_release(self, call: Call, ctx: CallContext, state: VmState) -> Step:
        return self._step(state, mailbox.rx_release(state, call.arg(1) & abi.W_MASK,
                                                    self._own_id(state)))

    @staticmethod
    def _step(state: VmState, outcome: VmState | FfaError) -> Step:
        return (state, outcome) if isinstance(outcome, FfaError) else (outcome, Success())

    # ---- direct messaging -------------------------------------------------------------
    async def _direct_req(self, call: Call, ctx: CallContext, state: VmState) -> Step:
        msg = messaging.decode_request(call.function_id, call.x, self._own_id(state), ctx.vm.key)
        if isinstance(msg, FfaError):
            return state, msg
        partition = messaging.route(msg, self.partitions)
        if isinstance(partition, FfaError):
            return state, partition
        view = GuestShares(ctx.memory, state.shares, partition.info.partition_id)
        reply = await partition.direct_request(msg, view)
        metrics.count(metrics.DIRECT_MESSAGES, partition.info.name, msg.kind.value,
                      "error" if isinstance(reply, FfaError) else "ok")
        return state, messaging.respond(msg, reply)

    async def _direct_resp(self, call: Call, ctx: CallContext, state: VmState) -> Step:
        return state, FfaError.DENIED  # nobody sends a guest direct requests: none to answer

    # ---- memory sharing ---------------------------------------------------------------
    async def _mem_send(self, call: Call, ctx: CallContext, state: VmState) -> Step:
        req = memshare.decode_send(call.function_id, *(call.arg(i) for i in range(1, 5)))
        gpa = memshare.check_send(state, req, self.settings.limits, self._version(state))
        if isinstance(gpa, FfaError):
            return state, gpa
        try:
            fragment = await _read(ctx, gpa, req.fragment_length)
        except GuestMemoryError:
            return state, FfaError.ABORTED  # TX was guest memory when it was mapped
        state, step = memshare.start(state, req, fragment, self._own_id(state))
        return await self._after_fragment(ctx, state, step)

    async def _mem_frag_tx(self, call: Call, ctx: CallContext, state: VmState) -> Step:
        req = memshare.decode_frag_tx(*(call.arg(i) for i in range(1, 5)))
        gpa = memshare.check_frag_tx(state, req, self._own_id(state))
        if isinstance(gpa, FfaError):
            return state, gpa
        try:
            fragment = await _read(ctx, gpa, req.fragment_length)
        except GuestMemoryError:
            return state, FfaError.ABORTED
        state, step = memshare.append(state, fragment)
        return await self._after_fragment(ctx, state, step)

    async def _after_fragment(self, ctx: CallContext, state: VmState,
                              step: memshare.Assembled | FragRx) -> Step:
        if isinstance(step, FragRx):
            return state, step
        tx = memshare.validate(
            step.data, step.kind, self._version(state), self._own_id(state),
            self.partitions.by_id.keys(), state, self.settings.limits,
        )
        if isinstance(tx, FfaError):
            return state, tx
        if not await _probe(ctx, memshare.probe_addresses(tx)):
            return state, FfaError.DENIED  # pages that are not the VM's (Xen, pKVM)
        state, share = memshare.commit(state, step, tx)
        metrics.count(metrics.SHARES, share.kind.value)
        metrics.count(metrics.PAGES_SHARED, share.kind.value, amount=share.pages)
        return state, Success((0, *abi.split_handle(share.handle)))

    async def _mem_reclaim(self, call: Call, ctx: CallContext, state: VmState) -> Step:
        req = memshare.decode_reclaim(call.arg(1), call.arg(2), call.arg(3))
        target = memshare.check_reclaim(state, req)
        if isinstance(target, FfaError):
            return state, target
        if target is not None:
            for grant in target.grants:
                partition = self.partitions.get(grant.receiver)
                if partition is None:
                    continue
                refused = await partition.reclaim(ctx.vm.key, self._own_id(state), req.handle)
                if refused is not None:
                    return state, FfaError.DENIED  # the borrower still uses it: retry later
            metrics.count(metrics.RECLAIMS, "guest")
            metrics.count(metrics.PAGES_RECLAIMED, "guest", amount=target.pages)
        return memshare.reclaim(state, req.handle), Success()

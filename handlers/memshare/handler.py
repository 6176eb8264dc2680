"""The memory-share tracking handler: KVM's vendor-hyp discovery plus the pKVM guest calls.

It owns the whole vendor-hyp range for the profiles that select it, so it answers
VENDOR_HYP_CALL_UID with KVM's UID and KVM_FEATURES with a bitmap of exactly what it serves
(include/linux/arm-smccc.h); KVM's own host-kernel services in that
range (PTP) are then not served and not advertised. The record of shared and guarded granules lives
in ctx.state; the adapter never awaits."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

from hyperbroker.calls import Call, Outcome, Result
from hyperbroker.handlers.api import (
    HANDLER_METRICS,
    Abi,
    CallContext,
    Handler,
    HandlerConfigError,
)
from hyperbroker.handlers.memshare import abi, record
from hyperbroker.handlers.memshare.record import IpaRange, MemsharePolicy, MemshareRecord, Refusal
from hyperbroker.runtime.metrics import Counter, Gauge
from hyperbroker.smccc import OWNER_SERVICES, RET_INVALID_PARAMETER, RET_NOT_SUPPORTED

CALLS = Counter("hyperbroker_memshare_calls_total",
                "pKVM memory-share calls by function and result (ok or the refusal reason)",
                ["function", "result"], registry=HANDLER_METRICS)
SHARED_BYTES = Gauge("hyperbroker_memshare_shared_bytes",
                     "Guest memory currently shared with the host", ["host", "vm"],
                     registry=HANDLER_METRICS)
GUARDED = Gauge("hyperbroker_memshare_guarded_granules",
                "Granules the guest has declared MMIO with MMIO_GUARD", ["host", "vm"],
                registry=HANDLER_METRICS)

STATE_VERSION = 1
MIN_GRANULE = 4096
MAX_GRANULE = 65536  # the largest arm64 PAGE_SIZE; the guest driver rejects a granule > PAGE_SIZE


def _ranges(key: str, raw: object) -> tuple[IpaRange, ...]:
    if not isinstance(raw, list):
        raise HandlerConfigError(f"{key}: must be a list of {{base, size}}")
    out = []
    for item in raw:
        if (not isinstance(item, dict) or set(item) != {"base", "size"}
                or not all(isinstance(item[k], int) and not isinstance(item[k], bool)
                           for k in ("base", "size"))
                or item["base"] < 0 or item["size"] <= 0):
            raise HandlerConfigError(f"{key}: {item!r} is not {{base, size}} with size > 0")
        out.append(IpaRange(item["base"], item["size"]))
    return tuple(out)


def _limit(key: str, raw: object) -> int | None:
    if raw is None:
        return None
    if not isinstance(raw, int) or isinstance(raw, bool) or raw < 0:
        raise HandlerConfigError(f"{key}: must be a non-negative integer or null, not {raw!r}")
    return raw


def parse_config(config: Mapping[str, Any]) -> MemsharePolicy:
    granule = config.get("granule", MIN_GRANULE)
    if (not isinstance(granule, int) or isinstance(granule, bool)
            or granule & (granule - 1) or not MIN_GRANULE <= granule <= MAX_GRANULE):
        raise HandlerConfigError(
            f"granule: {granule!r} is not a power of two in {MIN_GRANULE}..{MAX_GRANULE}")
    mmio_guard = config.get("mmio_guard", True)
    if not isinstance(mmio_guard, bool):
        raise HandlerConfigError(f"mmio_guard: must be true or false, not {mmio_guard!r}")
    return MemsharePolicy(
        granule=granule,
        max_shared_bytes=_limit("max_shared_bytes", config.get("max_shared_bytes")),
        max_guarded_granules=_limit("max_guarded_granules", config.get("max_guarded_granules")),
        deny=_ranges("deny", config.get("deny", [])),
        ram=_ranges("ram", config.get("ram", [])),
        mmio_guard=mmio_guard,
    )


class MemshareHandler(Handler):
    plugin = "memshare"
    abi = Abi("vendor-hyp", OWNER_SERVICES["vendor-hyp"], abi.FUNCTION_NAMES)
    eager = True  # never awaits

    @classmethod
    def config_keys(cls) -> Sequence[str]:
        return ("granule", "max_shared_bytes", "max_guarded_granules", "deny", "ram",
                "mmio_guard")

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        self.policy = parse_config(self.config)
        served = [abi.FUNC_FEATURES, abi.FUNC_HYP_MEMINFO, abi.FUNC_MEM_SHARE, abi.FUNC_MEM_UNSHARE]
        if self.policy.mmio_guard:
            served.append(abi.FUNC_MMIO_GUARD)
        self.functions = frozenset(served)  # KVM function numbers this handler serves
        self.features = abi.features_bitmap(self.functions)

    def served_functions(self) -> frozenset[int]:
        """The IDs of this handler's ranges answered with anything but NOT_SUPPORTED."""
        return frozenset(fid for n in self.functions for fid in abi.FUNCTION_IDS[n])

    def discovery_claims(self) -> Mapping[int, frozenset[int]]:
        """Discovery function ID -> the function IDs it tells the guest are served.

        KVM's UID promises KVM_FEATURES (Linux's kvm_init_hyp_services calls it next); the
        KVM_FEATURES bitmap promises the IDs of every bit it sets.
        """
        advertised = abi.bitmap_functions(self.features)
        return {
            abi.VENDOR_HYP_CALL_UID: frozenset({abi.KVM_FEATURES}),
            abi.KVM_FEATURES: frozenset(fid for n in advertised for fid in abi.FUNCTION_IDS[n]),
        }

    def static_answers(self) -> Mapping[int, Result]:
        return {
            abi.VENDOR_HYP_CALL_UID: Result.regs(*abi.kvm_uid_regs()),
            abi.KVM_FEATURES: Result.regs(*self.features),
        }

    def load(self, ctx: CallContext) -> MemshareRecord:
        """This VM's record (empty before its first share or guard)."""
        return MemshareRecord.from_json((ctx.state.get() or {}).get("record"))

    def admin_view(self, ctx: CallContext) -> dict[str, Any]:
        """This VM's record as the Admin API shows it."""
        return record.describe(self.policy, self.load(ctx))

    async def handle(self, call: Call, ctx: CallContext) -> Result:
        fid = call.function_id
        if fid == abi.VENDOR_HYP_CALL_UID:
            return Result.regs(*abi.kvm_uid_regs())
        if fid == abi.KVM_FEATURES:
            return Result.regs(*self.features)
        args = (call.arg(1), call.arg(2), call.arg(3))
        if fid == abi.HYP_MEMINFO:
            if any(args):
                CALLS.labels("KVM_HYP_MEMINFO", Refusal.MBZ.value).inc()
                return Result.regs(RET_INVALID_PARAMETER, outcome=Outcome.GUEST_ERROR)
            CALLS.labels("KVM_HYP_MEMINFO", "ok").inc()
            return Result.regs(self.policy.granule)
        transition = {
            abi.MEM_SHARE: record.share,
            abi.MEM_UNSHARE: record.unshare,
            abi.MMIO_GUARD: record.guard if self.policy.mmio_guard else None,
        }.get(fid)
        if transition is None:
            return Result.regs(RET_NOT_SUPPORTED, outcome=Outcome.GUEST_ERROR)
        name = abi.FUNCTION_NAMES[fid]
        before = self.load(ctx)
        after = transition(self.policy, before, args[0], args[1:])
        if isinstance(after, Refusal):
            CALLS.labels(name, after.value).inc()
            ctx.log.debug("%s %#x refused: %s", name, args[0], after.value)
            return Result.regs(RET_INVALID_PARAMETER, outcome=Outcome.GUEST_ERROR)
        CALLS.labels(name, "ok").inc()
        if after != before:
            ctx.state.put({"v": STATE_VERSION, "record": after.to_json()})
            SHARED_BYTES.labels(ctx.vm.host, ctx.vm.name).set(after.shared.size)
            GUARDED.labels(ctx.vm.host, ctx.vm.name).set(after.guarded.size // self.policy.granule)
        return Result.regs(0)

    async def undo(self, call: Call, result: Result, ctx: CallContext) -> None:
        """A share or unshare the guest never saw succeed is reversed, so its retry succeeds."""
        inverse = {abi.MEM_SHARE: record.unshare, abi.MEM_UNSHARE: record.share}.get(
            call.function_id)
        if inverse is None or result.x[0] != 0:
            return
        before = self.load(ctx)
        after = inverse(self.policy, before, call.arg(1), (0, 0))
        if not isinstance(after, Refusal) and after != before:
            ctx.state.put({"v": STATE_VERSION, "record": after.to_json()})
            SHARED_BYTES.labels(ctx.vm.host, ctx.vm.name).set(after.shared.size)

    async def vm_destroyed(self, ctx: CallContext) -> None:
        """The VM is gone: its shares go with it (a destroyed VM's share records are dropped)."""
        self._forget(ctx)

    async def vm_reset(self, ctx: CallContext) -> None:
        """A new boot has shared and guarded nothing yet: the old boot's record goes."""
        self._forget(ctx)

    @staticmethod
    def _forget(ctx: CallContext) -> None:
        if ctx.state.get() is not None:
            ctx.state.put(None)
        for gauge in (SHARED_BYTES, GUARDED):
            with contextlib.suppress(KeyError):  # never set for this VM
                gauge.remove(ctx.vm.host, ctx.vm.name)

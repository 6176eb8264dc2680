"""The Hyper-V persona: a Hyper-V-enlightened arm64 guest's hypervisor, served from the broker.

It owns the whole vendor-hyp range for the profiles that select it. VENDOR_HYP_CALL_UID answers
Hyper-V's UID, so KVM's own vendor services (KVM_FEATURES, PTP) are neither served nor advertised;
HV_FUNC_ID carries the hypercalls (the Hyper-V TLFS as Linux's arch/arm64/hyperv/ and
include/hyperv/hvgdk_mini.h use it). The adapter moves bytes between the guest (memory for slow
calls, x2..x17 for fast ones) and the pure executor in handlers.hyperv.hypercall, keeps the
persona's state in ctx.state, and turns crash reports into an event, a log line and metrics."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from hyperbroker.calls import Call, Outcome, Result
from hyperbroker.handlers.api import (
    HANDLER_METRICS,
    Abi,
    CallContext,
    GuestMemoryError,
    Handler,
    HandlerConfigError,
)
from hyperbroker.handlers.hyperv import abi, hypercall, layout
from hyperbroker.handlers.hyperv.abi import Control, HvStatus
from hyperbroker.handlers.hyperv.crash import GuestCrash
from hyperbroker.handlers.hyperv.hypercall import Caller, Execution, Plan
from hyperbroker.handlers.hyperv.partition import PartitionState
from hyperbroker.handlers.hyperv.persona import (
    SERVED_MISC,
    SERVED_PRIVILEGES,
    HypervisorVersion,
    PersonaConfig,
)
from hyperbroker.handlers.hyperv.registers import CrashReport
from hyperbroker.handlers.hyperv.synic import CountingSink, SynicSink
from hyperbroker.runtime.metrics import Counter, Gauge
from hyperbroker.smccc import NOT_SUPPORTED_U64, OWNER_SERVICES, U64_MASK

# Partition IDs the broker hands out when the persona names none: fleet-unique, one per VM.
PARTITION_POOL = "hyperv.partition"
PARTITION_LAST = 2**31 - 1

HYPERCALLS = Counter("hyperbroker_hyperv_hypercalls_total",
                     "Hyper-V hypercalls by call and status", ["call", "status"],
                     registry=HANDLER_METRICS)
CRASHES = Counter("hyperbroker_hyperv_guest_crashes_total",
                  "Guest crash reports received through the crash registers", ["kind"],
                  registry=HANDLER_METRICS)
CRASHES.initialise(GuestCrash.KINDS)  # 0 before the first crash: the alert and panel see data
CRASHED = Gauge("hyperbroker_hyperv_guest_crashed",
                "1 once a guest has reported a crash (0 from its partition's first call), until "
                "the VM is destroyed", ["host", "vm"],
                registry=HANDLER_METRICS)

_VERSION_FIELDS = {"build": 32, "major": 16, "minor": 16, "service_pack": 32,
                   "service_branch": 8, "service_number": 24}


def _uint(key: str, raw: object, bits: int) -> int:
    if not isinstance(raw, int) or isinstance(raw, bool) or not 0 <= raw < 1 << bits:
        raise HandlerConfigError(f"{key}: {raw!r} is not an unsigned {bits}-bit integer")
    return raw


def parse_config(config: Mapping[str, Any]) -> PersonaConfig:
    """The policy's config: mapping -> PersonaConfig, or HandlerConfigError naming the key."""
    raw_version = config.get("hypervisor_version", {})
    if not isinstance(raw_version, dict) or set(raw_version) - set(_VERSION_FIELDS):
        raise HandlerConfigError(
            f"hypervisor_version: a mapping of {', '.join(_VERSION_FIELDS)}, not {raw_version!r}")
    version = HypervisorVersion(**{
        k: _uint(f"hypervisor_version.{k}", v, _VERSION_FIELDS[k]) for k, v in raw_version.items()
    })
    privileges = _uint("privileges", config.get("privileges", SERVED_PRIVILEGES), 64)
    if privileges & ~SERVED_PRIVILEGES:
        raise HandlerConfigError(
            f"privileges: bits {privileges & ~SERVED_PRIVILEGES:#x} promise services the persona "
            f"does not serve (allowed: {SERVED_PRIVILEGES:#x})")
    misc = _uint("misc_features", config.get("misc_features", SERVED_MISC), 32)
    if misc & ~SERVED_MISC:
        raise HandlerConfigError(
            f"misc_features: bits {misc & ~SERVED_MISC:#x} promise services the persona does "
            f"not serve (allowed: {SERVED_MISC:#x})")
    hints = _uint("hints", config.get("hints", 0), 32)
    if hints & abi.HV_HINT_USE_HV_REGISTER_FOR_RESET:
        raise HandlerConfigError("hints: bit 0 (UseHvRegisterForReset) is always 0 on arm64")
    partition_id = config.get("partition_id")
    if partition_id is not None:
        _uint("partition_id", partition_id, 64)
        if partition_id in (abi.HV_PARTITION_ID_INVALID, abi.HV_PARTITION_ID_SELF):
            raise HandlerConfigError(f"partition_id: {partition_id:#x} is reserved")
    connections = None
    if "connections" in config:
        raw = config["connections"]
        if not isinstance(raw, list):
            raise HandlerConfigError("connections: must be a list of SynIC connection IDs")
        connections = frozenset(_uint("connections", c, 24) for c in raw)
    crash_records = _uint("crash_records", config.get("crash_records", 8), 16)
    return PersonaConfig(version, privileges, misc, hints, partition_id, connections,
                         crash_records)


CrashListener = Callable[[GuestCrash], None]


class HypervHandler(Handler):
    plugin = "hyperv"
    abi = Abi("vendor-hyp", OWNER_SERVICES["vendor-hyp"], abi.FUNCTION_NAMES)
    eager = True  # binds nothing to a task; awaits only guest memory

    @classmethod
    def config_keys(cls) -> Sequence[str]:
        return ("hypervisor_version", "privileges", "misc_features", "hints", "partition_id",
                "connections", "crash_records")

    def __init__(self, config: Mapping[str, Any], *, sink: SynicSink | None = None) -> None:
        super().__init__(config)
        self.persona = parse_config(self.config)
        self.sink: SynicSink = sink or CountingSink()
        self.crash_listeners: list[CrashListener] = []  # e.g. a broker event stream
        self.wall_clock_ns: Callable[[], int] = time.time_ns

    def served_functions(self) -> frozenset[int]:
        """The IDs of this handler's ranges answered with anything but NOT_SUPPORTED."""
        return frozenset({abi.VENDOR_HYP_CALL_UID, abi.HV_FUNC_ID})

    def discovery_claims(self) -> Mapping[int, frozenset[int]]:
        """Discovery function ID -> the function IDs it tells the guest are served: Hyper-V's
        UID promises HV_FUNC_ID (and, unlike KVM's, no KVM_FEATURES)."""
        return {abi.VENDOR_HYP_CALL_UID: frozenset({abi.HV_FUNC_ID})}

    def persona_claims(self) -> dict[str, frozenset[int]]:
        """What the feature registers promise inside HV_FUNC_ID: hypercall codes, registers."""
        return self.persona.claims()

    def static_answers(self) -> Mapping[int, Result]:
        return {abi.VENDOR_HYP_CALL_UID: Result.regs(*abi.hyperv_uid_regs())}

    async def load(self, ctx: CallContext) -> PartitionState | None:
        """This VM's persona state; a first call gives it a partition ID (fleet-unique, from
        the broker's pool) and a time epoch. None when the pool is exhausted."""
        state = PartitionState.from_json(ctx.state.get())
        if state.partition_id == abi.HV_PARTITION_ID_INVALID:
            pid = self.persona.partition_id or await ctx.ids.allocate(
                PARTITION_POOL, 1, PARTITION_LAST)
            if pid is None:
                return None
            state.partition_id = pid
            CRASHED.labels(ctx.vm.host, ctx.vm.name).set(0)  # a guest the panel shows, not crashed
        if state.time_epoch_ns is None:
            state.time_epoch_ns = ctx.now_ns()
        return state

    def admin_view(self, ctx: CallContext) -> dict[str, Any]:
        """This VM's persona as the Admin API shows it (crashes first: dashboards need them)."""
        s = PartitionState.from_json(ctx.state.get())
        return {"partition_id": s.partition_id, "guest_os_id": f"{s.guest_os_id:#x}",
                "crash_count": s.crash_count, "crashes": s.crashes,
                "messages_posted": s.messages_posted, "events_signalled": s.events_signalled}

    async def handle(self, call: Call, ctx: CallContext) -> Result:
        if call.function_id == abi.VENDOR_HYP_CALL_UID:
            return Result.regs(*abi.hyperv_uid_regs())
        if call.function_id != abi.HV_FUNC_ID:
            return Result.regs(NOT_SUPPORTED_U64, outcome=Outcome.GUEST_ERROR)
        control = Control.decode(call.arg(1))
        p = hypercall.plan(control)
        if isinstance(p, HvStatus):
            return self._status(control, p)
        if control.fast:
            data = layout.fast_block(call.x)[: p.input_size]
        else:
            bad = (hypercall.check_gpa(call.arg(2), p.input_size)
                   or hypercall.check_gpa(call.arg(3), p.output_size))
            if bad is not None:
                return self._status(control, bad)
            try:
                data = await ctx.memory.read(call.arg(2), p.input_size) if p.input_size else b""
            except GuestMemoryError:
                # TLFS: a GPA outside the partition's space is INVALID_ALIGNMENT.
                return self._status(control, HvStatus.INVALID_ALIGNMENT)
        state = await self.load(ctx)
        if state is None:
            return self._status(control, HvStatus.INSUFFICIENT_MEMORY)
        ex = hypercall.execute(self.persona, state, p, data,
                               Caller(ctx.vm, call.vcpu, ctx.now_ns()), self.sink)
        for report in ex.crashes:
            await self._report_crash(report, state, ctx)
        result = self._output(call, ctx, p, ex)
        if result is None:  # the output GPA is not guest memory: nothing happened
            return self._status(control, HvStatus.INVALID_ALIGNMENT)
        stored = state.to_json()
        if stored != ctx.state.get():
            ctx.state.put(stored)
        HYPERCALLS.labels(abi.CALL_NAMES[p.spec.code], ex.status.name).inc()
        return result

    def _status(self, control: Control, status: HvStatus) -> Result:
        HYPERCALLS.labels(abi.CALL_NAMES.get(control.code, "unknown"), status.name).inc()
        return Result.regs(abi.result_value(status), mask=0x1, outcome=Outcome.GUEST_ERROR)

    def _output(self, call: Call, ctx: CallContext, p: Plan, ex: Execution) -> Result | None:
        """x0 plus the output: registers after the input for a fast call, guest memory at x3
        for a slow one (written with the result, before the vCPU resumes). None when the
        output cannot be written."""
        x = [0] * 18
        mask = 0x1
        for offset, data in ex.writes:
            if p.control.fast:
                for reg, value in layout.fast_output_registers(p.input_size, offset,
                                                               data).items():
                    x[reg] = value
                    mask |= 1 << reg
            else:
                try:
                    ctx.memory.write(call.arg(3) + offset, data)
                except GuestMemoryError:
                    return None
        x[0] = ex.x0 & U64_MASK
        outcome = Outcome.OK if ex.status is HvStatus.SUCCESS else Outcome.GUEST_ERROR
        return Result(tuple(x), mask, outcome)

    async def _report_crash(self, report: CrashReport, state: PartitionState,
                            ctx: CallContext) -> None:
        message = error = None
        if report.message_gpa is not None:
            try:
                raw = await ctx.memory.read(report.message_gpa, report.message_length)
                message = raw.decode("utf-8", errors="replace").rstrip("\x00")
            except GuestMemoryError as exc:
                error = str(exc) or "guest memory read refused"
        crash = GuestCrash.from_report(report, ctx.vm.host, ctx.vm.name, message, error,
                                       self.wall_clock_ns())
        state.crash_count += 1
        keep = self.persona.crash_records
        state.crashes = [*state.crashes, crash.to_json()][-keep:] if keep else []
        CRASHES.labels(crash.kind).inc()
        CRASHED.labels(ctx.vm.host, ctx.vm.name).set(1)
        ctx.log.error(crash.log_line(), extra={"hyperbroker_event": crash.to_json()})
        for listener in self.crash_listeners:
            listener(crash)

    async def vm_destroyed(self, ctx: CallContext) -> None:
        ctx.state.put(None)
        await ctx.ids.release(PARTITION_POOL)
        with contextlib.suppress(KeyError):  # no crash was ever reported
            CRASHED.remove(ctx.vm.host, ctx.vm.name)

    async def vm_reset(self, ctx: CallContext) -> None:
        """A reboot of the same partition: the guest's synthetic registers (GUEST_OS_ID, the
        crash parameters, the reference TSC page, every per-VP register) start cleared, as a
        new boot finds them. The partition ID, the reference time (it never goes back) and the
        partition's history (crashes reported, messages and events counted) stay with the VM."""
        raw = ctx.state.get()
        if raw is None:
            return
        old = PartitionState.from_json(raw)
        new = PartitionState(partition_id=old.partition_id, time_epoch_ns=old.time_epoch_ns,
                             time_last=old.time_last, crash_count=old.crash_count,
                             crashes=old.crashes, messages_posted=old.messages_posted,
                             events_signalled=old.events_signalled, eoms=old.eoms)
        ctx.state.put(new.to_json())

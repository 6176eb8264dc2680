"""HV_FUNC_ID hypercalls as pure steps: check the control word, size the input and output,
execute against the VM's PartitionState.

The adapter fetches the input block (guest memory for slow calls, x2..x17 for fast ones) and
stores the output the same way; everything in between is here. Status codes follow
HV_STATUS_*, include/hyperv/hvgdk_mini.h and the TLFS rules for the hypercall input value: reserved
bits, a variable header, rep fields on a simple call, or a rep start not below the rep count are
INVALID_HYPERCALL_INPUT; an unknown code is INVALID_HYPERCALL_CODE; a slow call's input or output
that is not 8-byte aligned or crosses a page is INVALID_ALIGNMENT. A rep call stops at its first
failing element and reports how many elements are done, counted from the start of the list.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from hyperbroker.handlers.api import VmInfo
from hyperbroker.handlers.hyperv import abi, layout, registers, synic
from hyperbroker.handlers.hyperv.abi import Control, HvStatus
from hyperbroker.handlers.hyperv.layout import (
    PostMessageInput,
    RegisterAssoc,
    SignalEventInput,
    VpHeader,
)
from hyperbroker.handlers.hyperv.partition import PartitionState
from hyperbroker.handlers.hyperv.persona import PersonaConfig
from hyperbroker.handlers.hyperv.registers import CrashReport


@dataclass(frozen=True, slots=True)
class CallSpec:
    """The shape of one hypercall's input and output (hvgdk_mini.h structures)."""

    code: int
    rep: bool
    input_fixed: int
    input_element: int = 0
    output_fixed: int = 0
    output_element: int = 0

    def input_size(self, count: int) -> int:
        return self.input_fixed + self.input_element * count

    def output_size(self, count: int) -> int:
        return self.output_fixed + self.output_element * count


CALLS: Mapping[int, CallSpec] = {
    abi.HVCALL_GET_VP_REGISTERS: CallSpec(abi.HVCALL_GET_VP_REGISTERS, True, 16, 4, 0, 16),
    abi.HVCALL_SET_VP_REGISTERS: CallSpec(abi.HVCALL_SET_VP_REGISTERS, True, 16, 32),
    abi.HVCALL_GET_PARTITION_ID: CallSpec(abi.HVCALL_GET_PARTITION_ID, False, 0, 0, 8),
    abi.HVCALL_POST_MESSAGE: CallSpec(abi.HVCALL_POST_MESSAGE, False, 256),
    abi.HVCALL_SIGNAL_EVENT: CallSpec(abi.HVCALL_SIGNAL_EVENT, False, 8),
}


@dataclass(frozen=True, slots=True)
class Plan:
    """A hypercall whose control word is valid: what to read and where the output goes."""

    spec: CallSpec
    control: Control
    input_size: int
    output_size: int


def plan(control: Control) -> Plan | HvStatus:
    """Check the hypercall input value against the call's shape."""
    spec = CALLS.get(control.code)
    if spec is None:
        return HvStatus.INVALID_HYPERCALL_CODE
    if control.reserved or control.varhead_size:
        return HvStatus.INVALID_HYPERCALL_INPUT
    if spec.rep:
        if control.rep_count == 0 or control.rep_start >= control.rep_count:
            return HvStatus.INVALID_HYPERCALL_INPUT
    elif control.rep_count or control.rep_start:
        return HvStatus.INVALID_HYPERCALL_INPUT
    count = control.rep_count if spec.rep else 0
    p = Plan(spec, control, spec.input_size(count), spec.output_size(count))
    if control.fast and not layout.fast_fits(p.input_size, p.output_size):
        return HvStatus.INVALID_HYPERCALL_INPUT
    return p


def check_gpa(gpa: int, size: int) -> HvStatus | None:
    """A slow call's parameter page: 8-byte aligned, inside one page (TLFS)."""
    if size == 0:
        return None
    if gpa % 8 or gpa % abi.HV_PAGE_SIZE + size > abi.HV_PAGE_SIZE:
        return HvStatus.INVALID_ALIGNMENT
    return None


@dataclass
class Execution:
    """What a hypercall did: its status, reps done, output pieces, effects for the adapter."""

    status: HvStatus
    reps_completed: int = 0
    writes: list[tuple[int, bytes]] = field(default_factory=list)  # (offset in output, bytes)
    crashes: list[CrashReport] = field(default_factory=list)

    @property
    def x0(self) -> int:
        return abi.result_value(self.status, self.reps_completed)


@dataclass(frozen=True, slots=True)
class Caller:
    vm: VmInfo
    vp: int
    now_ns: int


def execute(config: PersonaConfig, state: PartitionState, p: Plan, data: bytes, caller: Caller,
            sink: synic.SynicSink) -> Execution:
    """Run a planned hypercall on `data` (its input block); `state` is updated in place."""
    match p.spec.code:
        case abi.HVCALL_GET_VP_REGISTERS | abi.HVCALL_SET_VP_REGISTERS:
            return _vp_registers(config, state, p, data, caller)
        case abi.HVCALL_GET_PARTITION_ID:
            if not config.has(abi.HV_ACCESS_PARTITION_ID):
                return Execution(HvStatus.ACCESS_DENIED)
            return Execution(HvStatus.SUCCESS,
                             writes=[(0, layout.PARTITION_ID.pack(state.partition_id))])
        case abi.HVCALL_POST_MESSAGE:
            raw = PostMessageInput.parse(data)
            if raw is None:
                return Execution(HvStatus.INVALID_HYPERCALL_INPUT)
            message = synic.post_message(config, raw)
            if isinstance(message, HvStatus):
                return Execution(message)
            status = sink.post_message(caller.vm, caller.vp, message)
            if status is HvStatus.SUCCESS:
                state.messages_posted += 1
            return Execution(status)
        case abi.HVCALL_SIGNAL_EVENT:
            raw_event = SignalEventInput.parse(data)
            if raw_event is None:
                return Execution(HvStatus.INVALID_HYPERCALL_INPUT)
            event = synic.signal_event(config, raw_event)
            if isinstance(event, HvStatus):
                return Execution(event)
            status = sink.signal_event(caller.vm, caller.vp, event)
            if status is HvStatus.SUCCESS:
                state.events_signalled += 1
            return Execution(status)
    raise AssertionError(f"planned call {p.spec.code:#x} has no executor")  # pragma: no cover


def target_vp(header: VpHeader, state: PartitionState, caller: Caller) -> int | HvStatus:
    """Which VP a Get/SetVpRegisters header names, or why it names none."""
    if header.partition_id not in (abi.HV_PARTITION_ID_SELF, state.partition_id):
        return HvStatus.INVALID_PARTITION_ID
    if header.reserved or header.input_vtl & layout.VTL_RESERVED:
        return HvStatus.INVALID_PARAMETER
    if header.input_vtl & layout.VTL_USE_TARGET and header.input_vtl & layout.VTL_TARGET_MASK:
        return HvStatus.INVALID_PARAMETER  # only VTL 0 exists in this partition
    if header.vp_index == abi.HV_VP_INDEX_SELF:
        return caller.vp
    if header.vp_index >= caller.vm.nr_vcpus:
        return HvStatus.INVALID_VP_INDEX
    return header.vp_index


def _vp_registers(config: PersonaConfig, state: PartitionState, p: Plan, data: bytes,
                  caller: Caller) -> Execution:
    start = p.control.rep_start
    header = VpHeader.parse(data)
    if header is None:
        return Execution(HvStatus.INVALID_HYPERCALL_INPUT, start)
    vp = target_vp(header, state, caller)
    if isinstance(vp, HvStatus):
        return Execution(vp, start)
    out = Execution(HvStatus.SUCCESS, start)
    for i in range(start, p.control.rep_count):
        if p.spec.code == abi.HVCALL_GET_VP_REGISTERS:
            name = layout.register_name(data, i)
            if name is None:
                out.status = HvStatus.INVALID_HYPERCALL_INPUT
                return out
            value = registers.read(config, state, vp, name, caller.now_ns)
            if isinstance(value, HvStatus):
                out.status = value
                return out
            out.writes.append((layout.VALUE_SIZE * i, layout.register_value(value)))
        else:
            assoc = RegisterAssoc.parse(data, i)
            if assoc is None:
                out.status = HvStatus.INVALID_HYPERCALL_INPUT
                return out
            if assoc.reserved:
                out.status = HvStatus.INVALID_PARAMETER
                return out
            effects = registers.write(config, state, vp, assoc.name, assoc.value)
            if isinstance(effects, HvStatus):
                out.status = effects
                return out
            out.crashes.extend(effects)
        out.reps_completed = i + 1
    return out

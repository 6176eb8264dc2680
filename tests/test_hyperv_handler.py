"""HypervHandler: discovery, the control word, Get/SetVpRegisters, GetPartitionId, SynIC
messages and events, one behaviour and one status code per test.

References: reference/hyperv-arm64.md §1.1 (UID), §2 (HV_FUNC_ID), §3 (register conventions),
§4 (control word), §5 (status codes), §6 (synthetic registers).
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from hyperbroker.calls import Call, Outcome, Result
from hyperbroker.handlers.api import HandlerConfigError, VmInfo
from hyperbroker.handlers.hyperv import HypervHandler, abi
from hyperbroker.handlers.hyperv.abi import HvStatus
from hyperbroker.handlers.hyperv.layout import (
    PostMessageInput,
    RegisterAssoc,
    SignalEventInput,
    VpHeader,
)
from hyperbroker.handlers.hyperv.synic import PostMessage, SignalEvent
from hyperbroker.smccc import NOT_SUPPORTED_U64
from hyperbroker.testing.context import FakeContext, FakeGuestMemory, MemoryState

RAM = 0x4000_0000
IN = RAM + 0x1000
OUT = RAM + 0x2000
SELF_P = abi.HV_PARTITION_ID_SELF
SELF_VP = abi.HV_VP_INDEX_SELF


class ClockContext(FakeContext):
    """A FakeContext whose monotonic clock the test sets."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.clock_ns = 1_000_000_000

    def now_ns(self) -> int:
        return self.clock_ns


def make(config: dict[str, Any] | None = None, nr_vcpus: int = 2, name: str = "vm",
         shared: MemoryState | None = None, **kwargs: Any) -> tuple[HypervHandler, ClockContext]:
    memory = FakeGuestMemory(regions={RAM: bytearray(0x1_0000)})
    ctx = ClockContext(VmInfo("host", name, nr_vcpus, "p", 1), memory=memory, shared=shared)
    return HypervHandler(config or {}, **kwargs), ctx


def control(code: int, *, fast: bool = False, count: int = 0, start: int = 0,
            extra: int = 0) -> int:
    return (code | (abi.FAST_BIT if fast else 0) | count << abi.REP_COUNT_SHIFT
            | start << abi.REP_START_SHIFT | extra)


async def hv(h: HypervHandler, ctx: FakeContext, x1: int, *regs: int, vcpu: int = 0) -> Result:
    x = (abi.HV_FUNC_ID, x1, *regs) + (0,) * (16 - len(regs))
    result = await h.handle(Call(vcpu=vcpu, seq=0, function_id=abi.HV_FUNC_ID, x=x), ctx)
    ctx.memory.commit()  # the agent applies the writes with the result
    return result


def status(result: Result) -> HvStatus:
    return HvStatus(result.x[0] & 0xFFFF)


def reps(result: Result) -> int:
    return (result.x[0] >> 32) & 0xFFF


async def set_fast(h: HypervHandler, ctx: FakeContext, name: int, value: int,
                   vcpu: int = 0) -> Result:
    """hv_set_vpreg (§3): x2 = partition self, x3 = VP self, x4 = name, x6 = value."""
    x1 = control(abi.HVCALL_SET_VP_REGISTERS, fast=True, count=1)
    return await hv(h, ctx, x1, SELF_P, SELF_VP, name, 0, value & (2**64 - 1), value >> 64,
                    vcpu=vcpu)


async def get_fast(h: HypervHandler, ctx: FakeContext, name: int,
                   vcpu: int = 0) -> tuple[Result, int]:
    """hv_get_vpreg_128 (§3): the value comes back in x6 (low) and x7 (high)."""
    x1 = control(abi.HVCALL_GET_VP_REGISTERS, fast=True, count=1)
    result = await hv(h, ctx, x1, SELF_P, SELF_VP, name, vcpu=vcpu)
    return result, result.x[6] | result.x[7] << 64


def header(pid: int = SELF_P, vp: int = SELF_VP, vtl: int = 0, reserved: int = 0) -> bytes:
    return VpHeader(pid, vp, vtl, reserved).pack()


def get_input(*names: int, **kw: int) -> bytes:
    return header(**kw) + b"".join(struct.pack("<I", n) for n in names)


def values(ctx: FakeContext, count: int) -> list[int]:
    data = ctx.memory.peek(OUT, 16 * count)
    return [int.from_bytes(data[16 * i : 16 * i + 16], "little") for i in range(count)]


# Discovery (§1.1): Hyper-V's UID, KVM's services hidden


async def test_call_uid_is_hyperv_uid() -> None:
    h, ctx = make()
    result = await h.handle(Call(0, 0, abi.VENDOR_HYP_CALL_UID, (abi.VENDOR_HYP_CALL_UID,)), ctx)
    assert result.x[:4] == (0x4D32_BA58, 0xCD24_4764, 0x8EEF_6C75, 0x1659_7024)


async def test_linux_recognises_the_uid() -> None:
    # arm_smccc_hypervisor_has_uuid: smccc_res_to_uuid(a0..a3), byte b[0] in a0 bits 7:0,
    # compared with UUID_INIT(0x58ba324d, 0x6447, 0x24cd, 0x75, 0x6c, ...) (§1).
    h, ctx = make()
    result = await h.handle(Call(0, 0, abi.VENDOR_HYP_CALL_UID, (abi.VENDOR_HYP_CALL_UID,)), ctx)
    uid = b"".join((r & 0xFFFF_FFFF).to_bytes(4, "little") for r in result.x[:4])
    assert uid == bytes([0x58, 0xBA, 0x32, 0x4D, 0x64, 0x47, 0x24, 0xCD,
                         0x75, 0x6C, 0xEF, 0x8E, 0x24, 0x70, 0x59, 0x16])


@pytest.mark.parametrize("fid", [abi.KVM_FEATURES, 0x8600_0001, 0xC600_0003, 0xC600_0040,
                                 0x4600_0000, 0x4600_0002, 0xC600_0001, 0x8600_FF03])
async def test_kvm_vendor_services_are_hidden(fid: int) -> None:
    h, ctx = make()
    result = await h.handle(Call(0, 0, fid, (fid,)), ctx)
    assert result.x[0] == NOT_SUPPORTED_U64
    assert result.outcome is Outcome.GUEST_ERROR


async def test_static_answers_agree_with_handle() -> None:
    h, ctx = make()
    for fid, static in h.static_answers().items():
        assert await h.handle(Call(0, 0, fid, (fid,)), ctx) == static


# The control word (§4, §5)


async def test_unknown_call_code_is_invalid_hypercall_code() -> None:
    h, ctx = make()
    result = await hv(h, ctx, control(0x0002, fast=True))
    assert status(result) is HvStatus.INVALID_HYPERCALL_CODE
    assert result.outcome is Outcome.GUEST_ERROR


@pytest.mark.parametrize("bit", [27, 31, 44, 47, 60, 63])
async def test_reserved_control_bits_are_invalid_hypercall_input(bit: int) -> None:
    # 31:27 (31 is HV_HYPERCALL_NESTED: no nesting on arm64), 47:44, 63:60.
    h, ctx = make()
    x1 = control(abi.HVCALL_GET_VP_REGISTERS, fast=True, count=1, extra=1 << bit)
    result = await hv(h, ctx, x1, SELF_P, SELF_VP, abi.HV_REGISTER_VP_INDEX)
    assert status(result) is HvStatus.INVALID_HYPERCALL_INPUT


async def test_a_variable_header_is_invalid_hypercall_input() -> None:
    h, ctx = make()
    x1 = control(abi.HVCALL_GET_VP_REGISTERS, fast=True, count=1, extra=1 << 17)
    result = await hv(h, ctx, x1, SELF_P, SELF_VP, abi.HV_REGISTER_VP_INDEX)
    assert status(result) is HvStatus.INVALID_HYPERCALL_INPUT


async def test_a_rep_count_on_a_simple_call_is_invalid_hypercall_input() -> None:
    h, ctx = make()
    x1 = control(abi.HVCALL_SIGNAL_EVENT, fast=True, count=1)
    assert status(await hv(h, ctx, x1, 0)) is HvStatus.INVALID_HYPERCALL_INPUT


async def test_a_rep_call_without_reps_is_invalid_hypercall_input() -> None:
    h, ctx = make()
    x1 = control(abi.HVCALL_GET_VP_REGISTERS, fast=True, count=0)
    assert status(await hv(h, ctx, x1, SELF_P, SELF_VP)) is HvStatus.INVALID_HYPERCALL_INPUT


async def test_a_rep_start_past_the_count_is_invalid_hypercall_input() -> None:
    h, ctx = make()
    x1 = control(abi.HVCALL_GET_VP_REGISTERS, fast=True, count=1, start=1)
    result = await hv(h, ctx, x1, SELF_P, SELF_VP, abi.HV_REGISTER_VP_INDEX)
    assert status(result) is HvStatus.INVALID_HYPERCALL_INPUT


async def test_a_fast_call_larger_than_the_registers_is_invalid_hypercall_input() -> None:
    h, ctx = make()
    x1 = control(abi.HVCALL_GET_VP_REGISTERS, fast=True, count=6)
    assert status(await hv(h, ctx, x1, SELF_P, SELF_VP)) is HvStatus.INVALID_HYPERCALL_INPUT
    x1 = control(abi.HVCALL_POST_MESSAGE, fast=True)
    assert status(await hv(h, ctx, x1)) is HvStatus.INVALID_HYPERCALL_INPUT


# Slow calls: parameter pages (§3)


@pytest.mark.parametrize(("in_gpa", "out_gpa"), [
    (IN + 4, OUT),  # input not 8-byte aligned
    (RAM + 0x1FF8, OUT),  # input crosses a page
    (IN, OUT + 8 + 4096 - 16),  # output crosses a page
    (IN, OUT + 2),  # output not aligned
    (0x1000, OUT),  # input outside guest memory
])
async def test_bad_parameter_pages_are_invalid_alignment(in_gpa: int, out_gpa: int) -> None:
    h, ctx = make()
    ctx.memory.poke(IN, get_input(abi.HV_REGISTER_VP_INDEX))
    x1 = control(abi.HVCALL_GET_VP_REGISTERS, count=1)
    assert status(await hv(h, ctx, x1, in_gpa, out_gpa)) is HvStatus.INVALID_ALIGNMENT


async def test_an_output_page_outside_guest_memory_is_invalid_alignment() -> None:
    h, ctx = make()
    ctx.memory.poke(IN, get_input(abi.HV_REGISTER_VP_INDEX))
    x1 = control(abi.HVCALL_GET_VP_REGISTERS, count=1)
    assert status(await hv(h, ctx, x1, IN, 0x2000)) is HvStatus.INVALID_ALIGNMENT


# Get/SetVpRegisters (§3, §6)


async def test_fast_set_then_get_uses_x6_and_x7() -> None:
    h, ctx = make()
    result = await set_fast(h, ctx, abi.HV_REGISTER_GUEST_OS_ID, 0x8100_0000_0006_0C00)
    assert result.x[0] == 1 << 32  # SUCCESS, 1 rep completed
    got, value = await get_fast(h, ctx, abi.HV_REGISTER_GUEST_OS_ID)
    assert status(got) is HvStatus.SUCCESS
    assert value == 0x8100_0000_0006_0C00
    assert got.mask == 0b1100_0001  # x0, x6, x7: the input registers are left alone


async def test_slow_get_writes_every_value_to_the_output_page() -> None:
    h, ctx = make()
    ctx.memory.poke(IN, get_input(abi.HV_REGISTER_VP_INDEX, abi.HV_REGISTER_SVERSION,
                                  abi.HV_REGISTER_SINT0, vp=1))
    result = await hv(h, ctx, control(abi.HVCALL_GET_VP_REGISTERS, count=3), IN, OUT)
    assert (status(result), reps(result)) == (HvStatus.SUCCESS, 3)
    assert values(ctx, 3) == [1, 1, abi.HV_SYNIC_SINT_MASKED]


async def test_slow_set_writes_every_element() -> None:
    h, ctx = make()
    elements = (RegisterAssoc(abi.HV_REGISTER_GUEST_CRASH_P0, 0, 7).pack()
                + RegisterAssoc(abi.HV_REGISTER_SCONTROL, 0, 1).pack())
    ctx.memory.poke(IN, header() + elements)
    result = await hv(h, ctx, control(abi.HVCALL_SET_VP_REGISTERS, count=2), IN, 0)
    assert (status(result), reps(result)) == (HvStatus.SUCCESS, 2)
    assert (await get_fast(h, ctx, abi.HV_REGISTER_GUEST_CRASH_P0))[1] == 7
    assert (await get_fast(h, ctx, abi.HV_REGISTER_SCONTROL))[1] == 1


async def test_a_rep_start_index_resumes_the_list() -> None:
    h, ctx = make()
    ctx.memory.poke(OUT, bytes([0xAA]) * 32)
    ctx.memory.poke(IN, get_input(abi.HV_REGISTER_VP_INDEX, abi.HV_REGISTER_SVERSION))
    result = await hv(h, ctx, control(abi.HVCALL_GET_VP_REGISTERS, count=2, start=1), IN, OUT)
    assert reps(result) == 2  # the total, counted from the start of the list
    assert ctx.memory.peek(OUT, 16) == bytes([0xAA]) * 16  # element 0 untouched
    assert values(ctx, 2)[1] == 1


async def test_a_failing_element_stops_the_list_and_reports_reps_done() -> None:
    h, ctx = make()
    ctx.memory.poke(IN, get_input(abi.HV_REGISTER_VP_INDEX, 0x1234_5678, abi.HV_REGISTER_SVERSION))
    result = await hv(h, ctx, control(abi.HVCALL_GET_VP_REGISTERS, count=3), IN, OUT)
    assert (status(result), reps(result)) == (HvStatus.INVALID_PARAMETER, 1)


async def test_an_unknown_register_is_invalid_parameter() -> None:
    h, ctx = make()
    assert status((await get_fast(h, ctx, 0x0009_0099))[0]) is HvStatus.INVALID_PARAMETER
    assert status(await set_fast(h, ctx, 0x0009_0099, 1)) is HvStatus.INVALID_PARAMETER


@pytest.mark.parametrize("name", [
    abi.HV_REGISTER_HYPERVISOR_VERSION, abi.HV_REGISTER_PRIVILEGES_AND_FEATURES_INFO,
    abi.HV_REGISTER_FEATURES_INFO, abi.HV_REGISTER_VP_INDEX, abi.HV_REGISTER_TIME_REF_COUNT,
    abi.HV_REGISTER_SVERSION, abi.HV_REGISTER_VSM_VP_STATUS,
])
async def test_read_only_registers_refuse_writes(name: int) -> None:
    h, ctx = make()
    result = await set_fast(h, ctx, name, 1)
    assert (status(result), reps(result)) == (HvStatus.ACCESS_DENIED, 0)


async def test_a_value_wider_than_64_bits_is_invalid_parameter() -> None:
    h, ctx = make()
    assert status(await set_fast(h, ctx, abi.HV_REGISTER_GUEST_OS_ID, 1 << 64)) is (
        HvStatus.INVALID_PARAMETER)


@pytest.mark.parametrize(("name", "value"), [
    (abi.HV_REGISTER_SINT0 + 3, 1 << 8),  # SINT reserved 15:8
    (abi.HV_REGISTER_SINT0, 1 << 21),  # SINT reserved 63:21
    (abi.HV_REGISTER_SCONTROL, 0x2),  # SCONTROL: only Enable
])
async def test_reserved_register_bits_are_invalid_register_value(name: int, value: int) -> None:
    h, ctx = make()
    assert status(await set_fast(h, ctx, name, value)) is HvStatus.INVALID_REGISTER_VALUE


async def test_nonzero_rsvdz_in_an_element_is_invalid_parameter() -> None:
    h, ctx = make()
    x1 = control(abi.HVCALL_SET_VP_REGISTERS, fast=True, count=1)
    result = await hv(h, ctx, x1, SELF_P, SELF_VP, abi.HV_REGISTER_GUEST_OS_ID | 1 << 32, 0, 5)
    assert status(result) is HvStatus.INVALID_PARAMETER


async def test_another_partition_is_invalid_partition_id() -> None:
    h, ctx = make({"partition_id": 42})
    x1 = control(abi.HVCALL_GET_VP_REGISTERS, fast=True, count=1)
    result = await hv(h, ctx, x1, 41, SELF_VP, abi.HV_REGISTER_VP_INDEX)
    assert status(result) is HvStatus.INVALID_PARTITION_ID
    assert status(await hv(h, ctx, x1, 42, SELF_VP, abi.HV_REGISTER_VP_INDEX)) is HvStatus.SUCCESS


async def test_a_vp_beyond_the_vm_is_invalid_vp_index() -> None:
    h, ctx = make(nr_vcpus=2)
    x1 = control(abi.HVCALL_GET_VP_REGISTERS, fast=True, count=1)
    result = await hv(h, ctx, x1, SELF_P, 2, abi.HV_REGISTER_VP_INDEX)
    assert status(result) is HvStatus.INVALID_VP_INDEX


async def test_another_vps_registers_can_be_named() -> None:
    h, ctx = make()
    x1 = control(abi.HVCALL_GET_VP_REGISTERS, fast=True, count=1)
    result = await hv(h, ctx, x1, SELF_P, 1, abi.HV_REGISTER_VP_INDEX, vcpu=0)
    assert result.x[6] == 1


@pytest.mark.parametrize(("vtl", "reserved"), [(1 << 4 | 1, 0), (1 << 5, 0), (0, 1)])
async def test_a_higher_vtl_or_reserved_header_bits_are_invalid_parameter(vtl: int,
                                                                          reserved: int) -> None:
    h, ctx = make()
    x3 = SELF_VP | vtl << 32 | reserved << 40
    x1 = control(abi.HVCALL_GET_VP_REGISTERS, fast=True, count=1)
    result = await hv(h, ctx, x1, SELF_P, x3, abi.HV_REGISTER_VP_INDEX)
    assert status(result) is HvStatus.INVALID_PARAMETER


async def test_vp_index_is_the_callers_own() -> None:
    h, ctx = make(nr_vcpus=3)
    for vcpu in range(3):
        assert (await get_fast(h, ctx, abi.HV_REGISTER_VP_INDEX, vcpu=vcpu))[1] == vcpu


async def test_synic_registers_are_per_vp() -> None:
    h, ctx = make()
    await set_fast(h, ctx, abi.HV_REGISTER_SIMP, 0x4010_0001, vcpu=1)
    assert (await get_fast(h, ctx, abi.HV_REGISTER_SIMP, vcpu=1))[1] == 0x4010_0001
    assert (await get_fast(h, ctx, abi.HV_REGISTER_SIMP, vcpu=0))[1] == 0


async def test_synic_registers_start_as_the_tlfs_resets_them() -> None:
    h, ctx = make()
    assert (await get_fast(h, ctx, abi.HV_REGISTER_SINT0 + 15))[1] == abi.HV_SYNIC_SINT_MASKED
    assert (await get_fast(h, ctx, abi.HV_REGISTER_SVERSION))[1] == abi.HV_SYNIC_VERSION_1
    assert (await get_fast(h, ctx, abi.HV_REGISTER_SCONTROL))[1] == 0


async def test_eom_is_write_only_and_counted() -> None:
    h, ctx = make()
    assert status(await set_fast(h, ctx, abi.HV_REGISTER_EOM, 0)) is HvStatus.SUCCESS
    assert (await get_fast(h, ctx, abi.HV_REGISTER_EOM))[1] == 0
    assert ctx.state.get()["eoms"] == 1


async def test_reference_tsc_is_stored() -> None:
    h, ctx = make()
    await set_fast(h, ctx, abi.HV_REGISTER_REFERENCE_TSC, 0x4020_0001)
    assert (await get_fast(h, ctx, abi.HV_REGISTER_REFERENCE_TSC))[1] == 0x4020_0001


async def test_vsm_vp_status_reports_vtl_0() -> None:
    h, ctx = make()
    assert (await get_fast(h, ctx, abi.HV_REGISTER_VSM_VP_STATUS))[1] & 0xF == 0


async def test_time_ref_count_counts_100ns_units() -> None:
    h, ctx = make()
    first = (await get_fast(h, ctx, abi.HV_REGISTER_TIME_REF_COUNT))[1]
    ctx.clock_ns += 1_000_000  # 1 ms
    second = (await get_fast(h, ctx, abi.HV_REGISTER_TIME_REF_COUNT))[1]
    assert second - first == 10_000


async def test_time_ref_count_never_goes_back() -> None:
    # A restart elsewhere may bring a smaller monotonic clock: the count resumes, never drops.
    h, ctx = make()
    await get_fast(h, ctx, abi.HV_REGISTER_TIME_REF_COUNT)  # the partition's first call
    ctx.clock_ns += 5_000_000
    before = (await get_fast(h, ctx, abi.HV_REGISTER_TIME_REF_COUNT))[1]
    assert before == 50_000
    ctx.clock_ns = 10
    after = (await get_fast(h, ctx, abi.HV_REGISTER_TIME_REF_COUNT))[1]
    ctx.clock_ns += 100
    later = (await get_fast(h, ctx, abi.HV_REGISTER_TIME_REF_COUNT))[1]
    assert before <= after < later == before + 1


async def test_hypervisor_version_is_configurable() -> None:
    h, ctx = make({"hypervisor_version": {"major": 10, "minor": 0, "build": 26100,
                                          "service_branch": 3, "service_number": 7}})
    value = (await get_fast(h, ctx, abi.HV_REGISTER_HYPERVISOR_VERSION))[1]
    assert value & 0xFFFF_FFFF == 26100  # build_number, as32.a
    assert (value >> 48) & 0xFFFF == 10  # major_version
    assert (value >> 96) & 0xFF_FFFF == 7 and value >> 120 == 3


async def test_hints_are_configurable() -> None:
    h, ctx = make({"hints": 0x200})
    assert (await get_fast(h, ctx, abi.HV_REGISTER_FEATURES_INFO))[1] == 0x200


async def test_features_advertise_only_what_is_served() -> None:
    h, ctx = make()
    value = (await get_fast(h, ctx, abi.HV_REGISTER_PRIVILEGES_AND_FEATURES_INFO))[1]
    features, priv_high, misc = value & 0xFFFF_FFFF, (value >> 32) & 0xFFFF_FFFF, value >> 64
    assert features & abi.HV_MSR_VP_INDEX_AVAILABLE
    assert not features & (abi.HV_MSR_SYNIC_AVAILABLE | abi.HV_MSR_REFERENCE_TSC_AVAILABLE
                           | abi.HV_MSR_SYNTIMER_AVAILABLE)
    assert priv_high & 0b11_0010  # HV_ACCESS_PARTITION_ID, HV_POST_MESSAGES, HV_SIGNAL_EVENTS
    assert misc == abi.HV_FEATURE_GUEST_CRASH_MSR_AVAILABLE


# HvCallGetPartitionId


async def test_get_partition_id_writes_the_id_to_the_output_page() -> None:
    h, ctx = make({"partition_id": 0x77})
    result = await hv(h, ctx, control(abi.HVCALL_GET_PARTITION_ID), 0, OUT)
    assert status(result) is HvStatus.SUCCESS
    assert ctx.memory.peek(OUT, 8) == (0x77).to_bytes(8, "little")


async def test_fast_get_partition_id_returns_it_in_x2() -> None:
    h, ctx = make({"partition_id": 0x77})
    result = await hv(h, ctx, control(abi.HVCALL_GET_PARTITION_ID, fast=True))
    assert (result.x[2], result.mask) == (0x77, 0b101)


async def test_partition_ids_are_unique_across_the_fleet() -> None:
    shared = MemoryState()
    ids = []
    for name in ("a", "b", "c"):
        h, ctx = make(name=name, shared=shared)
        ids.append((await hv(h, ctx, control(abi.HVCALL_GET_PARTITION_ID, fast=True))).x[2])
        assert (await hv(h, ctx, control(abi.HVCALL_GET_PARTITION_ID, fast=True))).x[2] == ids[-1]
    assert len(set(ids)) == 3 and 0 not in ids


async def test_get_partition_id_without_the_privilege_is_access_denied() -> None:
    h, ctx = make({"privileges": 0x60})  # HYPERCALL and VP_INDEX only
    result = await hv(h, ctx, control(abi.HVCALL_GET_PARTITION_ID, fast=True))
    assert status(result) is HvStatus.ACCESS_DENIED


# HvCallPostMessage, HvCallSignalEvent


class RecordingSink:
    def __init__(self, answer: HvStatus = HvStatus.SUCCESS) -> None:
        self.answer = answer
        self.seen: list[PostMessage | SignalEvent] = []

    def post_message(self, vm: VmInfo, vp: int, message: PostMessage) -> HvStatus:
        self.seen.append(message)
        return self.answer

    def signal_event(self, vm: VmInfo, vp: int, event: SignalEvent) -> HvStatus:
        self.seen.append(event)
        return self.answer


def message(conn: int = 4, reserved: int = 0, mtype: int = 1, size: int = 8) -> bytes:
    return PostMessageInput(conn, reserved, mtype, size, bytes(range(8)) + bytes(232)).pack()


async def post(h: HypervHandler, ctx: FakeContext, data: bytes) -> Result:
    ctx.memory.poke(IN, data)
    return await hv(h, ctx, control(abi.HVCALL_POST_MESSAGE), IN, 0)


async def signal(h: HypervHandler, ctx: FakeContext, conn: int, flag: int = 0,
                 reserved: int = 0) -> Result:
    """vmbus_set_event: hv_do_fast_hypercall8(HVCALL_SIGNAL_EVENT, sig_event) (§3)."""
    x2 = conn | flag << 32 | reserved << 48
    return await hv(h, ctx, control(abi.HVCALL_SIGNAL_EVENT, fast=True), x2)


async def test_post_message_reaches_the_sink() -> None:
    sink = RecordingSink()
    h, ctx = make(sink=sink)
    assert status(await post(h, ctx, message())) is HvStatus.SUCCESS
    assert sink.seen == [PostMessage(4, 1, bytes(range(8)))]
    assert ctx.state.get()["messages_posted"] == 1


async def test_the_default_sink_counts_and_acknowledges() -> None:
    h, ctx = make()
    before = REGISTRY.get_sample_value("hyperbroker_hyperv_synic_total",
                                       {"kind": "post_message"}) or 0.0
    assert status(await post(h, ctx, message())) is HvStatus.SUCCESS
    assert REGISTRY.get_sample_value("hyperbroker_hyperv_synic_total",
                                     {"kind": "post_message"}) == before + 1


@pytest.mark.parametrize(("data", "expected"), [
    (message(size=241), HvStatus.INVALID_PARAMETER),  # > HV_MESSAGE_PAYLOAD_BYTE_COUNT
    (message(mtype=0x8000_0010), HvStatus.INVALID_PARAMETER),  # a hypervisor message type
    (message(mtype=0), HvStatus.INVALID_PARAMETER),  # HVMSG_NONE
    (message(reserved=1), HvStatus.INVALID_PARAMETER),
    (message(conn=1 << 24 | 4), HvStatus.INVALID_CONNECTION_ID),
])
async def test_bad_messages_are_refused(data: bytes, expected: HvStatus) -> None:
    sink = RecordingSink()
    h, ctx = make(sink=sink)
    assert status(await post(h, ctx, data)) is expected
    assert sink.seen == []


async def test_a_message_to_an_unlisted_connection_is_invalid_connection_id() -> None:
    h, ctx = make({"connections": [1, 2]})
    assert status(await post(h, ctx, message(conn=4))) is HvStatus.INVALID_CONNECTION_ID
    assert status(await post(h, ctx, message(conn=2))) is HvStatus.SUCCESS


async def test_the_sinks_status_reaches_the_guest() -> None:
    h, ctx = make(sink=RecordingSink(HvStatus.INSUFFICIENT_BUFFERS))
    assert status(await post(h, ctx, message())) is HvStatus.INSUFFICIENT_BUFFERS
    assert status(await signal(h, ctx, 4)) is HvStatus.INSUFFICIENT_BUFFERS


async def test_post_message_without_the_privilege_is_access_denied() -> None:
    h, ctx = make({"privileges": abi.HV_MSR_HYPERCALL_AVAILABLE | abi.HV_SIGNAL_EVENTS})
    assert status(await post(h, ctx, message())) is HvStatus.ACCESS_DENIED


async def test_signal_event_reaches_the_sink() -> None:
    sink = RecordingSink()
    h, ctx = make(sink=sink)
    assert status(await signal(h, ctx, 0x2001, flag=3)) is HvStatus.SUCCESS
    assert sink.seen == [SignalEvent(0x2001, 3)]


@pytest.mark.parametrize(("flag", "reserved", "conn", "expected"), [
    (abi.HV_EVENT_FLAGS_COUNT, 0, 4, HvStatus.INVALID_PARAMETER),
    (0, 1, 4, HvStatus.INVALID_PARAMETER),
    (0, 0, 0xFF00_0004, HvStatus.INVALID_CONNECTION_ID),
])
async def test_bad_events_are_refused(flag: int, reserved: int, conn: int,
                                      expected: HvStatus) -> None:
    h, ctx = make()
    assert status(await signal(h, ctx, conn, flag, reserved)) is expected


async def test_signal_event_without_the_privilege_is_access_denied() -> None:
    h, ctx = make({"privileges": abi.HV_MSR_HYPERCALL_AVAILABLE})
    assert status(await signal(h, ctx, 4)) is HvStatus.ACCESS_DENIED


async def test_slow_signal_event_reads_its_input_page() -> None:
    sink = RecordingSink()
    h, ctx = make(sink=sink)
    ctx.memory.poke(IN, SignalEventInput(9, 1, 0).pack())
    assert status(await hv(h, ctx, control(abi.HVCALL_SIGNAL_EVENT), IN, 0)) is HvStatus.SUCCESS
    assert sink.seen == [SignalEvent(9, 1)]


# State, config, robustness


async def test_the_persona_survives_a_new_handler_instance() -> None:
    h, ctx = make()
    await set_fast(h, ctx, abi.HV_REGISTER_GUEST_OS_ID, 0x1234)
    fresh = HypervHandler({})
    assert (await get_fast(fresh, ctx, abi.HV_REGISTER_GUEST_OS_ID))[1] == 0x1234


async def test_reads_of_constant_registers_do_not_write_state_twice() -> None:
    h, ctx = make()
    await get_fast(h, ctx, abi.HV_REGISTER_VP_INDEX)  # first call: partition ID and epoch
    await get_fast(h, ctx, abi.HV_REGISTER_VP_INDEX)
    await get_fast(h, ctx, abi.HV_REGISTER_PRIVILEGES_AND_FEATURES_INFO)
    assert ctx.state.puts == 1


@pytest.mark.parametrize(("config", "key"), [
    ({"privileges": abi.HV_MSR_SYNIC_AVAILABLE}, "privileges"),
    ({"privileges": abi.HV_MSR_REFERENCE_TSC_AVAILABLE}, "privileges"),
    ({"misc_features": 1 << 3}, "misc_features"),
    ({"hints": 1}, "hints"),
    ({"hints": 1 << 32}, "hints"),
    ({"partition_id": 0}, "partition_id"),
    ({"partition_id": SELF_P}, "partition_id"),
    ({"connections": [1 << 24]}, "connections"),
    ({"hypervisor_version": {"major": 1 << 16}}, "hypervisor_version.major"),
    ({"hypervisor_version": {"flavour": 1}}, "hypervisor_version"),
    ({"vendor": "kvm"}, "vendor"),
])
def test_bad_config_names_the_key(config: dict[str, Any], key: str) -> None:
    with pytest.raises(HandlerConfigError, match=key.replace(".", r"\.")):
        HypervHandler(config)


@settings(max_examples=300, deadline=None)
@given(x1=st.integers(0, (1 << 64) - 1) | st.sampled_from(
           [0x50 | 1 << 16 | 1 << 32, 0x51 | 1 << 16 | 1 << 32, 0x46, 0x5C, 0x5D | 1 << 16,
            0x50 | 3 << 32, 0x51 | 2 << 32]),
       regs=st.lists(st.integers(0, (1 << 64) - 1) | st.sampled_from([IN, OUT, SELF_P, SELF_VP]),
                     min_size=16, max_size=16),
       page=st.binary(min_size=512, max_size=512))
async def test_no_guest_input_makes_the_persona_raise(x1: int, regs: list[int],
                                                      page: bytes) -> None:
    h, ctx = make()
    ctx.memory.poke(IN, page)
    result = await hv(h, ctx, x1, *regs)
    assert result.x[0] & 0xFFFF in {int(s) for s in HvStatus}
    assert (result.outcome is Outcome.OK) == (status(result) is HvStatus.SUCCESS)

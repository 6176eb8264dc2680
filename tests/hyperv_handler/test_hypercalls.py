"""HypervHandler: discovery, the control word, parameter pages, Get/SetVpRegisters.

The interface is the Hyper-V TLFS as Linux uses it on arm64 (arch/arm64/hyperv/, the hypercall
and register definitions in include/hyperv/hvgdk_mini.h and hvhdk.h): Hyper-V's SMCCC UID,
HV_FUNC_ID, the x0..x17 register conventions of fast calls, the control word, the status codes.
"""

from __future__ import annotations

import pytest

from hyperbroker.calls import Call, Outcome
from hyperbroker.handlers.hyperv import abi
from hyperbroker.handlers.hyperv.abi import HvStatus
from hyperbroker.handlers.hyperv.layout import (
    RegisterAssoc,
)
from hyperbroker.smccc import NOT_SUPPORTED_U64

from .support import (
    IN,
    OUT,
    RAM,
    SELF_P,
    SELF_VP,
    control,
    get_fast,
    get_input,
    header,
    hv,
    make,
    reps,
    set_fast,
    status,
    values,
)

# Discovery: Hyper-V's UID, KVM's services hidden


async def test_call_uid_is_hyperv_uid() -> None:
    h, ctx = make()
    result = await h.handle(Call(0, 0, abi.VENDOR_HYP_CALL_UID, (abi.VENDOR_HYP_CALL_UID,)), ctx)
    assert result.x[:4] == (0x4D32_BA58, 0xCD24_4764, 0x8EEF_6C75, 0x1659_7024)


async def test_linux_recognises_the_uid() -> None:
    # arm_smccc_hypervisor_has_uuid: smccc_res_to_uuid(a0..a3), byte b[0] in a0 bits 7:0,
    # compared with UUID_INIT(0x58ba324d, 0x6447, 0x24cd, 0x75, 0x6c, ...)
    # (arch/arm64/hyperv/mshyperv.c).
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


# The control word and status codes


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


# Slow calls: parameter pages


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


# Get/SetVpRegisters and the synthetic registers


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

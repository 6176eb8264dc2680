"""Userspace PSCI 1.3 through PsciHandler, one behaviour per test.

References: include/uapi/linux/psci.h, arch/arm64/kvm/psci.c (IDs, return codes, KVM's behaviour
that this handler mirrors); drivers/firmware/psci/psci.c (the calls Linux makes at boot)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hyperbroker.calls import ActionKind, Call, Outcome, Result, VmmAction
from hyperbroker.handlers.api import HandlerConfigError, VmInfo
from hyperbroker.handlers.psci import PsciHandler, abi
from hyperbroker.smccc import NOT_SUPPORTED_U64, to_s64
from hyperbroker.testing.context import FakeContext

ENTRY = 0x4020_0000
CONTEXT = 0x1234_5678
MPIDR_1 = 0x1  # KVM's reset_mpidr for vCPU 1: Aff0 = 1


def make(config: dict[str, Any] | None = None,
         nr_vcpus: int = 2) -> tuple[PsciHandler, FakeContext]:
    vm = VmInfo(host="h", name="vm", nr_vcpus=nr_vcpus, profile="p", policy_version=1)
    return PsciHandler(config or {}), FakeContext(vm)


async def call(h: PsciHandler, ctx: FakeContext, fid: int, *args: int, vcpu: int = 0) -> Result:
    x = (fid, *args) + (0,) * (18 - 1 - len(args))
    return await h.handle(Call(vcpu=vcpu, seq=0, function_id=fid, x=x), ctx)


def x0(result: Result) -> int:
    return to_s64(result.x[0])


# PSCI_VERSION and PSCI_FEATURES


async def test_version_defaults_to_1_3() -> None:
    h, ctx = make()
    assert (await call(h, ctx, abi.PSCI_VERSION)).x[0] == 0x10003  # KVM_ARM_PSCI_1_3


async def test_version_is_configurable() -> None:
    h, ctx = make({"version": "1.0"})
    assert (await call(h, ctx, abi.PSCI_VERSION)).x[0] == 0x10000


def test_version_config_names_the_key() -> None:
    with pytest.raises(HandlerConfigError, match="version"):
        PsciHandler({"version": "2.0"})


@pytest.mark.parametrize("fid", [
    abi.PSCI_VERSION, abi.CPU_OFF, abi.CPU_ON, abi.CPU_ON64, abi.AFFINITY_INFO,
    abi.AFFINITY_INFO64, abi.MIGRATE_INFO_TYPE, abi.SYSTEM_OFF, abi.SYSTEM_RESET,
    abi.PSCI_FEATURES, abi.SYSTEM_SUSPEND, abi.SYSTEM_SUSPEND64, abi.SYSTEM_RESET2,
    abi.SYSTEM_RESET2_64,
])
async def test_features_is_zero_for_served_functions(fid: int) -> None:
    h, ctx = make()
    assert x0(await call(h, ctx, abi.PSCI_FEATURES, fid)) == 0


async def test_features_cpu_suspend_reports_original_format_without_osi() -> None:
    # PSCI_1_0_FEATURES_CPU_SUSPEND_PF (bit 1) clear, PSCI_1_0_OS_INITIATED (bit 0) clear.
    h, ctx = make()
    for fid in (abi.CPU_SUSPEND, abi.CPU_SUSPEND64):
        assert x0(await call(h, ctx, abi.PSCI_FEATURES, fid)) == 0


async def test_features_system_off2_reports_hibernate_off() -> None:
    h, ctx = make()
    for fid in (abi.SYSTEM_OFF2, abi.SYSTEM_OFF2_64):
        assert x0(await call(h, ctx, abi.PSCI_FEATURES, fid)) == abi.OFF_TYPE_HIBERNATE_OFF


async def test_features_claims_smccc_version_for_the_kernel() -> None:
    # Linux's psci_init_smccc asks this before using SMCCC 1.1 discovery.
    h, ctx = make()
    assert x0(await call(h, ctx, abi.PSCI_FEATURES, abi.SMCCC_VERSION)) == 0


@pytest.mark.parametrize("fid", [abi.MIGRATE, abi.MIGRATE_INFO_UP_CPU, abi.fn(11), 0x8400_0050,
                                 0xC400_0000, 0])
async def test_features_is_not_supported_for_unserved_ids(fid: int) -> None:
    h, ctx = make()
    result = await call(h, ctx, abi.PSCI_FEATURES, fid)
    assert result.x[0] == NOT_SUPPORTED_U64
    assert result.outcome is Outcome.GUEST_ERROR


async def test_features_follows_the_configured_version() -> None:
    # KVM reports SYSTEM_RESET2 only for minor >= 1 and SYSTEM_OFF2 only for minor >= 3.
    h, ctx = make({"version": "1.0"})
    assert x0(await call(h, ctx, abi.PSCI_FEATURES, abi.SYSTEM_RESET2)) == -1
    assert x0(await call(h, ctx, abi.PSCI_FEATURES, abi.SYSTEM_OFF2)) == -1
    assert x0(await call(h, ctx, abi.SYSTEM_RESET2, 0, 0)) == -1


async def test_psci_0_2_has_no_features_call() -> None:
    h, ctx = make({"version": "0.2"})
    assert x0(await call(h, ctx, abi.PSCI_FEATURES, abi.CPU_ON)) == -1


async def test_system_suspend_can_be_left_out() -> None:
    h, ctx = make({"system_suspend": False})
    assert x0(await call(h, ctx, abi.PSCI_FEATURES, abi.SYSTEM_SUSPEND64)) == -1
    assert x0(await call(h, ctx, abi.SYSTEM_SUSPEND64, ENTRY, 0)) == -1


async def test_migrate_info_type_is_tos_mp() -> None:
    h, ctx = make()
    assert x0(await call(h, ctx, abi.MIGRATE_INFO_TYPE)) == 2  # PSCI_0_2_TOS_MP, as KVM


# CPU_ON, AFFINITY_INFO, CPU_OFF


async def test_cpu_on_starts_the_target_through_a_vmm_action() -> None:
    h, ctx = make()
    result = await call(h, ctx, abi.CPU_ON64, MPIDR_1, ENTRY, CONTEXT)
    assert x0(result) == 0
    assert result.outcome is Outcome.OK
    assert result.actions == (VmmAction(ActionKind.CPU_ON, 1, ENTRY, CONTEXT),)


async def test_cpu_on_of_a_running_vcpu_is_already_on() -> None:
    h, ctx = make()
    result = await call(h, ctx, abi.CPU_ON64, 0, ENTRY, CONTEXT)  # the caller itself
    assert x0(result) == abi.PsciError.ALREADY_ON
    assert result.actions == ()


async def test_cpu_on_while_the_first_is_in_flight_is_on_pending() -> None:
    h, ctx = make(nr_vcpus=3)
    await call(h, ctx, abi.PSCI_VERSION, vcpu=2)  # vCPU 2 runs
    await call(h, ctx, abi.CPU_ON64, MPIDR_1, ENTRY, CONTEXT, vcpu=0)
    # vCPU 0 has not called again, so vCPU 1's start is not proven yet.
    result = await call(h, ctx, abi.CPU_ON64, MPIDR_1, ENTRY, CONTEXT, vcpu=2)
    assert x0(result) == abi.PsciError.ON_PENDING


async def test_the_callers_next_call_proves_the_target_started() -> None:
    h, ctx = make()
    await call(h, ctx, abi.CPU_ON64, MPIDR_1, ENTRY, CONTEXT)
    assert x0(await call(h, ctx, abi.AFFINITY_INFO64, MPIDR_1, 0)) == abi.AffinityState.ON
    assert x0(await call(h, ctx, abi.CPU_ON64, MPIDR_1, ENTRY, CONTEXT)) == -4  # ALREADY_ON


async def test_affinity_info_reports_on_pending_to_other_vcpus() -> None:
    h, ctx = make(nr_vcpus=3)
    await call(h, ctx, abi.PSCI_VERSION, vcpu=2)
    await call(h, ctx, abi.CPU_ON64, MPIDR_1, ENTRY, CONTEXT, vcpu=0)
    result = await call(h, ctx, abi.AFFINITY_INFO64, MPIDR_1, 0, vcpu=2)
    assert x0(result) == abi.AffinityState.ON_PENDING


async def test_a_vcpu_that_calls_is_on() -> None:
    h, ctx = make()
    await call(h, ctx, abi.PSCI_VERSION, vcpu=1)  # running although never started by CPU_ON
    assert x0(await call(h, ctx, abi.AFFINITY_INFO64, MPIDR_1, 0)) == abi.AffinityState.ON


async def test_cpu_on_of_an_unknown_mpidr_is_invalid_params() -> None:
    h, ctx = make()
    assert x0(await call(h, ctx, abi.CPU_ON64, 0x7, ENTRY, CONTEXT)) == -2


async def test_cpu_on_with_bits_outside_the_affinity_fields_is_invalid_params() -> None:
    h, ctx = make()
    assert x0(await call(h, ctx, abi.CPU_ON64, (1 << 24) | MPIDR_1, ENTRY, CONTEXT)) == -2


async def test_cpu_on_outside_the_entry_ranges_is_invalid_address() -> None:
    h, ctx = make({"entry_ranges": [{"base": 0x4000_0000, "size": 0x2000_0000}]})
    assert x0(await call(h, ctx, abi.CPU_ON64, MPIDR_1, 0x1000, CONTEXT)) == -9
    assert x0(await call(h, ctx, abi.CPU_ON64, MPIDR_1, ENTRY, CONTEXT)) == 0


async def test_smc32_cpu_on_reads_only_the_low_32_bits() -> None:
    # kvm_psci_narrow_to_32bit: SMC32 functions take W registers.
    h, ctx = make()
    result = await call(h, ctx, abi.CPU_ON, (0xAB << 32) | MPIDR_1, (1 << 40) | ENTRY,
                        (1 << 63) | CONTEXT)
    assert result.actions == (VmmAction(ActionKind.CPU_ON, 1, ENTRY, CONTEXT),)


async def test_configured_mpidrs_address_the_vcpus() -> None:
    h, ctx = make({"mpidrs": [0x000, 0x100]})
    assert x0(await call(h, ctx, abi.CPU_ON64, 1, ENTRY, 0)) == -2
    result = await call(h, ctx, abi.CPU_ON64, 0x100, ENTRY, 0)
    assert result.actions[0].vcpu == 1


async def test_affinity_info_of_a_powered_off_vcpu_is_off() -> None:
    h, ctx = make()
    assert x0(await call(h, ctx, abi.AFFINITY_INFO64, MPIDR_1, 0)) == abi.AffinityState.OFF


async def test_affinity_info_at_level_1_covers_the_cluster() -> None:
    # psci_affinity_mask(1) ignores Aff0: vCPUs 0..15 share Aff1 = 0 under reset_mpidr.
    h, ctx = make(nr_vcpus=17)
    assert x0(await call(h, ctx, abi.AFFINITY_INFO64, 0x5, 1)) == abi.AffinityState.ON
    assert x0(await call(h, ctx, abi.AFFINITY_INFO64, 0x100, 1)) == abi.AffinityState.OFF


async def test_affinity_info_above_level_3_is_invalid_params() -> None:
    h, ctx = make()
    assert x0(await call(h, ctx, abi.AFFINITY_INFO64, 0, 4)) == -2


async def test_affinity_info_matching_no_vcpu_is_invalid_params() -> None:
    h, ctx = make()
    assert x0(await call(h, ctx, abi.AFFINITY_INFO64, 0x9, 0)) == -2


async def test_cpu_off_stops_the_caller_through_a_vmm_action() -> None:
    h, ctx = make()
    await call(h, ctx, abi.CPU_ON64, MPIDR_1, ENTRY, CONTEXT)
    result = await call(h, ctx, abi.CPU_OFF, vcpu=1)
    assert result.actions == (VmmAction(ActionKind.CPU_OFF, 1),)
    # Only seen if the VMM resumed the vCPU instead of stopping it.
    assert x0(result) == abi.PsciError.INTERNAL_FAILURE
    assert x0(await call(h, ctx, abi.AFFINITY_INFO64, MPIDR_1, 0)) == abi.AffinityState.OFF
    assert x0(await call(h, ctx, abi.CPU_ON64, MPIDR_1, ENTRY, CONTEXT)) == 0


# CPU_SUSPEND


async def test_cpu_suspend_standby_waits_and_returns_success() -> None:
    h, ctx = make()
    result = await call(h, ctx, abi.CPU_SUSPEND64, 0x0, ENTRY, CONTEXT)
    assert x0(result) == 0
    assert result.actions == (VmmAction(ActionKind.CPU_SUSPEND, 0, 0, 0),)


async def test_cpu_suspend_powerdown_carries_its_entry_point() -> None:
    h, ctx = make()
    result = await call(h, ctx, abi.CPU_SUSPEND64, 1 << 16, ENTRY, CONTEXT)
    assert x0(result) == 0  # downgraded to standby, DEN0022 §5.4.2
    assert result.actions == (VmmAction(ActionKind.CPU_SUSPEND, 0, ENTRY, CONTEXT),)


async def test_cpu_suspend_with_reserved_bits_is_invalid_params() -> None:
    h, ctx = make()
    assert x0(await call(h, ctx, abi.CPU_SUSPEND64, 1 << 20, ENTRY, CONTEXT)) == -2


async def test_cpu_suspend_powerdown_to_a_bad_entry_is_invalid_address() -> None:
    h, ctx = make({"entry_ranges": [{"base": 0x4000_0000, "size": 0x1000_0000}]})
    assert x0(await call(h, ctx, abi.CPU_SUSPEND64, 1 << 16, 0x10, CONTEXT)) == -9
    # a standby state never uses the entry point
    assert x0(await call(h, ctx, abi.CPU_SUSPEND64, 0, 0x10, CONTEXT)) == 0


async def test_cpu_suspend_keeps_the_vcpu_on() -> None:
    h, ctx = make()
    await call(h, ctx, abi.CPU_SUSPEND64, 0, 0, 0)
    assert x0(await call(h, ctx, abi.AFFINITY_INFO64, 0, 0)) == abi.AffinityState.ON


# SYSTEM_OFF, SYSTEM_RESET, SYSTEM_RESET2, SYSTEM_OFF2, SYSTEM_SUSPEND


async def test_system_off_ends_the_vm_through_a_vmm_action() -> None:
    h, ctx = make()
    result = await call(h, ctx, abi.SYSTEM_OFF)
    assert result.actions == (VmmAction(ActionKind.SYSTEM_OFF),)
    assert x0(result) == abi.PsciError.INTERNAL_FAILURE  # KVM's preload


async def test_system_reset_restarts_with_only_the_boot_vcpus_on() -> None:
    h, ctx = make()
    await call(h, ctx, abi.CPU_ON64, MPIDR_1, ENTRY, CONTEXT)
    result = await call(h, ctx, abi.SYSTEM_RESET)
    assert result.actions == (VmmAction(ActionKind.SYSTEM_RESET),)
    assert x0(await call(h, ctx, abi.AFFINITY_INFO64, MPIDR_1, 0)) == abi.AffinityState.OFF


async def test_system_reset2_warm_reset_carries_type_and_cookie() -> None:
    h, ctx = make()
    result = await call(h, ctx, abi.SYSTEM_RESET2_64, 0, 0xC0FFEE)
    assert result.actions == (VmmAction(ActionKind.SYSTEM_RESET2, 0, 0xC0FFEE, 0),)


async def test_system_reset2_vendor_type_goes_to_the_vmm() -> None:
    h, ctx = make()
    result = await call(h, ctx, abi.SYSTEM_RESET2, 0x8000_0001, 7)
    assert result.actions == (VmmAction(ActionKind.SYSTEM_RESET2, 0, 7, 0x8000_0001),)


async def test_system_reset2_reserved_architectural_type_is_invalid_params() -> None:
    h, ctx = make()
    result = await call(h, ctx, abi.SYSTEM_RESET2, 1, 0)
    assert x0(result) == -2
    assert result.actions == ()


@pytest.mark.parametrize("off_type", [0, abi.OFF_TYPE_HIBERNATE_OFF])
async def test_system_off2_hibernate_off_ends_the_vm(off_type: int) -> None:
    h, ctx = make()
    result = await call(h, ctx, abi.SYSTEM_OFF2_64, off_type, 0)
    assert result.actions == (VmmAction(ActionKind.SYSTEM_OFF2, 0, 0, 1),)


async def test_system_off2_with_a_cookie_is_invalid_params() -> None:
    h, ctx = make()
    assert x0(await call(h, ctx, abi.SYSTEM_OFF2_64, 1, 1)) == -2


async def test_system_off2_of_an_unknown_type_is_invalid_params() -> None:
    h, ctx = make()
    assert x0(await call(h, ctx, abi.SYSTEM_OFF2, 2, 0)) == -2


async def test_system_suspend_with_another_vcpu_on_is_denied() -> None:
    h, ctx = make()
    await call(h, ctx, abi.CPU_ON64, MPIDR_1, ENTRY, CONTEXT)
    assert x0(await call(h, ctx, abi.SYSTEM_SUSPEND64, ENTRY, CONTEXT)) == -3  # DENIED


async def test_system_suspend_of_the_last_vcpu_suspends_the_vm() -> None:
    h, ctx = make()
    result = await call(h, ctx, abi.SYSTEM_SUSPEND64, ENTRY, CONTEXT)
    assert result.actions == (VmmAction(ActionKind.SYSTEM_SUSPEND, 0, ENTRY, CONTEXT),)
    assert result.outcome is Outcome.OK


async def test_system_suspend_to_a_bad_entry_is_invalid_address() -> None:
    h, ctx = make({"entry_ranges": [{"base": 0x4000_0000, "size": 0x1000}]})
    assert x0(await call(h, ctx, abi.SYSTEM_SUSPEND64, 0x10, CONTEXT)) == -9


# The range as a whole, state, lifecycle


async def test_every_id_of_the_range_is_answered() -> None:
    h, ctx = make()
    for r in h.ranges:
        for fid in range(r.base, r.end):
            result = await call(h, ctx, fid)
            assert isinstance(result, Result)


async def test_unserved_functions_are_not_supported() -> None:
    h, ctx = make()
    for fid in (abi.MIGRATE, abi.fn(11), abi.fn(19), abi.fn(0x1F), abi.fn64(0)):
        result = await call(h, ctx, fid)
        assert result.x[0] == NOT_SUPPORTED_U64
        assert result.outcome is Outcome.GUEST_ERROR


async def test_static_answers_agree_with_handle() -> None:
    h, ctx = make()
    for fid, static in h.static_answers().items():
        assert await call(h, ctx, fid) == static


async def test_power_state_survives_a_new_handler_instance() -> None:
    # The broker may restart between calls: state lives in ctx.state only.
    h, ctx = make()
    await call(h, ctx, abi.CPU_ON64, MPIDR_1, ENTRY, CONTEXT)
    fresh = PsciHandler({})
    assert x0(await call(fresh, ctx, abi.CPU_ON64, MPIDR_1, ENTRY, CONTEXT)) == -4


async def test_state_is_written_only_when_it_changes() -> None:
    h, ctx = make()
    await call(h, ctx, abi.PSCI_VERSION)
    await call(h, ctx, abi.AFFINITY_INFO64, 0, 0)
    assert ctx.state.puts == 0
    await call(h, ctx, abi.CPU_ON64, MPIDR_1, ENTRY, CONTEXT)
    assert ctx.state.puts == 1


async def test_a_vcpu_the_vm_does_not_have_gets_internal_failure() -> None:
    h, ctx = make(nr_vcpus=2)
    result = await call(h, ctx, abi.CPU_OFF, vcpu=2)
    assert x0(result) == abi.PsciError.INTERNAL_FAILURE
    assert result.actions == ()


async def test_vm_destroyed_drops_the_record() -> None:
    h, ctx = make()
    await call(h, ctx, abi.CPU_ON64, MPIDR_1, ENTRY, CONTEXT)
    await h.vm_destroyed(ctx)
    assert ctx.state.get() is None


@pytest.mark.parametrize(("config", "key"), [
    ({"mpidrs": [1, 1]}, "mpidrs"),
    ({"mpidrs": [1 << 24]}, "mpidrs"),
    ({"boot_vcpus": []}, "boot_vcpus"),
    ({"entry_ranges": [{"base": 0, "size": 0}]}, "entry_ranges"),
    ({"system_off2": "yes"}, "system_off2"),
    ({"colour": 1}, "colour"),
])
def test_bad_config_names_the_key(config: dict[str, Any], key: str) -> None:
    with pytest.raises(HandlerConfigError, match=key):
        PsciHandler(config)


def test_function_names_cover_the_range_only() -> None:
    h = PsciHandler({})
    assert h.function_name(abi.CPU_ON64) == "PSCI_CPU_ON64"
    assert h.function_name(abi.fn(0x1E)) == "PSCI_RESERVED"
    assert h.function_name(0x8400_0050) is None


@settings(max_examples=200, deadline=None)
@given(fid=st.integers(0x8400_0000, 0x8400_001F) | st.integers(0xC400_0000, 0xC400_001F),
       args=st.lists(st.integers(0, (1 << 64) - 1), min_size=17, max_size=17),
       vcpu=st.integers(0, 3))
async def test_no_register_values_make_the_handler_raise(fid: int, args: list[int],
                                                         vcpu: int) -> None:
    h, ctx = make(nr_vcpus=4)
    result = await call(h, ctx, fid, *args, vcpu=vcpu)
    code = to_s64(result.x[0])
    assert code >= -9  # a PSCI answer or one of DEN0022's codes, never anything else
    assert (result.outcome is Outcome.GUEST_ERROR) == (code < 0 and result.actions == ())


@given(raw=st.integers(0, (1 << 64) - 1))
def test_power_state_decoding_rejects_exactly_the_reserved_bits(raw: int) -> None:
    state = abi.decode_power_state(raw)
    low = raw & 0xFFFF_FFFF
    if low & abi.POWER_STATE_RESERVED:
        assert state is None
    else:
        assert state is not None
        rebuilt = state.state_id | (state.powerdown << 16) | (state.level << 24)
        assert rebuilt == low

"""MemshareHandler: KVM vendor-hyp discovery and the pKVM guest calls, one behaviour per test.

References: include/linux/arm-smccc.h (KVM's vendor hypervisor service: UID, KVM_FEATURES bitmap)
and Documentation/virt/kvm/arm/hypercalls.rst (pKVM guest hypercalls: HYP_MEMINFO, MEM_SHARE,
MEM_UNSHARE, MMIO_GUARD, "-3 on error")."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hyperbroker.calls import Call, Outcome, Result
from hyperbroker.handlers.api import HandlerConfigError, VmInfo
from hyperbroker.handlers.memshare import MemshareHandler, abi
from hyperbroker.smccc import NOT_SUPPORTED_U64, to_s64
from hyperbroker.testing.context import FakeContext
from hyperbroker.testing.metrics import HANDLERS as REGISTRY

RAM = 0x4000_0000
G = 4096


def make(config: dict[str, Any] | None = None, name: str = "vm") -> tuple[MemshareHandler,
                                                                         FakeContext]:
    return MemshareHandler(config or {}), FakeContext(VmInfo("host", name, 2, "p", 1))


async def call(h: MemshareHandler, ctx: FakeContext, fid: int, *args: int) -> Result:
    x = (fid, *args) + (0,) * (17 - len(args))
    return await h.handle(Call(vcpu=0, seq=0, function_id=fid, x=x), ctx)


def x0(result: Result) -> int:
    return to_s64(result.x[0])


def calls_metric(function: str, result: str) -> float:
    return REGISTRY.get_sample_value("hyperbroker_memshare_calls_total",
                                     {"function": function, "result": result}) or 0.0


# Discovery


async def test_call_uid_is_kvms_uid() -> None:
    h, ctx = make()
    result = await call(h, ctx, abi.VENDOR_HYP_CALL_UID)
    assert result.x[:4] == (0xB66F_B428, 0xE911_C52E, 0x564B_CAA9, 0x743A_004D)


async def test_kvm_features_advertises_exactly_the_served_functions() -> None:
    h, ctx = make()
    result = await call(h, ctx, abi.KVM_FEATURES)
    # bits 0 (FEATURES/UID), 2 (MEMINFO), 3 (MEM_SHARE), 4 (MEM_UNSHARE), 7 (MMIO_GUARD)
    assert result.x[:4] == (0b1001_1101, 0, 0, 0)


async def test_kvm_features_drops_mmio_guard_when_it_is_off() -> None:
    h, ctx = make({"mmio_guard": False})
    assert (await call(h, ctx, abi.KVM_FEATURES)).x[:4] == (0b1_1101, 0, 0, 0)
    assert (await call(h, ctx, abi.MMIO_GUARD, 0x900_0000)).x[0] == NOT_SUPPORTED_U64


@pytest.mark.parametrize("fid", [abi.KVM_PTP, abi.DISCOVER_IMPL_VER, abi.DISCOVER_IMPL_CPUS,
                                 0x8600_0002, 0xC600_0005, 0xC600_FF01, 0x4600_0001])
async def test_host_kernel_services_are_neither_served_nor_advertised(fid: int) -> None:
    # PTP needs the host's clocks read together; only the host kernel can serve it.
    h, ctx = make()
    result = await call(h, ctx, fid)
    assert result.x[0] == NOT_SUPPORTED_U64
    assert result.outcome is Outcome.GUEST_ERROR


async def test_static_answers_agree_with_handle() -> None:
    h, ctx = make()
    for fid, static in h.static_answers().items():
        assert await call(h, ctx, fid) == static


# HYP_MEMINFO


async def test_meminfo_returns_the_granule() -> None:
    h, ctx = make({"granule": 16384})
    assert x0(await call(h, ctx, abi.HYP_MEMINFO)) == 16384


@pytest.mark.parametrize("args", [(1, 0, 0), (0, 1, 0), (0, 0, 1)])
async def test_meminfo_with_a_nonzero_argument_is_invalid_parameter(args: tuple[int, ...]) -> None:
    h, ctx = make()
    result = await call(h, ctx, abi.HYP_MEMINFO, *args)
    assert x0(result) == -3
    assert result.outcome is Outcome.GUEST_ERROR


# MEM_SHARE / MEM_UNSHARE


async def test_share_records_the_granule() -> None:
    h, ctx = make()
    assert x0(await call(h, ctx, abi.MEM_SHARE, RAM)) == 0
    assert h.admin_view(ctx)["shared"] == [[RAM, RAM + G]]


async def test_sharing_a_shared_granule_is_invalid_parameter() -> None:
    h, ctx = make()
    await call(h, ctx, abi.MEM_SHARE, RAM)
    assert x0(await call(h, ctx, abi.MEM_SHARE, RAM)) == -3


async def test_unshare_drops_the_granule() -> None:
    h, ctx = make()
    await call(h, ctx, abi.MEM_SHARE, RAM)
    assert x0(await call(h, ctx, abi.MEM_UNSHARE, RAM)) == 0
    assert h.admin_view(ctx)["shared_bytes"] == 0


async def test_unsharing_a_private_granule_is_invalid_parameter() -> None:
    h, ctx = make()
    assert x0(await call(h, ctx, abi.MEM_UNSHARE, RAM)) == -3


@pytest.mark.parametrize("fid", [abi.MEM_SHARE, abi.MEM_UNSHARE, abi.MMIO_GUARD])
async def test_an_unaligned_ipa_is_invalid_parameter(fid: int) -> None:
    h, ctx = make()
    assert x0(await call(h, ctx, fid, RAM + 8)) == -3


@pytest.mark.parametrize("fid", [abi.MEM_SHARE, abi.MEM_UNSHARE, abi.MMIO_GUARD])
@pytest.mark.parametrize("mbz", [(1, 0), (0, 1)])
async def test_nonzero_reserved_arguments_are_invalid_parameter(fid: int,
                                                                mbz: tuple[int, int]) -> None:
    h, ctx = make()
    await call(h, ctx, abi.MEM_SHARE, RAM)
    assert x0(await call(h, ctx, fid, RAM, *mbz)) == -3


async def test_sharing_a_denied_granule_is_invalid_parameter() -> None:
    h, ctx = make({"deny": [{"base": RAM + 0x10_0000, "size": 0x1000}]})
    assert x0(await call(h, ctx, abi.MEM_SHARE, RAM + 0x10_0000)) == -3
    assert calls_metric("KVM_MEM_SHARE", "denied") >= 1
    assert x0(await call(h, ctx, abi.MEM_SHARE, RAM + 0x10_1000)) == 0


async def test_sharing_outside_guest_ram_is_invalid_parameter() -> None:
    h, ctx = make({"ram": [{"base": RAM, "size": 0x2000_0000}]})
    assert x0(await call(h, ctx, abi.MEM_SHARE, 0x900_0000)) == -3
    assert x0(await call(h, ctx, abi.MEM_SHARE, RAM)) == 0


async def test_sharing_beyond_the_limit_is_invalid_parameter() -> None:
    h, ctx = make({"max_shared_bytes": 2 * G})
    assert x0(await call(h, ctx, abi.MEM_SHARE, RAM)) == 0
    assert x0(await call(h, ctx, abi.MEM_SHARE, RAM + G)) == 0
    assert x0(await call(h, ctx, abi.MEM_SHARE, RAM + 2 * G)) == -3
    await call(h, ctx, abi.MEM_UNSHARE, RAM)
    assert x0(await call(h, ctx, abi.MEM_SHARE, RAM + 2 * G)) == 0


async def test_sharing_a_guarded_granule_is_invalid_parameter() -> None:
    h, ctx = make()
    await call(h, ctx, abi.MMIO_GUARD, 0x900_0000)
    assert x0(await call(h, ctx, abi.MEM_SHARE, 0x900_0000)) == -3


# MMIO_GUARD


async def test_guard_records_the_granule() -> None:
    h, ctx = make()
    assert x0(await call(h, ctx, abi.MMIO_GUARD, 0x900_0000)) == 0
    assert h.admin_view(ctx)["guarded"] == [[0x900_0000, 0x900_1000]]


async def test_guarding_twice_succeeds_and_writes_once() -> None:
    # The guest's ioremap hook guards each mapping and warns on failure.
    h, ctx = make()
    await call(h, ctx, abi.MMIO_GUARD, 0x900_0000)
    assert x0(await call(h, ctx, abi.MMIO_GUARD, 0x900_0000)) == 0
    assert ctx.state.puts == 1


async def test_guarding_guest_ram_is_invalid_parameter() -> None:
    h, ctx = make({"ram": [{"base": RAM, "size": 0x2000_0000}]})
    assert x0(await call(h, ctx, abi.MMIO_GUARD, RAM)) == -3
    assert x0(await call(h, ctx, abi.MMIO_GUARD, 0x900_0000)) == 0


async def test_guarding_a_shared_granule_is_invalid_parameter() -> None:
    h, ctx = make()
    await call(h, ctx, abi.MEM_SHARE, RAM)
    assert x0(await call(h, ctx, abi.MMIO_GUARD, RAM)) == -3


async def test_guarding_beyond_the_limit_is_invalid_parameter() -> None:
    h, ctx = make({"max_guarded_granules": 1})
    assert x0(await call(h, ctx, abi.MMIO_GUARD, 0x900_0000)) == 0
    assert x0(await call(h, ctx, abi.MMIO_GUARD, 0x901_0000)) == -3


# Record, metrics, lifecycle


async def test_the_record_survives_a_new_handler_instance() -> None:
    h, ctx = make()
    await call(h, ctx, abi.MEM_SHARE, RAM)
    fresh = MemshareHandler({})
    assert x0(await call(fresh, ctx, abi.MEM_UNSHARE, RAM)) == 0


async def test_refusals_and_reads_do_not_write_state() -> None:
    h, ctx = make()
    await call(h, ctx, abi.HYP_MEMINFO)
    await call(h, ctx, abi.MEM_UNSHARE, RAM)
    await call(h, ctx, abi.KVM_FEATURES)
    assert ctx.state.puts == 0


async def test_shared_bytes_are_exported_per_vm() -> None:
    h, ctx = make(name="metrics-vm")
    for n in range(3):
        await call(h, ctx, abi.MEM_SHARE, RAM + n * G)
    await call(h, ctx, abi.MMIO_GUARD, 0x900_0000)
    labels = {"host": "host", "vm": "metrics-vm"}
    assert REGISTRY.get_sample_value("hyperbroker_memshare_shared_bytes", labels) == 3 * G
    assert REGISTRY.get_sample_value("hyperbroker_memshare_guarded_granules", labels) == 1


async def test_vm_destroyed_drops_the_record_and_its_metrics() -> None:
    h, ctx = make(name="gone-vm")
    await call(h, ctx, abi.MEM_SHARE, RAM)
    await h.vm_destroyed(ctx)
    assert ctx.state.get() is None
    labels = {"host": "host", "vm": "gone-vm"}
    assert REGISTRY.get_sample_value("hyperbroker_memshare_shared_bytes", labels) is None


async def test_vm_destroyed_without_any_share_is_fine() -> None:
    h, ctx = make(name="idle-vm")
    await h.vm_destroyed(ctx)
    assert ctx.state.get() is None


@pytest.mark.parametrize(("config", "key"), [
    ({"granule": 3000}, "granule"),
    ({"granule": 1 << 20}, "granule"),
    ({"max_shared_bytes": -1}, "max_shared_bytes"),
    ({"max_guarded_granules": True}, "max_guarded_granules"),
    ({"deny": [{"base": 0}]}, "deny"),
    ({"ram": "all"}, "ram"),
    ({"mmio_guard": 1}, "mmio_guard"),
])
def test_bad_config_names_the_key(config: dict[str, Any], key: str) -> None:
    with pytest.raises(HandlerConfigError, match=key):
        MemshareHandler(config)


@settings(max_examples=300, deadline=None)
@given(fid=st.sampled_from([r.base for r in MemshareHandler({}).ranges]).flatmap(
           lambda base: st.integers(base, base + 0xFFFF)),
       args=st.lists(st.integers(0, (1 << 64) - 1), min_size=3, max_size=3))
async def test_no_register_values_make_the_handler_raise(fid: int, args: list[int]) -> None:
    h, ctx = make()
    code = x0(await call(h, ctx, fid, *args))
    if fid not in h.served_functions():
        assert code == -1
    elif fid in (abi.MEM_SHARE, abi.MEM_UNSHARE, abi.MMIO_GUARD):
        assert code in (0, -3)
    elif fid == abi.HYP_MEMINFO:
        assert code in (G, -3)


async def test_linux_pkvm_guest_driver_sequence() -> None:
    """drivers/virt/coco/pkvm-guest/arm-pkvm-guest.c as a Linux guest runs it: the record
    after sharing and unsharing matches what the guest did."""
    h, ctx = make({"ram": [{"base": RAM, "size": 0x2000_0000}]})
    # kvm_init_hyp_services: the UID must be KVM's before KVM_FEATURES is read.
    uid = await call(h, ctx, abi.VENDOR_HYP_CALL_UID)
    assert uid.x[:4] == abi.kvm_uid_regs()
    bitmap = abi.bitmap_functions((await call(h, ctx, abi.KVM_FEATURES)).x[:4])
    # pkvm_init_hyp_services: MEMINFO, MEM_SHARE, MEM_UNSHARE required; granule <= PAGE_SIZE.
    assert {abi.FUNC_HYP_MEMINFO, abi.FUNC_MEM_SHARE, abi.FUNC_MEM_UNSHARE} <= bitmap
    granule = x0(await call(h, ctx, abi.HYP_MEMINFO))
    assert 0 < granule <= 4096
    # set_memory_decrypted(swiotlb, 4 pages), then set_memory_encrypted of the second page.
    for page in range(4):
        assert x0(await call(h, ctx, abi.MEM_SHARE, RAM + page * 4096)) == 0
    assert x0(await call(h, ctx, abi.MEM_UNSHARE, RAM + 4096)) == 0
    # an ioremap of a device page, twice
    assert abi.FUNC_MMIO_GUARD in bitmap
    for _ in range(2):
        assert x0(await call(h, ctx, abi.MMIO_GUARD, 0x0900_0000)) == 0
    view = h.admin_view(ctx)
    assert view["shared"] == [[RAM, RAM + 4096], [RAM + 2 * 4096, RAM + 4 * 4096]]
    assert view["shared_granules"] == 3
    assert view["guarded"] == [[0x0900_0000, 0x0900_1000]]

"""Linux's arm64 Hyper-V code replayed against the persona: hyperv_init's register sequence
(hyperv_init, arch/arm64/hyperv/mshyperv.c) and both ways a panicking guest reports a crash
(hyperv_report_panic, hv_kmsg_dump in arch/arm64/hyperv/hv_core.c and drivers/hv/hv_common.c).
"""

from __future__ import annotations

import logging
import struct

import pytest

from hyperbroker.calls import Call, Result
from hyperbroker.handlers.api import VmInfo
from hyperbroker.handlers.hyperv import HypervHandler, abi
from hyperbroker.handlers.hyperv.abi import HvStatus
from hyperbroker.handlers.hyperv.crash import GuestCrash
from hyperbroker.testing.context import FakeContext, FakeGuestMemory
from hyperbroker.testing.metrics import HANDLERS as REGISTRY

RAM = 0x4000_0000
OUTPUT_ARG = RAM + 0x3000  # hyperv_pcpu_output_arg
PANIC_PAGE = RAM + 0x8000  # hv_panic_page
GUEST_ID = 0x8100_0000_0006_0C00  # hv_generate_guest_id(LINUX_VERSION_CODE) for 6.12


class Guest:
    """One vCPU of a Linux guest issuing HVCs the way hv_core.c does."""

    def __init__(self, h: HypervHandler, ctx: FakeContext, vcpu: int = 0) -> None:
        self.h, self.ctx, self.vcpu = h, ctx, vcpu

    async def hvc(self, *x: int) -> Result:
        regs = tuple(x) + (0,) * (18 - len(x))
        result = await self.h.handle(Call(self.vcpu, 0, x[0] & 0xFFFF_FFFF, regs), self.ctx)
        self.ctx.memory.commit()
        return result

    async def set_vpreg(self, name: int, value: int) -> None:
        res = await self.hvc(abi.HV_FUNC_ID,
                             abi.HVCALL_SET_VP_REGISTERS | abi.FAST_BIT | 1 << 32,
                             abi.HV_PARTITION_ID_SELF, abi.HV_VP_INDEX_SELF, name, 0, value, 0)
        assert res.x[0] & 0xFFFF == 0, "BUG_ON(!hv_result_success(res.a0))"

    async def get_vpreg_128(self, name: int) -> int:
        res = await self.hvc(abi.HV_FUNC_ID,
                             abi.HVCALL_GET_VP_REGISTERS | abi.FAST_BIT | 1 << 32,
                             abi.HV_PARTITION_ID_SELF, abi.HV_VP_INDEX_SELF, name)
        assert res.x[0] & 0xFFFF == 0, "BUG_ON(!hv_result_success(res.a0))"
        return res.x[6] | res.x[7] << 64

    async def do_hypercall(self, control: int, input_gpa: int, output_gpa: int) -> int:
        return (await self.hvc(abi.HV_FUNC_ID, control, input_gpa, output_gpa)).x[0]


def vm(nr_vcpus: int = 2) -> tuple[HypervHandler, FakeContext]:
    memory = FakeGuestMemory(regions={RAM: bytearray(0x1_0000)})
    return HypervHandler({}), FakeContext(VmInfo("host-a", "win-or-linux", nr_vcpus, "hv", 1),
                                          memory=memory)


async def test_hyperv_init_sequence_succeeds() -> None:
    h, ctx = vm()
    guest = Guest(h, ctx)
    # hyperv_detect_via_smccc -> arm_smccc_hypervisor_has_uuid
    uid = await guest.hvc(abi.VENDOR_HYP_CALL_UID)
    assert uid.x[0] != 0xFFFF_FFFF_FFFF_FFFF
    assert b"".join(r.to_bytes(4, "little") for r in uid.x[:4]) == abi.HYPERV_UID.bytes
    # 1. the guest ID
    await guest.set_vpreg(abi.HV_REGISTER_GUEST_OS_ID, GUEST_ID)
    # 2. features (low 32), privileges high (63:32), misc features (95:64)
    info = await guest.get_vpreg_128(abi.HV_REGISTER_PRIVILEGES_AND_FEATURES_INFO)
    features, priv_high, misc = info & 0xFFFF_FFFF, (info >> 32) & 0xFFFF_FFFF, (info >> 64)
    assert features & abi.HV_MSR_HYPERCALL_AVAILABLE
    # 3. hints
    hints = (await guest.get_vpreg_128(abi.HV_REGISTER_FEATURES_INFO)) & 0xFFFF_FFFF
    assert not hints & abi.HV_HINT_USE_HV_REGISTER_FOR_RESET
    # 4. hv_common_init: crash MSRs available -> read CRASH_CTL for NOTIFY_MSG; per-cpu VP index
    assert misc & abi.HV_FEATURE_GUEST_CRASH_MSR_AVAILABLE
    crash_ctl = await guest.get_vpreg_128(abi.HV_REGISTER_GUEST_CRASH_CTL)
    assert crash_ctl & abi.HV_CRASH_CTL_CRASH_NOTIFY_MSG
    for vcpu in range(2):
        assert await Guest(h, ctx, vcpu).get_vpreg_128(abi.HV_REGISTER_VP_INDEX) == vcpu
    # 5. hv_get_partition_id when HV_ACCESS_PARTITION_ID (BIT(1) of the high privileges)
    assert priv_high & 0x2
    status = await guest.do_hypercall(abi.HVCALL_GET_PARTITION_ID, 0, OUTPUT_ARG)
    assert status & 0xFFFF == HvStatus.SUCCESS
    partition_id = struct.unpack("<Q", ctx.memory.peek(OUTPUT_ARG, 8))[0]
    assert partition_id not in (abi.HV_PARTITION_ID_INVALID, abi.HV_PARTITION_ID_SELF)
    # 6. get_vtl(): VTL 0
    assert (await guest.get_vpreg_128(abi.HV_REGISTER_VSM_VP_STATUS)) & 0xF == 0
    # hv_get_hypervisor_version: "Hyper-V: Host Build %d.%d.%d.%d-%d-%d"
    version = await guest.get_vpreg_128(abi.HV_REGISTER_HYPERVISOR_VERSION)
    assert (version >> 48) & 0xFFFF == 10
    # the guest ID is kept
    assert await guest.get_vpreg_128(abi.HV_REGISTER_GUEST_OS_ID) == GUEST_ID


async def test_hyperv_report_panic_is_a_crash_event_log_line_and_metric(
        caplog: pytest.LogCaptureFixture) -> None:
    h, ctx = vm()
    events: list[GuestCrash] = []
    h.crash_listeners.append(events.append)
    guest = Guest(h, ctx, vcpu=1)
    await guest.set_vpreg(abi.HV_REGISTER_GUEST_OS_ID, GUEST_ID)
    before = REGISTRY.get_sample_value("hyperbroker_hyperv_guest_crashes_total",
                                       {"kind": "notify"}) or 0.0
    # hyperv_report_panic(regs, err): P0 = err, P1 = guest id, P2 = PC, P3 = SP, P4 = 0
    with caplog.at_level(logging.ERROR):
        guest_id = await guest.get_vpreg_128(abi.HV_REGISTER_GUEST_OS_ID)
        for i, value in enumerate((0xB, guest_id, 0xFFFF_8000_1234_5678, 0xFFFF_8000_0000_F000, 0)):
            await guest.set_vpreg(abi.HV_REGISTER_GUEST_CRASH_P0 + i, value)
        await guest.set_vpreg(abi.HV_REGISTER_GUEST_CRASH_CTL, abi.HV_CRASH_CTL_CRASH_NOTIFY)

    assert len(events) == 1
    crash = events[0]
    assert (crash.vcpu, crash.notify, crash.params[0], crash.params[2]) == (
        1, True, 0xB, 0xFFFF_8000_1234_5678)
    assert crash.guest_os_id == GUEST_ID
    assert "guest crash" in caplog.text and "pc=0xffff800012345678" in caplog.text
    assert REGISTRY.get_sample_value("hyperbroker_hyperv_guest_crashes_total",
                                     {"kind": "notify"}) == before + 1
    assert REGISTRY.get_sample_value("hyperbroker_hyperv_guest_crashed",
                                     {"host": "host-a", "vm": "win-or-linux"}) == 1
    view = h.admin_view(ctx)
    assert view["crash_count"] == 1
    assert view["crashes"][0]["event"] == "hyperv.guest_crash"
    await h.vm_destroyed(ctx)
    assert REGISTRY.get_sample_value("hyperbroker_hyperv_guest_crashed",
                                     {"host": "host-a", "vm": "win-or-linux"}) is None


async def test_hv_kmsg_dump_sends_the_panic_text() -> None:
    h, ctx = vm()
    events: list[GuestCrash] = []
    h.crash_listeners.append(events.append)
    guest = Guest(h, ctx)
    text = b"Kernel panic - not syncing: VFS: Unable to mount root fs\n"
    ctx.memory.poke(PANIC_PAGE, text)
    # hv_kmsg_dump: P0..P2 = 0, P3 = the page's GPA, P4 = bytes written, then NOTIFY_MSG
    for i, value in enumerate((0, 0, 0, PANIC_PAGE, len(text))):
        await guest.set_vpreg(abi.HV_REGISTER_GUEST_CRASH_P0 + i, value)
    await guest.set_vpreg(abi.HV_REGISTER_GUEST_CRASH_CTL, abi.HV_CRASH_CTL_CRASH_NOTIFY_MSG)
    assert events[0].message == text.decode()
    assert events[0].kind == "message"
    assert "Unable to mount root fs" in events[0].log_line()


async def test_an_unreadable_panic_page_still_reports_the_crash() -> None:
    h, ctx = vm()
    events: list[GuestCrash] = []
    h.crash_listeners.append(events.append)
    guest = Guest(h, ctx)
    await guest.set_vpreg(abi.HV_REGISTER_GUEST_CRASH_P0 + 3, 0x10)  # not guest RAM
    await guest.set_vpreg(abi.HV_REGISTER_GUEST_CRASH_P4, 100)
    await guest.set_vpreg(abi.HV_REGISTER_GUEST_CRASH_CTL, abi.HV_CRASH_CTL_CRASH_NOTIFY_MSG)
    assert events[0].message is None and events[0].message_error


async def test_crash_records_are_bounded() -> None:
    h = HypervHandler({"crash_records": 2})
    _, ctx = vm()
    guest = Guest(h, ctx)
    for err in range(5):
        await guest.set_vpreg(abi.HV_REGISTER_GUEST_CRASH_P0, err)
        await guest.set_vpreg(abi.HV_REGISTER_GUEST_CRASH_CTL, abi.HV_CRASH_CTL_CRASH_NOTIFY)
    view = h.admin_view(ctx)
    assert view["crash_count"] == 5
    assert [c["params"][0] for c in view["crashes"]] == ["0x3", "0x4"]


async def test_a_crash_ctl_write_without_action_bits_reports_nothing() -> None:
    h, ctx = vm()
    events: list[GuestCrash] = []
    h.crash_listeners.append(events.append)
    await Guest(h, ctx).set_vpreg(abi.HV_REGISTER_GUEST_CRASH_CTL, 0)
    assert events == []

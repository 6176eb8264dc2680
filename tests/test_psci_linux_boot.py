"""The PSCI calls a Linux 6.12/7.2 guest makes, in order, replayed against PsciHandler on a
two-vCPU VM (as observed booting a Debian arm64 kernel under real KVM: PSCI_VERSION,
MIGRATE_INFO_TYPE, PSCI_FEATURES probes, CPU_ON of the secondary, SYSTEM_OFF)."""

from __future__ import annotations

from hyperbroker.calls import ActionKind, Call, Result, VmmAction
from hyperbroker.handlers.api import VmInfo
from hyperbroker.handlers.psci import PsciHandler, abi
from hyperbroker.smccc import to_s64
from hyperbroker.testing.context import FakeContext

SECONDARY_ENTRY = 0x4020_1000  # secondary_entry's physical address
TASK_STACK = 0xFFFF_0000_0123_4000  # the context id Linux passes is opaque to PSCI


async def test_linux_boot_and_power_off_sequence() -> None:
    h = PsciHandler({})
    ctx = FakeContext(VmInfo("host", "linux", 2, "default", 1))

    async def call(fid: int, *args: int, vcpu: int = 0) -> Result:
        x = (fid, *args) + (0,) * (17 - len(args))
        return await h.handle(Call(vcpu=vcpu, seq=0, function_id=fid, x=x), ctx)

    # psci_probe: version 1.x makes Linux use PSCI_FEATURES.
    version = (await call(abi.PSCI_VERSION)).x[0]
    assert version >> 16 == 1
    # psci_init_migrate: MIGRATE_INFO_TYPE = TOS_MP means no resident Trusted OS CPU.
    assert (await call(abi.MIGRATE_INFO_TYPE)).x[0] == abi.TOS_MP
    # psci_init_smccc: SMCCC_VERSION must be reported, or Linux stays on SMCCC 1.0 and never
    # reaches the vendor-hyp UID, TRNG, or any other SMCCC 1.1 discovery.
    assert to_s64((await call(abi.PSCI_FEATURES, abi.SMCCC_VERSION)).x[0]) >= 0
    # psci_init_cpu_suspend, psci_init_system_suspend, psci_init_system_reset2, SYSTEM_OFF2 probe
    assert (await call(abi.PSCI_FEATURES, abi.CPU_SUSPEND64)).x[0] == 0
    assert (await call(abi.PSCI_FEATURES, abi.SYSTEM_SUSPEND64)).x[0] == 0
    assert (await call(abi.PSCI_FEATURES, abi.SYSTEM_RESET2_64)).x[0] == 0
    assert (await call(abi.PSCI_FEATURES, abi.SYSTEM_OFF2_64)).x[0] & abi.OFF_TYPE_HIBERNATE_OFF

    # smp_init -> cpu_psci_cpu_boot: CPU_ON (64) for the secondary at its entry point.
    started = await call(abi.CPU_ON64, 0x1, SECONDARY_ENTRY, TASK_STACK)
    assert started.x[0] == 0
    assert started.actions == (VmmAction(ActionKind.CPU_ON, 1, SECONDARY_ENTRY, TASK_STACK),)
    # The secondary runs; the boot CPU later asks about it.
    assert (await call(abi.AFFINITY_INFO64, 0x1, 0, vcpu=0)).x[0] == abi.AffinityState.ON

    # cpu hot-unplug: the secondary calls CPU_OFF, the boot CPU polls AFFINITY_INFO for OFF.
    off = await call(abi.CPU_OFF, vcpu=1)
    assert off.actions == (VmmAction(ActionKind.CPU_OFF, 1),)
    assert (await call(abi.AFFINITY_INFO64, 0x1, 0)).x[0] == abi.AffinityState.OFF

    # poweroff: SYSTEM_OFF ends the VM.
    assert (await call(abi.SYSTEM_OFF)).actions == (VmmAction(ActionKind.SYSTEM_OFF),)

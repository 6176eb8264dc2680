"""A reset starts a new boot for every shipped handler (issue 11, item 4).

The broker calls `vm_reset` on every handler of the VM's profile when the VMM reports a reset
(HB_MSG_VM_RESET) or a handler's result asks for one (SYSTEM_RESET, SYSTEM_RESET2), before the
guest runs again. Each test here plays one boot, resets the same VM (the same handler, the same
context, so the same stored state) and checks that the second boot sees none of what the first
one must not: measured before, a rebooted guest's CPU_ON of a secondary got ALREADY_ON, memshare
refused to share a page again (-3), and OP-TEE sessions and registrations leaked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hyperv_handler.support import get_fast, set_fast, status

from hyperbroker.calls import Call, Result
from hyperbroker.handlers.api import Handler, VmInfo
from hyperbroker.handlers.hyperv import HypervHandler
from hyperbroker.handlers.hyperv import abi as hv_abi
from hyperbroker.handlers.memshare import MemshareHandler
from hyperbroker.handlers.memshare import abi as ms_abi
from hyperbroker.handlers.psci import PsciHandler
from hyperbroker.handlers.psci import abi as psci_abi
from hyperbroker.handlers.trng import TrngHandler
from hyperbroker.handlers.trng import abi as trng_abi
from hyperbroker.smccc import NR_ARGS, to_s64
from hyperbroker.tee.gp import TeeResult
from hyperbroker.tee.ta import VmIdentity
from hyperbroker.testing.context import FakeContext
from hyperbroker.testing.optee import DRIVER_BASE, ECHO_TA, RAM_BASE, RAM_SIZE, Guest, Harness
from hyperbroker.testing.optee_guest import GuestDriver, context_smc

VM = VmInfo(host="host-b", name="vm-boot", nr_vcpus=2, profile="default", policy_version=1)
GRANULE = 0x4000_1000


async def smc(h: Handler, ctx: FakeContext, fid: int, *args: int, vcpu: int = 0) -> Result:
    x = (fid, *args) + (0,) * (NR_ARGS - 1 - len(args))
    return await h.handle(Call(vcpu=vcpu, seq=0, function_id=fid, x=x), ctx)


async def test_psci_a_new_boot_finds_its_secondaries_off() -> None:
    h, ctx = PsciHandler({}), FakeContext(VM)
    assert to_s64((await smc(h, ctx, psci_abi.CPU_ON64, 1, 0x4020_0000, 7)).x[0]) == 0
    assert (await smc(h, ctx, psci_abi.AFFINITY_INFO64, 1, 0)).x[0] == 0  # ON
    await h.vm_reset(ctx)
    assert (await smc(h, ctx, psci_abi.AFFINITY_INFO64, 1, 0)).x[0] == 1  # OFF again
    # ... so the rebooted guest brings its secondary up as the first boot did.
    assert to_s64((await smc(h, ctx, psci_abi.CPU_ON64, 1, 0x4020_0000, 7)).x[0]) == 0


async def test_memshare_a_new_boot_may_share_the_old_boots_granules() -> None:
    h, ctx = MemshareHandler({}), FakeContext(VM)
    assert to_s64((await smc(h, ctx, ms_abi.MEM_SHARE, GRANULE)).x[0]) == 0
    assert to_s64((await smc(h, ctx, ms_abi.MEM_SHARE, GRANULE)).x[0]) == -3  # already shared
    await h.vm_reset(ctx)
    view: Any = h.admin_view(ctx)
    assert view["shared_granules"] == 0  # nothing of the old boot is left
    assert to_s64((await smc(h, ctx, ms_abi.MEM_SHARE, GRANULE)).x[0]) == 0


async def test_hyperv_a_new_boot_starts_with_cleared_registers_in_the_same_partition() -> None:
    h, ctx = HypervHandler({}), FakeContext(VM)
    written = await set_fast(h, ctx, hv_abi.HV_REGISTER_GUEST_OS_ID, 0x8100_0006_0C00_0000)
    assert status(written) == hv_abi.HvStatus.SUCCESS
    before: Any = h.admin_view(ctx)
    await h.vm_reset(ctx)
    after: Any = h.admin_view(ctx)
    assert after["guest_os_id"] == "0x0"  # the new boot identifies itself again
    assert after["partition_id"] == before["partition_id"] != 0  # the same partition
    assert (await get_fast(h, ctx, hv_abi.HV_REGISTER_GUEST_OS_ID))[1] == 0


async def test_trng_keeps_nothing_a_new_boot_could_see() -> None:
    h, ctx = TrngHandler({}), FakeContext(VM)
    first = await smc(h, ctx, trng_abi.RND64, 64)
    await h.vm_reset(ctx)
    second = await smc(h, ctx, trng_abi.RND64, 64)
    assert first.x[0] == second.x[0] == 0 and first.x[3] != second.x[3]
    assert ctx.state.get() is None  # stateless: there is no boot to forget


def rebooted(h: Harness, g: Guest) -> Guest:
    """The same VM (context, stored state) with a freshly booted OP-TEE driver."""
    smc_fn = context_smc(h.handler, g.ctx, g.memory.commit)
    return Guest(g.ctx, GuestDriver(smc_fn, g.memory, DRIVER_BASE,
                                    RAM_BASE + RAM_SIZE - DRIVER_BASE))


async def test_optee_a_new_boot_has_none_of_the_old_sessions_or_registrations(
        tmp_path: Path) -> None:
    h = Harness(tmp_path)
    g = h.guest(name=VM.name, host=VM.host)
    for _ in range(2):
        assert (await g.driver.open_session(ECHO_TA)).ret == TeeResult.SUCCESS
    vm = VmIdentity(VM.host, VM.name)
    assert h.service.session_count(vm) == 2
    old_incarnation = g.ctx.state.get()["incarnation"]  # type: ignore[index]
    await h.handler.vm_reset(g.ctx)
    assert h.service.session_count(vm) == 0  # closed at the service, not leaked
    assert g.ctx.state.get() is None  # no sessions, no shared memory, no incarnation
    boot2 = rebooted(h, g)
    opened = await boot2.driver.open_session(ECHO_TA)
    assert opened.ret == TeeResult.SUCCESS
    assert h.service.session_count(vm) == 1
    assert g.ctx.state.get()["incarnation"] != old_incarnation  # type: ignore[index]

"""The Linux OP-TEE driver's probe, replayed against the proxy (Linux's drivers/tee/optee/smc_abi.c
optee_probe).

The order is what a Debian 6.12 guest was seen to call on the real-KVM bed (measured on this
project's arm64 KVM bed (docs/kvm-bed.md), "A real Linux guest as L2", item 4): CALLS_UID,
GET_OS_REVISION, CALLS_REVISION, GET_THREAD_COUNT, EXCHANGE_CAPABILITIES, DISABLE_SHM_CACHE (until
ENOTAVAIL), ENABLE_SHM_CACHE (until OK), then the device enumeration through CALL_WITH_ARG. The
guest side is hyperbroker.testing.optee_guest.GuestDriver, a model of smc_abi.c and device.c."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path

import pytest

from hyperbroker.handlers.optee import abi, msg
from hyperbroker.handlers.optee.abi import SmcReturn
from hyperbroker.handlers.optee.state import VmTeeState
from hyperbroker.tee.apps import DeviceEnumPta
from hyperbroker.tee.ta import VmIdentity
from hyperbroker.tee.uuids import KEYED_MAC_TA, SECURE_STORAGE_TA
from hyperbroker.testing.optee import Guest, Harness
from hyperbroker.testing.optee_guest import Smc

LINUX_6_12_FAST_CALLS = [
    abi.CALLS_UID, abi.GET_OS_REVISION, abi.CALLS_REVISION, abi.GET_THREAD_COUNT,
    abi.EXCHANGE_CAPABILITIES, abi.DISABLE_SHM_CACHE, abi.ENABLE_SHM_CACHE,
]


class Recorder:
    """Wraps the guest's SMC to log (function ID, x1, message command) per call."""

    def __init__(self, g: Guest) -> None:
        self.g = g
        self.inner: Smc = g.driver.smc
        self.log: list[tuple[int, int, int | None]] = []
        g.driver.smc = self

    async def __call__(self, regs: Sequence[int]) -> tuple[int, ...]:
        cmd = None
        if regs[0] == abi.CALL_WITH_ARG:
            parg = (regs[1] << 32) | regs[2]
            cmd = struct.unpack("<I", self.g.memory.peek(parg, 4))[0]
        self.log.append((regs[0], regs[1] if len(regs) > 1 else 0, cmd))
        return await self.inner(regs)

    @property
    def fids(self) -> list[int]:
        return [f for f, _, _ in self.log]

    @property
    def commands(self) -> list[int | None]:
        return [c for f, _, c in self.log if f == abi.CALL_WITH_ARG]


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


async def test_probe_finishes_and_lists_our_trusted_apps(h: Harness) -> None:
    g = h.guest()
    rec = Recorder(g)
    devices = await g.driver.probe(nr_cpus=1)
    assert set(devices) == {SECURE_STORAGE_TA, KEYED_MAC_TA}
    assert rec.fids[:7] == LINUX_6_12_FAST_CALLS
    assert rec.log[4][1] == abi.NSEC_CAP_UNIPROCESSOR  # one vCPU: "uniprocessor"
    # device.c: open the PTA, ask the size with a NULL memref, register a buffer, ask again,
    # free the buffer, close.
    assert rec.fids[7:] == [abi.CALL_WITH_ARG] * 6
    assert rec.commands == [msg.CMD_OPEN_SESSION, msg.CMD_INVOKE_COMMAND, msg.CMD_REGISTER_SHM,
                            msg.CMD_INVOKE_COMMAND, msg.CMD_UNREGISTER_SHM,
                            msg.CMD_CLOSE_SESSION]


async def test_probe_with_no_enumerable_ta_is_three_messages(tmp_path: Path) -> None:
    # What the lab saw with a TEE listing no devices: CALL_WITH_ARG x 3.
    h = Harness(tmp_path, apps=(DeviceEnumPta,))
    g = h.guest()
    rec = Recorder(g)
    assert await g.driver.probe() == []
    assert rec.commands == [msg.CMD_OPEN_SESSION, msg.CMD_INVOKE_COMMAND, msg.CMD_CLOSE_SESSION]


async def test_probe_with_several_cpus_does_not_claim_uniprocessor(h: Harness) -> None:
    g = h.guest()
    rec = Recorder(g)
    await g.driver.probe(nr_cpus=2)
    assert rec.log[4] == (abi.EXCHANGE_CAPABILITIES, 0, None)


async def test_probe_in_linux_7_2_order(h: Harness) -> None:
    # Linux 7.2 asks GET_OS_REVISION last among the discovery calls (measured on this project's
    # arm64 KVM bed (docs/kvm-bed.md)).
    d = h.guest().driver
    for fid in (abi.CALLS_UID, abi.CALLS_REVISION, abi.GET_THREAD_COUNT):
        assert (await d.fast(fid))[0] != SmcReturn.UNKNOWN_FUNCTION
    assert (await d.fast(abi.EXCHANGE_CAPABILITIES, 1))[0] == SmcReturn.OK
    assert (await d.fast(abi.GET_OS_REVISION))[0] != SmcReturn.UNKNOWN_FUNCTION
    assert set(await d.enumerate_devices()) == {SECURE_STORAGE_TA, KEYED_MAC_TA}


async def test_probe_leaves_no_session_and_no_registration_behind(h: Harness) -> None:
    g = h.guest()
    await g.driver.probe()
    state = VmTeeState.from_json(g.ctx.state.get())
    assert not state.sessions and not state.shm
    assert h.service.session_count(VmIdentity(g.ctx.vm.host, g.ctx.vm.name)) == 0


async def test_probe_survives_a_tee_service_that_is_down(h: Harness) -> None:
    # device.c treats a failed open of the PTA as "not found": the probe still succeeds, so a
    # guest boots even when the TEE service is unreachable.
    h.backend.down = True
    g = h.guest()
    assert await g.driver.probe() == []


async def test_shutdown_disable_shm_cache_after_probe(h: Harness) -> None:
    # At power-off the driver calls DISABLE_SHM_CACHE once more; ENOTAVAIL ends its loop.
    g = h.guest()
    await g.driver.probe()
    assert (await g.driver.fast(abi.DISABLE_SHM_CACHE))[0] == SmcReturn.ENOTAVAIL


async def test_two_guests_probe_independently(h: Harness) -> None:
    first, second = h.guest("vm-1"), h.guest("vm-2")
    assert await first.driver.probe() == await second.driver.probe()

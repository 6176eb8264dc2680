"""A VMM cannot make the agent fault on the guest RAM it passed (issue 12, item 4).

The measured attack: register a memfd over SEQPACKET, shrink it with ftruncate(fd, 0), then make
a handler read guest memory; the agent's mapping faulted (SIGBUS) and every VM of the host lost
its agent. Now the agent maps only memfds sealed against shrinking and long enough for their
region; everything else is refused at registration with EINVAL, and a VM on another connection
is served throughout. Real broker and agent processes; the VMMs are played by the test.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

import pytest

from hyperbroker.calls import Outcome
from hyperbroker.testing.procs import AgentProcess
from hyperbroker.testing.vmm import AgentError, GuestRam, VmmClient

pytestmark = pytest.mark.slow

READ_MEMORY, TRNG_RND64 = 0x8200_0003, 0xC400_0053
RAM_BASE, RAM_SIZE = 0x4000_0000, 1 << 20


def memfd(size: int, seals: int = 0) -> int:
    fd = os.memfd_create("attacker-ram", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def ram_with_fd(fd: int) -> GuestRam:
    """A GuestRam whose fd, the one passed to the agent, is `fd` instead of a sealed memfd."""
    ram = GuestRam(RAM_BASE, RAM_SIZE)
    os.close(ram.fd)
    ram.fd = fd
    return ram


async def innocent_call_works(bystander: VmmClient, vm_id: int) -> None:
    r = await bystander.call(vm_id, 0, TRNG_RND64, [64])
    assert r.outcome == Outcome.OK and r.x[0] == 0


async def test_rams_that_could_shrink_or_are_short_are_refused(agent: AgentProcess,
                                                               tmp_path: Path) -> None:
    bystander = await VmmClient.connect(str(agent.socket), "seqpacket")
    good = GuestRam(RAM_BASE, RAM_SIZE, "bystander")
    innocent = await bystander.register("innocent", 1, "", good)
    plain_file = tmp_path / "ram.img"
    plain_file.write_bytes(bytes(RAM_SIZE))
    cases = {
        "unsealed memfd": memfd(RAM_SIZE),
        "sealed against growing only": memfd(RAM_SIZE, fcntl.F_SEAL_GROW),
        "sealed but shorter than its region": memfd(RAM_SIZE // 2, fcntl.F_SEAL_SHRINK),
        "a regular file": os.open(plain_file, os.O_RDWR),
    }
    for what, fd in cases.items():
        attacker = await VmmClient.connect(str(agent.socket), "seqpacket")
        ram = ram_with_fd(fd)
        with pytest.raises(AgentError) as refused:
            await attacker.register(f"attacker-{len(what)}", 1, "", ram)
        assert refused.value.code == errno.EINVAL, what
        assert ("F_SEAL_SHRINK" in str(refused.value)
                or "past the end" in str(refused.value)), (what, str(refused.value))
        attacker.close()
        ram.close()
        await innocent_call_works(bystander, innocent.vm_id)
    bystander.close()
    good.close()


async def test_the_shrink_attack_cannot_fault_the_agent(agent: AgentProcess) -> None:
    bystander = await VmmClient.connect(str(agent.stream_socket), "stream")
    innocent = await bystander.register("innocent", 1)
    attacker = await VmmClient.connect(str(agent.socket), "seqpacket")
    ram = GuestRam(RAM_BASE, RAM_SIZE, "attacker")
    ram.write(RAM_BASE, b"guest bytes")
    reg = await attacker.register("attacker", 1, "", ram)
    with pytest.raises(PermissionError):  # the seal holds: the file cannot shrink
        os.ftruncate(ram.fd, 0)
    r = await attacker.call(reg.vm_id, 0, READ_MEMORY, [RAM_BASE, 16])
    assert r.outcome == Outcome.OK
    assert r.x[1] == int.from_bytes(b"guest bytes\0\0\0\0\0"[:8], "little")
    await innocent_call_works(bystander, innocent.vm_id)
    assert agent.process.proc.poll() is None, "the agent died"
    attacker.close()
    bystander.close()
    ram.close()

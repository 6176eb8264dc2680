"""A VM at the broker is one boot of one VM (issue 11, items 4, 5 and 7).

Measured before: a restarted agent numbered its VMs from 1 again and the broker took the same
vm_id and name for a resume, so the new boot inherited the dead boot's handler state and
last-result records; and a VM that ended while the agent's stream was down was never cleaned
up. Now every registration carries an incarnation the agent chooses at random, and the hello of
every stream lists the host's live VMs: the broker resumes only the same incarnation and
destroys, with handler clean-up, every VM of the host not in the list. Real broker processes;
the agent is either a real process or the test speaking the broker protocol itself.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import grpc

from hyperbroker.testing.procs import Broker, start_agent, start_broker
from hyperbroker.testing.vmm import VmmClient
from hyperbroker.wire import vmm as proto
from hyperbroker.wire.v1 import broker_pb2

from .conftest import agent_stream, next_result, plugin_env

INCREMENT = 0x8200_0001  # the test counter handler: per-VM counter += 1, x1 = counter


async def connect(broker: Broker, host: str, live: dict[int, str],
                  resumed: bool = True) -> tuple[grpc.aio.Channel, object]:
    """A stream as an agent opens it: the hello lists the host's live VMs; `resumed` says the
    agent process is the one that opened the host's previous stream."""
    return await agent_stream(broker.address, host, live=live, resumed=resumed)


async def register(stream: object, vm_id: int, name: str, incarnation: str) -> None:
    await stream.write(broker_pb2.AgentFrame(vms_registered=[broker_pb2.VmRegistered(  # type: ignore[attr-defined]
        vm_id=vm_id, name=name, profile="default", policy_version=1, nr_vcpus=1,
        incarnation=incarnation)]))


async def increment(stream: object, vm_id: int, seq: int) -> int:
    record = proto.CALL.pack(vm_id, 0, seq, INCREMENT, 0, 0, INCREMENT, *[0] * 17)
    await stream.write(broker_pb2.AgentFrame(calls=record))  # type: ignore[attr-defined]
    return (await next_result(stream)).x[1]


async def test_the_same_incarnation_resumes_and_a_new_one_starts_afresh(
        tmp_path: Path, policy_file: Path) -> None:
    broker = start_broker(policy_file, tmp_path / "state", env=plugin_env(), log_level="info")
    try:
        channel, stream = await connect(broker, "host-i", {}, resumed=False)
        await register(stream, 1, "vm-i", "boot-a")
        assert [await increment(stream, 1, seq) for seq in (1, 2)] == [1, 2]
        await channel.close()
        # A reconnect of the same agent: the VM is live, the same incarnation resumes.
        channel, stream = await connect(broker, "host-i", {1: "boot-a"})
        await register(stream, 1, "vm-i", "boot-a")
        assert await increment(stream, 1, 3) == 3
        await channel.close()
        # A restarted agent reuses handle 1 and the name for a new registration.
        channel, stream = await connect(broker, "host-i", {1: "boot-b"})
        await register(stream, 1, "vm-i", "boot-b")
        assert await increment(stream, 1, 1) == 1  # neither the old count nor its seq-1 record
        await channel.close()
        # The broker's log reaches the test through a pipe: wait for the line, do not race it.
        await asyncio.to_thread(broker.process.wait_for,
                                r"vm host-i/vm-i is no longer on host host-i", 60)
    finally:
        broker.process.stop()


async def test_a_vm_that_ended_while_the_stream_was_down_is_cleaned_up(
        tmp_path: Path, policy_file: Path) -> None:
    broker = start_broker(policy_file, tmp_path / "state", env=plugin_env(), log_level="info")
    try:
        channel, stream = await connect(broker, "host-j", {}, resumed=False)
        await register(stream, 1, "vm-stays", "s")
        await register(stream, 2, "vm-ends", "e")
        assert await increment(stream, 1, 1) == 1
        assert await increment(stream, 2, 1) == 1
        await channel.close()
        channel, stream = await connect(broker, "host-j", {1: "s"})  # vm-ends is gone
        await register(stream, 1, "vm-stays", "s")
        assert await increment(stream, 1, 2) == 2
        await channel.close()
        await asyncio.to_thread(broker.process.wait_for, r"vm host-j/vm-ends destroyed", 60)
        destroyed = [line for line in broker.process.lines if "destroyed" in line]
        assert any("vm host-j/vm-ends destroyed" in line for line in destroyed)
        assert not any("vm-stays destroyed" in line for line in destroyed)
    finally:
        broker.process.stop()


async def test_a_restarted_agent_does_not_inherit_the_old_boot(
        tmp_path: Path, policy_file: Path) -> None:
    broker = start_broker(policy_file, tmp_path / "state", env=plugin_env(), log_level="info")
    agent = start_agent(broker.address, "host-k", tmp_path / "a1")
    try:
        client = await VmmClient.connect(str(agent.socket), "seqpacket")
        reg = await client.register("vm-k", 1)
        counts = [(await client.call(reg.vm_id, 0, INCREMENT)).x[1] for _ in range(3)]
        assert counts == [1, 2, 3]
        client.close()
        agent.process.signal(signal.SIGKILL)
        agent.process.stop()
        agent = start_agent(broker.address, "host-k", tmp_path / "a2")
        client = await VmmClient.connect(str(agent.socket), "seqpacket")
        reg = await client.register("vm-k", 1)  # the same name, handle 1 again
        assert (await client.call(reg.vm_id, 0, INCREMENT)).x[1] == 1
        client.close()
    finally:
        agent.process.stop()
        broker.process.stop()


async def test_a_restarted_agent_resumes_the_boots_its_vmms_register_again(
        tmp_path: Path, policy_file: Path) -> None:
    """An agent upgrade must not reset running guests: a VMM that registers again with its boot
    ID resumes the VM, and a VM none registers again within the grace is cleaned up."""
    broker = start_broker(policy_file, tmp_path / "state", env=plugin_env(), log_level="info",
                          extra=["--reregister-grace", "1"])
    agent = start_agent(broker.address, "host-m", tmp_path / "a1")
    try:
        client = await VmmClient.connect(str(agent.socket), "seqpacket")
        kept = await client.register("vm-kept", 1, boot_id=b"k" * 16)
        gone = await client.register("vm-gone", 1, boot_id=b"g" * 16)
        assert [(await client.call(kept.vm_id, 0, INCREMENT)).x[1] for _ in range(2)] == [1, 2]
        assert (await client.call(gone.vm_id, 0, INCREMENT)).x[1] == 1
        # The agent dies under its VMMs (closing the VMM side first would let it report the VMs
        # destroyed): the VMMs see it gone and register again with the new one.
        agent.process.signal(signal.SIGKILL)
        agent.process.stop()
        client.close()
        agent = start_agent(broker.address, "host-m", tmp_path / "a2")
        client = await VmmClient.connect(str(agent.socket), "seqpacket")
        kept = await client.register("vm-kept", 1, boot_id=b"k" * 16)  # its VMM came back
        assert (await client.call(kept.vm_id, 0, INCREMENT)).x[1] == 3  # the same boot goes on
        await asyncio.to_thread(broker.process.wait_for,
                                r"vm host-m/vm-gone was not registered again", 60)
        await asyncio.to_thread(broker.process.wait_for, r"vm host-m/vm-gone destroyed", 60)
        assert not any("vm-kept destroyed" in line for line in broker.process.lines)
        client.close()
    finally:
        agent.process.stop()
        broker.process.stop()

"""Nothing of a call the guest did not get persists (issue 11, items 3 and 4).

Measured before: state a handler put before it raised was committed, and the broker let a
handler run for four times the rule's deadline plus a second, committing a result (and its
state) the agent had already replaced with the fallback. Now a failed call's puts are rolled
back and the broker gives a handler the rule's deadline, so a call that times out changes
nothing either. And a result the broker did commit, but that reached the agent after its
fallback (AgentFrame.divergent), is undone by its handler and counted. Real broker and agent
processes; the test plays the VMM, or the agent itself where it must report a divergence.
"""

from __future__ import annotations

import asyncio

from hyperbroker.calls import Outcome
from hyperbroker.smccc import to_s64
from hyperbroker.testing.procs import AgentProcess, Broker
from hyperbroker.testing.vmm import VmmClient
from hyperbroker.wire import vmm as proto
from hyperbroker.wire.v1 import broker_pb2
from hyperbroker.wire.vmm import ResultSource

from .conftest import agent_stream, next_result, scrape_value

INCREMENT, SLOW_INCREMENT, INCREMENT_THEN_FAIL = 0x8200_0001, 0x8200_0002, 0x8200_0009
DEADLINE_MS = 3000  # the counter rule's, tests/e2e/conftest.py


async def test_a_handler_that_raises_after_a_put_leaves_no_trace(agent: AgentProcess) -> None:
    client = await VmmClient.connect(str(agent.socket), "seqpacket")
    reg = await client.register("vm-raises", 1)
    assert (await client.call(reg.vm_id, 0, INCREMENT)).x[1] == 1
    failed = await client.call(reg.vm_id, 0, INCREMENT_THEN_FAIL)
    assert failed.outcome == Outcome.INTERNAL_ERROR and to_s64(failed.x[0]) == -3  # fallback
    assert (await client.call(reg.vm_id, 0, INCREMENT)).x[1] == 2  # not 3
    client.close()


async def test_a_call_that_outlives_its_deadline_changes_nothing(broker: Broker,
                                                                 agent: AgentProcess) -> None:
    client = await VmmClient.connect(str(agent.socket), "seqpacket")
    reg = await client.register("vm-slow", 1)
    assert (await client.call(reg.vm_id, 0, INCREMENT)).x[1] == 1
    late = await client.call(reg.vm_id, 0, SLOW_INCREMENT, [DEADLINE_MS + 1500])
    assert late.timing.source == ResultSource.FALLBACK and late.outcome == Outcome.FALLBACK
    # The broker gives up at the deadline too (before, it waited 4 x 3 s + 1 s and committed).
    await asyncio.to_thread(broker.process.wait_for, r"SLOW_INCREMENT on vm .*vm-slow timed out",
                            60)
    assert (await client.call(reg.vm_id, 0, INCREMENT)).x[1] == 2  # the slow one left nothing
    client.close()


async def test_a_divergent_result_is_undone_and_counted(broker: Broker) -> None:
    channel, stream = await agent_stream(broker.address, "host-d")
    await stream.write(broker_pb2.AgentFrame(vms_registered=[broker_pb2.VmRegistered(
        vm_id=1, name="vm-d", profile="default", policy_version=1, nr_vcpus=1,
        incarnation="d1")]))

    async def increment(seq: int, divergent: int | None = None) -> int:
        frame = broker_pb2.AgentFrame(calls=proto.CALL.pack(
            1, 0, seq, INCREMENT, 0, 0, INCREMENT, *[0] * 17))
        if divergent is not None:  # reported in the same frame as the guest's retry
            frame.divergent.add(vm_id=1, vcpu=0, seq=divergent)
        await stream.write(frame)
        return (await next_result(stream)).x[1]

    before = scrape_value(broker, "hyperbroker_broker_divergent_results_total")
    assert await increment(1) == 1
    assert await increment(2) == 2  # the guest got the fallback for this one instead
    assert await increment(3, divergent=2) == 2  # undone before the retry ran
    assert scrape_value(broker, "hyperbroker_broker_divergent_results_total") == before + 1
    await channel.close()

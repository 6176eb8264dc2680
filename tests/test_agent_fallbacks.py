"""The agent's fallbacks: rejected VMs (issue 11, item 6) and results the guest never saw (item 3).

A rejected VM's calls get their rules' fallbacks, never a broker's DENIED.
Two ways a VM stops being served by the broker: the broker rejects its registration (for
example a broker that does not hold the policy version the VM's filter came from, met after a
failover: the calls the agent replays come back DENIED in the same frame as the rejection), or
the VMM reports that KVM refused some of the VM's filter records (its kernel filter is then not
its profile's). Either way every forwarded call of that VM, waiting or new, is answered with its
rule's fallback and the rejection is counted. The agent runs in-process; the VMM connection is a
recorder, and broker frames are built by the test.

A broker result that arrives after the agent answered the call with its fallback is dropped, and
reported once in the next frame (AgentFrame.divergent) so the broker can have it undone.
"""

from __future__ import annotations

import asyncio
import errno
from typing import Any

from hyperbroker.agent import metrics
from hyperbroker.agent.core import Agent, AgentConfig
from hyperbroker.calls import Outcome
from hyperbroker.smccc import NR_ARGS, to_s64
from hyperbroker.wire import vmm as proto
from hyperbroker.wire.v1 import broker_pb2

COUNTER_FN = 0x8200_0001  # a SIP call the profile forwards, with a named fallback
FALLBACK = (-3 & (2**64 - 1), 0xFA11)


def compiled_policy(deadline_us: int = 3_000_000) -> broker_pb2.CompiledPolicy:
    pb = broker_pb2.CompiledPolicy(version=1, digest="d" * 64)
    prof = pb.profiles.add(name="default", default_deadline_us=3_000_000)
    prof.kernel_filter.add(base=0x8200_0000, nr_functions=0x1_0000, action=2, rule="counter")
    prof.kernel_filter.add(base=0xC200_0000, nr_functions=0x1_0000, action=2, rule="counter")
    prof.rules.add(base=0x8200_0000, nr_functions=0x1_0000, deadline_us=deadline_us,
                   rule="counter", fallback=list(FALLBACK), fallback_mask=0xF)
    return pb


class RecordingConnection:
    """What the agent needs of a VMM connection, keeping what it sends."""

    seqpacket = True
    closed = False
    mode = "seqpacket"
    peer = "vmm pid 1 uid 0"  # what agent.vmm.peer_name gives a real connection

    def __init__(self) -> None:
        self.vm_ids: set[int] = set()
        self.mem_waiters: dict[int, Any] = {}
        self.sent: list[proto.Frame] = []
        self.arrived = asyncio.Event()
        self._tag = 1 << 31

    def send(self, data: bytes) -> None:
        self.sent.append(proto.decode(data))
        self.arrived.set()

    def send_error(self, code: int, msg_type: int, tag: int, message: str) -> None:
        self.sent.append(proto.Frame(proto.MsgType.ERROR, tag,
                                     proto.ErrorMsg(code, int(msg_type), message)))

    def next_tag(self) -> int:
        self._tag += 1
        return self._tag

    def results(self) -> list[proto.ResultMsg]:
        return [f.message for f in self.sent if isinstance(f.message, proto.ResultMsg)]


async def agent_with_vm(deadline_us: int = 3_000_000) -> tuple[Agent, RecordingConnection, int]:
    agent = Agent(AgentConfig(broker="127.0.0.1:9", host_id="host-r"))
    agent.on_welcome(broker_pb2.BrokerWelcome(policy=compiled_policy(deadline_us)))
    agent.link.up = True  # frames are built but never written: there is no stream
    conn = RecordingConnection()
    await agent.register_vm(conn, 7, proto.RegisterVm("vm-r", "", 2, (), 0), [])  # type: ignore[arg-type]
    (reply,) = [f.message for f in conn.sent]
    assert isinstance(reply, proto.RegisterVmReply) and reply.status == 0
    conn.sent.clear()
    conn.arrived.clear()
    return agent, conn, reply.vm_id


def call(agent: Agent, conn: RecordingConnection, vm_id: int, vcpu: int, seq: int,
         tag: int) -> None:
    msg = proto.CallMsg(vm_id, vcpu, seq, COUNTER_FN, 0, 0, (COUNTER_FN,) + (0,) * (NR_ARGS - 1))
    agent.on_frame(conn, proto.encode_call(msg, tag), [])  # type: ignore[arg-type]


def broker_record(vm_id: int, vcpu: int, seq: int, outcome: Outcome = Outcome.DENIED,
                  x0: int = 2**64 - 1) -> bytes:
    """A broker's result; by default what it answers for a call of a VM it does not know."""
    return proto.pack_result(vm_id, vcpu, seq, outcome, 0xF, (x0,), 0, 0, 0, 0, 0, 0,
                             int(proto.ResultSource.BROKER))


def assert_fallback(result: proto.ResultMsg) -> None:
    assert result.outcome == Outcome.FALLBACK
    assert result.timing.source == proto.ResultSource.FALLBACK
    assert (to_s64(result.x[0]), result.x[1]) == (-3, 0xFA11)


async def test_replayed_calls_of_a_vm_the_broker_rejects_get_their_fallback() -> None:
    agent, conn, vm_id = await agent_with_vm()
    rejected_before = metrics.VMS_REJECTED["broker"].value
    fallbacks_before = metrics.FALLBACK_REJECTED.value
    call(agent, conn, vm_id, 0, 1, tag=11)
    call(agent, conn, vm_id, 1, 1, tag=12)
    assert conn.results() == []  # both wait for the broker
    # The broker answers the replayed calls DENIED and rejects the VM in the same frame.
    frame = broker_pb2.BrokerFrame(results=broker_record(vm_id, 0, 1) + broker_record(vm_id, 1, 1))
    frame.vms_rejected.add(vm_id=vm_id, reason="policy version 1 is unknown to this broker")
    agent.on_broker_frame(frame)
    results = conn.results()
    assert len(results) == 2 and {f.tag for f in conn.sent} == {11, 12}
    for r in results:
        assert_fallback(r)
    # A new call is not forwarded at all.
    call(agent, conn, vm_id, 0, 2, tag=13)
    assert_fallback(conn.results()[-1])
    assert [proto.CALL.unpack_from(rec)[2] for rec in agent.link.calls] == [1, 1]  # not seq 2
    assert metrics.VMS_REJECTED["broker"].value == rejected_before + 1
    assert metrics.FALLBACK_REJECTED.value == fallbacks_before + 3


async def test_the_next_broker_decides_again_after_a_reconnect() -> None:
    agent, conn, vm_id = await agent_with_vm()
    frame = broker_pb2.BrokerFrame()
    frame.vms_rejected.add(vm_id=vm_id, reason="unknown version")
    agent.on_broker_frame(frame)
    assert agent.vms[vm_id].rejected is not None
    replay = broker_pb2.AgentFrame()
    agent.replay(replay, [])
    assert [r.vm_id for r in replay.vms_registered] == [vm_id]
    assert agent.vms[vm_id].rejected is None  # forwarded again until this broker says no
    call(agent, conn, vm_id, 0, 1, tag=21)
    assert conn.results() == [] and len(agent.link.calls) == 1


async def test_a_vm_whose_filter_kvm_refused_is_served_by_fallbacks_only() -> None:
    agent, conn, vm_id = await agent_with_vm()
    before = metrics.VMS_REJECTED["filter"].value
    call(agent, conn, vm_id, 1, 1, tag=31)  # waiting when the report arrives
    agent.on_frame(conn, proto.encode(proto.FilterReport(vm_id, (0, errno.EEXIST)), 32), [])  # type: ignore[arg-type]
    (waiting,) = conn.results()
    assert_fallback(waiting)
    call(agent, conn, vm_id, 0, 1, tag=33)
    assert_fallback(conn.results()[-1])
    assert metrics.VMS_REJECTED["filter"].value == before + 1
    assert "refused 1 of its 2 filter records" in (agent.vms[vm_id].rejected or "")
    # A reconnect does not lift it: the VM's kernel filter is still not its profile's.
    agent.replay(broker_pb2.AgentFrame(), [])
    call(agent, conn, vm_id, 0, 2, tag=34)
    assert_fallback(conn.results()[-1])


async def test_a_clean_filter_report_changes_nothing() -> None:
    agent, conn, vm_id = await agent_with_vm()
    agent.on_frame(conn, proto.encode(proto.FilterReport(vm_id, (0, 0)), 41), [])  # type: ignore[arg-type]
    call(agent, conn, vm_id, 0, 1, tag=42)
    assert conn.results() == [] and agent.vms[vm_id].rejected is None


async def test_a_result_after_the_fallback_is_reported_once_as_divergent() -> None:
    agent, conn, vm_id = await agent_with_vm(deadline_us=1000)  # 1 ms: it will pass first
    before = metrics.DIVERGENT.value
    call(agent, conn, vm_id, 0, 1, tag=51)
    await asyncio.wait_for(conn.arrived.wait(), 30)  # the deadline passes
    (fallback,) = conn.results()
    assert_fallback(fallback)
    late = broker_record(vm_id, 0, 1, Outcome.OK, 0)
    agent.on_broker_frame(broker_pb2.BrokerFrame(results=late))
    agent.on_broker_frame(broker_pb2.BrokerFrame(results=late))  # a duplicate after a reconnect
    assert len(conn.results()) == 1  # the guest got the fallback, and only that
    assert [(d.vm_id, d.vcpu, d.seq) for d in agent.link.frame.divergent] == [(vm_id, 0, 1)]
    assert metrics.DIVERGENT.value == before + 1


async def test_an_answer_in_time_is_not_divergent() -> None:
    agent, conn, vm_id = await agent_with_vm()
    call(agent, conn, vm_id, 0, 1, tag=61)
    agent.on_broker_frame(broker_pb2.BrokerFrame(results=broker_record(vm_id, 0, 1,
                                                                       Outcome.OK, 0)))
    (result,) = conn.results()
    assert result.outcome == Outcome.OK and not agent.link.frame.divergent

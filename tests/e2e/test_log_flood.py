"""Bounded logs under a flood of garbage (issue 12): real broker and agent processes, a real
peer that floods junk for a few seconds, and a well-behaved VM on the same agent throughout.

For each flooding peer: its lines stay within its log budget (hyperbroker.runtime.loglimit),
no traceback is written, the malformed counter counts every event, and what was written plus
what the summaries say was suppressed is exactly what the peer did.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import DecodeError

from hyperbroker.calls import Outcome
from hyperbroker.runtime.loglimit import BURST, RATE_PER_S
from hyperbroker.testing.procs import (
    AgentProcess,
    Broker,
    ManagedProcess,
    start_agent,
    start_broker,
)
from hyperbroker.testing.vmm import VmmClient
from hyperbroker.wire import vmm as proto
from hyperbroker.wire.v1 import admin_pb2, admin_pb2_grpc, broker_pb2

from .conftest import plugin_env

pytestmark = pytest.mark.slow

INCREMENT = 0x8200_0001  # the test-counter plugin: x1 = how many times this VM called it
FLOOD_S = 4.0
CONNECT = "/hyperbroker.v1.Broker/Connect"
VALIDATE = "/hyperbroker.v1.Admin/ValidatePolicy"
JUNK = (b"\xff\xff\xff garbage", b"\x0a\xff\xff\xff\xff\x0f", b"\xff" * 64)


def metrics_of(port: int | None) -> dict[str, float]:
    assert port is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def family(samples: dict[str, float], name: str) -> float:
    return sum(v for k, v in samples.items() if k.split("{")[0] == name)


@dataclass
class PeerLines:
    written: int = 0
    suppressed: int = 0
    summaries: int = 0


def lines_of(process: ManagedProcess, peer: str) -> PeerLines:
    """The lines `peer` caused in a process's log, and what its summaries say was held back."""
    out = PeerLines()
    prefix = f": {peer}: "
    for line in process.lines:
        if prefix not in line:
            continue
        m = re.search(re.escape(prefix) + r"suppressed (\d+) similar messages", line)
        if m:
            out.summaries += 1
            out.suppressed += int(m.group(1))
        else:
            out.written += 1
    return out


def budget(seconds: float) -> float:
    """The most lines one peer may cause in `seconds`, summaries aside."""
    return BURST + RATE_PER_S * seconds + 1


@dataclass
class GoodVm:
    """A VM that calls INCREMENT every 10 ms until stopped; every answer is recorded."""

    client: VmmClient
    vm_id: int
    answers: list[tuple[float, int, int]] = field(default_factory=list)  # t, outcome, x1
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    async def start(cls, agent: AgentProcess, name: str) -> GoodVm:
        client = await VmmClient.connect(str(agent.socket), "seqpacket")
        reg = await client.register(name, 1)
        return cls(client, reg.vm_id)

    async def run(self) -> None:
        while not self.stop.is_set():
            r = await self.client.call(self.vm_id, 0, INCREMENT, timeout=30)
            self.answers.append((time.monotonic(), r.outcome, r.x[1]))
            await asyncio.sleep(0.01)

    def check(self, since: float, until: float) -> None:
        assert self.answers, "the well-behaved VM got no answer at all"
        bad = [(o, x1) for _, o, x1 in self.answers if o != Outcome.OK]
        assert not bad, f"the well-behaved VM got {len(bad)} non-OK answers: {bad[:5]}"
        assert [x1 for _, _, x1 in self.answers] == list(range(1, len(self.answers) + 1))
        times = [since] + [t for t, _, _ in self.answers if since <= t <= until] + [until]
        gap = max(b - a for a, b in itertools.pairwise(times))
        assert gap < 3.0, f"the well-behaved VM went {gap:.2f} s without an answer"  # deadline


# ---- the agent: a VMM process writing junk to the agent's sockets -------------------------
FLOODER = r"""
import socket, sys, time
from hyperbroker.wire import vmm as proto

seq_path, stream_path, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
junk = [
    b"\x00" * 16,                                           # bad magic
    proto.header(0x03, 7, 10) + b"x" * 10,                  # a CALL of the wrong size
    proto.header(0x55, 7, 0),                               # an unknown type
    proto.HEADER.pack(proto.MAGIC, 9, 0x03, 0, 7),          # version 9
    b"HBP",                                                 # shorter than a header
    proto.header(0x83, 7, proto.RESULT.size) + bytes(proto.RESULT.size),  # a RESULT from a VMM
    proto.encode_call(proto.CallMsg(4242, 0, 1, 0x82000001, 0, 0, (0,) * 18), 7),  # not its VM
]
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(seq_path)
sent = streams = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    for i in range(32):  # a window of 32, then their 32 error replies
        s.send(junk[(sent + i) % len(junk)])
    sent += 32
    for _ in range(32):
        assert s.recv(1 << 16)
    if sent % 640 == 0:  # now and then a stream that loses its framing at once
        t = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        t.connect(stream_path)
        t.sendall(b"GET / HTTP/1.1\r\n\r\n")
        while t.recv(1 << 16):
            pass
        t.close()
        streams += 1
s.close()
print(f"sent {sent} streams {streams}", flush=True)
"""


async def test_a_vmm_flooding_junk_gets_a_bounded_log_and_every_frame_counted(
        tmp_path: Path, policy_file: Path) -> None:
    broker = start_broker(policy_file, tmp_path / "state", env=plugin_env(), log_level="info")
    agent = start_agent(broker.address, "host-a", tmp_path, log_level="info")
    try:
        before = metrics_of(agent.metrics_port)
        for code in ("EPROTO", "EBADMSG", "EPROTONOSUPPORT", "EMSGSIZE", "EINVAL", "ENOENT"):
            assert f'hyperbroker_agent_protocol_errors_total{{code="{code}"}}' in before
        good = await GoodVm.start(agent, "vm-good")
        calling = asyncio.ensure_future(good.run())
        t0 = time.monotonic()
        flooder = await asyncio.create_subprocess_exec(
            sys.executable, "-c", FLOODER, str(agent.socket), str(agent.stream_socket),
            str(FLOOD_S), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = await asyncio.wait_for(flooder.communicate(), 120)
        t1 = time.monotonic()
        assert flooder.returncode == 0, out.decode()
        m = re.search(rb"sent (\d+) streams (\d+)", out)
        assert m, out.decode()
        sent, streams = int(m.group(1)), int(m.group(2))
        good.stop.set()
        await asyncio.wait_for(calling, 60)
        good.check(t0, t1)
        after = metrics_of(agent.metrics_port)
        refused = (family(after, "hyperbroker_agent_protocol_errors_total")
                   - family(before, "hyperbroker_agent_protocol_errors_total"))
        assert refused == sent + streams  # every junk frame got its error and was counted
        peer = f"vmm pid {flooder.pid} uid {os.getuid()}"
        during = lines_of(agent.process, peer)
        assert during.written <= budget(t1 - t0), during
        good.client.close()
    finally:
        agent.process.stop()
        broker.process.stop()
    assert not any("Traceback" in line for line in agent.process.lines)
    final = lines_of(agent.process, peer)  # the agent wrote its pending summary as it stopped
    assert final.written + final.suppressed == sent + streams, final
    assert final.summaries >= 1
    print(f"\nagent: {sent + streams} junk frames in {t1 - t0:.1f} s from one VMM process: "
          f"{final.written} lines + {final.summaries} summaries; the good VM got "
          f"{len(good.answers)} answers, all OK")


# ---- the broker: a gRPC client sending what does not decode, and bogus calls ----------------
def raw(channel: grpc.aio.Channel) -> tuple[object, object]:
    connect = channel.stream_stream(CONNECT, request_serializer=lambda b: b,
                                    response_deserializer=broker_pb2.BrokerFrame.FromString)
    validate = channel.unary_unary(VALIDATE, request_serializer=lambda b: b,
                                   response_deserializer=admin_pb2.PolicyReport.FromString)
    return connect, validate


async def refused(call: object) -> grpc.StatusCode:
    try:
        async for _ in call:  # type: ignore[attr-defined]
            pass
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


async def frames(items: list[bytes]) -> AsyncIterator[bytes]:
    for item in items:
        yield item


async def test_a_grpc_client_flooding_garbage_gets_a_bounded_log_and_every_frame_counted(
        tmp_path: Path, policy_file: Path) -> None:
    for junk in JUNK:
        with pytest.raises(DecodeError):
            broker_pb2.AgentFrame.FromString(junk)
    broker = start_broker(policy_file, tmp_path / "state", env=plugin_env(), log_level="info")
    agent = start_agent(broker.address, "host-a", tmp_path, log_level="info")
    try:
        before = metrics_of(broker.metrics_port)
        for reason in ("undecodable", "no_hello", "bad_hello", "call_records", "unknown_vm"):
            assert f'hyperbroker_broker_malformed_total{{reason="{reason}"}}' in before
        good = await GoodVm.start(agent, "vm-good")
        calling = asyncio.ensure_future(good.run())
        channel = grpc.aio.insecure_channel(broker.address)
        connect, validate = raw(channel)
        t0 = time.monotonic()
        # Streams whose first frame does not decode, Admin requests that do not, and policy
        # writes (refused without --insecure-admin: each an audit record, in the same budget).
        apply = channel.unary_unary("/hyperbroker.v1.Admin/ApplyPolicy",
                                    request_serializer=admin_pb2.PolicyText.SerializeToString,
                                    response_deserializer=admin_pb2.PolicyReport.FromString)
        first = admin = writes = 0
        while time.monotonic() < t0 + FLOOD_S:
            code = await refused(connect(frames([JUNK[first % len(JUNK)]])))  # type: ignore[operator]
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            first += 1
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await validate(JUNK[admin % len(JUNK)])  # type: ignore[operator]
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            admin += 1
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await apply(admin_pb2.PolicyText(yaml="profiles: {}"))
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            writes += 1
        # A stream that says hello, then sends 10,000 calls for VMs it never registered and 20
        # frames of call bytes that are not whole records, then a frame that does not decode.
        hello = broker_pb2.AgentFrame(hello=broker_pb2.AgentHello(host="flood-h", protocol=1))
        bogus = [broker_pb2.AgentFrame(calls=b"".join(  # type: ignore[call-arg]
            proto.CALL.pack(1000 + i, 0, n, INCREMENT, 0, 0, INCREMENT, *[0] * 17)
            for n in range(500))).SerializeToString() for i in range(20)]
        torn = [broker_pb2.AgentFrame(calls=b"x" * 17).SerializeToString()  # type: ignore[call-arg]
                for _ in range(20)]
        stream = connect()  # type: ignore[operator]
        await stream.write(hello.SerializeToString())
        welcome = await asyncio.wait_for(stream.read(), 30)
        assert welcome.HasField("welcome")
        for a, b in zip(bogus, torn, strict=True):
            await stream.write(a)
            await stream.write(b)
        denied = 0
        while denied < 10_000:  # every bogus call is answered (DENIED), so all were read
            frame = await asyncio.wait_for(stream.read(), 60)
            denied += len(frame.results) // proto.RESULT.size
        await stream.write(JUNK[0])
        with pytest.raises(grpc.aio.AioRpcError) as e:
            while True:  # results still on their way, then the status
                if await asyncio.wait_for(stream.read(), 60) is grpc.aio.EOF:
                    break
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        t1 = time.monotonic()
        await channel.close()
        good.stop.set()
        await asyncio.wait_for(calling, 60)
        good.check(t0, t1)
        after = metrics_of(broker.metrics_port)

        def grew(reason: str) -> float:
            name = f'hyperbroker_broker_malformed_total{{reason="{reason}"}}'
            return after[name] - before[name]

        assert grew("undecodable") == first + admin + 1
        assert grew("unknown_vm") == 10_000
        assert grew("call_records") == 20
        audited = (after['hyperbroker_broker_admin_audit_total{decision="refused",'
                         'method="ApplyPolicy"}']
                   - before.get('hyperbroker_broker_admin_audit_total{decision="refused",'
                                'method="ApplyPolicy"}', 0.0))
        assert audited == writes  # every refusal counted, written or not
        address, host = lines_of(broker.process, "ipv4:127.0.0.1"), lines_of(broker.process,
                                                                             "host flood-h")
        assert address.written <= budget(t1 - t0), address
        assert host.written <= budget(t1 - t0), host
        good.client.close()
    finally:
        agent.process.stop()
        broker.process.stop()
    assert not any("Traceback" in line for line in broker.process.lines)
    address, host = lines_of(broker.process, "ipv4:127.0.0.1"), lines_of(broker.process,
                                                                         "host flood-h")
    records = sum(1 for line in broker.process.lines
                  if "hyperbroker.audit: {" in line and '"decision": "refused"' in line)
    assert records + address.written <= budget(t1 - t0) + 1  # +1: a summary written in between
    assert records + address.written + address.suppressed == first + admin + writes
    assert host.written + host.suppressed == 10_000 + 20 + 1
    print(f"\nbroker: {first} undecodable streams + {admin} undecodable Admin calls + {writes} "
          f"refused policy writes in {FLOOD_S:g} s: {address.written} lines + {records} audit "
          f"records + {address.summaries} summaries; 10,021 bad "
          f"frames and calls on one stream: {host.written} lines + {host.summaries} summaries; "
          f"the good VM got {len(good.answers)} answers, all OK")


async def test_an_admin_field_out_of_range_is_refused_counted_and_no_traceback(
        broker: Broker) -> None:
    # GetPolicyRequest.version is a uint64; the stores keep versions as signed 64-bit integers.
    name = 'hyperbroker_broker_malformed_total{reason="bad_request"}'
    assert metrics_of(broker.metrics_port)[name] == 0
    async with grpc.aio.insecure_channel(broker.address) as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await admin.GetPolicy(admin_pb2.GetPolicyRequest(version=(1 << 63) + 5))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "out of range" in (e.value.details() or "")
        current = await admin.GetPolicy(admin_pb2.GetPolicyRequest())  # still serving
        assert current.version == 1
    assert metrics_of(broker.metrics_port)[name] == 1
    await asyncio.to_thread(broker.process.wait_for, r"ipv4:127\.0\.0\.1: Admin\.GetPolicy", 60)
    assert not any("Traceback" in line for line in broker.process.lines)

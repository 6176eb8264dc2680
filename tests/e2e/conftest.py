"""Real broker and agent processes on loopback, with the test plugins installed."""

from __future__ import annotations

import asyncio
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from hyperbroker.testing.procs import AgentProcess, Broker, start_agent, start_broker
from hyperbroker.wire import vmm as proto
from hyperbroker.wire.v1 import broker_pb2, broker_pb2_grpc

PLUGINS = Path(__file__).resolve().parent.parent / "plugins"
POLICY = """\
handlers:
  trng: {}
  counter: {plugin: test-counter}
profiles:
  default:
    rules:
      - {name: trng, abi: trng, action: forward, handler: trng, deadline_ms: 300}
      - name: counter
        abi: sip
        action: forward
        handler: counter
        deadline_ms: 3000
        fallback: {x0: -3, x1: 0xfa11}
  second:
    rules:
      - {name: trng, abi: trng, action: forward, handler: trng, deadline_ms: 300,
         agent_static: false}
"""


def plugin_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": f"{PLUGINS}{os.pathsep}{path}" if path else str(PLUGINS)}


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    p = tmp_path / "policy.yaml"
    p.write_text(POLICY)
    return p


@pytest.fixture
def broker(tmp_path: Path, policy_file: Path) -> Iterator[Broker]:
    b = start_broker(policy_file, tmp_path / "state", env=plugin_env(), log_level="info")
    yield b
    b.process.stop()


@pytest.fixture
def agent(tmp_path: Path, broker: Broker) -> Iterator[AgentProcess]:
    a = start_agent(broker.address, "host-a", tmp_path, log_level="info")
    yield a
    a.process.stop()


async def agent_stream(address: str, host: str, *, live: dict[int, str] | None = None,
                       resumed: bool = False, policy_version: int = 0
                       ) -> tuple[grpc.aio.Channel, Any]:
    """A broker stream opened as an agent opens it (hello, then the welcome), for tests that
    play the agent themselves. With `live`, the hello lists the host's live VMs (reconcile)."""
    channel = grpc.aio.insecure_channel(address)
    stream = broker_pb2_grpc.BrokerStub(channel).Connect()
    hello = broker_pb2.AgentHello(host=host, protocol=1, resumed=resumed)
    if live is not None:
        hello.reconcile = True
        hello.live_vms.extend(broker_pb2.VmRef(vm_id=i, incarnation=inc) for i, inc in live.items())
    await stream.write(broker_pb2.AgentFrame(hello=hello))
    welcome = await asyncio.wait_for(stream.read(), 30)
    assert welcome.HasField("welcome")
    assert welcome.welcome.policy.version >= policy_version
    return channel, stream


async def next_result(stream: Any) -> proto.ResultMsg:
    """The first hb_result record of the next broker frame that carries results."""
    while True:
        frame = await asyncio.wait_for(stream.read(), 30)
        if frame.results:
            msg = proto.decode(proto.header(proto.MsgType.RESULT, 0, len(frame.results))
                               + frame.results).message
            assert isinstance(msg, proto.ResultMsg)
            return msg


def scrape_value(broker: Broker, name: str) -> float:
    """One sample of the broker's /metrics; `name` with its labels as exported, e.g.
    `x_total{reason="fenced"}`. 0 when absent."""
    assert broker.metrics_port is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{broker.metrics_port}/metrics",
                                timeout=30) as r:
        text = r.read().decode()
    values = [float(line.split()[-1]) for line in text.splitlines()
              if line.startswith(name + " ")]
    return values[0] if values else 0.0


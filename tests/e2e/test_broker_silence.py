"""The stream's own liveness check: an agent gives up a broker that has stopped answering.

HTTP/2 pings prove only the next hop; behind an HTTP/2 proxy that is the proxy, so a broker that
is paused or wedged would keep its hosts for ever. The agent sends AgentFrame.keepalive after
--broker-keepalive without a frame, the broker echoes it, and after --broker-silence without any
frame the agent ends the stream and dials again.
"""

from __future__ import annotations

import asyncio
import signal
import urllib.request
from pathlib import Path

import pytest

from hyperbroker.calls import Outcome
from hyperbroker.testing.procs import AgentProcess, start_agent, start_broker
from hyperbroker.testing.vmm import VmmClient

from .conftest import plugin_env

pytestmark = pytest.mark.slow

TRNG_RND64 = 0xC400_0053
KEEPALIVE, SILENCE = "0.2", "1.0"


def agent_metric(agent: AgentProcess, name: str) -> float:
    assert agent.metrics_port is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{agent.metrics_port}/metrics",
                                timeout=30) as r:
        text = r.read().decode()
    values = [float(line.split()[-1]) for line in text.splitlines()
              if line.startswith(name + " ")]
    return values[0] if values else 0.0


async def until(predicate: object, what: str, timeout: float = 60.0) -> None:
    assert callable(predicate)
    deadline = asyncio.get_running_loop().time() + timeout
    while not await asyncio.to_thread(predicate):
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.05)


async def test_a_paused_broker_is_given_up_and_an_idle_healthy_one_is_not(
        tmp_path: Path, policy_file: Path) -> None:
    broker = start_broker(policy_file, tmp_path / "state", env=plugin_env(), log_level="info")
    agent = start_agent(broker.address, "host-q", tmp_path, log_level="info",
                        extra=["--broker-keepalive", KEEPALIVE, "--broker-silence", SILENCE])
    client = await VmmClient.connect(str(agent.socket), "seqpacket")
    try:
        reg = await client.register("vm-q", 1)
        assert (await client.call(reg.vm_id, 0, TRNG_RND64, [64], timeout=30)).outcome \
            == Outcome.OK
        # Idle for many keepalive periods and past the silence: the echoes keep it up.
        await asyncio.sleep(3 * float(SILENCE))
        assert agent_metric(agent, "hyperbroker_agent_broker_silent_total") == 0
        assert agent_metric(agent, "hyperbroker_agent_reconnects_total") == 0

        broker.process.signal(signal.SIGSTOP)
        try:
            await until(lambda: agent_metric(agent, "hyperbroker_agent_broker_silent_total")
                        == 1, "the agent never gave the paused broker up")
            assert agent_metric(agent, "hyperbroker_agent_broker_stream_up") == 0
            agent.process.wait_for(r"broker stream to .* ended: no frame from the broker")
            # Dialling the paused broker again: its welcome never comes, so that stream is
            # given up too (the agent keeps dialling, not waiting on a dead stream).
            await until(lambda: agent_metric(agent, "hyperbroker_agent_broker_silent_total")
                        >= 3, "the agent waits for ever on a paused broker's welcome")
        finally:
            broker.process.signal(signal.SIGCONT)
        await until(lambda: agent_metric(agent, "hyperbroker_agent_broker_stream_up") == 1,
                    "the agent never came back to the woken broker")
        r = await client.call(reg.vm_id, 0, TRNG_RND64, [64], timeout=30)
        assert r.outcome == Outcome.OK
        assert not any("Traceback" in line for line in agent.process.lines)
    finally:
        client.close()
        agent.process.stop()
        broker.process.stop()

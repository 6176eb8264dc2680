"""An agent run with --busy-poll-us answers calls as usual and goes back to sleep afterwards.

Its latency effect is measured by `hyperbroker bench` (docs/performance.md), not here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from hyperbroker.calls import Outcome
from hyperbroker.testing.procs import AgentProcess, Broker, start_agent
from hyperbroker.testing.procstat import cpu_times
from hyperbroker.testing.vmm import VmmClient
from hyperbroker.wire.vmm import ResultSource

pytestmark = pytest.mark.slow

TRNG_RND64 = 0xC400_0053


@pytest.fixture
def polling_agent(tmp_path: Path, broker: Broker) -> Iterator[AgentProcess]:
    a = start_agent(broker.address, "host-poll", tmp_path, extra=["--busy-poll-us", "2000"])
    yield a
    a.process.stop()


async def test_a_busy_polling_agent_answers_and_then_sleeps(polling_agent: AgentProcess) -> None:
    client = await VmmClient.connect(str(polling_agent.socket), "seqpacket")
    reg = await client.register("vm-poll", 1)
    for _ in range(200):
        r = await client.call(reg.vm_id, 0, TRNG_RND64, [192])
        assert (r.outcome, r.timing.source) == (Outcome.OK, ResultSource.BROKER)
    # The window is 2 ms: once calls stop, the agent sleeps. Over a quiet second it may use a
    # few ticks for timers and keepalives, but nowhere near the second a spinning loop would.
    await asyncio.sleep(0.1)
    pid = polling_agent.process.proc.pid
    before = cpu_times(pid).total_s
    await asyncio.sleep(1.0)
    assert cpu_times(pid).total_s - before < 0.2
    client.close()

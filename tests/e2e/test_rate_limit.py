"""A per-VM rate limit: a flooding guest gets its fallbacks, the others are served."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from hyperbroker.calls import Outcome
from hyperbroker.testing.procs import start_agent, start_broker
from hyperbroker.testing.vmm import VmmClient
from hyperbroker.wire.vmm import ResultSource

from .conftest import plugin_env

pytestmark = pytest.mark.slow
TRNG_RND64 = 0xC400_0053


async def test_a_vm_over_its_rate_gets_fallbacks_and_others_are_served(
        tmp_path: Path, policy_file: Path) -> None:
    broker = start_broker(policy_file, tmp_path / "state", env=plugin_env(),
                          extra=["--vm-rate-limit", "5", "--vm-burst", "10"])
    agent = start_agent(broker.address, "host-rl", tmp_path)
    try:
        client = await VmmClient.connect(str(agent.socket), "seqpacket")
        noisy = await client.register("vm-noisy", 4)
        quiet = await client.register("vm-quiet", 1)

        async def flood(v: int) -> list[int]:
            return [int((await client.call(noisy.vm_id, v, TRNG_RND64, [64])).outcome)
                    for _ in range(40)]

        t0 = time.monotonic()
        outcomes = [o for part in await asyncio.gather(*(flood(v) for v in range(4)))
                    for o in part]
        admitted = 10 + 5 * (time.monotonic() - t0)  # the burst, then 5 a second
        assert outcomes.count(Outcome.OK) >= 10
        assert outcomes.count(Outcome.OK) <= admitted + 1
        assert outcomes.count(Outcome.FALLBACK) == 160 - outcomes.count(Outcome.OK)
        r = await client.call(quiet.vm_id, 0, TRNG_RND64, [64])
        assert r.outcome == Outcome.OK and r.timing.source == ResultSource.BROKER
        client.close()
    finally:
        agent.process.stop()
        broker.process.stop()

"""A per-VM rate limit with fair queuing: a flooding guest is slowed to its rate (its calls wait
their turn, then fall back at their deadline) while a neighbour's calls are all served."""

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
DEADLINE_S = 0.3  # the trng rule's deadline_ms in conftest's policy


@pytest.mark.parametrize("fair", [True, False], ids=["fair-queue", "token-bucket-only"])
async def test_a_vm_over_its_rate_is_slowed_and_its_neighbour_is_served(
        tmp_path: Path, policy_file: Path, fair: bool) -> None:
    broker = start_broker(policy_file, tmp_path / "state", env=plugin_env(),
                          extra=["--vm-rate-limit", "5", "--vm-burst", "10",
                                 *([] if fair else ["--no-fair-queue"])])
    agent = start_agent(broker.address, "host-rl", tmp_path)
    try:
        client = await VmmClient.connect(str(agent.socket), "seqpacket")
        noisy = await client.register("vm-noisy", 4)
        quiet = await client.register("vm-quiet", 1)

        async def flood(v: int) -> list[tuple[int, float]]:
            out = []
            for _ in range(10):
                t = time.monotonic()
                r = await client.call(noisy.vm_id, v, TRNG_RND64, [64])
                out.append((int(r.outcome), time.monotonic() - t))
            return out

        async def neighbour() -> list[tuple[int, int]]:
            out = []
            for _ in range(8):  # within its burst: under its rate
                r = await client.call(quiet.vm_id, 0, TRNG_RND64, [64])
                out.append((int(r.outcome), int(r.timing.source)))
                await asyncio.sleep(0.01)
            return out

        t0 = time.monotonic()
        *floods, quiet_results = await asyncio.gather(*(flood(v) for v in range(4)),
                                                      neighbour())
        admitted = 10 + 5 * (time.monotonic() - t0)  # the burst, then 5 a second
        calls = [c for part in floods for c in part]
        ok = [s for o, s in calls if o == Outcome.OK]
        fell_back = [s for o, s in calls if o == Outcome.FALLBACK]
        assert len(ok) + len(fell_back) == 40
        assert 10 <= len(ok) <= admitted + 1
        assert quiet_results == [(Outcome.OK, ResultSource.BROKER)] * 8
        if fair:
            # Calls beyond the burst waited for tokens: some were served late...
            assert len(ok) > 10, ok
            # ...and the rest fell back only at their deadline: the guest was slowed.
            assert fell_back and min(fell_back) >= DEADLINE_S * 0.9, fell_back
        else:
            # Without the queue the excess falls back at once, and the guest calls on.
            assert fell_back and min(fell_back) < DEADLINE_S / 2, fell_back
        client.close()
    finally:
        agent.process.stop()
        broker.process.stop()

"""Broken policies (and a big valid one) validated and applied against a running broker while a
VM calls through a real agent with 50 ms deadlines: every broken one is refused in under 2 s with
bounded reasons, by the Admin API and by `hyperbroker policy apply`, and the VM gets 0
fallbacks (counted from the guest's view)."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from hyperbroker.broker.policy import bounds
from hyperbroker.calls import Outcome
from hyperbroker.testing.broken_policies import BROKEN, big_valid
from hyperbroker.testing.procs import AgentProcess, Broker, start_broker
from hyperbroker.testing.vmm import VmmClient
from hyperbroker.wire.v1 import admin_pb2, admin_pb2_grpc

from .conftest import POLICY, plugin_env

pytestmark = pytest.mark.slow
TRNG_RND64 = 0xC400_0053
TIGHT = POLICY.replace("deadline_ms: 300}", "deadline_ms: 50}", 1)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """Without TLS these tests change the policy: that takes --insecure-admin."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(TIGHT)
    b = start_broker(policy, tmp_path / "state", env=plugin_env(), log_level="info",
                     extra=["--insecure-admin"])
    yield b
    b.process.stop()


@pytest.mark.xfail(strict=False, reason=(
    "not yet 0: with the check in a worker thread (GIL hand-over cut to 0.5 ms) the guest "
    "still saw 3-6 fallbacks in ~5,000 calls on a busy 2-core machine (9 before the cut; 0 in "
    "4,148 calls with no policy traffic; a trial with the check in a spawned process gave 6): "
    "the cause is still to be found"))
async def test_broken_policies_cost_a_running_vm_no_fallbacks(
        broker: Broker, agent: AgentProcess, tmp_path: Path) -> None:
    client = await VmmClient.connect(str(agent.socket), "seqpacket")
    reg = await client.register("vm-steady", 1)
    outcomes: dict[int, int] = {}
    stop = asyncio.Event()

    async def guest() -> None:
        while not stop.is_set():
            result = await client.call(reg.vm_id, 0, TRNG_RND64, [64])
            outcomes[result.outcome] = outcomes.get(result.outcome, 0) + 1
            await asyncio.sleep(0.002)

    calls = asyncio.create_task(guest())
    try:
        async with grpc.aio.insecure_channel(broker.address) as ch:
            admin = admin_pb2_grpc.AdminStub(ch)
            for name, text in BROKEN.items():
                for rpc in (admin.ValidatePolicy, admin.ApplyPolicy):
                    start = time.monotonic()
                    try:
                        report = await rpc(admin_pb2.PolicyText(yaml=text), timeout=30)
                    except grpc.aio.AioRpcError as e:  # past gRPC's 4 MB message limit
                        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, name
                        assert len(text) > bounds.MAX_BYTES, name
                        continue
                    elapsed = time.monotonic() - start
                    assert not report.ok, name
                    assert elapsed < 2.0, f"{name}: {elapsed:.2f} s"
                    assert 1 <= len(report.errors) <= bounds.MAX_ERRORS, name
                    assert report.ByteSize() < 64 << 10, f"{name}: {report.ByteSize()} bytes"
                path = tmp_path / "broken.yaml"
                path.write_text(text)
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "hyperbroker.cli", "policy", "apply", "--broker",
                    broker.address, str(path), stderr=asyncio.subprocess.PIPE)
                _, err = await asyncio.wait_for(proc.communicate(), 60)
                stderr = err.decode()
                assert proc.returncode == 1, f"{name}: {stderr[-500:]}"
                assert "Traceback" not in stderr and "refused" in stderr.splitlines()[-1], name
                assert all(len(line) <= bounds.MAX_MESSAGE + 60
                           for line in stderr.splitlines()), name
            big = big_valid(TIGHT)
            report = await admin.ValidatePolicy(admin_pb2.PolicyText(yaml=big), timeout=30)
            assert report.ok, report.errors[:3]
            report = await admin.ApplyPolicy(admin_pb2.PolicyText(yaml=big), timeout=30)
            assert report.ok and report.version == 2
    finally:
        stop.set()
        await calls
        client.close()
    print(f"guest outcomes while {len(BROKEN)} broken policies were refused: {outcomes}")
    assert outcomes.get(Outcome.FALLBACK, 0) == 0, outcomes
    assert outcomes.get(Outcome.OK, 0) > 100, outcomes

"""Several broker workers on one port and state; hosts that never come back."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from pathlib import Path

import grpc
import pytest

from hyperbroker.testing.procs import ManagedProcess, spawn_cli, start_agent, start_broker
from hyperbroker.testing.vmm import VmmClient
from hyperbroker.wire.v1 import admin_pb2, admin_pb2_grpc

from .conftest import POLICY, plugin_env

pytestmark = pytest.mark.slow
TRNG_RND64, INCREMENT = 0xC400_0053, 0x8200_0001


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_workers_share_a_port_and_pick_up_each_others_policies(
        tmp_path: Path, policy_file: Path) -> None:
    port = free_port()
    env = plugin_env()
    workers: ManagedProcess = spawn_cli("workers", [
        "--log-level", "info", "serve", "--workers", "2", "--listen", f"127.0.0.1:{port}",
        "--policy", str(policy_file), "--state-dir", str(tmp_path / "state"),
        "--insecure-admin"], env)
    agents = []
    try:
        for _ in range(2):
            workers.wait_for(r"listening on")
        await asyncio.sleep(0.3)
        agents = [start_agent(f"127.0.0.1:{port}", f"host-{i}", tmp_path) for i in range(2)]
        clients = [await VmmClient.connect(str(a.socket), "seqpacket") for a in agents]
        for i, c in enumerate(clients):
            reg = await c.register(f"vm-{i}", 1)
            assert reg.policy_version == 1
            assert (await c.call(reg.vm_id, 0, TRNG_RND64, [64])).outcome == 0
        v2 = POLICY.replace("deadline_ms: 300}", "deadline_ms: 290}", 1)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            report = await admin_pb2_grpc.AdminStub(ch).ApplyPolicy(
                admin_pb2.PolicyText(yaml=v2), timeout=30)
        assert report.ok and report.version == 2
        for i, c in enumerate(clients):  # whichever worker serves the agent learns v2
            for attempt in range(40):
                reg = await c.register(f"vm-{i}-v2-{attempt}", 1)
                if reg.policy_version == 2:
                    break
                await asyncio.sleep(0.25)
            assert reg.policy_version == 2
            assert (await c.call(reg.vm_id, 0, TRNG_RND64, [64])).outcome == 0
        for c in clients:
            c.close()
    finally:
        for a in agents:
            a.process.stop()
        workers.signal(signal.SIGTERM)
        assert workers.proc.wait(15) == 0, "\n".join(workers.lines[-40:])


async def test_a_host_gone_for_good_has_its_vms_cleaned_up(tmp_path: Path,
                                                           policy_file: Path) -> None:
    broker = start_broker(policy_file, tmp_path / "state", env=plugin_env(), log_level="info",
                          extra=["--host-expiry", "1"])
    agent = start_agent(broker.address, "host-gone", tmp_path)
    try:
        client = await VmmClient.connect(str(agent.socket), "seqpacket")
        reg = await client.register("vm-orphan", 1)
        assert (await client.call(reg.vm_id, 0, INCREMENT)).x[1] == 1
        agent.process.signal(signal.SIGKILL)
        async with grpc.aio.insecure_channel(broker.address) as ch:
            admin = admin_pb2_grpc.AdminStub(ch)
            deadline = time.monotonic() + 60  # expiry is 1 s; a busy machine may take longer
            while time.monotonic() < deadline:
                hosts = await admin.ListHosts(admin_pb2.ListHostsRequest(), timeout=30)
                if not hosts.hosts:
                    break
                await asyncio.sleep(0.2)
            assert not hosts.hosts
            assert not (await admin.ListVms(admin_pb2.ListVmsRequest(), timeout=30)).vms
        # The broker log reaches the test through a pipe: wait for the line.
        await asyncio.to_thread(broker.process.wait_for, r"vm host-gone/vm-orphan destroyed", 60)
    finally:
        agent.process.stop()
        broker.process.stop()

"""The Admin API, health checking and reflection of a running broker, and policy versions."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from hyperbroker.testing.procs import AgentProcess, Broker, start_broker
from hyperbroker.testing.vmm import VmmClient
from hyperbroker.wire import views
from hyperbroker.wire.v1 import admin_pb2, admin_pb2_grpc

from .conftest import POLICY, plugin_env

pytestmark = pytest.mark.slow
TRNG_RND64 = 0xC400_0053


@pytest.fixture
def broker(tmp_path: Path, policy_file: Path) -> Iterator[Broker]:
    """Without TLS these tests change the policy: that takes --insecure-admin."""
    b = start_broker(policy_file, tmp_path / "state", env=plugin_env(), log_level="info",
                     extra=["--insecure-admin"])
    yield b
    b.process.stop()


async def test_health_reports_serving_for_every_service(broker: Broker) -> None:
    async with grpc.aio.insecure_channel(broker.address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "hyperbroker.v1.Broker", "hyperbroker.v1.Admin"):
            r = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
            assert r.status == health_pb2.HealthCheckResponse.SERVING, service


async def test_reflection_lists_the_services(broker: Broker) -> None:
    async with grpc.aio.insecure_channel(broker.address) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        call = stub.ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        reply = await call.read()
        await call.done_writing()
        names = {s.name for s in reply.list_services_response.service}
        assert {"hyperbroker.v1.Broker", "hyperbroker.v1.Admin", "grpc.health.v1.Health"} <= names


async def test_validate_reports_every_error_with_the_kernels_errno(broker: Broker) -> None:
    bad = """\
handlers: {trng: {}}
profiles:
  default:
    rules:
      - {name: a, ranges: [{base: 0x86000100, count: 16}], action: deny}
      - {name: b, ranges: [{base: 0x86000108, count: 16}], action: deny}
      - {name: arch, functions: [0x80008000], action: deny}
"""
    async with grpc.aio.insecure_channel(broker.address) as ch:
        report = await admin_pb2_grpc.AdminStub(ch).ValidatePolicy(
            admin_pb2.PolicyText(yaml=bad), timeout=30)
    assert not report.ok
    assert all(e.errno_name == "EEXIST" for e in report.errors)
    assert any(set(e.rules) == {"a", "b"} for e in report.errors)
    assert any("arch" in e.rules for e in report.errors)


async def test_a_new_policy_version_applies_to_vms_registered_after_it(
        broker: Broker, agent: AgentProcess) -> None:
    client = await VmmClient.connect(str(agent.socket), "seqpacket")
    before = await client.register("vm-before", 1)
    assert before.policy_version == 1
    v2 = POLICY.replace("deadline_ms: 300}", "deadline_ms: 250}", 1)
    async with grpc.aio.insecure_channel(broker.address) as ch:
        admin = admin_pb2_grpc.AdminStub(ch)
        report = await admin.ApplyPolicy(admin_pb2.PolicyText(yaml=v2), timeout=30)
        assert report.ok and report.version == 2
        for i in range(100):  # the broker pushes it to the agent
            after_name = f"vm-after-{i}"
            after = await client.register(after_name, 1)
            if after.policy_version == 2:
                break
            await asyncio.sleep(0.05)
        assert after.policy_version == 2
        # Both VMs keep working, each under its own version.
        for reg in (before, after):
            assert (await client.call(reg.vm_id, 0, TRNG_RND64, [64])).outcome == 0
        vms = {v.name: v for v in (await admin.ListVms(admin_pb2.ListVmsRequest(),
                                                        timeout=30)).vms}
        assert vms["vm-before"].policy_version == 1
        assert vms[after_name].policy_version == 2
        assert vms["vm-before"].calls == 1 and vms["vm-before"].vcpus[0].last_seq == 1
        old = await admin.GetPolicy(admin_pb2.GetPolicyRequest(version=1), timeout=30)
        assert old.version == 1 and "deadline_ms: 300}" in old.yaml
        stats = await admin.GetStats(admin_pb2.GetStatsRequest(), timeout=30)
        assert stats.policy_version == 2 and stats.calls >= 2 and stats.agents == 1
        hosts = await admin.ListHosts(admin_pb2.ListHostsRequest(), timeout=30)
        assert [(h.host, h.connected) for h in hosts.hosts] == [("host-a", True)]
    client.close()


def test_inspect_of_a_vm_that_is_gone_says_not_found(broker: Broker,
                                                      agent: AgentProcess) -> None:
    async def two_increments() -> None:
        client = await VmmClient.connect(str(agent.socket), "seqpacket")
        reg = await client.register("vm-inspected", 1)
        for _ in range(2):
            await client.call(reg.vm_id, 0, 0x8200_0001)

    asyncio.run(two_increments())  # the VM goes when its connection closes: inspect before
    out = subprocess.run([sys.executable, "-m", "hyperbroker.cli", "inspect", "--broker",
                          broker.address, "host-a/vm-inspected", "counter"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "NOT_FOUND" in out.stderr  # destroyed with its connection


async def test_the_admin_api_shows_a_handlers_view_of_a_live_vm(broker: Broker,
                                                                agent: AgentProcess) -> None:
    client = await VmmClient.connect(str(agent.socket), "seqpacket")
    reg = await client.register("vm-viewed", 1)
    for _ in range(3):
        await client.call(reg.vm_id, 0, 0x8200_0001)
    async with grpc.aio.insecure_channel(broker.address) as ch:
        admin = admin_pb2_grpc.AdminStub(ch)
        view = await admin.GetVmHandlerView(admin_pb2.VmHandlerViewRequest(
            host="host-a", vm="vm-viewed", handler="counter"), timeout=30)
        assert views.from_struct(view.view) == {"vm": "host-a/vm-viewed", "state": {"counter": 3}}
        assert view.view.fields["state"].struct_value.fields["counter"].number_value == 3
        assert view.policy_version == 1
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await admin.GetVmHandlerView(admin_pb2.VmHandlerViewRequest(
                host="host-a", vm="vm-viewed", handler="nope"), timeout=30)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    client.close()


def test_status_and_call_commands_work_against_running_processes(
        broker: Broker, agent: AgentProcess) -> None:
    call = subprocess.run([sys.executable, "-m", "hyperbroker.cli", "call", "--socket",
                           str(agent.socket), "TRNG_RND64", "192"],
                          capture_output=True, text=True, timeout=30)
    assert call.returncode == 0, call.stderr
    assert "TRNG_RND64 (0xc4000053) -> ok, answered by broker" in call.stdout
    assert "latency: agent" in call.stdout and "handler" in call.stdout
    status = subprocess.run([sys.executable, "-m", "hyperbroker.cli", "status", "--broker",
                             broker.address], capture_output=True, text=True, timeout=30)
    assert status.returncode == 0, status.stderr
    assert "host-a" in status.stdout and "TRNG_RND64" in status.stdout

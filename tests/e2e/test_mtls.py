"""mTLS between agent and broker: the broker serves a host only to the certificate that names it."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hyperbroker.calls import Outcome
from hyperbroker.testing.procs import start_agent, start_broker
from hyperbroker.testing.vmm import VmmClient
from hyperbroker.wire.v1 import admin_pb2, admin_pb2_grpc
from hyperbroker.wire.vmm import ResultSource

from .conftest import plugin_env

pytestmark = pytest.mark.slow
TRNG_RND64 = 0xC400_0053


def pem_files(tmp: Path, ca: trustme.CA, name: str, *identities: str) -> list[str]:
    cert = ca.issue_cert(*identities)
    paths = [tmp / f"{name}.crt", tmp / f"{name}.key", tmp / "ca.crt"]
    paths[0].write_bytes(b"".join(c.bytes() for c in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(paths[1]))
    ca.cert_pem.write_to_path(str(paths[2]))
    return ["--tls-cert", str(paths[0]), "--tls-key", str(paths[1]), "--tls-ca", str(paths[2])]


async def test_health_is_served_in_plaintext_beside_an_mtls_broker(
        tmp_path: Path, policy_file: Path) -> None:
    """Kubernetes' gRPC probes cannot speak TLS: --health-listen serves health alone, plainly."""
    ca = trustme.CA()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        health_port = s.getsockname()[1]
    broker = start_broker(policy_file, tmp_path / "state", env=plugin_env(),
                          extra=[*pem_files(tmp_path, ca, "broker", "localhost", "127.0.0.1"),
                                 "--health-listen", f"127.0.0.1:{health_port}"])
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as ch:
            r = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="hyperbroker.v1.Broker"), timeout=30)
            assert r.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as e:  # nothing else is served there
                await admin_pb2_grpc.AdminStub(ch).GetStats(admin_pb2.GetStatsRequest(),
                                                            timeout=30)
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        async with grpc.aio.insecure_channel(broker.address) as ch:  # the main port is TLS
            with pytest.raises(grpc.aio.AioRpcError):
                await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                           timeout=2)
    finally:
        broker.process.stop()


async def test_an_agent_is_served_only_for_the_host_its_certificate_names(
        tmp_path: Path, policy_file: Path) -> None:
    ca = trustme.CA()
    broker = start_broker(policy_file, tmp_path / "state", env=plugin_env(),
                          extra=pem_files(tmp_path, ca, "broker", "localhost", "127.0.0.1"))
    good = start_agent(broker.address, "host-m", tmp_path, log_level="info",
                       extra=pem_files(tmp_path, ca, "host-m", "host-m"))
    liar = start_agent(broker.address, "host-m2", tmp_path, log_level="info",
                       extra=pem_files(tmp_path, ca, "other", "host-other"))
    try:
        client = await VmmClient.connect(str(good.socket), "seqpacket")
        reg = await client.register("vm-tls", 1)
        r = await client.call(reg.vm_id, 0, TRNG_RND64, [64])
        assert r.outcome == Outcome.OK and r.timing.source == ResultSource.BROKER
        client.close()

        await asyncio.sleep(0.5)
        assert any("PERMISSION_DENIED" in line for line in liar.process.lines), \
            liar.process.lines[-5:]
    finally:
        good.process.stop()
        liar.process.stop()
        broker.process.stop()

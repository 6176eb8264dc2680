"""The Admin boundary, exact host identities and certificate rotation, against real processes
and real TLS (issue 12, items 1-3)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from hyperbroker.calls import Outcome
from hyperbroker.testing.certs import CertAuthority
from hyperbroker.testing.procs import Broker, start_agent, start_broker
from hyperbroker.testing.vmm import VmmClient
from hyperbroker.wire.v1 import admin_pb2, admin_pb2_grpc, broker_pb2, broker_pb2_grpc
from hyperbroker.wire.vmm import ResultSource

from .conftest import POLICY, plugin_env

pytestmark = pytest.mark.slow
TRNG_RND64 = 0xC400_0053
V2 = POLICY.replace("deadline_ms: 300}", "deadline_ms: 250}", 1)
TlsBroker = tuple[Broker, CertAuthority, CertAuthority, Path]  # broker, agents' CA, admin CA, dir
WRITER_TOKEN = "w-0123456789abcdef-token"
READER_TOKEN = "r-0123456789abcdef-token"


def creds(d: Path, ca: CertAuthority, name: str, *, dns: tuple[str, ...] = (),
          uris: tuple[str, ...] = (), server_ca: CertAuthority | None = None
          ) -> grpc.ChannelCredentials:
    """Client credentials: a certificate from `ca` and trust in the broker's (`server_ca`)."""
    cert, key, _ = ca.issue(dns=dns, uris=uris, cn=name)
    return grpc.ssl_channel_credentials((server_ca or ca).pem, key, cert)


def audit_records(broker: Broker) -> list[dict[str, object]]:
    out = []
    for line in broker.process.lines:
        m = re.search(r"hyperbroker\.audit: (\{.*\})$", line)
        if m:
            out.append(json.loads(m.group(1)))
    return out


def metric(port: int | None, name: str, **labels: str) -> float:
    assert port is not None
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line
                                                 for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{{want}}} not in the metrics")


async def admin_call(credentials: grpc.ChannelCredentials, address: str, method: str,
                     request: object, token: str | None = None) -> object:
    async with grpc.aio.secure_channel(
            address, credentials,
            options=[("grpc.ssl_target_name_override", "localhost")]) as ch:
        stub = admin_pb2_grpc.AdminStub(ch)
        md = (("authorization", f"Bearer {token}"),) if token else None
        return await getattr(stub, method)(request, timeout=30, metadata=md)


@pytest.fixture
def tls_broker(tmp_path: Path, policy_file: Path) -> Iterator[TlsBroker]:
    agents, admins = CertAuthority("agents CA"), CertAuthority("admin CA")
    d = tmp_path / "pki"
    server = agents.write(d, "broker", dns=("localhost",))
    (d / "admin-ca.crt").write_bytes(admins.pem)
    (d / "tokens").write_text(f"# role name token\nwrite ci {WRITER_TOKEN}\n"
                              f"read dash {READER_TOKEN}\n")
    broker = start_broker(policy_file, tmp_path / "state", env=plugin_env(), log_level="info",
                          extra=[*server, "--admin-ca", str(d / "admin-ca.crt"),
                                 "--admin-write", "ops-writer", "--admin-read", "ops-reader",
                                 "--admin-tokens", str(d / "tokens")])
    yield broker, agents, admins, d
    broker.process.stop()


async def test_admin_is_refused_to_every_identity_but_an_admins_and_each_refusal_is_audited(
        tls_broker: TlsBroker) -> None:
    broker, agents, admins, d = tls_broker
    address = broker.address
    apply = admin_pb2.PolicyText(yaml=V2)
    refused = [
        # An agent's certificate, for the host it serves.
        ("agent certificate", creds(d, agents, "host-a", dns=("host-a",)), None),
        # The admin name, but in a certificate of the agents' CA: not an admin credential.
        ("admin name from the agents' CA", creds(d, agents, "x", dns=("ops-writer",)), None),
        # The admin CA, but a name that is no configured admin.
        ("admin CA, unknown name", creds(d, admins, "x", dns=("ops-nobody",),
                                         server_ca=agents), None),
        # A read-only admin attempting a write.
        ("read-only admin", creds(d, admins, "r", dns=("ops-reader",), server_ca=agents),
         None),
        # A read token attempting a write, and a token nobody issued.
        ("read token", creds(d, agents, "host-a", dns=("host-a",)), READER_TOKEN),
        ("unknown token", creds(d, agents, "host-a", dns=("host-a",)), "not-a-token-at-all"),
    ]
    for what, credentials, token in refused:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await admin_call(credentials, address, "ApplyPolicy", apply, token)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, what
        assert "refused" in (e.value.details() or ""), what
    # Agent certificates cannot read either.
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await admin_call(creds(d, agents, "host-a", dns=("host-a",)), address, "ListVms",
                         admin_pb2.ListVmsRequest())
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # Another CA altogether, and no certificate: the TLS handshake refuses them before any
    # call exists (the broker requires a client certificate that chains to one of its CAs).
    stranger = CertAuthority("someone else's CA")
    for what, credentials in (
            ("another CA", creds(d, stranger, "x", dns=("ops-writer",), server_ca=agents)),
            ("no certificate", grpc.ssl_channel_credentials(agents.pem))):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await admin_call(credentials, address, "ApplyPolicy", apply)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, what

    reader = creds(d, admins, "r", dns=("ops-reader",), server_ca=agents)
    stats = await admin_call(reader, address, "GetStats", admin_pb2.GetStatsRequest())
    assert stats.policy_version == 1  # type: ignore[attr-defined]  # nothing got through
    writer = creds(d, admins, "w", uris=("spiffe://ops/ops-writer",), dns=("ops-writer",),
                   server_ca=agents)
    report = await admin_call(writer, address, "ApplyPolicy", apply)
    assert report.ok and report.version == 2  # type: ignore[attr-defined]

    # The CLI with a write token from a file (over an agent certificate's TLS) succeeds too.
    (d / "v3.yaml").write_text(V2.replace("deadline_ms: 250}", "deadline_ms: 240}", 1))
    (d / "ci.token").write_text(WRITER_TOKEN + "\n")
    agent_tls = agents.write(d, "cli-host", dns=("host-a",))
    cli = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "hyperbroker.cli", "policy", "apply", str(d / "v3.yaml"),
         "--broker", f"localhost:{broker.port}", *agent_tls,
         "--admin-token-file", str(d / "ci.token")],
        capture_output=True, text=True, timeout=60, env={**os.environ, **plugin_env()})
    assert cli.returncode == 0, cli.stderr
    assert "policy v3 is current" in cli.stdout

    await asyncio.to_thread(broker.process.wait_for, r'"decision": "applied".*"version": 3', 30)
    records = audit_records(broker)
    refusals = [r for r in records if r["decision"] == "refused"]
    assert len(refusals) == len(refused) + 1, refusals  # + the agent's ListVms
    assert {r["method"] for r in refusals} == {"ApplyPolicy", "ListVms"}
    assert all(r["who"] and r["reason"] and r["peer"] for r in refusals)
    assert all(len(str(r["policy_sha256"])) == 64 for r in refusals if r["method"] ==
               "ApplyPolicy")
    applied = [r for r in records if r["decision"] == "applied"]
    assert [(r["who"], r["version"]) for r in applied] == [
        ("cert:ops-writer,spiffe://ops/ops-writer", 2), ("token:ci", 3)]
    assert metric(broker.metrics_port, "hyperbroker_broker_admin_audit_total",
                  method="ApplyPolicy", decision="refused") == len(refused)
    assert metric(broker.metrics_port, "hyperbroker_broker_admin_audit_total",
                  method="ListVms", decision="refused") == 1
    assert metric(broker.metrics_port, "hyperbroker_broker_admin_audit_total",
                  method="ApplyPolicy", decision="applied") == 2


async def test_without_tls_admin_writes_need_insecure_admin(tmp_path: Path,
                                                            policy_file: Path) -> None:
    broker = start_broker(policy_file, tmp_path / "state", env=plugin_env(), log_level="info")
    try:
        assert any("policy writes are refused" in line for line in broker.process.lines)
        async with grpc.aio.insecure_channel(broker.address) as ch:
            admin = admin_pb2_grpc.AdminStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await admin.ApplyPolicy(admin_pb2.PolicyText(yaml=V2), timeout=30)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "--insecure-admin" in (e.value.details() or "")
            stats = await admin.GetStats(admin_pb2.GetStatsRequest(), timeout=30)
            assert stats.policy_version == 1
        await asyncio.to_thread(broker.process.wait_for,
                                r'hyperbroker\.audit: .*"decision": "refused"', 30)
        assert [r["who"] for r in audit_records(broker)] == ["anonymous"]
    finally:
        broker.process.stop()
    insecure = start_broker(policy_file, tmp_path / "state2", env=plugin_env(),
                            extra=["--insecure-admin"])
    try:
        assert any("WARNING --insecure-admin" in line for line in insecure.process.lines)
    finally:
        insecure.process.stop()


async def hello(address: str, credentials: grpc.ChannelCredentials | None,
                host: str) -> broker_pb2.BrokerFrame | grpc.aio.AioRpcError:
    """Say hello as `host`; the welcome, or the error the broker ended the stream with.
    The channel stays open (the stream alive) until the caller's task ends."""
    channel = (grpc.aio.secure_channel(address, credentials,
                                       options=[("grpc.ssl_target_name_override", "localhost")])
               if credentials is not None else grpc.aio.insecure_channel(address))
    stream = broker_pb2_grpc.BrokerStub(channel).Connect()
    try:
        await stream.write(broker_pb2.AgentFrame(hello=broker_pb2.AgentHello(host=host,
                                                                               protocol=1)))
        first = await stream.read()
        assert isinstance(first, broker_pb2.BrokerFrame)
        OPEN.append(channel)
        return first
    except grpc.aio.AioRpcError as e:
        await channel.close()
        return e


OPEN: list[grpc.aio.Channel] = []


async def test_a_host_is_proved_by_exactly_one_form_of_its_name(tmp_path: Path,
                                                                policy_file: Path) -> None:
    ca = CertAuthority()
    d = tmp_path / "pki"
    spiffe_only = creds(d, ca, "c", uris=("spiffe://example.org/host/host-c",))
    dns_only = creds(d, ca, "c", dns=("host-c",))
    broker = start_broker(policy_file, None, env=plugin_env(), log_level="info",
                          extra=ca.write(d, "broker", dns=("localhost",)))
    try:
        # DNS form (the default): the SPIFFE-only certificate proves none of the loose names.
        for claim in ("host-c", "host/host-c", "example.org/host/host-c"):
            r = await hello(broker.address, spiffe_only, claim)
            assert isinstance(r, grpc.aio.AioRpcError), claim
            assert r.code() in (grpc.StatusCode.PERMISSION_DENIED,
                                grpc.StatusCode.INVALID_ARGUMENT), claim
        r = await hello(broker.address, dns_only, "host-c")
        assert isinstance(r, broker_pb2.BrokerFrame) and r.HasField("welcome")
        # A second hello for host-c while its stream is alive (and heard from just now) is
        # refused, even with a certificate that proves host-c.
        r = await hello(broker.address, dns_only, "host-c")
        assert isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.ALREADY_EXISTS
    finally:
        for ch in OPEN:
            await ch.close()
        OPEN.clear()
        broker.process.stop()
    template = "spiffe://example.org/host/{host}"
    broker = start_broker(policy_file, None, env=plugin_env(), log_level="info",
                          extra=[*ca.write(d, "broker", dns=("localhost",)),
                                 "--spiffe-template", template])
    try:
        r = await hello(broker.address, dns_only, "host-c")  # the DNS form no longer counts
        assert isinstance(r, grpc.aio.AioRpcError)
        assert r.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "spiffe://example.org/host/host-c" in (r.details() or "")
        for claim in ("host/host-c", "example.org/host/host-c", "org/host/host-c"):
            r = await hello(broker.address, spiffe_only, claim)
            assert isinstance(r, grpc.aio.AioRpcError), claim
        r = await hello(broker.address, spiffe_only, "host-c")
        assert isinstance(r, broker_pb2.BrokerFrame) and r.HasField("welcome")
    finally:
        for ch in OPEN:
            await ch.close()
        OPEN.clear()
        broker.process.stop()


async def test_without_tls_a_live_hosts_stream_cannot_be_taken_over(tmp_path: Path,
                                                                   policy_file: Path) -> None:
    broker = start_broker(policy_file, None, env=plugin_env(), log_level="info")
    try:
        first = await hello(broker.address, None, "host-t")
        assert isinstance(first, broker_pb2.BrokerFrame)
        second = await hello(broker.address, None, "host-t")
        assert isinstance(second, grpc.aio.AioRpcError)
        assert second.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "without TLS" in (second.details() or "")
        for bad in ("", "a/b", "x" * 129, "-lead", "sp ace"):
            r = await hello(broker.address, None, bad)
            assert isinstance(r, grpc.aio.AioRpcError), bad
            assert r.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        for ch in OPEN:  # the first stream ends: the host may connect again at once
            await ch.close()
        OPEN.clear()
        again = await hello(broker.address, None, "host-t")
        assert isinstance(again, broker_pb2.BrokerFrame)
    finally:
        for ch in OPEN:
            await ch.close()
        OPEN.clear()
        broker.process.stop()


def served_serial(port: int, client_cert: Path, client_key: Path, ca: Path) -> int:
    """The serial number of the certificate a brand-new TLS handshake gets from the broker."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(str(client_cert), str(client_key))
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def replace(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


async def test_certificates_rotate_under_load_without_a_failed_call(tmp_path: Path,
                                                                   policy_file: Path) -> None:
    ca = CertAuthority()
    d = tmp_path / "pki"
    broker_args = ca.write(d, "broker", dns=("localhost",))
    agent_args = ca.write(d, "host-r", dns=("host-r",))
    broker = start_broker(policy_file, None, env=plugin_env(), log_level="info",
                          extra=broker_args)
    agent = start_agent(f"localhost:{broker.port}", "host-r", tmp_path, log_level="info",
                        extra=agent_args)
    crt, key, ca_file = d / "broker.crt", d / "broker.key", d / "ca.crt"
    try:
        before = await asyncio.to_thread(served_serial, broker.port, d / "host-r.crt",
                                         d / "host-r.key", ca_file)
        client = await VmmClient.connect(str(agent.socket), "seqpacket")
        reg = await client.register("vm-rot", 1)
        answers: list[bool] = []  # each call: answered OK by the broker (not a fallback)
        stop = asyncio.Event()

        async def load() -> None:
            while not stop.is_set():
                r = await client.call(reg.vm_id, 0, TRNG_RND64, [64])
                answers.append(r.outcome == Outcome.OK and r.timing.source == ResultSource.BROKER)

        task = asyncio.create_task(load())
        await asyncio.sleep(0.5)
        new_cert, new_key, new_serial = ca.issue(dns=("localhost",), cn="broker rotated")
        # A rotation as a tool writes it: key first, then the certificate. Between the two the
        # pair does not match; the broker keeps the old one until it does.
        replace(key, new_key)
        await asyncio.sleep(0.2)
        replace(crt, new_cert)
        rotated = time.monotonic()
        deadline = rotated + 30
        seen = before
        while seen != new_serial and time.monotonic() < deadline:
            seen = await asyncio.to_thread(served_serial, broker.port, d / "host-r.crt",
                                           d / "host-r.key", ca_file)
        assert seen == new_serial != before
        took = time.monotonic() - rotated
        # SIGHUP makes it read the files again even when they look unchanged.
        broker.process.signal(signal.SIGHUP)
        await asyncio.to_thread(broker.process.wait_for, r"certificates will be read again", 30)
        await asyncio.sleep(0.5)
        stop.set()
        await task
        assert len(answers) > 50 and all(answers), answers.count(False)
        print(f"rotation under load: {len(answers)} calls, {answers.count(False)} failed; a new "
              f"handshake saw the new certificate {took:.2f} s after it was written")
        assert sum(1 for line in broker.process.lines
                   if "agent for host host-r connected" in line) == 1  # no stream dropped
        client.close()
    finally:
        agent.process.stop()
        broker.process.stop()


async def test_an_agent_presents_its_rotated_certificate_at_its_next_reconnect(
        tmp_path: Path, policy_file: Path) -> None:
    old_ca, new_ca = CertAuthority("agents CA 1"), CertAuthority("agents CA 2")
    d = tmp_path / "pki"
    clients_ca = d / "clients-ca.crt"  # what the broker trusts for agents
    d.mkdir()
    clients_ca.write_bytes(old_ca.pem)
    broker_tls = old_ca.write(d, "broker", dns=("localhost",))
    broker_tls[-1] = str(clients_ca)
    agent_tls = old_ca.write(d, "host-n", dns=("host-n",))  # its --tls-ca verifies the broker
    broker = start_broker(policy_file, None, env=plugin_env(), log_level="info",
                          extra=broker_tls)
    port = broker.port
    agent = start_agent(f"localhost:{port}", "host-n", tmp_path, log_level="info",
                        extra=agent_tls)
    try:
        client = await VmmClient.connect(str(agent.socket), "seqpacket")
        reg = await client.register("vm-n", 1)
        assert (await client.call(reg.vm_id, 0, TRNG_RND64, [64])).outcome == Outcome.OK
        # The agent's certificate moves to the new CA; SIGHUP: nothing drops meanwhile.
        cert, key, _ = new_ca.issue(dns=("host-n",))
        replace(d / "host-n.key", key)
        replace(d / "host-n.crt", cert)
        agent.process.signal(signal.SIGHUP)
        await asyncio.to_thread(agent.process.wait_for, r"TLS files will be read again", 30)
        r = await client.call(reg.vm_id, 0, TRNG_RND64, [64])
        assert r.outcome == Outcome.OK and r.timing.source == ResultSource.BROKER
        # A broker that trusts only the new CA: the agent gets in only with its new certificate.
        clients_ca.write_bytes(new_ca.pem)
        broker.process.stop()
        broker = start_broker(policy_file, None, port=port, env=plugin_env(), log_level="info",
                              extra=broker_tls)
        await asyncio.to_thread(broker.process.wait_for,
                                r"agent for host host-n connected", 60)
        await asyncio.to_thread(agent.process.wait_for, r"TLS: reconnecting with the certificate",
                                30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = await client.call(reg.vm_id, 0, TRNG_RND64, [64])
            if r.timing.source == ResultSource.BROKER:
                break
        assert r.outcome == Outcome.OK and r.timing.source == ResultSource.BROKER
        client.close()
    finally:
        agent.process.stop()
        broker.process.stop()


async def test_a_proven_host_takes_over_a_stream_silent_past_the_keepalive(
        tmp_path: Path, policy_file: Path) -> None:
    ca = CertAuthority()
    d = tmp_path / "pki"
    host = creds(d, ca, "h", dns=("host-k",))
    broker = start_broker(policy_file, None, env=plugin_env(), log_level="info",
                          extra=ca.write(d, "broker", dns=("localhost",)))
    try:
        first = await hello(broker.address, host, "host-k")
        assert isinstance(first, broker_pb2.BrokerFrame)
        await asyncio.sleep(31)  # the old stream says nothing past the broker's 30 s keepalive
        second = await hello(broker.address, host, "host-k")
        assert isinstance(second, broker_pb2.BrokerFrame) and second.HasField("welcome")
        await asyncio.to_thread(broker.process.wait_for, r"the new stream takes over", 30)
    finally:
        for ch in OPEN:
            await ch.close()
        OPEN.clear()
        broker.process.stop()

"""End to end: the TEE service as a real process (`python -m hyperbroker.tee.server`), the proxy
handler in this process, and guests acting as the Linux driver on simulated memory (issue 5,
"Tests").

Storage and MAC round trips, two VMs kept apart, a restart of the service, and mTLS with
certificates from `trustme`.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trustme

from hyperbroker.handlers.optee import OpteeHandler
from hyperbroker.handlers.optee.grpc_backend import OpteePlugin
from hyperbroker.tee.apps import mac, storage
from hyperbroker.tee.apps.storage import decode_id_list
from hyperbroker.tee.gp import Origin, ParamType, TeeResult
from hyperbroker.tee.uuids import KEYED_MAC_TA, SECURE_STORAGE_TA
from hyperbroker.testing.optee import Guest, TeeProcess, guest_of, start_tee_process
from hyperbroker.testing.optee_guest import GuestParam

pytestmark = pytest.mark.slow


@pytest.fixture
def tee(tmp_path: Path) -> Iterator[TeeProcess]:
    proc = start_tee_process(tmp_path / "tee-state")
    yield proc
    proc.stop()


@pytest.fixture
async def handler(tee: TeeProcess) -> AsyncIterator[OpteeHandler]:
    h = OpteePlugin({"backend": tee.address, "timeout_ms": 3000})
    yield h
    await h.close()


async def open_ok(g: Guest, ta: object) -> int:
    r = await g.driver.open_session(ta)  # type: ignore[arg-type]
    assert (r.ret, r.origin) == (TeeResult.SUCCESS, Origin.TRUSTED_APP)
    return r.session


async def test_storage_and_mac_round_trip(handler: OpteeHandler) -> None:
    g = guest_of(handler, "vm-a")
    assert set(await g.driver.probe()) == {SECURE_STORAGE_TA, KEYED_MAC_TA}

    st = await open_ok(g, SECURE_STORAGE_TA)
    blob = bytes(range(256)) * 30  # 7.5 KiB across pages
    r = await g.driver.invoke(st, storage.CMD_CREATE, [GuestParam.mem_in(b"config"),
                                                       GuestParam.mem_in(blob)])
    assert r.ret == TeeResult.SUCCESS
    r = await g.driver.invoke(st, storage.CMD_READ, [GuestParam.mem_in(b"config"),
                                                     GuestParam.mem_out(16)])
    assert (r.ret, r.params[1].size) == (TeeResult.SHORT_BUFFER, len(blob))
    r = await g.driver.invoke(st, storage.CMD_READ, [GuestParam.mem_in(b"config"),
                                                     GuestParam.mem_out(len(blob))])
    assert r.ret == TeeResult.SUCCESS and r.outputs[1] == blob
    r = await g.driver.invoke(st, storage.CMD_WRITE, [GuestParam.mem_in(b"config"),
                                                      GuestParam.mem_in(b"v2")])
    assert r.ret == TeeResult.SUCCESS
    r = await g.driver.invoke(st, storage.CMD_LIST, [GuestParam.mem_out(256),
                                                     GuestParam(ParamType.VALUE_OUTPUT)])
    assert decode_id_list(r.outputs[0]) == [b"config"] and r.params[1].a == 1

    m = await open_ok(g, KEYED_MAC_TA)
    assert (await g.driver.invoke(m, mac.CMD_GENERATE_KEY,
                                  [GuestParam.mem_in(b"k1")])).ret == TeeResult.SUCCESS
    signed = await g.driver.invoke(m, mac.CMD_SIGN, [GuestParam.mem_in(b"k1"),
                                                     GuestParam.mem_in(b"message"),
                                                     GuestParam.mem_out(32)])
    assert signed.ret == TeeResult.SUCCESS and len(signed.outputs[2]) == 32
    tag = signed.outputs[2]
    ok = await g.driver.invoke(m, mac.CMD_VERIFY, [GuestParam.mem_in(b"k1"),
                                                   GuestParam.mem_in(b"message"),
                                                   GuestParam.mem_in(tag)])
    assert ok.ret == TeeResult.SUCCESS
    bad = await g.driver.invoke(m, mac.CMD_VERIFY, [GuestParam.mem_in(b"k1"),
                                                    GuestParam.mem_in(b"messagE"),
                                                    GuestParam.mem_in(tag)])
    assert (bad.ret, bad.origin) == (TeeResult.MAC_INVALID, Origin.TRUSTED_APP)

    for session in (st, m):
        assert (await g.driver.close_session(session)).ret == TeeResult.SUCCESS


async def test_two_vms_cannot_see_each_others_objects_or_keys(handler: OpteeHandler) -> None:
    a, b = guest_of(handler, "vm-a"), guest_of(handler, "vm-b")
    sa, sb = await open_ok(a, SECURE_STORAGE_TA), await open_ok(b, SECURE_STORAGE_TA)
    assert (await a.driver.invoke(sa, storage.CMD_CREATE, [
        GuestParam.mem_in(b"secret"), GuestParam.mem_in(b"of vm-a")])).ret == TeeResult.SUCCESS
    r = await b.driver.invoke(sb, storage.CMD_READ, [GuestParam.mem_in(b"secret"),
                                                     GuestParam.mem_out(64)])
    assert r.ret == TeeResult.ITEM_NOT_FOUND
    r = await b.driver.invoke(sb, storage.CMD_LIST, [GuestParam.mem_out(64),
                                                     GuestParam(ParamType.VALUE_OUTPUT)])
    assert r.ret == TeeResult.SUCCESS and r.params[1].a == 0
    assert (await b.driver.invoke(sb, storage.CMD_CREATE, [
        GuestParam.mem_in(b"secret"), GuestParam.mem_in(b"of vm-b")])).ret == TeeResult.SUCCESS
    r = await a.driver.invoke(sa, storage.CMD_READ, [GuestParam.mem_in(b"secret"),
                                                     GuestParam.mem_out(64)])
    assert r.outputs[1] == b"of vm-a"
    # Session IDs are per VM: vm-b cannot use vm-a's session even with the same number.
    assert sa == sb
    assert (await b.driver.close_session(sb)).ret == TeeResult.SUCCESS
    r = await a.driver.invoke(sa, storage.CMD_READ, [GuestParam.mem_in(b"secret"),
                                                     GuestParam.mem_out(64)])
    assert r.ret == TeeResult.SUCCESS

    ma, mb = await open_ok(a, KEYED_MAC_TA), await open_ok(b, KEYED_MAC_TA)
    assert (await a.driver.invoke(ma, mac.CMD_GENERATE_KEY,
                                  [GuestParam.mem_in(b"shared-name")])).ret == TeeResult.SUCCESS
    r = await b.driver.invoke(mb, mac.CMD_SIGN, [GuestParam.mem_in(b"shared-name"),
                                                 GuestParam.mem_in(b"m"), GuestParam.mem_out(32)])
    assert r.ret == TeeResult.ITEM_NOT_FOUND


async def test_service_restart_loses_sessions_and_keeps_objects(tmp_path: Path) -> None:
    state = tmp_path / "tee-state"
    tee = start_tee_process(state)
    handler = OpteePlugin({"backend": tee.address, "timeout_ms": 1000, "yield_ms": 50})
    g = guest_of(handler)
    try:
        session = await open_ok(g, SECURE_STORAGE_TA)
        assert (await g.driver.invoke(session, storage.CMD_CREATE, [
            GuestParam.mem_in(b"survivor"), GuestParam.mem_in(b"yes")])).ret == TeeResult.SUCCESS
        tee.stop(signal.SIGKILL)
        r = await g.driver.invoke(session, storage.CMD_READ, [GuestParam.mem_in(b"survivor"),
                                                              GuestParam.mem_out(8)])
        assert (r.ret, r.origin) == (TeeResult.COMMUNICATION, Origin.COMMS)  # down: no hang
        tee = start_tee_process(state, port=tee.port)
        r = await g.driver.invoke(session, storage.CMD_READ, [GuestParam.mem_in(b"survivor"),
                                                              GuestParam.mem_out(8)])
        assert (r.ret, r.origin) == (TeeResult.TARGET_DEAD, Origin.TEE)
        assert (await g.driver.close_session(session)).ret == TeeResult.SUCCESS
        session = await open_ok(g, SECURE_STORAGE_TA)
        r = await g.driver.invoke(session, storage.CMD_READ, [GuestParam.mem_in(b"survivor"),
                                                              GuestParam.mem_out(8)])
        assert r.ret == TeeResult.SUCCESS and r.outputs[1] == b"yes"
    finally:
        await handler.close()
        tee.stop()


# mTLS ---------------------------------------------------------------------------------------------


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    ca, stranger = trustme.CA(), trustme.CA()
    files: dict[str, Path] = {}
    server_cert = ca.issue_cert("tee.example", "127.0.0.1")
    proxy_cert = ca.issue_cert("broker.example")
    rogue_cert = stranger.issue_cert("rogue.example")
    for name, obj in (("ca", ca.cert_pem), ("stranger-ca", stranger.cert_pem)):
        files[name] = tmp_path / f"{name}.pem"
        obj.write_to_path(str(files[name]))
    for name, cert in (("server", server_cert), ("proxy", proxy_cert), ("rogue", rogue_cert)):
        files[f"{name}-cert"] = tmp_path / f"{name}-cert.pem"
        files[f"{name}-key"] = tmp_path / f"{name}-key.pem"
        cert.cert_chain_pems[0].write_to_path(str(files[f"{name}-cert"]))
        cert.private_key_pem.write_to_path(str(files[f"{name}-key"]))
    return files


@pytest.fixture
def tls_tee(tmp_path: Path, pki: dict[str, Path]) -> Iterator[TeeProcess]:
    proc = start_tee_process(tmp_path / "tls-state", extra=(
        "--tls-cert", str(pki["server-cert"]), "--tls-key", str(pki["server-key"]),
        "--tls-ca", str(pki["ca"])))
    yield proc
    proc.stop()


async def test_mtls_between_proxy_and_service(tls_tee: TeeProcess,
                                              pki: dict[str, Path]) -> None:
    handler = OpteePlugin({"backend": tls_tee.address, "tls_cert": str(pki["proxy-cert"]),
                            "tls_key": str(pki["proxy-key"]), "tls_ca": str(pki["ca"]),
                            "tls_server_name": "tee.example"})
    try:
        g = guest_of(handler)
        assert set(await g.driver.probe()) == {SECURE_STORAGE_TA, KEYED_MAC_TA}
    finally:
        await handler.close()


async def test_mtls_refuses_a_client_from_another_ca(tls_tee: TeeProcess,
                                                     pki: dict[str, Path]) -> None:
    for config in (
        {"tls_cert": str(pki["rogue-cert"]), "tls_key": str(pki["rogue-key"]),
         "tls_ca": str(pki["ca"]), "tls_server_name": "tee.example"},
        {},  # plaintext against a TLS port
    ):
        handler = OpteePlugin({"backend": tls_tee.address, "timeout_ms": 1000, **config})
        try:
            r = await guest_of(handler).driver.open_session(SECURE_STORAGE_TA)
            assert (r.ret, r.origin) == (TeeResult.COMMUNICATION, Origin.COMMS)
        finally:
            await handler.close()


async def test_mtls_refuses_a_service_from_another_ca(tls_tee: TeeProcess,
                                                      pki: dict[str, Path]) -> None:
    handler = OpteePlugin({"backend": tls_tee.address, "timeout_ms": 1000,
                            "tls_cert": str(pki["proxy-cert"]), "tls_key": str(pki["proxy-key"]),
                            "tls_ca": str(pki["stranger-ca"]), "tls_server_name": "tee.example"})
    try:
        r = await guest_of(handler).driver.open_session(SECURE_STORAGE_TA)
        assert (r.ret, r.origin) == (TeeResult.COMMUNICATION, Origin.COMMS)
    finally:
        await handler.close()

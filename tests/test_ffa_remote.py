"""Remote partitions over gRPC (proto/hyperbroker/v1/ffa_partition.proto), on loopback.

A PartitionServer serves partitions in this process on 127.0.0.1; the handler reaches them as
`kind: remote` partitions. Memory the guest shared crosses the stream only through the handler's
checked SharedMemory, which the malicious-service tests probe.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import trustme

from hyperbroker.handlers.ffa import abi
from hyperbroker.handlers.ffa.abi import FfaError
from hyperbroker.handlers.ffa.config import ECHO_UUID, SHA256_UUID
from hyperbroker.handlers.ffa.discovery import uuid_to_pair
from hyperbroker.handlers.ffa.partitions import (
    DirectMessage,
    EchoPartition,
    Partition,
    PartitionInfo,
    Reply,
    Sha256Partition,
    SharedMemory,
    digest_words,
)
from hyperbroker.handlers.ffa.remote import FfaPlugin
from hyperbroker.testing.ffa import BUFFER_ADDRESS, FfaGuest, error_of, handle_of
from hyperbroker.testing.ffa_partition import PartitionServer
from hyperbroker.testing.metrics import HANDLERS as REGISTRY

ECHO, SHA, PROBE = 0x8001, 0x8002, 0x8003
PROBE_UUID = "0b5c1f6e-9a57-4d8e-9d2c-3f1e2a4b5c6d"
STATUS_INVALID = FfaError.INVALID_PARAMETERS & (1 << 64) - 1


class ProbingPartition(Partition):
    """A service that tries what it should not: reads and writes chosen by the request."""

    def __init__(self, info: PartitionInfo) -> None:
        super().__init__(info)
        self.reclaimed: list[int] = []
        self.destroyed: list[int] = []

    async def direct_request(self, msg: DirectMessage, memory: SharedMemory) -> Reply:
        op, handle, offset, length = msg.payload[:4]
        if op == 1:
            got = await memory.read(handle, offset, length)
            return (int(got) & (1 << 64) - 1 if isinstance(got, FfaError) else len(got), 0, 0, 0,
                    0)
        code = await memory.write(handle, offset, b"\xAB" * length)
        return (0 if code is None else int(code) & (1 << 64) - 1, 0, 0, 0, 0)

    async def reclaim(self, vm: str, sender: int, handle: int) -> FfaError | None:
        self.reclaimed.append(handle)
        return None

    async def vm_destroyed(self, vm: str, endpoint_id: int) -> None:
        self.destroyed.append(endpoint_id)


def infos() -> list[PartitionInfo]:
    return [PartitionInfo("r-echo", ECHO, ECHO_UUID), PartitionInfo("r-sha", SHA, SHA256_UUID),
            PartitionInfo("r-probe", PROBE, uuid.UUID(PROBE_UUID))]


def remote_config(target: str, **extra: Any) -> dict[str, Any]:
    return {"partitions": [
        {"kind": "remote", "name": i.name, "id": i.partition_id, "uuid": str(i.uuid),
         "target": target, **extra}
        for i in infos()
    ]}


@pytest.fixture
async def service() -> AsyncIterator[tuple[str, ProbingPartition]]:
    echo_info, sha_info, probe_info = infos()
    probe = ProbingPartition(probe_info)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [PartitionServer([EchoPartition(echo_info), Sha256Partition(sha_info), probe])
         .generic_handler()])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}", probe
    await server.stop(None)


@pytest.fixture
async def guest(service: tuple[str, ProbingPartition]) -> AsyncIterator[FfaGuest]:
    g = FfaGuest(FfaPlugin(remote_config(service[0])))
    await g.setup()
    yield g
    await g.handler.close()


def to(g: FfaGuest, dst: int) -> int:
    return abi.pack_target(g.endpoint_id, dst)


async def test_remote_echo_over_direct_req_64_and_req2(guest: FfaGuest) -> None:
    r = await guest.call(abi.FFA_MSG_SEND_DIRECT_REQ_64, to(guest, ECHO), 0, 1, 2, 3, 4, 5)
    assert r.x[0] == abi.FFA_MSG_SEND_DIRECT_RESP_64 and r.x[3:8] == (1, 2, 3, 4, 5)
    payload = tuple(range(1, 15))
    r2 = await guest.call(abi.FFA_MSG_SEND_DIRECT_REQ2, to(guest, ECHO), *uuid_to_pair(ECHO_UUID),
                          *payload)
    assert r2.x[0] == abi.FFA_MSG_SEND_DIRECT_RESP2 and r2.x[4:18] == payload


async def test_remote_sha256_hashes_memory_read_through_the_broker(guest: FfaGuest) -> None:
    data = bytes(range(256)) * 64  # 16 KiB over four pages, several reads
    guest.poke(BUFFER_ADDRESS, data)
    handle = handle_of(await guest.share((SHA,), ((BUFFER_ADDRESS, 4),)))
    r = await guest.call(abi.FFA_MSG_SEND_DIRECT_REQ_64, to(guest, SHA), 0, handle, 0, 0)
    assert r.x[3] == 0 and r.x[4:8] == digest_words(data)


async def test_remote_service_cannot_read_a_handle_it_was_not_given(guest: FfaGuest) -> None:
    handle = handle_of(await guest.share((SHA,), ((BUFFER_ADDRESS, 1),)))  # given to SHA only
    r = await guest.call(abi.FFA_MSG_SEND_DIRECT_REQ_64, to(guest, PROBE), 0, 1, handle, 0, 16)
    assert r.x[3] == STATUS_INVALID


async def test_remote_service_cannot_read_past_its_share(guest: FfaGuest) -> None:
    handle = handle_of(await guest.share((PROBE,), ((BUFFER_ADDRESS, 1),)))
    r = await guest.call(abi.FFA_MSG_SEND_DIRECT_REQ_64, to(guest, PROBE), 0, 1, handle, 4000, 200)
    assert r.x[3] == STATUS_INVALID
    ok = await guest.call(abi.FFA_MSG_SEND_DIRECT_REQ_64, to(guest, PROBE), 0, 1, handle, 0, 4096)
    assert ok.x[3] == 4096


async def test_remote_service_cannot_write_a_read_only_share(guest: FfaGuest) -> None:
    handle = handle_of(await guest.share((PROBE,), ((BUFFER_ADDRESS, 1),), permissions=0x1))
    r = await guest.call(abi.FFA_MSG_SEND_DIRECT_REQ_64, to(guest, PROBE), 0, 2, handle, 0, 4)
    assert r.x[3] == FfaError.DENIED & (1 << 64) - 1
    assert guest.peek(BUFFER_ADDRESS, 4) == bytes(4)


async def test_remote_service_writes_a_read_write_share(guest: FfaGuest) -> None:
    handle = handle_of(await guest.share((PROBE,), ((BUFFER_ADDRESS, 1),)))
    r = await guest.call(abi.FFA_MSG_SEND_DIRECT_REQ_64, to(guest, PROBE), 0, 2, handle, 8, 4)
    assert r.x[3] == 0
    assert guest.peek(BUFFER_ADDRESS + 8, 4) == b"\xAB" * 4  # applied with the result


async def test_reclaim_and_destroy_reach_the_remote_service(
    guest: FfaGuest, service: tuple[str, ProbingPartition]
) -> None:
    _, probe = service
    handle = handle_of(await guest.share((PROBE,), ((BUFFER_ADDRESS, 1),)))
    await guest.call(abi.FFA_MEM_RECLAIM, *abi.split_handle(handle), 0)
    assert probe.reclaimed == [handle]
    await guest.handler.vm_destroyed(guest.ctx)
    assert probe.destroyed == [guest.endpoint_id]


async def test_unreachable_service_answers_aborted_and_marks_it_down() -> None:
    g = FfaGuest(FfaPlugin(remote_config("127.0.0.1:1", timeout_ms=500)))
    await g.setup()
    r = await g.call(abi.FFA_MSG_SEND_DIRECT_REQ_64, to(g, ECHO), 0)
    assert error_of(r) is FfaError.ABORTED
    assert REGISTRY.get_sample_value("hyperbroker_ffa_partition_up", {"partition": "r-echo"}) == 0
    # Reclaim does not depend on the service: access is mediated, so it goes ahead.
    handle = handle_of(await g.share((SHA,), ((BUFFER_ADDRESS, 1),)))
    assert (await g.call(abi.FFA_MEM_RECLAIM, *abi.split_handle(handle), 0)).x[0] == \
        abi.FFA_SUCCESS_32
    await g.handler.close()


async def test_remote_partition_over_tls(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    server = grpc.aio.server()
    echo_info = infos()[0]
    server.add_generic_rpc_handlers([PartitionServer([EchoPartition(echo_info)]).generic_handler()])
    creds = grpc.ssl_server_credentials(
        [(cert.private_key_pem.bytes(), cert.cert_chain_pems[0].bytes())])
    port = server.add_secure_port("localhost:0", creds)
    await server.start()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    spec = {"kind": "remote", "id": ECHO, "uuid": str(ECHO_UUID), "target": f"localhost:{port}",
            "tls_ca": str(tmp_path / "ca.pem")}
    g = FfaGuest(FfaPlugin({"partitions": [spec]}))
    await g.setup()
    r = await g.call(abi.FFA_MSG_SEND_DIRECT_REQ_64, to(g, ECHO), 0, 77)
    assert r.x[0] == abi.FFA_MSG_SEND_DIRECT_RESP_64 and r.x[3] == 77
    await g.handler.close()
    await server.stop(None)


async def test_service_that_hangs_up_without_answering_is_aborted() -> None:
    async def hang_up(request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.read()  # take the request, answer nothing

    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "hyperbroker.v1.FfaPartition",
        {"DirectMessage": grpc.stream_stream_rpc_method_handler(hang_up)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    g = FfaGuest(FfaPlugin(remote_config(f"127.0.0.1:{port}")))
    await g.setup()
    r = await g.call(abi.FFA_MSG_SEND_DIRECT_REQ_64, to(g, ECHO), 0)
    assert error_of(r) is FfaError.ABORTED
    await g.handler.close()
    await server.stop(None)

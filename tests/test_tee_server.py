"""The TEE service's gRPC face (tee.server): the TeeBackend protocol, health, and the CLI."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hyperbroker.tee import server
from hyperbroker.tee.apps import BUILTIN
from hyperbroker.tee.gp import Origin, ParamType, TeeResult
from hyperbroker.tee.ta import Param
from hyperbroker.tee.uuids import DEVICE_ENUM_PTA
from hyperbroker.testing.optee import ECHO_TA, EchoTa
from hyperbroker.wire.v1 import tee_pb2, tee_pb2_grpc

VM = tee_pb2.TeeVm(host="host-a", name="vm-1", incarnation="boot")


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[server.TeeServer]:
    srv = await server.start("127.0.0.1:0", tmp_path, apps=(*BUILTIN, EchoTa),
                             max_sessions_per_vm=3)
    yield srv
    await srv.stop(grace=0)


@pytest.fixture
async def stub(running: server.TeeServer) -> AsyncIterator[tee_pb2_grpc.TeeBackendStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield tee_pb2_grpc.TeeBackendStub(channel)  # type: ignore[no-untyped-call]


async def test_describe_lists_epoch_limit_and_apps(running: server.TeeServer,
                                                   stub: tee_pb2_grpc.TeeBackendStub) -> None:
    r = await stub.Describe(tee_pb2.TeeDescribeRequest())
    assert r.epoch == running.service.epoch and r.max_sessions_per_vm == 3
    assert {a.name for a in r.apps} == {"device-enum", "secure-storage", "keyed-mac", "echo"}


async def test_health_is_serving(running: server.TeeServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        r = await health.Check(health_pb2.HealthCheckRequest(service=server.SERVICE_NAME))
        assert r.status == health_pb2.HealthCheckResponse.SERVING


async def test_open_invoke_close_over_grpc(stub: tee_pb2_grpc.TeeBackendStub) -> None:
    r = await stub.OpenSession(tee_pb2.TeeOpenSessionRequest(vm=VM, ta_uuid=ECHO_TA.bytes))
    assert r.status == tee_pb2.TEE_STATUS_VM_UNKNOWN
    created = await stub.VmCreated(tee_pb2.TeeVmCreatedRequest(vm=VM, max_sessions=10))
    assert created.max_sessions == 3
    r = await stub.OpenSession(tee_pb2.TeeOpenSessionRequest(vm=VM, ta_uuid=ECHO_TA.bytes))
    assert (r.status, r.ret, r.origin) == (tee_pb2.TEE_STATUS_OK, 0, Origin.TRUSTED_APP)
    session, epoch = r.session, r.epoch
    r = await stub.InvokeCommand(tee_pb2.TeeInvokeCommandRequest(
        vm=VM, session=session, epoch=epoch, func=0, params=[
            tee_pb2.TeeParam(type=tee_pb2.TEE_PARAM_MEMREF_INPUT, data=b"abc"),
            tee_pb2.TeeParam(type=tee_pb2.TEE_PARAM_MEMREF_OUTPUT, size=2),
            tee_pb2.TeeParam(type=tee_pb2.TEE_PARAM_VALUE_INOUT, a=1, b=2),
        ]))
    # The mirror does not fit in 2 bytes: SHORT_BUFFER with the size, no data.
    assert r.ret == TeeResult.SHORT_BUFFER
    assert (r.params[1].size, r.params[1].data) == (3, b"")
    assert len(r.params) == 3 and r.params[0].data == b""  # inputs do not come back
    r = await stub.CloseSession(tee_pb2.TeeCloseSessionRequest(vm=VM, session=session,
                                                               epoch=epoch))
    assert (r.ret, r.origin) == (TeeResult.SUCCESS, Origin.TEE)
    r = await stub.CloseSession(tee_pb2.TeeCloseSessionRequest(vm=VM, session=session,
                                                               epoch=epoch ^ 1))
    assert r.status == tee_pb2.TEE_STATUS_SESSION_LOST
    gone = await stub.VmDestroyed(tee_pb2.TeeVmDestroyedRequest(vm=VM))
    assert gone.sessions_closed == 0


@pytest.mark.parametrize("request_", [
    tee_pb2.TeeOpenSessionRequest(vm=tee_pb2.TeeVm(name="x"), ta_uuid=DEVICE_ENUM_PTA.bytes),
    tee_pb2.TeeOpenSessionRequest(vm=VM, ta_uuid=b"short"),
    tee_pb2.TeeOpenSessionRequest(vm=VM, ta_uuid=DEVICE_ENUM_PTA.bytes, client_uuid=b"x"),
    tee_pb2.TeeOpenSessionRequest(vm=VM, ta_uuid=DEVICE_ENUM_PTA.bytes,
                                  params=[tee_pb2.TeeParam(type=4)]),  # type: ignore[arg-type]
])
async def test_malformed_requests_are_invalid_argument(
        stub: tee_pb2_grpc.TeeBackendStub, request_: tee_pb2.TeeOpenSessionRequest) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.OpenSession(request_)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_wire_parameters_keep_capacity_and_return_only_outputs() -> None:
    out = Param.received(ParamType.MEMREF_OUTPUT, 0, 0, b"", 8, False)
    assert (out.capacity, out.size) == (8, 8)
    inout = Param.received(ParamType.MEMREF_INOUT, 0, 0, b"abc", 10, False)
    assert (inout.capacity, inout.data) == (10, b"abc")
    assert out.set_output(b"12345678") and server.param_to_proto(out).data == b"12345678"
    assert not out.set_output(b"123456789") and server.param_to_proto(out).size == 9
    value = Param.received(ParamType.VALUE_INPUT, 2**40 + 5, 6, b"", 0, False)
    assert (value.a, value.b) == (5, 6)
    assert server.param_to_proto(value).a == 0  # an input value does not come back


def test_main_refuses_half_a_tls_configuration(tmp_path: Path) -> None:
    assert server.main(["--state-dir", str(tmp_path), "--tls-cert", "c.pem"]) == 2


def test_main_reports_a_port_it_cannot_bind(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # gRPC sets SO_REUSEPORT; a plain listening socket without it still blocks the port.
        assert server.main(["--state-dir", str(tmp_path), "--listen",
                            f"127.0.0.1:{port}"]) == 2  # a configuration error


async def test_serve_reports_its_port_and_stops_when_cancelled(tmp_path: Path) -> None:
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.ensure_future(server.serve("127.0.0.1:0", tmp_path, ready=ready))
    port = await asyncio.wait_for(ready, 10)
    assert port > 0
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

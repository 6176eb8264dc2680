"""The proxy's TEE-backend client (handlers.optee.grpc_backend): one channel per address, wire
conversions, and protocol errors reported as BackendUnavailable."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from hyperbroker.handlers.optee import grpc_backend
from hyperbroker.handlers.optee.backend import (
    BackendStatus,
    BackendUnavailable,
    OpenSessionRequest,
    TeeParam,
    TeeVm,
)
from hyperbroker.handlers.optee.grpc_backend import ChannelSpec, GrpcTeeBackend
from hyperbroker.tee import server
from hyperbroker.tee.gp import ParamType, TeeResult
from hyperbroker.tee.uuids import DEVICE_ENUM_PTA
from hyperbroker.wire.v1 import tee_pb2

VM = TeeVm("host-a", "vm-1", "boot")


async def test_backends_with_the_same_address_share_one_channel(tmp_path: Path) -> None:
    running = await server.start("127.0.0.1:0", tmp_path)
    spec = ChannelSpec(f"127.0.0.1:{running.port}")
    first, second = GrpcTeeBackend(spec, 2.0), GrpcTeeBackend(spec, 2.0)
    try:
        epoch = await first.vm_created(VM, 0)
        assert epoch == running.service.epoch
        reply = await second.open_session(OpenSessionRequest(VM, DEVICE_ENUM_PTA, 0,
                                                             uuid.UUID(int=0), 0, ()))
        assert (reply.status, reply.ret) == (BackendStatus.OK, TeeResult.SUCCESS)
        assert first._channel is second._channel
        assert grpc_backend._CHANNELS[spec].users == 2
        await first.close()
        assert grpc_backend._CHANNELS[spec].users == 1
        await second.close()
        assert spec not in grpc_backend._CHANNELS
    finally:
        await running.stop(grace=0)


def test_parameters_survive_the_wire() -> None:
    for p in (TeeParam(ParamType.VALUE_INOUT, a=0xFFFF_FFFF, b=7),
              TeeParam(ParamType.MEMREF_INPUT, data=b"abc", size=3),
              TeeParam(ParamType.MEMREF_OUTPUT, size=99, null=True),
              TeeParam()):
        assert grpc_backend.param_from_proto(grpc_backend.param_to_proto(p)) == p


def test_a_reply_the_protocol_does_not_allow_is_unavailable() -> None:
    with pytest.raises(BackendUnavailable) as e:
        grpc_backend.reply_from_proto(tee_pb2.TeeReply(status=7))  # type: ignore[arg-type]
    assert e.value.reason == "protocol"
    with pytest.raises(BackendUnavailable):
        grpc_backend.reply_from_proto(tee_pb2.TeeReply(
            params=[tee_pb2.TeeParam(type=9)]))  # type: ignore[arg-type]


def test_channel_options_bound_messages_and_reconnect_quickly() -> None:
    opts = dict(ChannelSpec("x:1", server_name="tee.example", max_message_bytes=123).options())
    assert opts["grpc.max_receive_message_length"] == 123
    assert opts["grpc.max_reconnect_backoff_ms"] <= 2000
    assert opts["grpc.ssl_target_name_override"] == "tee.example"
    assert ChannelSpec("x:1").credentials() is None

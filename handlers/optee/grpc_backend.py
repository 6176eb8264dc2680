"""The TEE-backend client: tee.proto over grpc.aio, one channel per backend address.

Channels are shared: every handler instance configured with the same address and credentials
(several policy versions may be live) uses one channel per event loop, reference-counted and
closed with the last user. Every RPC has a deadline, so a dead or restarting service costs a guest
at most `timeout` (the caller answers TEEC_ERROR_COMMUNICATION); `wait_for_ready` lets a call made
while the channel reconnects go through as soon as the service is back within that deadline.
Reconnection backoff is short (at most 2 s) for the same reason. This module converts between
handlers.optee.backend values and protobuf; it knows nothing of guests or OP-TEE messages.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from hyperbroker.handlers.api import HandlerConfigError
from hyperbroker.handlers.optee.backend import (
    BackendReply,
    BackendStatus,
    BackendUnavailable,
    CancelRequest,
    CloseRequest,
    InvokeRequest,
    OpenSessionRequest,
    TeeBackend,
    TeeParam,
    TeeVm,
)
from hyperbroker.handlers.optee.handler import CONFIG_KEYS, OpteeHandler, config_int
from hyperbroker.runtime.tls import TlsFiles
from hyperbroker.tee.gp import ParamType
from hyperbroker.wire.v1 import tee_pb2, tee_pb2_grpc


@dataclass(frozen=True, slots=True)
class ChannelSpec:
    """Everything that makes two channels interchangeable."""

    target: str
    tls: TlsFiles | None = None  # mTLS: this proxy's certificate and key, the service's CA
    server_name: str | None = None  # expected name in the service's certificate
    max_message_bytes: int = 16 << 20

    def credentials(self) -> grpc.ChannelCredentials | None:
        return self.tls.channel_credentials() if self.tls is not None else None

    def options(self) -> list[tuple[str, Any]]:
        opts: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        if self.server_name:
            opts.append(("grpc.ssl_target_name_override", self.server_name))
        return opts


@dataclass(eq=False, slots=True)
class _Shared:
    loop: asyncio.AbstractEventLoop
    channel: grpc.aio.Channel
    users: int = 0


_CHANNELS: dict[ChannelSpec, _Shared] = {}


def _acquire(spec: ChannelSpec) -> grpc.aio.Channel:
    loop = asyncio.get_running_loop()
    shared = _CHANNELS.get(spec)
    if shared is None or shared.loop is not loop or loop.is_closed():
        creds = spec.credentials()
        channel = (grpc.aio.secure_channel(spec.target, creds, options=spec.options())
                   if creds is not None
                   else grpc.aio.insecure_channel(spec.target, options=spec.options()))
        shared = _CHANNELS[spec] = _Shared(loop, channel)
    shared.users += 1
    return shared.channel


def _forget(spec: ChannelSpec, channel: grpc.aio.Channel) -> None:
    """Drop a use of a channel of an event loop that is gone (it cannot be closed from here)."""
    shared = _CHANNELS.get(spec)
    if shared is not None and shared.channel is channel:
        shared.users -= 1
        if shared.users <= 0:
            del _CHANNELS[spec]


async def _release(spec: ChannelSpec, channel: grpc.aio.Channel) -> None:
    shared = _CHANNELS.get(spec)
    if shared is None or shared.channel is not channel:
        await channel.close()  # replaced (another event loop): this user was the last one
        return
    shared.users -= 1
    if shared.users <= 0:
        del _CHANNELS[spec]
        await channel.close()


def vm_to_proto(vm: TeeVm) -> tee_pb2.TeeVm:
    return tee_pb2.TeeVm(host=vm.host, name=vm.name, incarnation=vm.incarnation)


def param_to_proto(p: TeeParam) -> tee_pb2.TeeParam:
    return tee_pb2.TeeParam(type=f"TEE_PARAM_{p.type.name}", a=p.a & 0xFFFF_FFFF,
                            b=p.b & 0xFFFF_FFFF, data=p.data, size=p.size, null_memref=p.null)


def param_from_proto(p: tee_pb2.TeeParam) -> TeeParam:
    try:
        kind = ParamType(p.type)
    except ValueError:
        raise BackendUnavailable("protocol", f"parameter type {p.type}") from None
    return TeeParam(kind, p.a, p.b, bytes(p.data), p.size, p.null_memref)


def reply_from_proto(r: tee_pb2.TeeReply) -> BackendReply:
    try:
        status = BackendStatus(r.status)
    except ValueError:
        raise BackendUnavailable("protocol", f"status {r.status}") from None
    return BackendReply(status, r.ret, r.origin, r.session, r.epoch,
                        tuple(param_from_proto(p) for p in r.params))


class GrpcTeeBackend:
    """handlers.optee.backend.TeeBackend over gRPC. Create it anywhere; it connects on first use."""

    def __init__(self, spec: ChannelSpec, timeout: float) -> None:
        self.spec = spec
        self.timeout = timeout
        self._channel: grpc.aio.Channel | None = None
        self._stub: tee_pb2_grpc.TeeBackendStub | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _get_stub(self) -> tee_pb2_grpc.TeeBackendStub:
        loop = asyncio.get_running_loop()
        if self._stub is None or self._loop is not loop:
            if self._channel is not None:
                _forget(self.spec, self._channel)
            self._channel = _acquire(self.spec)
            self._stub = tee_pb2_grpc.TeeBackendStub(self._channel)
            self._loop = loop
        return self._stub

    async def _call(self, method: str, request: Any) -> Any:
        rpc = getattr(self._get_stub(), method)
        try:
            return await rpc(request, timeout=self.timeout, wait_for_ready=True)
        except grpc.aio.AioRpcError as e:
            code = e.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise BackendUnavailable("timeout", e.details() or "") from None
            if code == grpc.StatusCode.UNAVAILABLE:
                raise BackendUnavailable("unavailable", e.details() or "") from None
            raise BackendUnavailable(code.name.lower(), e.details() or "") from None
        except grpc.aio.UsageError as e:  # the channel was closed under the call
            raise BackendUnavailable("closed", str(e)) from None

    async def vm_created(self, vm: TeeVm, max_sessions: int) -> int:
        reply = await self._call("VmCreated", tee_pb2.TeeVmCreatedRequest(
            vm=vm_to_proto(vm), max_sessions=max_sessions))
        return int(reply.epoch)

    async def vm_destroyed(self, vm: TeeVm) -> int:
        reply = await self._call("VmDestroyed", tee_pb2.TeeVmDestroyedRequest(vm=vm_to_proto(vm)))
        return int(reply.sessions_closed)

    async def open_session(self, request: OpenSessionRequest) -> BackendReply:
        return reply_from_proto(await self._call("OpenSession", tee_pb2.TeeOpenSessionRequest(
            vm=vm_to_proto(request.vm), ta_uuid=request.ta.bytes, login=request.login,
            client_uuid=request.client.bytes, cancel_id=request.cancel_id,
            params=[param_to_proto(p) for p in request.params])))

    async def invoke_command(self, request: InvokeRequest) -> BackendReply:
        return reply_from_proto(await self._call("InvokeCommand", tee_pb2.TeeInvokeCommandRequest(
            vm=vm_to_proto(request.vm), session=request.session, epoch=request.epoch,
            func=request.func, cancel_id=request.cancel_id,
            params=[param_to_proto(p) for p in request.params])))

    async def close_session(self, request: CloseRequest) -> BackendReply:
        return reply_from_proto(await self._call("CloseSession", tee_pb2.TeeCloseSessionRequest(
            vm=vm_to_proto(request.vm), session=request.session, epoch=request.epoch)))

    async def cancel(self, request: CancelRequest) -> BackendReply:
        return reply_from_proto(await self._call("Cancel", tee_pb2.TeeCancelRequest(
            vm=vm_to_proto(request.vm), session=request.session, epoch=request.epoch,
            cancel_id=request.cancel_id)))

    async def describe(self) -> tuple[int, list[tuple[uuid.UUID, str]]]:
        """The service's epoch and its TAs (operator tooling, health checks)."""
        reply = await self._call("Describe", tee_pb2.TeeDescribeRequest())
        return int(reply.epoch), [(uuid.UUID(bytes=a.uuid), a.name) for a in reply.apps]

    async def close(self) -> None:
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await _release(self.spec, channel)


BACKEND_KEYS = ("backend", "tls_cert", "tls_key", "tls_ca", "tls_server_name", "timeout_ms")


def channel_spec(config: Mapping[str, Any], max_memref_bytes: int) -> ChannelSpec:
    """The policy's transport keys -> ChannelSpec, or HandlerConfigError naming the key."""
    target = config.get("backend")
    if not isinstance(target, str) or not target:
        raise HandlerConfigError("backend: the TEE service's address (host:port) is required")
    files = {k: config.get(k) for k in ("tls_cert", "tls_key", "tls_ca")}
    given = [k for k, v in files.items() if v]
    if given and len(given) != 3:
        raise HandlerConfigError(
            f"tls_cert, tls_key, tls_ca: mTLS needs all three, got only {', '.join(given)}")
    tls = TlsFiles(*(Path(str(v)) for v in files.values())) if given else None
    if tls is not None:
        try:
            tls.check()
        except ValueError as e:
            raise HandlerConfigError(str(e)) from None
    server_name = config.get("tls_server_name")
    if server_name is not None and (not isinstance(server_name, str) or not server_name):
        raise HandlerConfigError("tls_server_name: expected a host name")
    # Room for every memory parameter plus framing.
    return ChannelSpec(target, tls, server_name, max(4 << 20, 2 * max_memref_bytes + (64 << 10)))


class OpteePlugin(OpteeHandler):
    """The installed `optee` handler: the OP-TEE proxy with its TEE service over gRPC."""

    @classmethod
    def config_keys(cls) -> Sequence[str]:
        return (*BACKEND_KEYS, *CONFIG_KEYS)

    def connect(self) -> TeeBackend:
        timeout_ms = config_int(self.config, "timeout_ms", 5000, 1, 600_000)
        return GrpcTeeBackend(channel_spec(self.config, self.limits.max_memref_bytes),
                              timeout_ms / 1000)

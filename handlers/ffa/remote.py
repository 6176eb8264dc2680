"""Remote partitions over gRPC (proto/hyperbroker/v1/ffa_partition.proto), and the plugin.

`RemotePartition` is a Partition whose answers come from a FfaPartition service elsewhere: each
direct request is one bidi stream on which the service may ask for bytes of the calling VM's
shares; every such access goes through the handler's SharedMemory, which checks it, so the
service can reach nothing the VM did not give it and nothing after a reclaim. A service that
cannot be reached, times out or breaks the protocol costs the guest FFA_ERROR(ABORTED), never an
exception. `FfaPlugin` is what the `ffa` entry point installs: the FF-A handler with the
`remote` partition kind added. (hyperbroker.testing.ffa_partition serves Partition objects as a
FfaPartition service, for tests and as a worked example of the other side.)

This is the FF-A backend module: the only one that knows about gRPC; the state machines and the
adapter only see the Partition interface. Channels are created lazily on the running event loop
(grpc.aio objects are bound to the loop that created them).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import grpc
import grpc.aio

from hyperbroker.handlers.api import HandlerConfigError
from hyperbroker.handlers.ffa import metrics
from hyperbroker.handlers.ffa.abi import FfaError
from hyperbroker.handlers.ffa.config import BUILTIN_KINDS, PartitionKind, config_int
from hyperbroker.handlers.ffa.handler import FfaHandler
from hyperbroker.handlers.ffa.partitions import (
    MAX_READ,
    DirectMessage,
    MessageKind,
    Partition,
    PartitionInfo,
    Reply,
    SharedMemory,
)
from hyperbroker.runtime.loglimit import PeerLog
from hyperbroker.runtime.tls import TlsFiles
from hyperbroker.wire.v1 import ffa_partition_pb2 as pb

# A partition service (or a guest that makes it fail) may fail every call: bounded per partition.
log = PeerLog(logging.getLogger("hyperbroker.handlers.ffa.remote"))

SERVICE = "hyperbroker.v1.FfaPartition"
METHOD_DIRECT = f"/{SERVICE}/DirectMessage"
METHOD_RECLAIM = f"/{SERVICE}/Reclaim"
METHOD_VM_DESTROYED = f"/{SERVICE}/VmDestroyed"
MAX_ACCESSES_PER_REQUEST = 4096  # a service looping on memory accesses is cut off (ABORTED)

KIND_TO_PB = {
    MessageKind.REQ_32: pb.FFA_MESSAGE_KIND_DIRECT_REQ_32,
    MessageKind.REQ_64: pb.FFA_MESSAGE_KIND_DIRECT_REQ_64,
    MessageKind.REQ2: pb.FFA_MESSAGE_KIND_DIRECT_REQ2,
}
KIND_FROM_PB = {v: k for k, v in KIND_TO_PB.items()}
_ERRORS = {int(e) for e in FfaError}


def error_code(value: FfaError | None) -> int:
    return 0 if value is None else int(value)


def error_from_code(code: int) -> FfaError | None:
    """0 is no error; an unknown code from a peer is a protocol violation: ABORTED."""
    if code == 0:
        return None
    return FfaError(code) if code in _ERRORS else FfaError.ABORTED


def serialize(message: Any) -> bytes:
    return cast(bytes, message.SerializeToString())


class RemotePartition(Partition):
    """A partition served by a FfaPartition service at `target` (host:port)."""

    def __init__(
        self,
        info: PartitionInfo,
        target: str,
        *,
        timeout_s: float = 1.0,
        tls: TlsFiles | None = None,
    ) -> None:
        super().__init__(info)
        self.target = target
        self.timeout_s = timeout_s
        self.tls = tls
        self._channel: grpc.aio.Channel | None = None

    def _open(self) -> grpc.aio.Channel:
        if self._channel is None:
            if self.tls is None:
                self._channel = grpc.aio.insecure_channel(self.target)
            else:
                self._channel = grpc.aio.secure_channel(self.target,
                                                        self.tls.channel_credentials())
        return self._channel

    @property
    def peer(self) -> str:
        return f"partition {self.info.name}"

    def _unreachable(self, what: str, err: grpc.aio.AioRpcError) -> FfaError:
        log.warning(self.peer, "at %s: %s failed: %s %s", self.target, what, err.code(),
                    err.details())
        metrics.set_up(self.info.name, False)
        return FfaError.ABORTED

    async def direct_request(self, msg: DirectMessage, memory: SharedMemory) -> Reply:
        request = pb.FfaDirectRequest(
            vm=msg.vm,
            sender_id=msg.sender,
            receiver_id=msg.receiver,
            kind=KIND_TO_PB[msg.kind],
            service_uuid=b"" if msg.uuid is None else msg.uuid.bytes,
            payload=msg.payload,
            grants=[
                pb.FfaShareGrant(handle=g.handle, size=g.size, writable=g.writable, lent=g.lent)
                for g in memory.grants
            ],
        )
        stream = self._open().stream_stream(
            METHOD_DIRECT, serialize, pb.FfaPartitionOutbound.FromString
        )
        call = stream(None, timeout=self.timeout_s)
        try:
            await call.write(pb.FfaPartitionInbound(request=request))
            for _ in range(MAX_ACCESSES_PER_REQUEST):
                out = await call.read()
                if not isinstance(out, pb.FfaPartitionOutbound):  # grpc.aio.EOF
                    log.warning(self.peer, "closed a request without answering")
                    return FfaError.ABORTED
                if out.HasField("response"):
                    metrics.set_up(self.info.name, True)
                    code = error_from_code(out.response.error)
                    return code if code is not None else tuple(out.response.payload)
                if not out.HasField("access"):
                    return FfaError.ABORTED
                result = await _serve_access(out.access, memory)
                await call.write(pb.FfaPartitionInbound(memory=result))
            log.warning(self.peer, "exceeded %d memory accesses", MAX_ACCESSES_PER_REQUEST)
            return FfaError.ABORTED
        except grpc.aio.AioRpcError as err:
            return self._unreachable("DirectMessage", err)
        except (grpc.aio.UsageError, asyncio.InvalidStateError) as err:
            # The service ended the stream while we were still writing to it.
            log.warning(self.peer, "broke the DirectMessage stream: %r", err)
            return FfaError.ABORTED
        finally:
            call.cancel()

    async def reclaim(self, vm: str, sender: int, handle: int) -> FfaError | None:
        rpc = self._open().unary_unary(METHOD_RECLAIM, serialize, pb.FfaReclaimReply.FromString)
        req = pb.FfaReclaimRequest(vm=vm, sender_id=sender, receiver_id=self.info.partition_id,
                                   handle=handle)
        try:
            reply = await rpc(req, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as err:
            # Every access is mediated, so an unreachable service cannot keep using the pages:
            # the reclaim goes ahead.
            self._unreachable("Reclaim", err)
            return None
        code = error_from_code(reply.error)
        return None if code is None else FfaError.DENIED

    async def vm_destroyed(self, vm: str, endpoint_id: int) -> None:
        rpc = self._open().unary_unary(
            METHOD_VM_DESTROYED, serialize, pb.FfaVmDestroyedReply.FromString
        )
        req = pb.FfaVmDestroyedRequest(vm=vm, endpoint_id=endpoint_id,
                                       receiver_id=self.info.partition_id)
        try:
            await rpc(req, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as err:
            self._unreachable("VmDestroyed", err)

    async def close(self) -> None:
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close(None)


async def _serve_access(access: pb.FfaMemoryAccess, memory: SharedMemory) -> pb.FfaMemoryResult:
    if access.write_data:
        code = await memory.write(access.handle, access.offset, access.write_data)
        return pb.FfaMemoryResult(request_id=access.request_id, error=error_code(code))
    if access.length > MAX_READ:
        return pb.FfaMemoryResult(request_id=access.request_id,
                                  error=int(FfaError.INVALID_PARAMETERS))
    data = await memory.read(access.handle, access.offset, access.length)
    if isinstance(data, FfaError):
        return pb.FfaMemoryResult(request_id=access.request_id, error=int(data))
    return pb.FfaMemoryResult(request_id=access.request_id, data=data)


def _build_remote(info: PartitionInfo, spec: Mapping[str, Any], where: str) -> Partition:
    target = spec["target"]
    if not isinstance(target, str) or not target:
        raise HandlerConfigError(f"{where}.target: {target!r} is not host:port")
    timeout_ms = config_int(spec.get("timeout_ms", 1000), f"{where}.timeout_ms", 1, 60_000)
    tls = None
    if any(k in spec for k in ("tls_ca", "tls_cert", "tls_key")):
        if ("tls_cert" in spec) != ("tls_key" in spec):
            raise HandlerConfigError(f"{where}.tls_cert/tls_key: give both or neither")
        tls = TlsFiles(*(Path(str(spec[k])) if k in spec else None
                         for k in ("tls_cert", "tls_key", "tls_ca")))
        try:
            tls.check(f"{where}.")
        except ValueError as e:
            raise HandlerConfigError(str(e)) from None
    return RemotePartition(info, target, timeout_s=timeout_ms / 1000, tls=tls)


REMOTE_KIND = PartitionKind(
    frozenset({"target", "timeout_ms", "tls_ca", "tls_cert", "tls_key"}), ("target",),
    _build_remote)


class FfaPlugin(FfaHandler):
    """The installed `ffa` handler: FfaHandler whose partitions may also be `kind: remote`."""

    partition_kinds = {**BUILTIN_KINDS, "remote": REMOTE_KIND}

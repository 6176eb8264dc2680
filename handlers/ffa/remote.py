"""Partitions over gRPC (proto/hyperbroker/v1/ffa_partition.proto): client and server sides.

`RemotePartition` is a Partition whose answers come from a FfaPartition service elsewhere: each
direct request is one bidi stream on which the service may ask for bytes of the calling VM's
shares; every such access goes through the handler's SharedMemory, which checks it, so the
service can reach nothing the VM did not give it and nothing after a reclaim. A service that
cannot be reached, times out or breaks the protocol costs the guest FFA_ERROR(ABORTED), never an
exception. `PartitionServer` is the other side: it serves local Partition objects (the built-in
ones or an operator's) as a FfaPartition service, so a secure service can run on another machine.

This is the only FF-A module that knows about gRPC; the state machines and the adapter only see
the Partition interface. Channels are created lazily on the running event loop (grpc.aio objects
are bound to the loop that created them; reference/grpc-python.md §2.5).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from typing import Any, cast

import grpc
import grpc.aio

from hyperbroker.handlers.ffa import metrics
from hyperbroker.handlers.ffa.abi import FfaError
from hyperbroker.handlers.ffa.partitions import (
    MAX_READ,
    DirectMessage,
    MessageKind,
    Partition,
    PartitionInfo,
    Reply,
    SharedMemory,
    ShareGrant,
)
from hyperbroker.wire.v1 import ffa_partition_pb2 as pb

log = logging.getLogger("hyperbroker.handlers.ffa.remote")

SERVICE = "hyperbroker.v1.FfaPartition"
METHOD_DIRECT = f"/{SERVICE}/DirectMessage"
METHOD_RECLAIM = f"/{SERVICE}/Reclaim"
METHOD_VM_DESTROYED = f"/{SERVICE}/VmDestroyed"
MAX_ACCESSES_PER_REQUEST = 4096  # a service looping on memory accesses is cut off (ABORTED)

_KIND_TO_PB = {
    MessageKind.REQ_32: pb.FFA_MESSAGE_KIND_DIRECT_REQ_32,
    MessageKind.REQ_64: pb.FFA_MESSAGE_KIND_DIRECT_REQ_64,
    MessageKind.REQ2: pb.FFA_MESSAGE_KIND_DIRECT_REQ2,
}
_KIND_FROM_PB = {v: k for k, v in _KIND_TO_PB.items()}
_ERRORS = {int(e) for e in FfaError}


def error_code(value: FfaError | None) -> int:
    return 0 if value is None else int(value)


def error_from_code(code: int) -> FfaError | None:
    """0 is no error; an unknown code from a peer is a protocol violation: ABORTED."""
    if code == 0:
        return None
    return FfaError(code) if code in _ERRORS else FfaError.ABORTED


def _serialize(message: Any) -> bytes:
    return cast(bytes, message.SerializeToString())


class RemotePartition(Partition):
    """A partition served by a FfaPartition service at `target` (host:port)."""

    def __init__(
        self,
        info: PartitionInfo,
        target: str,
        *,
        timeout_s: float = 1.0,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        super().__init__(info)
        self.target = target
        self.timeout_s = timeout_s
        self.credentials = credentials
        self._channel: grpc.aio.Channel | None = None

    def _open(self) -> grpc.aio.Channel:
        if self._channel is None:
            if self.credentials is None:
                self._channel = grpc.aio.insecure_channel(self.target)
            else:
                self._channel = grpc.aio.secure_channel(self.target, self.credentials)
        return self._channel

    def _unreachable(self, what: str, err: grpc.aio.AioRpcError) -> FfaError:
        log.warning("partition %s at %s: %s failed: %s %s", self.info.name, self.target, what,
                    err.code(), err.details())
        metrics.set_up(self.info.name, False)
        return FfaError.ABORTED

    async def direct_request(self, msg: DirectMessage, memory: SharedMemory) -> Reply:
        request = pb.FfaDirectRequest(
            vm=msg.vm,
            sender_id=msg.sender,
            receiver_id=msg.receiver,
            kind=_KIND_TO_PB[msg.kind],
            service_uuid=b"" if msg.uuid is None else msg.uuid.bytes,
            payload=msg.payload,
            grants=[
                pb.FfaShareGrant(handle=g.handle, size=g.size, writable=g.writable, lent=g.lent)
                for g in memory.grants
            ],
        )
        stream = self._open().stream_stream(
            METHOD_DIRECT, _serialize, pb.FfaPartitionOutbound.FromString
        )
        call = stream(None, timeout=self.timeout_s)
        try:
            await call.write(pb.FfaPartitionInbound(request=request))
            for _ in range(MAX_ACCESSES_PER_REQUEST):
                out = await call.read()
                if not isinstance(out, pb.FfaPartitionOutbound):  # grpc.aio.EOF
                    log.warning("partition %s closed a request without answering",
                                self.info.name)
                    return FfaError.ABORTED
                if out.HasField("response"):
                    metrics.set_up(self.info.name, True)
                    code = error_from_code(out.response.error)
                    return code if code is not None else tuple(out.response.payload)
                if not out.HasField("access"):
                    return FfaError.ABORTED
                result = await _serve_access(out.access, memory)
                await call.write(pb.FfaPartitionInbound(memory=result))
            log.warning("partition %s exceeded %d memory accesses", self.info.name,
                        MAX_ACCESSES_PER_REQUEST)
            return FfaError.ABORTED
        except grpc.aio.AioRpcError as err:
            return self._unreachable("DirectMessage", err)
        except (grpc.aio.UsageError, asyncio.InvalidStateError) as err:
            # The service ended the stream while we were still writing to it.
            log.warning("partition %s broke the DirectMessage stream: %r", self.info.name, err)
            return FfaError.ABORTED
        finally:
            call.cancel()

    async def reclaim(self, vm: str, sender: int, handle: int) -> FfaError | None:
        rpc = self._open().unary_unary(METHOD_RECLAIM, _serialize, pb.FfaReclaimReply.FromString)
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
            METHOD_VM_DESTROYED, _serialize, pb.FfaVmDestroyedReply.FromString
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


class _StreamShares:
    """SharedMemory on the service side: each access is a round trip to the broker."""

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any],
                 grants: Sequence[ShareGrant]) -> None:
        self._context = context
        self._grants = tuple(grants)
        self._next_id = 0

    @property
    def grants(self) -> Sequence[ShareGrant]:
        return self._grants

    async def _access(self, **fields: Any) -> pb.FfaMemoryResult | FfaError:
        self._next_id += 1
        await self._context.write(pb.FfaPartitionOutbound(
            access=pb.FfaMemoryAccess(request_id=self._next_id, **fields)))
        inbound = await self._context.read()
        if not isinstance(inbound, pb.FfaPartitionInbound) or not inbound.HasField("memory"):
            return FfaError.ABORTED
        if inbound.memory.request_id != self._next_id:
            return FfaError.ABORTED
        return inbound.memory

    async def read(self, handle: int, offset: int, length: int) -> bytes | FfaError:
        out = bytearray()
        while len(out) < length:
            n = min(MAX_READ, length - len(out))
            result = await self._access(handle=handle, offset=offset + len(out), length=n)
            if isinstance(result, FfaError):
                return result
            code = error_from_code(result.error)
            if code is not None:
                return code
            if len(result.data) != n:
                return FfaError.ABORTED
            out += result.data
        return bytes(out)

    async def write(self, handle: int, offset: int, data: bytes) -> FfaError | None:
        if not data:
            return None
        result = await self._access(handle=handle, offset=offset, write_data=data)
        return result if isinstance(result, FfaError) else error_from_code(result.error)


class PartitionServer:
    """Serves local partitions as a FfaPartition service; requests route by receiver ID."""

    def __init__(self, partitions: Sequence[Partition]) -> None:
        self.partitions = {p.info.partition_id: p for p in partitions}

    def generic_handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        return grpc.method_handlers_generic_handler(SERVICE, {
            "DirectMessage": grpc.stream_stream_rpc_method_handler(
                self._direct, pb.FfaPartitionInbound.FromString, _serialize),
            "Reclaim": grpc.unary_unary_rpc_method_handler(
                self._reclaim, pb.FfaReclaimRequest.FromString, _serialize),
            "VmDestroyed": grpc.unary_unary_rpc_method_handler(
                self._vm_destroyed, pb.FfaVmDestroyedRequest.FromString, _serialize),
        })

    async def _direct(self, request_iterator: Any,
                      context: grpc.aio.ServicerContext[Any, Any]) -> None:
        first = await context.read()
        if not isinstance(first, pb.FfaPartitionInbound) or not first.HasField("request"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "first message must be a request")
        req = first.request
        partition = self.partitions.get(req.receiver_id)
        kind = _KIND_FROM_PB.get(req.kind)
        if partition is None or kind is None:
            await context.write(pb.FfaPartitionOutbound(response=pb.FfaDirectResponse(
                error=int(FfaError.INVALID_PARAMETERS))))
            return
        msg = DirectMessage(
            vm=req.vm,
            sender=req.sender_id,
            receiver=req.receiver_id,
            kind=kind,
            uuid=uuid.UUID(bytes=req.service_uuid) if len(req.service_uuid) == 16 else None,
            payload=tuple(req.payload),
        )
        grants = [ShareGrant(g.handle, g.size, g.writable, g.lent) for g in req.grants]
        reply = await partition.direct_request(msg, _StreamShares(context, grants))
        if isinstance(reply, FfaError):
            response = pb.FfaDirectResponse(error=int(reply))
        else:
            response = pb.FfaDirectResponse(payload=reply)
        await context.write(pb.FfaPartitionOutbound(response=response))

    async def _reclaim(self, req: pb.FfaReclaimRequest,
                       context: grpc.aio.ServicerContext[Any, Any]) -> pb.FfaReclaimReply:
        partition = self.partitions.get(req.receiver_id)
        if partition is None:
            return pb.FfaReclaimReply(error=int(FfaError.INVALID_PARAMETERS))
        code = await partition.reclaim(req.vm, req.sender_id, req.handle)
        return pb.FfaReclaimReply(error=error_code(code))

    async def _vm_destroyed(self, req: pb.FfaVmDestroyedRequest,
                            context: grpc.aio.ServicerContext[Any, Any]
                            ) -> pb.FfaVmDestroyedReply:
        partition = self.partitions.get(req.receiver_id)
        if partition is not None:
            await partition.vm_destroyed(req.vm, req.endpoint_id)
        return pb.FfaVmDestroyedReply()

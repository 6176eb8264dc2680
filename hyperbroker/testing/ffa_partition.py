"""A FfaPartition gRPC service (proto/hyperbroker/v1/ffa_partition.proto) serving Partition
objects: the other side of hyperbroker.handlers.ffa.remote, for tests and as a worked example.

`PartitionServer.generic_handler()` goes on any grpc.aio server. Each direct request arrives on
its own bidi stream; when the partition reads or writes the sender's shares, every access is a
round trip to the handler, which checks it against the shares the VM granted.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import grpc
import grpc.aio

from hyperbroker.handlers.ffa.abi import FfaError
from hyperbroker.handlers.ffa.partitions import MAX_READ, DirectMessage, Partition, ShareGrant
from hyperbroker.handlers.ffa.remote import (
    KIND_FROM_PB,
    SERVICE,
    error_code,
    error_from_code,
    serialize,
)
from hyperbroker.wire.v1 import ffa_partition_pb2 as pb


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
                self._direct, pb.FfaPartitionInbound.FromString, serialize),
            "Reclaim": grpc.unary_unary_rpc_method_handler(
                self._reclaim, pb.FfaReclaimRequest.FromString, serialize),
            "VmDestroyed": grpc.unary_unary_rpc_method_handler(
                self._vm_destroyed, pb.FfaVmDestroyedRequest.FromString, serialize),
        })

    async def _direct(self, request_iterator: Any,
                      context: grpc.aio.ServicerContext[Any, Any]) -> None:
        first = await context.read()
        if not isinstance(first, pb.FfaPartitionInbound) or not first.HasField("request"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "first message must be a request")
        req = first.request
        partition = self.partitions.get(req.receiver_id)
        kind = KIND_FROM_PB.get(req.kind)
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

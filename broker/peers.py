"""Bad input from the broker's peers: refused with a clear status, counted, logged boundedly.

A gRPC client (an agent, an operator's CLI, anyone who reaches the port) can send bytes that do
not decode as the method's message. grpc's own handling of that is a 15-line traceback per
message. MalformedRequests wraps every method's deserializer instead: what does not decode
becomes an Undecodable value, and the method is ended with INVALID_ARGUMENT before it runs
(Broker.Connect reads its frames itself and refuses them with `refuse`). Every such event, and
every other bad frame on the agent stream, is one count of hyperbroker_broker_malformed_total
{reason} and at most one line, "PEER: ...", within the peer's log budget
(hyperbroker.runtime.loglimit). A peer is its address without the port, or its host once the
stream has said hello.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError

from hyperbroker.broker import metrics
from hyperbroker.runtime.loglimit import PeerLog

log = PeerLog(logging.getLogger("hyperbroker.broker"))


def peer_of(peer: str) -> str:
    """grpc's `context.peer()` without the port: "ipv4:10.0.0.7", "ipv6:[::1]", "unix:/p"."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6") and ":" in rest:
        return f"{kind}:{rest.rpartition(':')[0]}"
    return peer


def host_peer(host: str) -> str:
    return f"host {host}"


@dataclass(frozen=True, slots=True)
class Undecodable:
    """What a request that is not its method's message deserialises to."""

    size: int
    error: str


async def refuse(context: grpc.aio.ServicerContext[Any, Any], reason: str, message: str,
                 *args: object, peer: str | None = None,
                 code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> NoReturn:
    """Count, log (within budget) and end the RPC with `code` and the same message."""
    note(reason, peer if peer is not None else peer_of(context.peer()), message, *args)
    await context.abort(code, message % args if args else message)
    raise AssertionError("context.abort returned")  # pragma: no cover


def note(reason: str, peer: str, message: str, *args: object) -> None:
    """One malformed input from `peer` that does not end its RPC: counted, logged in budget."""
    metrics.MALFORMED[reason].inc()
    log.warning(peer, message, *args)


def _safe(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def safe(data: bytes) -> Any:
        try:
            return deserialize(data)
        except (DecodeError, ValueError, TypeError) as e:
            return Undecodable(len(data), str(e))

    return safe


class MalformedRequests(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Every method of the server: a request that does not decode is refused before the method
    runs (stream methods: when it is read), as INVALID_ARGUMENT, counted and logged in budget."""

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return None
        method: str = details.method

        async def bad(request: Undecodable, context: grpc.aio.ServicerContext[Any, Any]
                      ) -> NoReturn:
            await refuse(context, "undecodable", "%s: a %d-byte message that is not its "
                         "request type: %s", method, request.size, request.error)

        def checked_one(inner: Callable[..., Any]) -> Callable[..., Any]:
            if inspect.isasyncgenfunction(inner):
                async def gen_one(request: Any, context: Any) -> AsyncIterator[Any]:
                    if isinstance(request, Undecodable):
                        await bad(request, context)
                    async for reply in inner(request, context):
                        yield reply
                return gen_one

            async def one(request: Any, context: Any) -> Any:
                if isinstance(request, Undecodable):
                    await bad(request, context)
                return await inner(request, context)
            return one

        def checked_many(inner: Callable[..., Any]) -> Callable[..., Any]:
            async def requests(it: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
                async for request in it:
                    if isinstance(request, Undecodable):
                        await bad(request, context)
                    yield request

            if inspect.isasyncgenfunction(inner):
                async def gen_many(it: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
                    async for reply in inner(requests(it, context), context):
                        yield reply
                return gen_many

            async def many(it: AsyncIterator[Any], context: Any) -> Any:
                return await inner(requests(it, context), context)
            return many

        ser, des = handler.response_serializer, _safe(handler.request_deserializer)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                checked_one(handler.unary_unary), request_deserializer=des,
                response_serializer=ser)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                checked_one(handler.unary_stream), request_deserializer=des,
                response_serializer=ser)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                checked_many(handler.stream_unary), request_deserializer=des,
                response_serializer=ser)
        return grpc.stream_stream_rpc_method_handler(
            checked_many(handler.stream_stream), request_deserializer=des,
            response_serializer=ser)

"""`hyperbroker tee-serve`: the reference TEE service behind the TEE-backend gRPC protocol.

Lifecycle: load (or create) the master sealing key in the state directory, instantiate the trusted
applications, then serve TeeBackend, gRPC health and reflection on one port, optionally with mTLS
(clients must present a certificate signed by the configured CA) and a Prometheus endpoint. On
SIGTERM/SIGINT: health NOT_SERVING, stop accepting calls, close every session. This module is the
transport only: conversions between tee.proto messages and tee.service calls.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from hyperbroker.runtime import logformat, options
from hyperbroker.runtime.metrics import serve as serve_metrics
from hyperbroker.runtime.net import CannotListen, add_grpc_port
from hyperbroker.runtime.tls import TlsFiles
from hyperbroker.tee import metrics
from hyperbroker.tee.apps import discover_trusted_apps
from hyperbroker.tee.gp import ParamType, result_name
from hyperbroker.tee.service import DEFAULT_MAX_SESSIONS_PER_VM, Reply, Status, TeeService
from hyperbroker.tee.ta import Param, TrustedApp, VmIdentity
from hyperbroker.wire.v1 import tee_pb2, tee_pb2_grpc

log = logging.getLogger("hyperbroker.tee.server")

T = TypeVar("T")

SERVICE_NAME = tee_pb2.DESCRIPTOR.services_by_name["TeeBackend"].full_name
DEFAULT_MAX_MESSAGE_BYTES = 16 << 20


class BadRequest(ValueError):
    """A request the protocol does not allow (not a TEE error: the proxy is broken)."""


def _vm(msg: tee_pb2.TeeVm) -> tuple[VmIdentity, str]:
    if not msg.host or not msg.name:
        raise BadRequest("vm.host and vm.name are required")
    return VmIdentity(msg.host, msg.name), msg.incarnation


def _uuid(raw: bytes, what: str) -> uuid.UUID:
    if len(raw) != 16:
        raise BadRequest(f"{what} must be 16 octets, got {len(raw)}")
    return uuid.UUID(bytes=raw)


def param_from_proto(p: tee_pb2.TeeParam) -> Param:
    try:
        kind = ParamType(p.type)
    except ValueError:
        raise BadRequest(f"unknown parameter type {p.type}") from None
    return Param.received(kind, p.a, p.b, p.data, p.size, p.null_memref)


def param_to_proto(p: Param) -> tee_pb2.TeeParam:
    a, b, data, size = p.reply()
    return tee_pb2.TeeParam(type=f"TEE_PARAM_{p.type.name}", a=a, b=b, data=data, size=size,
                            null_memref=p.null)


class TeeBackendServicer(tee_pb2_grpc.TeeBackendServicer):
    def __init__(self, service: TeeService) -> None:
        self.service = service

    def _reply(self, method: str, reply: Reply) -> tee_pb2.TeeReply:
        result = result_name(reply.ret) if reply.status == Status.OK else reply.status.name
        metrics.requests(method, result).inc()
        return tee_pb2.TeeReply(
            status=f"TEE_STATUS_{reply.status.name}", ret=reply.ret, origin=reply.origin,
            session=reply.session, epoch=self.service.epoch,
            params=[param_to_proto(p) for p in reply.params],
        )

    async def VmCreated(self, request: tee_pb2.TeeVmCreatedRequest,
                        context: grpc.aio.ServicerContext) -> tee_pb2.TeeVmCreatedReply:
        vm, incarnation = await _checked(context, lambda: _vm(request.vm))
        limit = await self.service.vm_created(vm, incarnation, request.max_sessions)
        metrics.requests("VmCreated", "SUCCESS").inc()
        return tee_pb2.TeeVmCreatedReply(epoch=self.service.epoch, max_sessions=limit)

    async def VmDestroyed(self, request: tee_pb2.TeeVmDestroyedRequest,
                          context: grpc.aio.ServicerContext) -> tee_pb2.TeeVmDestroyedReply:
        vm, incarnation = await _checked(context, lambda: _vm(request.vm))
        closed = await self.service.vm_destroyed(vm, incarnation)
        metrics.requests("VmDestroyed", "SUCCESS").inc()
        return tee_pb2.TeeVmDestroyedReply(sessions_closed=closed)

    async def OpenSession(self, request: tee_pb2.TeeOpenSessionRequest,
                          context: grpc.aio.ServicerContext) -> tee_pb2.TeeReply:
        def parse() -> tuple[VmIdentity, str, uuid.UUID, uuid.UUID, list[Param]]:
            vm, incarnation = _vm(request.vm)
            client = _uuid(request.client_uuid or bytes(16), "client_uuid")
            params = [param_from_proto(p) for p in request.params]
            return vm, incarnation, _uuid(request.ta_uuid, "ta_uuid"), client, params

        vm, incarnation, ta, client, params = await _checked(context, parse)
        reply = await self.service.open_session(vm, incarnation, ta, request.login, client,
                                                params, request.cancel_id)
        return self._reply("OpenSession", reply)

    async def InvokeCommand(self, request: tee_pb2.TeeInvokeCommandRequest,
                            context: grpc.aio.ServicerContext) -> tee_pb2.TeeReply:
        vm, incarnation = await _checked(context, lambda: _vm(request.vm))
        params = await _checked(context, lambda: [param_from_proto(p) for p in request.params])
        reply = await self.service.invoke(vm, incarnation, request.session, request.epoch,
                                          request.func, params, request.cancel_id)
        return self._reply("InvokeCommand", reply)

    async def CloseSession(self, request: tee_pb2.TeeCloseSessionRequest,
                           context: grpc.aio.ServicerContext) -> tee_pb2.TeeReply:
        vm, incarnation = await _checked(context, lambda: _vm(request.vm))
        reply = await self.service.close_session(vm, incarnation, request.session, request.epoch)
        return self._reply("CloseSession", reply)

    async def Cancel(self, request: tee_pb2.TeeCancelRequest,
                     context: grpc.aio.ServicerContext) -> tee_pb2.TeeReply:
        vm, incarnation = await _checked(context, lambda: _vm(request.vm))
        reply = await self.service.cancel(vm, incarnation, request.session, request.epoch,
                                          request.cancel_id)
        return self._reply("Cancel", reply)

    async def Describe(self, request: tee_pb2.TeeDescribeRequest,
                       context: grpc.aio.ServicerContext) -> tee_pb2.TeeDescribeReply:
        return tee_pb2.TeeDescribeReply(
            epoch=self.service.epoch,
            max_sessions_per_vm=self.service.max_sessions_per_vm,
            apps=[tee_pb2.TeeTrustedApp(uuid=a.uuid.bytes, name=a.name, device_enum=a.device_enum)
                  for a in self.service.catalogue],
        )


async def _checked(context: grpc.aio.ServicerContext, parse: Callable[[], T]) -> T:
    """parse(), or the call ends with INVALID_ARGUMENT: the proxy broke the protocol."""
    try:
        return parse()
    except BadRequest as e:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        raise  # abort() raises; this line only informs type checkers


class TeeServer:
    """A running TEE service: the gRPC server, its bound port, and the service."""

    def __init__(self, server: grpc.aio.Server, service: TeeService,
                 health_servicer: Any, port: int) -> None:
        self.server = server
        self.service = service
        self.health = health_servicer
        self.port = port

    async def stop(self, grace: float = 1.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await self.service.close()


async def start(address: str, state_dir: Path, *, tls: TlsFiles | None = None,
                apps: Sequence[type[TrustedApp]] | None = None,
                max_sessions_per_vm: int = DEFAULT_MAX_SESSIONS_PER_VM,
                max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> TeeServer:
    """Start serving on `address` (host:port, port 0 picks one); returns once listening."""
    service = TeeService(discover_trusted_apps() if apps is None else apps, state_dir,
                         max_sessions_per_vm=max_sessions_per_vm)
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ])
    tee_pb2_grpc.add_TeeBackendServicer_to_server(TeeBackendServicer(service), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = add_grpc_port(server, address, "--listen", tls.server_credentials() if tls else None)
    await server.start()
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info("TEE service epoch %#x listening on port %d with %s", service.epoch, port,
             ", ".join(a.name for a in service.catalogue))
    return TeeServer(server, service, health_servicer, port)


async def serve(address: str, state_dir: Path, *, tls: TlsFiles | None = None,
                apps: Sequence[type[TrustedApp]] | None = None,
                max_sessions_per_vm: int = DEFAULT_MAX_SESSIONS_PER_VM,
                max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                ready: asyncio.Future[int] | None = None) -> None:
    """Serve until cancelled or SIGTERM/SIGINT; `ready` gets the bound port once listening."""
    running = await start(address, state_dir, tls=tls, apps=apps,
                          max_sessions_per_vm=max_sessions_per_vm,
                          max_message_bytes=max_message_bytes)
    if ready is not None and not ready.done():
        ready.set_result(running.port)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stopping.set)
    # Only a signal (or the caller's cancel) ends the server: a task parked in grpc's
    # wait_for_termination() and then cancelled cancels the shutdown future that stop() awaits.
    try:
        await stopping.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)
        await running.stop()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hyperbroker tee-serve", formatter_class=options.HelpFormatter,
        description="Serve trusted applications to hyperbroker's OP-TEE proxy (TEE-backend gRPC).")
    parser.add_argument("--listen", default="127.0.0.1:50061",
                        help="host:port to listen on, port 0 for any")
    parser.add_argument("--state-dir", type=Path, required=True,
                        help="master sealing key and the TAs' persistent objects")
    parser.add_argument("--tls-cert", help="PEM certificate of this service (mTLS)")
    parser.add_argument("--tls-key", help="PEM private key of this service (mTLS)")
    parser.add_argument("--tls-ca", help="PEM CA that signs the proxies' client certificates")
    parser.add_argument("--max-sessions-per-vm", type=int, default=DEFAULT_MAX_SESSIONS_PER_VM,
                        help="sessions one VM may hold open at once")
    parser.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES,
                        help="largest OP-TEE message accepted")
    parser.add_argument("--metrics-port", type=int,
                        help="serve Prometheus metrics on this port (0: any free one, printed)")
    parser.add_argument("--log-level", default="INFO", type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log threshold")
    parser.add_argument("--log-format", default="text", choices=logformat.FORMATS,
                        help="json: one object per line, for log collectors")
    parser.add_argument("--config", metavar="FILE",
                        help="TOML file of settings, the flags' names as keys; a flag or a "
                             "HYPERBROKER_* variable wins over it")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `hyperbroker tee-serve`; prints 'listening on HOST:PORT' once ready."""
    try:
        opts = options.parse(build_parser(), sys.argv[1:] if argv is None else argv)
    except options.OptionError as e:
        print(f"hyperbroker tee-serve: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the --config file
        print(f"hyperbroker tee-serve: --config: {e.strerror}: {e.filename}", file=sys.stderr)
        return 2
    logformat.configure(opts.log_level, opts.log_format)
    try:
        tls = TlsFiles.from_args(opts.tls_cert, opts.tls_key, opts.tls_ca)
    except ValueError as e:
        print(f"hyperbroker tee-serve: {e}", file=sys.stderr)
        return 2
    host = opts.listen.rpartition(":")[0] or "0.0.0.0"

    async def run() -> None:
        metrics_port = None
        if opts.metrics_port is not None:
            metrics_port = serve_metrics(f":{opts.metrics_port}", metrics.TEE_SERVICE)
        ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(serve(opts.listen, opts.state_dir, tls=tls,
                                           max_sessions_per_vm=opts.max_sessions_per_vm,
                                           max_message_bytes=opts.max_message_bytes,
                                           ready=ready))
        await asyncio.wait((task, ready), return_when=asyncio.FIRST_COMPLETED)
        if ready.done():
            print(f"listening on {host}:{ready.result()}"
                  + (f" metrics on :{metrics_port}" if metrics_port is not None else ""),
                  flush=True)
        await task

    try:
        asyncio.run(run())
    except CannotListen as e:
        print(f"hyperbroker tee-serve: {e}; stop whatever holds it or give another address",
              file=sys.stderr)
        return 2
    except OSError as e:  # the state directory: a configuration error when it names a file
        print(f"hyperbroker tee-serve: {e}", file=sys.stderr)
        return 2 if e.filename else 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The broker process: start, serve, and on SIGTERM drain in-flight calls and stop.

Order on the way up: store, policy, dispatcher, gRPC services (Broker, Admin, health,
reflection), metrics endpoint. On the way down: health NOT_SERVING, no new streams, a Drain
frame to every agent, in-flight handlers finish (bounded by the grace period), pending results
and state are flushed, the server stops, handlers close, the store closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from hyperbroker.broker.dispatch import Dispatcher
from hyperbroker.broker.metrics import BROKER
from hyperbroker.broker.peers import MalformedRequests
from hyperbroker.broker.policy import PolicyError, PolicyInvalid
from hyperbroker.broker.policy_versions import PolicyRegistry
from hyperbroker.broker.security import AdminAuthorizer, AdminConfig, HostIdentity
from hyperbroker.broker.service import AdminService, BrokerService
from hyperbroker.broker.store import Store, StoreUnavailable, StoreUrlError, open_store
from hyperbroker.handlers.api import HANDLER_METRICS, discover_plugins
from hyperbroker.runtime import loglimit, metrics
from hyperbroker.runtime.net import add_grpc_port, split_hostport
from hyperbroker.runtime.tls import ReloadingServerCredentials, TlsConfigError, TlsFiles
from hyperbroker.wire.v1 import admin_pb2, admin_pb2_grpc, broker_pb2, broker_pb2_grpc

log = logging.getLogger("hyperbroker.broker")

KEEPALIVE_TIME_MS = 20_000
KEEPALIVE_TIMEOUT_MS = 10_000
KEEPALIVE_S = (KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS) / 1000

SERVICE_NAMES = (
    broker_pb2.DESCRIPTOR.services_by_name["Broker"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
)


@dataclass(frozen=True)
class BrokerConfig:
    listen: str = "127.0.0.1:50051"
    policy_path: Path | None = None
    store: str = "memory://"  # a store URL (broker.store.open_store)
    store_password: str | None = None
    lease_ttl_s: float = 30.0  # a host's lease lapses this long after its last renewal
    metrics_listen: str | None = None
    tls: TlsFiles | None = None
    drain_grace_s: float = 5.0
    reuse_port: bool = False
    health_listen: str | None = None  # a plaintext port serving only grpc.health.v1
    vm_rate: float = 0.0  # calls per second per VM handed to handlers; 0: no limit
    vm_burst: float = 0.0  # bucket size; 0: one second's worth
    fair_queue: bool = True  # over the rate, calls wait their turn (False: fall back at once)
    host_expiry_s: float = 600.0  # a host away this long is gone: its VMs are cleaned up
    # After a new agent process for a host says hello, its VMMs have this long to register
    # again what still runs; the host's other VMs are then cleaned up.
    reregister_grace_s: float = 60.0
    housekeeping_s: float = 2.0  # how often to look for newer policies and expired hosts
    admin: AdminConfig = field(default_factory=AdminConfig)  # who may call Admin (security)
    spiffe_template: str | None = None  # hosts are proved by this URI SAN, not a DNS SAN


class BrokerServer:
    def __init__(self, config: BrokerConfig) -> None:
        self.config = config
        self.store: Store = open_store(config.store, password=config.store_password)
        self.policies = PolicyRegistry(self.store, discover_plugins())
        # Unique per process: a restarted broker is a new lease holder, never the old one.
        self.broker_id = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"
        self.dispatcher = Dispatcher(self.store, self.policies, vm_rate=config.vm_rate,
                                     vm_burst=config.vm_burst,
                                     fair_queue=config.fair_queue,
                                     reregister_grace_s=config.reregister_grace_s,
                                     broker_id=self.broker_id, lease_ttl_s=config.lease_ttl_s)
        tls = config.tls
        self.admin_auth = AdminAuthorizer(config.admin, tls=tls is not None,
                                          agent_ca=tls.ca if tls else None)
        # Keepalive pings find a dead peer within KEEPALIVE_S; a stream silent that long may be
        # taken over by a hello that proves the same host.
        self.broker_service = BrokerService(
            self.dispatcher, self.broker_id,
            identity=HostIdentity(config.spiffe_template) if tls is not None else None,
            takeover_after_s=KEEPALIVE_S)
        self.health = health.aio.HealthServicer()
        # Who may call Admin first, then what does not decode is refused (broker.peers).
        self.server = grpc.aio.server(interceptors=[self.admin_auth, MalformedRequests()],
                                      options=[
            ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.so_reuseport", 1 if config.reuse_port else 0),
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        ])
        broker_pb2_grpc.add_BrokerServicer_to_server(self.broker_service, self.server)
        admin_pb2_grpc.add_AdminServicer_to_server(AdminService(self.dispatcher), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self.credentials: ReloadingServerCredentials | None = None
        if tls is not None:
            # Client certificates chain to the agents' CA or the admin CA; which one, and what
            # that allows, is checked per call (broker.security).
            self.credentials = ReloadingServerCredentials(
                tls, (config.admin.ca,) if config.admin.ca else ())
        self.port = add_grpc_port(self.server, config.listen, "--listen",
                                  self.credentials.credentials() if self.credentials else None)
        # Kubernetes' gRPC probes speak plaintext only: under mTLS, health (and only health) can
        # be served on a port of its own. The same servicer, so draining shows there too.
        self.health_server: grpc.aio.Server | None = None
        if config.health_listen:
            self.health_server = grpc.aio.server(interceptors=[MalformedRequests()], options=[
                ("grpc.so_reuseport", 1 if config.reuse_port else 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            add_grpc_port(self.health_server, config.health_listen, "--health-listen")
        self.metrics_port: int | None = None
        self._stop = asyncio.Event()

    async def load_policy(self) -> None:
        """The policy to serve: --policy (stored as a new version unless it is the newest), or
        the newest stored version. Raises PolicyInvalid."""
        if self.config.policy_path is not None:
            await self.policies.apply(self.config.policy_path.read_text())
        elif await self.policies.resume_latest() is None:
            raise PolicyInvalid([PolicyError(
                "no policy: give --policy FILE (the store holds none yet)", "", ())])

    async def start(self) -> None:
        await self.server.start()
        if self.health_server is not None:
            await self.health_server.start()
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.config.metrics_listen:
            self.metrics_port = metrics.serve(self.config.metrics_listen, BROKER, HANDLER_METRICS)
        host, _ = split_hostport(self.config.listen)
        pv = self.policies.current
        assert pv is not None
        print(self.admin_auth.describe(), flush=True)
        print(f"hyperbroker broker listening on {host}:{self.port} policy v{pv.version}"
              + (f" metrics on :{self.metrics_port}" if self.metrics_port else ""), flush=True)

    def stop(self) -> None:
        self._stop.set()

    async def housekeeping(self) -> None:
        """Pick up policy versions other broker processes stored; forget hosts gone for good."""
        while True:
            await asyncio.sleep(self.config.housekeeping_s)
            try:
                await self.dispatcher.renew_leases()
                pv = await self.policies.refresh()
                if pv is not None:
                    for session in self.dispatcher.hosts.values():
                        session.queue_policy(pv.compiled)
                await self.dispatcher.expire_hosts(self.config.host_expiry_s)
                await self.dispatcher.sweep_orphans(self.config.host_expiry_s)
            except Exception:
                log.exception("housekeeping failed; retrying")

    async def wait_and_drain(self) -> None:
        await self._stop.wait()
        log.info("draining: no new streams, finishing in-flight calls")
        await self.health.enter_graceful_shutdown()
        self.broker_service.drain()
        await self.dispatcher.drain(self.config.drain_grace_s)
        for session in self.dispatcher.hosts.values():
            session.wake()
        await asyncio.sleep(0.05)  # let the writers send the last results and the drain frame
        await self.server.stop(grace=1.0)
        if self.health_server is not None:
            await self.health_server.stop(grace=None)
        for handler in self.policies.all_handlers():
            try:
                await handler.close()
            except Exception:
                log.exception("handler %s failed to close", handler.plugin)
        for session in list(self.dispatcher.hosts.values()):
            await self.dispatcher.flush_quietly(session)
            if session.lease is not None:  # whoever the agent reaches next takes over at once
                with contextlib.suppress(StoreUnavailable):
                    await self.store.release_lease(session.lease)
        await self.store.close()
        loglimit.SHARED.flush()  # what the log limiter held back since its last summaries
        log.info("stopped")


async def serve(config: BrokerConfig) -> int:
    try:
        server = BrokerServer(config)
    except (StoreUrlError, TlsConfigError) as e:
        print(f"hyperbroker serve: {e}", file=sys.stderr)
        return 2
    try:
        await server.load_policy()
    except PolicyInvalid as e:
        print(f"hyperbroker serve: policy refused:\n{e}", file=sys.stderr)
        await server.store.close()
        return 2
    except StoreUnavailable as e:
        print(f"hyperbroker serve: the store at {config.store} cannot be reached: {e}",
              file=sys.stderr)
        await server.store.close()
        return 1
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.stop)
    if server.credentials is not None:  # the files are also read again whenever they change
        loop.add_signal_handler(signal.SIGHUP, server.credentials.reload)
    await server.start()
    housekeeping = asyncio.create_task(server.housekeeping())
    await server.wait_and_drain()
    housekeeping.cancel()
    return 0

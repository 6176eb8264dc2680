"""The gRPC services: Broker (one bidi stream per agent) and Admin (operators).

Connect reads frames and hands their contents to the Dispatcher; a writer task per stream sends
what the dispatcher queued for that host, one frame per batch. The first frame each way is the
hello / welcome. Under mTLS the host an agent claims must be proved by its certificate
(broker.security.HostIdentity); a host has one live stream, and a second hello takes it over only
when TLS proves the host and the old stream has been silent past a keepalive. Who may call Admin
is decided apart from all this, by broker.security.AdminAuthorizer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import statistics
import time
from collections.abc import AsyncIterator

import grpc

from hyperbroker.broker import metrics, peers
from hyperbroker.broker.dispatch import CallCtx, Dispatcher, HostSession
from hyperbroker.broker.peers import Undecodable, host_peer, peer_of, refuse
from hyperbroker.broker.policy import Policy, PolicyInvalid, to_json
from hyperbroker.broker.policy_versions import off_loop
from hyperbroker.broker.security import HostIdentity, peer_sans
from hyperbroker.broker.store import Fenced, StoreUnavailable
from hyperbroker.runtime.net import host_id_problem
from hyperbroker.wire import views
from hyperbroker.wire.v1 import admin_pb2, admin_pb2_grpc, broker_pb2, broker_pb2_grpc

log = logging.getLogger("hyperbroker.broker")

PROTOCOL_VERSION = 1
MAX_POLICY_VERSION = (1 << 63) - 1  # stores keep versions as signed 64-bit integers
MAX_BATCH = 1024
CALLS_FIELD = broker_pb2.AgentFrame.CALLS_FIELD_NUMBER


class StreamWriter:
    def __init__(self, context: grpc.aio.ServicerContext[broker_pb2.AgentFrame,
                                                         broker_pb2.BrokerFrame]) -> None:
        self._context = context

    async def write(self, frame: broker_pb2.BrokerFrame) -> None:
        await self._context.write(frame)


class BrokerService(broker_pb2_grpc.BrokerServicer):
    CLOSING_WAIT_S = 3.0
    def __init__(self, dispatcher: Dispatcher, broker_id: str, *,
                 identity: HostIdentity | None, takeover_after_s: float = 30.0) -> None:
        self.dispatcher = dispatcher
        self.broker_id = broker_id
        self.identity = identity  # None: no TLS, so nothing proves a host
        # A stream silent this long (gRPC keepalive time plus its timeout) may be taken over
        # by a hello whose certificate proves the same host.
        self.takeover_after_s = takeover_after_s
        self.draining = False

    async def Connect(
        self,
        request_iterator: AsyncIterator[broker_pb2.AgentFrame],
        context: grpc.aio.ServicerContext[broker_pb2.AgentFrame, broker_pb2.BrokerFrame],
    ) -> None:
        first = await context.read()
        if first is grpc.aio.EOF:
            return
        if isinstance(first, Undecodable):
            await refuse(context, "undecodable", "Broker.Connect: a %d-byte first frame that is "
                         "not an AgentFrame: %s", first.size, first.error)
        assert isinstance(first, broker_pb2.AgentFrame)
        if not first.HasField("hello"):
            await refuse(context, "no_hello", "the first frame of a stream must carry AgentHello")
        hello = first.hello
        if hello.protocol != PROTOCOL_VERSION:
            await refuse(context, "bad_hello", "agent protocol %d, broker speaks %d",
                         hello.protocol, PROTOCOL_VERSION,
                         code=grpc.StatusCode.FAILED_PRECONDITION)
        problem = host_id_problem(hello.host)
        if problem:
            await refuse(context, "bad_hello", "AgentHello.host: %s", problem)
        if self.identity is not None:
            dns, uris = peer_sans(context)
            if not self.identity.proves(hello.host, dns, uris):
                peers.log.warning(peer_of(context.peer()), "claims host %r; its certificate "
                                  "has DNS %s URI %s", hello.host, sorted(dns), sorted(uris))
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"certificate does not prove host {hello.host!r}: it needs exactly the "
                    f"{self.identity.expected(hello.host)}")
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "broker is draining")
        policies = self.dispatcher.policies
        assert policies.current is not None
        old = self.dispatcher.hosts.get(hello.host)
        if old is not None and old.writer is not None:
            # An agent that just dropped its stream and redialled may be here before the old
            # stream's end: give that end a moment to arrive.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(old.detached.wait(), self.CLOSING_WAIT_S)
        had_stream = old is not None and old.writer is not None
        if old is not None and had_stream:
            silent = time.monotonic() - old.last_read
            if self.identity is None or silent < self.takeover_after_s:
                why = ("without TLS nothing proves it is the same host" if self.identity is None
                       else f"it was heard from {silent:.1f} s ago (under "
                            f"{self.takeover_after_s:g} s)")
                peers.log.warning(peer_of(context.peer()), "refused a second stream for host %s "
                                  "while the one from %s is alive: %s", hello.host, old.peer,
                                  why)
                await context.abort(grpc.StatusCode.ALREADY_EXISTS,
                                    f"host {hello.host!r} already has a live stream; {why}")
        try:
            session = await self.dispatcher.claim(hello.host)
        except (Fenced, StoreUnavailable) as e:
            peers.log.error(host_peer(hello.host), "cannot take its lease: %s", e)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"broker store: {e}")
        await context.write(broker_pb2.BrokerFrame(welcome=broker_pb2.BrokerWelcome(
            broker_id=self.broker_id, protocol=PROTOCOL_VERSION,
            policy=policies.current.compiled, max_batch=MAX_BATCH)))
        if had_stream:
            peers.log.warning(host_peer(hello.host), "its certificate proves it and its "
                              "previous stream was silent past a keepalive: the new stream "
                              "takes over")
        if hello.reconcile and hello.resumed:
            # The same agent process: it knows exactly which of its VMs still run.
            self.dispatcher.reconcile(session, {v.vm_id: v.incarnation for v in hello.live_vms})
        elif hello.reconcile:
            self.dispatcher.adopt(session)  # a new agent process: its VMMs register again
        writer = StreamWriter(context)
        session.attach(writer, context.peer())
        metrics.AGENTS_CONNECTED.inc()
        log.info("agent for host %s connected from %s (resumed=%s, lease epoch %d)",
                 hello.host, context.peer(), hello.resumed,
                 session.lease.epoch if session.lease else 0)
        flush = self.dispatcher.flush
        writer_task = asyncio.create_task(session.run_writer(writer, flush))
        stream_task = asyncio.current_task()
        assert stream_task is not None
        lost: list[str] = []

        def end_stream(why: str) -> None:  # the host is lost here: end this stream now
            lost.append(why)
            if asyncio.current_task() is not stream_task:  # else its own except ends it
                stream_task.cancel()

        session.on_abandon = end_stream
        try:
            while True:
                frame = await context.read()
                if frame is grpc.aio.EOF:
                    break
                if isinstance(frame, Undecodable):
                    # The stream cannot be trusted to be in step any more: end it (the agent
                    # reconnects and re-sends what is in flight).
                    await refuse(context, "undecodable", "a %d-byte frame that is not an "
                                 "AgentFrame (%s); ending the stream", frame.size, frame.error,
                                 peer=host_peer(hello.host))
                assert isinstance(frame, broker_pb2.AgentFrame)
                session.last_read = time.monotonic()
                present = frame.ListFields()
                session.reading = True
                try:
                    if len(present) == 1 and present[0][0].number == CALLS_FIELD:
                        # Most frames carry calls alone: skip looking at every other field.
                        self.dispatcher.on_calls(session, present[0][1], time.monotonic_ns())
                        metrics.FRAMES_IN.inc()
                    else:
                        await self.on_frame(session, frame)
                finally:
                    session.reading = False
                if session.writing:
                    pass  # the writer loops until nothing is pending
                elif session.batch:
                    # Results wait for a commit: the writer task waits it out while this
                    # reader goes on dispatching, and its next commit takes everything that
                    # finished meanwhile (at 64 in flight, 2-5x the calls/s of committing here).
                    session.wake()
                else:
                    await session.write_pending(writer, flush)
                if writer_task.done():
                    break  # the stream cannot be written any more
        except (Fenced, StoreUnavailable) as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"broker lost host {hello.host}: {e}")
        except asyncio.CancelledError:
            if not lost:
                raise
            # Cancelled by end_stream: a cancelled servicer sends no status and its client
            # would wait forever, so end the RPC with one (the agent reconnects).
            stream_task.uncancel()
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"broker lost host {hello.host}: {lost[0]}")
        finally:
            if session.on_abandon is end_stream:
                session.on_abandon = None
            session.detach(writer)
            writer_task.cancel()
            metrics.AGENTS_CONNECTED.dec()
            log.info("agent stream for host %s closed", hello.host)

    async def on_frame(self, session: HostSession, frame: broker_pb2.AgentFrame) -> None:
        t_frame = time.monotonic_ns()
        metrics.FRAMES_IN.inc()
        dispatcher = self.dispatcher
        for reg in frame.vms_registered:
            await dispatcher.register_vm(session, reg)
        for gone in frame.vms_destroyed:
            dispatcher.destroy_vm(session, gone.vm_id)
        for reply in frame.memory_replies:
            session.memory_reply(reply)
        for ref in frame.divergent:
            dispatcher.divergent(session, ref.vm_id, ref.vcpu, ref.seq)
        for reset in frame.vms_reset:
            dispatcher.reset_vm(session, reset.vm_id, reset.request_id)
        if frame.HasField("keepalive"):
            session.queue_keepalive(frame.keepalive.sent_ns)
        for report in frame.filter_reports:
            failed = [e for e in report.errnos if e]
            if failed:
                peers.log.error(host_peer(session.host), "vm %d: the kernel refused filter "
                                "records: errnos %s", report.vm_id, list(report.errnos))
        if frame.calls:
            dispatcher.on_calls(session, frame.calls, t_frame)

    def drain(self) -> None:
        self.draining = True
        for session in self.dispatcher.hosts.values():
            if session.writer is not None:
                session.queue_drain("broker stopping")


async def _rendered(policy: Policy) -> str:
    """The compiled policy as JSON, rendered off the event loop (a policy may have many rules)."""
    return await off_loop(lambda: json.dumps(to_json(policy)))


class AdminService(admin_pb2_grpc.AdminServicer):
    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher

    async def _report(self, text: str, apply: bool) -> admin_pb2.PolicyReport:
        policies = self.dispatcher.policies
        try:
            if apply:
                pv = await policies.apply(text)
                for session in self.dispatcher.hosts.values():
                    session.queue_policy(pv.compiled)
                return admin_pb2.PolicyReport(ok=True, version=pv.version,
                                              compiled_json=await _rendered(pv.policy))
            policy = await policies.validate(text)
            return admin_pb2.PolicyReport(ok=True, compiled_json=await _rendered(policy))
        except PolicyInvalid as e:
            return admin_pb2.PolicyReport(ok=False, errors=[
                admin_pb2.PolicyError(message=err.message, errno_name=err.errno_name,
                                      rules=list(err.rules)) for err in e.errors])

    async def ValidatePolicy(self, request: admin_pb2.PolicyText,
                             context: grpc.aio.ServicerContext[object, object]
                             ) -> admin_pb2.PolicyReport:
        return await self._report(request.yaml, apply=False)

    async def ApplyPolicy(self, request: admin_pb2.PolicyText,
                          context: grpc.aio.ServicerContext[object, object]
                          ) -> admin_pb2.PolicyReport:
        return await self._report(request.yaml, apply=True)

    async def GetPolicy(self, request: admin_pb2.GetPolicyRequest,
                        context: grpc.aio.ServicerContext[object, object]) -> admin_pb2.PolicyText:
        policies = self.dispatcher.policies
        if request.version > MAX_POLICY_VERSION:
            await refuse(context, "bad_request", "Admin.GetPolicy: version %d is out of range "
                         "(1..%d)", request.version, MAX_POLICY_VERSION)
        version = request.version or (policies.current.version if policies.current else 0)
        stored = await self.dispatcher.store.get_policy(version)
        if stored is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no policy version {version}")
        assert stored is not None
        return admin_pb2.PolicyText(yaml=stored.text, version=stored.version)

    async def ListHosts(self, request: admin_pb2.ListHostsRequest,
                        context: grpc.aio.ServicerContext[object, object]
                        ) -> admin_pb2.ListHostsResponse:
        return admin_pb2.ListHostsResponse(hosts=[
            admin_pb2.HostInfo(host=s.host, connected=s.writer is not None, vms=len(s.vms),
                               calls=s.calls, peer=s.peer,
                               connected_since_unix_ns=s.connected_since_ns)
            for s in sorted(self.dispatcher.hosts.values(), key=lambda s: s.host)])

    async def ListVms(self, request: admin_pb2.ListVmsRequest,
                      context: grpc.aio.ServicerContext[object, object]
                      ) -> admin_pb2.ListVmsResponse:
        out = []
        for s in sorted(self.dispatcher.hosts.values(), key=lambda s: s.host):
            if request.host and s.host != request.host:
                continue
            for vm in sorted(s.vms.values(), key=lambda v: v.name):
                out.append(admin_pb2.VmInfo(
                    host=s.host, name=vm.name, vm_id=vm.vm_id, profile=vm.profile,
                    policy_version=vm.pv.version, nr_vcpus=vm.nr_vcpus, calls=vm.calls,
                    connected=s.writer is not None,
                    vcpus=[admin_pb2.VcpuInfo(vcpu=i, last_seq=max(r.last_seq, 0),
                                              calls=r.calls, in_flight=r.in_flight_seq >= 0)
                           for i, r in enumerate(vm.vcpus)]))
        return admin_pb2.ListVmsResponse(vms=out)

    async def GetVmHandlerView(
            self, request: admin_pb2.VmHandlerViewRequest,
            context: grpc.aio.ServicerContext[object, object]) -> admin_pb2.VmHandlerView:
        session = self.dispatcher.hosts.get(request.host)
        vm = next((v for v in session.vms.values() if v.name == request.vm), None) if session \
            else None
        if session is None or vm is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"no VM {request.vm!r} on host {request.host!r}")
        assert session is not None and vm is not None
        handler = vm.pv.policy.handlers.get(request.handler)
        if handler is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"policy v{vm.pv.version} has no handler {request.handler!r} "
                                f"(has {sorted(vm.pv.policy.handlers)})")
        assert handler is not None
        view = handler.admin_view(CallCtx(self.dispatcher, session, vm, request.handler))
        return admin_pb2.VmHandlerView(view=views.to_struct(view), policy_version=vm.pv.version)

    async def GetStats(self, request: admin_pb2.GetStatsRequest,
                       context: grpc.aio.ServicerContext[object, object]) -> admin_pb2.Stats:
        d = self.dispatcher
        functions = []
        for (handler, function, outcome), window in sorted(d.recent.items()):
            samples = sorted(window)
            if not samples:
                continue
            functions.append(admin_pb2.FunctionStats(
                handler=handler, function=function, outcome=outcome, calls=len(samples),
                p50_us=statistics.median(samples) * 1e6,
                p99_us=samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1e6))
        return admin_pb2.Stats(
            calls=d.calls, duplicates=d.duplicates, handler_errors=d.handler_errors,
            agents=sum(1 for s in d.hosts.values() if s.writer is not None),
            vms=sum(len(s.vms) for s in d.hosts.values()), functions=functions,
            policy_version=d.policies.current.version if d.policies.current else 0)


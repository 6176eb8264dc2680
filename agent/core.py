"""The agent: every VM on this host, their calls in flight, and who answers each one.

A call from a VMM is answered by the agent itself when the compiled policy has a static answer
for it, otherwise forwarded to the broker with a deadline; when the deadline passes first, the
VMM gets the rule's fallback and the vCPU runs on. Results from the broker are matched to the
waiting (VM, vCPU, seq), their guest-memory writes applied, and sent back to the VMM with the
latency breakdown. Guest-memory reads the broker asks for are served from the agent's mappings
(SEQPACKET VMMs) or relayed to the VMM (STREAM VMMs), always within the VM's declared regions.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import struct
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hyperbroker.agent import metrics
from hyperbroker.agent.compiled_policy import AgentPolicy
from hyperbroker.agent.link import BrokerLink
from hyperbroker.agent.memory import MappedRam, MemoryAccessError, RegionMap, close_fds
from hyperbroker.agent.resets import Resets
from hyperbroker.agent.vmm import VmmConnection, VmmListener
from hyperbroker.agent.vms import AgentVm, Pending, registration_error
from hyperbroker.calls import Outcome
from hyperbroker.kvm import errno_name
from hyperbroker.runtime.busypoll import BusyPoll
from hyperbroker.runtime.loglimit import PeerLog
from hyperbroker.runtime.tls import TlsFiles
from hyperbroker.wire import vmm as proto
from hyperbroker.wire.v1 import broker_pb2

log = logging.getLogger("hyperbroker.agent")
# Lines a VMM (or its guest) can cause, each within its VMM's log budget (runtime.loglimit).
vmm_log = PeerLog(log)

CALL_FRAME_SIZE = proto.HEADER.size + proto.CALL.size
CALL_KEY = struct.Struct("<IIQI")  # vm_id, vcpu, seq, function_id: the head of struct hb_call
RESULT_SIZE = proto.RESULT.size
RESULT_KEY = struct.Struct("<IIQ")  # vm_id, vcpu, seq: the head of struct hb_result
NR_ACTIONS = struct.Struct("<I")
OUTCOME_OFFSET = proto.RESULT_OUTCOME_OFFSET
AGENT_TIMES_OFFSET = proto.RESULT_TIMING_OFFSET  # timing.agent_ns, timing.link_ns
AGENT_TIMES = struct.Struct("<QQ")
BROKER_TIMES_OFFSET = proto.RESULT_BROKER_TIMES_OFFSET  # broker_queue_ns, handler_ns
BROKER_TIMES = struct.Struct("<QQ")
NR_ACTIONS_OFFSET = proto.RESULT_NR_ACTIONS_OFFSET
CALL_PREFIX = proto.HEADER.pack(proto.MAGIC, proto.VERSION, proto.MsgType.CALL,
                                proto.CALL.size, 0)[:12]
LINK_DOWN_GRACE_S = 0.5  # a stream down longer than this is an outage, not a reconnect
REGISTER_WAIT_S = 10.0
OUTCOME_LABELS = metrics.OUTCOMES


@dataclass(frozen=True)
class AgentConfig:
    broker: str
    host_id: str
    socket_path: Path | None = None
    stream_socket_path: Path | None = None
    metrics_listen: str | None = None
    tls: TlsFiles | None = None
    busy_poll_us: float = 0.0  # hyperbroker.runtime.busypoll; 0: sleep whenever idle
    keepalive_s: float = 2.0  # BrokerLink: the stream's own liveness check
    silence_s: float = 8.0


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.link = BrokerLink(self, config.broker, config.host_id, config.tls,
                               keepalive_s=config.keepalive_s, silence_s=config.silence_s)
        self.policies: dict[int, AgentPolicy] = {}
        self.policy: AgentPolicy | None = None
        self._policy_ready = asyncio.Event()
        self.vms: dict[int, AgentVm] = {}
        self.names: dict[str, int] = {}
        self._next_vm_id = 1
        self.listeners: list[VmmListener] = []
        self.connections: set[VmmConnection] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        metrics.IN_FLIGHT.set_function(lambda: sum(
            p is not None for vm in self.vms.values() for p in vm.pending))
        self._loop = asyncio.get_running_loop()
        # After each call from a VMM and each frame from the broker: docs/performance.md.
        self.poll = BusyPoll(self._loop, config.busy_poll_us)
        self.resets = Resets(self._loop, self.link)

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        if self.config.socket_path:
            self.listeners.append(VmmListener(self.config.socket_path, True, self.on_frame,
                                              self.connections.add, self.on_conn_closed))
        if self.config.stream_socket_path:
            self.listeners.append(VmmListener(self.config.stream_socket_path, False,
                                              self.on_frame, self.connections.add,
                                              self.on_conn_closed))
        self._spawn(self.link.run())

    async def stop(self) -> None:
        for listener in self.listeners:
            listener.close()
        for conn in list(self.connections):
            conn.close()
        await self.link.close()
        for task in list(self._tasks):
            task.cancel()

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- broker link callbacks -----------------------------------------------------------
    @property
    def policy_version(self) -> int:
        return self.policy.version if self.policy else 0

    def on_welcome(self, welcome: broker_pb2.BrokerWelcome) -> None:
        self._install_policy(welcome.policy)

    def _install_policy(self, pb: broker_pb2.CompiledPolicy) -> None:
        if pb.version not in self.policies:
            self.policies[pb.version] = AgentPolicy(pb)
        if self.policy is None or pb.version >= self.policy.version:
            self.policy = self.policies[pb.version]
            log.info("policy v%d current (%d profiles)", pb.version, len(pb.profiles))
        self._policy_ready.set()

    def live_vms(self) -> list[broker_pb2.VmRef]:
        """Every VM of this host now, for the broker to reconcile its view with (AgentHello)."""
        return [broker_pb2.VmRef(vm_id=vm.vm_id, incarnation=vm.incarnation)
                for vm in self.vms.values()]

    def replay(self, frame: broker_pb2.AgentFrame, calls: list[bytes]) -> None:
        """After (re)connecting: every live VM, then every call still waiting. A broker's
        rejection was that broker's: the one now answering decides again."""
        for vm in self.vms.values():
            if vm.rejected_by == "broker":
                vm.rejected = vm.rejected_by = None
            frame.vms_registered.append(vm.registration())
        for vm in self.vms.values():
            for p in vm.pending:
                if p is not None:
                    p.t_sent = time.monotonic_ns()
                    calls.append(p.record)

    def on_broker_frame(self, frame: broker_pb2.BrokerFrame) -> None:
        now = time.monotonic_ns()
        self.poll.kick()
        # Rejections first: results in the same frame for a VM the broker does not know (its
        # replayed calls) are DENIED; the guest gets its rules' fallbacks instead.
        for rej in frame.vms_rejected:
            vm = self.vms.get(rej.vm_id)
            if vm is not None:
                vmm_log.error(vm.conn.peer, "broker rejected vm %s: %s", vm.name, rej.reason)
                self._reject(vm, "broker", rej.reason)
        blob = frame.results
        if blob:
            writes = ({(w.vm_id, w.vcpu, w.seq): w for w in frame.memory_writes}
                      if frame.memory_writes else None)
            off, size = 0, len(blob)
            while off + RESULT_SIZE <= size:
                vm_id, vcpu, seq = RESULT_KEY.unpack_from(blob, off)
                (nr_actions,) = NR_ACTIONS.unpack_from(blob, off + NR_ACTIONS_OFFSET)
                end = off + RESULT_SIZE + nr_actions * proto.ACTION.size
                if end > size:
                    log.error("broker frame has a truncated result record; dropped")
                    break
                self.on_result(blob[off:end], vm_id, vcpu, seq,
                               writes.get((vm_id, vcpu, seq)) if writes else None, now)
                off = end
        for req in frame.memory_requests:
            self.on_memory_request(req)
        for request_id in frame.resets_done:
            self.resets.done(request_id, 0)
        if frame.HasField("policy"):
            self._install_policy(frame.policy)
        self.link.flush_soon()

    # ---- VMM connections -----------------------------------------------------------------
    def on_conn_closed(self, conn: VmmConnection) -> None:
        self.connections.discard(conn)
        for vm_id in list(conn.vm_ids):
            self.destroy_vm(vm_id, "VMM connection closed")

    def on_frame(self, conn: VmmConnection, data: bytes, fds: list[int]) -> None:
        if len(data) == CALL_FRAME_SIZE and data[:12] == CALL_PREFIX and not fds:
            vm_id, vcpu, seq, fid = CALL_KEY.unpack_from(data, proto.HEADER.size)
            tag = int.from_bytes(data[12:16], "little")
            self.on_call(conn, tag, vm_id, vcpu, seq, fid, data[proto.HEADER.size:])
            return
        try:
            frame = proto.decode(data)
        except proto.ProtocolError as e:
            close_fds(fds)
            conn.send_error(e.code, e.msg_type, e.tag, str(e))
            return
        msg = frame.message
        if fds and not isinstance(msg, proto.RegisterVm):
            close_fds(fds)
            conn.send_error(errno.EINVAL, frame.type, frame.tag,
                            "file descriptors are only accepted with REGISTER_VM")
            return
        match msg:
            case proto.CallMsg():
                self.on_call(conn, frame.tag, msg.vm_id, msg.vcpu, msg.seq, msg.function_id,
                             data[proto.HEADER.size:])
            case proto.RegisterVm():
                self._spawn(self.register_vm(conn, frame.tag, msg, fds))
            case proto.FilterReport():
                self.on_filter_report(conn, frame.tag, msg)
            case proto.VmReset():
                self.on_vm_reset(conn, frame.tag, msg.vm_id)
            case proto.DestroyVm():
                ok = msg.vm_id in conn.vm_ids
                if ok:
                    self.destroy_vm(msg.vm_id, "destroyed by its VMM")
                conn.send(proto.encode(proto.StatusReply(0 if ok else -errno.ENOENT), frame.tag))
            case proto.MemReadReply():
                fut = conn.mem_waiters.pop(frame.tag, None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
            case proto.Ping():
                conn.send(proto.encode(proto.Pong(), frame.tag))
            case proto.ErrorMsg():
                vmm_log.error(conn.peer, "reports an error for our tag %d (type %#x): %s: %s",
                              frame.tag, msg.refused_type, errno.errorcode.get(msg.code, msg.code),
                              msg.message[:200])
                fut = conn.mem_waiters.pop(frame.tag, None)
                if fut is not None and not fut.done():
                    fut.set_result(proto.MemReadReply(-msg.code, b""))
            case proto.Pong():
                pass
            case _:
                conn.send_error(errno.EBADMSG, frame.type, frame.tag,
                                f"{frame.type.name} is not a message a VMM sends")

    # ---- registration --------------------------------------------------------------------
    async def register_vm(self, conn: VmmConnection, tag: int, reg: proto.RegisterVm,
                          fds: list[int]) -> None:
        def refuse(code: int, message: str) -> None:
            close_fds(fds)
            vmm_log.warning(conn.peer, "refused registration of vm %r: %s", reg.name[:200],
                            message)
            conn.send(proto.encode(proto.RegisterVmReply(-code, 0, 0, (), message), tag))

        bad = registration_error(reg, conn.seqpacket, len(fds))
        if bad is not None:
            return refuse(*bad)
        if self.policy is None:
            try:
                await asyncio.wait_for(self._policy_ready.wait(), REGISTER_WAIT_S)
            except TimeoutError:
                return refuse(errno.EAGAIN, f"no policy from broker {self.config.broker} yet")
        assert self.policy is not None
        policy = self.policy
        profile = policy.profiles.get(reg.profile or "default")
        if profile is None:
            return refuse(errno.ENOENT, f"profile {reg.profile or 'default'!r} is not in "
                                        f"policy v{policy.version} "
                                        f"(has {sorted(policy.profiles)})")
        if reg.name in self.names:
            return refuse(errno.EEXIST, f"a VM named {reg.name!r} is already registered on "
                                        "this host")
        if conn.closed:
            return close_fds(fds)
        try:
            regions = RegionMap(reg.regions)
            ram = MappedRam(regions, fds) if fds else None
        except MemoryAccessError as e:
            return refuse(e.code, str(e))
        finally:
            close_fds(fds)  # the mappings hold their own references
        vm_id = self._next_vm_id
        self._next_vm_id += 1
        vm = AgentVm(vm_id, reg, conn, policy, profile, regions, ram)
        self.vms[vm_id] = vm
        self.names[reg.name] = vm_id
        conn.vm_ids.add(vm_id)
        metrics.VMS.inc()
        if self.link.up:
            self.link.frame.vms_registered.append(vm.registration())
            self.link.mark()
            self.link.flush_soon()
        conn.send(proto.encode(proto.RegisterVmReply(
            0, vm_id, policy.version, profile.filters,
            f"registered {reg.name} under profile {profile.name}"), tag))
        log.info("vm %s registered as %d (%s, profile %s, policy v%d, %d vCPUs)", reg.name,
                 vm_id, conn.mode, profile.name, policy.version, reg.nr_vcpus)

    def on_filter_report(self, conn: VmmConnection, tag: int, msg: proto.FilterReport) -> None:
        vm = self.vms.get(msg.vm_id)
        if vm is None or msg.vm_id not in conn.vm_ids:
            conn.send_error(errno.ENOENT, proto.MsgType.FILTER_REPORT, tag,
                            f"vm_id {msg.vm_id} is not registered on this connection")
            return
        failed = [(f, e) for f, e in zip(vm.profile.filters, msg.errnos, strict=False) if e]
        for f, e in failed:
            vmm_log.error(conn.peer, "vm %s: KVM refused filter [%#x, +%d) action %d: %s",
                          vm.name, f.base, f.nr_functions, f.action, errno_name(e))
        if failed:
            # Its kernel filter is not its profile's: calls meant for the broker may be served
            # by KVM and the broker's view of the VM would be wrong, so none are forwarded.
            self._reject(vm, "filter", f"KVM refused {len(failed)} of its "
                         f"{len(vm.profile.filters)} filter records")
        if self.link.up:
            self.link.frame.filter_reports.add(vm_id=vm.vm_id, errnos=msg.errnos)
            self.link.mark()
            self.link.flush_soon()

    def on_vm_reset(self, conn: VmmConnection, tag: int, vm_id: int) -> None:
        """The VMM reset the VM by itself: calls of the old boot are void, handlers forget it."""
        vm = self.vms.get(vm_id)
        if vm is None or vm_id not in conn.vm_ids:
            conn.send_error(errno.ENOENT, proto.MsgType.VM_RESET, tag,
                            f"vm_id {vm_id} is not registered on this connection")
            return
        vm.drop_pending()  # the reset vCPUs no longer wait for these
        self.resets.ask(conn, tag, vm_id)
        log.info("vm %s reset by its VMM", vm.name)

    def destroy_vm(self, vm_id: int, why: str) -> None:
        vm = self.vms.pop(vm_id, None)
        if vm is None:
            return
        self.names.pop(vm.name, None)
        vm.conn.vm_ids.discard(vm_id)
        vm.drop_pending()
        if vm.ram is not None:
            vm.ram.close()
        metrics.VMS.dec()
        if self.link.up:
            self.link.frame.vms_destroyed.add(vm_id=vm_id)
            self.link.mark()
            self.link.flush_soon()
        log.info("vm %s (%d) gone: %s", vm.name, vm_id, why)

    # ---- calls ---------------------------------------------------------------------------
    def on_call(self, conn: VmmConnection, tag: int, vm_id: int, vcpu: int, seq: int, fid: int,
                record: bytes) -> None:
        t_recv = time.monotonic_ns()
        self.poll.kick()
        vm = self.vms.get(vm_id)
        if vm is None or vm_id not in conn.vm_ids:
            conn.send_error(errno.ENOENT, proto.MsgType.CALL, tag,
                            f"vm_id {vm_id} is not registered on this connection")
            return
        if vcpu >= vm.nr_vcpus:
            conn.send_error(errno.EINVAL, proto.MsgType.CALL, tag,
                            f"vcpu {vcpu} out of range for {vm.name} ({vm.nr_vcpus} vCPUs)")
            return
        waiting = vm.pending[vcpu]
        if waiting is not None:
            conn.send_error(errno.EBUSY, proto.MsgType.CALL, tag,
                            f"vcpu {vcpu} of {vm.name} already has call seq {waiting.seq} in "
                            "flight")
            return
        static = vm.profile.static.get(fid)
        if static is not None:
            regs, mask = static
            self._reply(conn, tag, vm_id, vcpu, seq, Outcome.OK, mask, regs,
                        proto.Timing(agent_ns=time.monotonic_ns() - t_recv,
                                     source=proto.ResultSource.AGENT), t_recv, "agent")
            return
        rule = vm.profile.rule_for(fid)
        p = Pending(vm, conn, tag, vcpu, seq, fid, record, rule, t_recv)
        if vm.rejected is not None:
            metrics.FALLBACK_REJECTED.inc()
            self._fallback(p, Outcome.FALLBACK)
            return
        if self.link.down_for() > LINK_DOWN_GRACE_S:
            # Not a blip: the broker has been unreachable for a while. Waiting out the
            # deadline would only stall the vCPU; answer with the fallback now.
            metrics.FALLBACK_DISCONNECTED.inc()
            self._fallback(p, Outcome.FALLBACK)
            return
        vm.pending[vcpu] = p
        p.timer = self._loop.call_later(rule.deadline_s, self._expire, p)
        link = self.link
        if link.up:
            p.t_sent = t_recv
            link.calls.append(record)
            link.mark()
            link.flush_soon()

    def _expire(self, p: Pending) -> None:
        vm = p.vm
        if vm.pending[p.vcpu] is not p:
            return
        vm.pending[p.vcpu] = None
        (metrics.FALLBACK_DEADLINE if self.link.up else metrics.FALLBACK_DISCONNECTED).inc()
        vmm_log.warning(p.conn.peer, "vm %s vcpu %d: fid %#x seq %d got no answer in %.0f ms: "
                        "fallback (%s)", vm.name, p.vcpu, p.fid, p.seq,
                        p.rule.deadline_s * 1e3,
                        "broker slow" if self.link.up else "broker unreachable")
        self._fallback(p, Outcome.FALLBACK)

    def _reject(self, vm: AgentVm, kind: str, reason: str) -> None:
        """From now on the VM's forwarded calls get their rules' fallbacks, as do those waiting."""
        if vm.rejected is None:
            metrics.VMS_REJECTED[kind].inc()
        if vm.rejected_by != "filter":  # a refused filter stays refused for the VM's life
            vm.rejected, vm.rejected_by = reason, kind
        for p in vm.drop_pending():
            metrics.FALLBACK_REJECTED.inc()
            self._fallback(p, Outcome.FALLBACK)

    def _divergent(self, vm: AgentVm, vcpu: int, seq: int) -> None:
        """Tell the broker the guest got the fallback, not its result: the handler undoes it."""
        metrics.DIVERGENT.inc()
        if self.link.up:
            self.link.frame.divergent.add(vm_id=vm.vm_id, vcpu=vcpu, seq=seq)
            self.link.mark()
            self.link.flush_soon()

    def _fallback(self, p: Pending, outcome: Outcome) -> None:
        rule = p.rule
        if p.t_sent:
            p.vm.fell_back[p.vcpu] = p.seq
        self._reply(p.conn, p.tag, p.vm.vm_id, p.vcpu, p.seq, outcome, rule.fallback_mask,
                    rule.fallback,
                    proto.Timing(agent_ns=time.monotonic_ns() - p.t_recv,
                                 source=proto.ResultSource.FALLBACK), p.t_recv, "fallback")

    def on_result(self, record: bytes, vm_id: int, vcpu: int, seq: int,
                  writes: broker_pb2.ResultWrites | None, now: int) -> None:
        vm = self.vms.get(vm_id)
        p = vm.pending[vcpu] if vm is not None and vcpu < vm.nr_vcpus else None
        if vm is None or p is None or p.seq != seq:
            # Answered by its fallback already, or a duplicate after a reconnect.
            log.debug("late result for vm %d vcpu %d seq %d dropped", vm_id, vcpu, seq)
            if vm is not None and vcpu < vm.nr_vcpus and vm.fell_back[vcpu] == seq:
                vm.fell_back[vcpu] = -1
                self._divergent(vm, vcpu, seq)
            return
        if p.timer is not None:
            p.timer.cancel()
        vm.pending[vcpu] = None
        if writes is not None:
            try:
                vm.apply_writes(writes.writes)
            except MemoryAccessError as e:
                vmm_log.error(vm.conn.peer, "vm %s: broker result for fid %#x carries a bad "
                              "write (%s); fallback", vm.name, p.fid, e)
                self._fallback(p, Outcome.INTERNAL_ERROR)
                self._divergent(vm, vcpu, seq)
                return
        queued_ns, handler_ns = BROKER_TIMES.unpack_from(record, BROKER_TIMES_OFFSET)
        link_ns = max(0, now - p.t_sent - queued_ns - handler_ns)
        metrics.LINK_RTT.observe(link_ns / 1e9)
        out = bytearray(record)
        agent_ns = max(0, time.monotonic_ns() - p.t_recv - (now - p.t_sent))
        AGENT_TIMES.pack_into(out, AGENT_TIMES_OFFSET, agent_ns, link_ns)
        p.conn.send(proto.header(proto.MsgType.RESULT, p.tag, len(out)) + out)
        outcome = record[OUTCOME_OFFSET] if record[OUTCOME_OFFSET] < len(OUTCOME_LABELS) else 4
        metrics.OBSERVE["broker", OUTCOME_LABELS[outcome]]((time.monotonic_ns() - p.t_recv) / 1e9)

    def _reply(self, conn: VmmConnection, tag: int, vm_id: int, vcpu: int, seq: int,
               outcome: Outcome, mask: int, regs: tuple[int, ...], timing: proto.Timing,
               t_recv: int, source: str) -> None:
        """A RESULT the agent makes itself: a static answer or a fallback."""
        payload = proto.pack_result(
            vm_id, vcpu, seq, outcome, mask & proto.ARGS_MASK, regs, timing.agent_ns,
            timing.link_ns, timing.broker_queue_ns, timing.handler_ns, timing.memory_ns,
            timing.memory_round_trips, timing.source)
        conn.send(proto.header(proto.MsgType.RESULT, tag, len(payload)) + payload)
        metrics.OBSERVE[source, OUTCOME_LABELS[outcome]]((time.monotonic_ns() - t_recv) / 1e9)

    # ---- guest memory --------------------------------------------------------------------
    def on_memory_request(self, req: broker_pb2.MemoryRequest) -> None:
        def reply(data: bytes = b"", error: int = 0, message: str = "") -> None:
            if self.link.up:
                self.link.frame.memory_replies.add(request_id=req.request_id, data=data,
                                                   error=error, message=message)
                self.link.mark()
                self.link.flush_soon()

        vm = self.vms.get(req.vm_id)
        if vm is None:
            return reply(error=errno.ENOENT, message=f"vm {req.vm_id} is not on this host")
        try:
            data = vm.read_mapped(req.gpa, req.length)
        except MemoryAccessError as e:
            return reply(error=e.code, message=str(e))
        if data is not None:
            return reply(data)

        async def relay() -> None:
            try:
                reply(await vm.relay_read(req.gpa, req.length))
            except MemoryAccessError as e:
                reply(error=e.code, message=str(e))

        self._spawn(relay())

"""One VM as the agent holds it: its registration, its calls in flight, its guest memory.

Guest memory is reached through the fds the VMM passed at registration (SEQPACKET VMMs, mapped
by agent.memory) or, for STREAM VMMs, by asking the VMM itself with HB_MSG_MEM_READ and
HB_MSG_MEM_WRITE. Every access is checked against the VM's declared regions first.
"""

from __future__ import annotations

import asyncio
import errno
import secrets
from collections.abc import Iterable

from hyperbroker.agent import metrics
from hyperbroker.agent.compiled_policy import AgentPolicy, AgentProfile, RuleView
from hyperbroker.agent.memory import MappedRam, MemoryAccessError, RegionMap
from hyperbroker.agent.vmm import VmmConnection
from hyperbroker.wire import vmm as proto
from hyperbroker.wire.v1 import broker_pb2

MEMORY_RELAY_TIMEOUT_S = 1.5


def registration_error(reg: proto.RegisterVm, seqpacket: bool,
                       nr_fds: int) -> tuple[int, str] | None:
    """(errno, reason) when REGISTER_VM is malformed in itself; None when it may go on."""
    if not reg.name:
        return errno.EINVAL, "the VM name is empty"
    if not 0 < reg.nr_vcpus <= proto.MAX_VCPUS:
        return errno.EINVAL, f"nr_vcpus {reg.nr_vcpus} outside 1..{proto.MAX_VCPUS}"
    if reg.flags & ~(proto.REGISTER_MEM_FDS | proto.REGISTER_BOOT_ID):
        return errno.EINVAL, f"unknown flags {reg.flags:#x}"
    wants_fds = bool(reg.flags & proto.REGISTER_MEM_FDS)
    if wants_fds and not seqpacket:
        return errno.EINVAL, "HB_REGISTER_MEM_FDS needs a SEQPACKET connection"
    if wants_fds != bool(nr_fds):
        return errno.EINVAL, "file descriptors must come exactly with HB_REGISTER_MEM_FDS"
    return None


class Pending:
    __slots__ = ("conn", "fid", "record", "rule", "seq", "t_recv", "t_sent", "tag", "timer",
                 "vcpu", "vm")

    def __init__(self, vm: AgentVm, conn: VmmConnection, tag: int, vcpu: int, seq: int,
                 fid: int, record: bytes, rule: RuleView, t_recv: int) -> None:
        self.vm = vm
        self.conn = conn
        self.tag = tag
        self.vcpu = vcpu
        self.seq = seq
        self.fid = fid
        self.record = record  # the VMM's hb_call record, forwarded as is
        self.rule = rule
        self.t_recv = t_recv
        self.t_sent = 0
        self.timer: asyncio.TimerHandle | None = None


class AgentVm:
    def __init__(self, vm_id: int, reg: proto.RegisterVm, conn: VmmConnection,
                 policy: AgentPolicy, profile: AgentProfile, regions: RegionMap,
                 ram: MappedRam | None) -> None:
        self.vm_id = vm_id
        self.name = reg.name
        self.profile_name = profile.name
        self.profile = profile
        self.policy_version = policy.version
        self.policy_digest = policy.digest
        self.nr_vcpus = reg.nr_vcpus
        self.conn = conn
        self.regions = regions
        self.ram = ram
        self.pending: list[Pending | None] = [None] * reg.nr_vcpus
        # Per vCPU, the seq of the last forwarded call answered with its fallback: a result for
        # it arriving later is one the guest never saw (AgentFrame.divergent).
        self.fell_back: list[int] = [-1] * reg.nr_vcpus
        # This boot's identity at the broker: the VMM's boot ID, so that registering again after
        # an agent restart resumes it; without one every REGISTER_VM is a new boot.
        self.incarnation = reg.boot_id.hex() if reg.boot_id else secrets.token_hex(16)
        self.rejected: str | None = None  # why its forwarded calls get fallbacks, if they do
        self.rejected_by: str | None = None  # "broker" (until the next broker) or "filter"

    def registration(self) -> broker_pb2.VmRegistered:
        return broker_pb2.VmRegistered(
            vm_id=self.vm_id, name=self.name, profile=self.profile_name,
            policy_version=self.policy_version, policy_digest=self.policy_digest,
            nr_vcpus=self.nr_vcpus, incarnation=self.incarnation,
            regions=[broker_pb2.MemoryRegion(gpa=r.gpa, size=r.size,
                                             readonly=bool(r.flags & proto.REGION_READONLY))
                     for r in self.regions.regions])

    def drop_pending(self) -> list[Pending]:
        """Every call still waiting, no longer waiting (deadline timers cancelled)."""
        dropped = [p for p in self.pending if p is not None]
        for p in dropped:
            if p.timer is not None:
                p.timer.cancel()
        self.pending = [None] * len(self.pending)
        return dropped

    # ---- guest memory --------------------------------------------------------------------
    def apply_writes(self, writes: Iterable[broker_pb2.MemoryWrite]) -> None:
        """Every write checked before any is applied; MemoryAccessError names the bad one."""
        items = list(writes)
        for w in items:
            self.regions.locate(w.gpa, len(w.data), write=True)
        for w in items:
            if self.ram is not None:
                self.ram.write(w.gpa, w.data)
            else:
                for off in range(0, len(w.data), proto.MAX_MEM_CHUNK):
                    chunk = w.data[off : off + proto.MAX_MEM_CHUNK]
                    self.conn.send(proto.encode(proto.MemWrite(self.vm_id, w.gpa + off, chunk),
                                                self.conn.next_tag()))
            metrics.MEMORY_WRITE.inc(len(w.data))

    def read_mapped(self, gpa: int, length: int) -> bytes | None:
        """The bytes from the agent's own mapping, or None when only the VMM can serve them."""
        if not 0 < length <= proto.MAX_MEM_CHUNK:
            raise MemoryAccessError(errno.EMSGSIZE, f"reads are 1..{proto.MAX_MEM_CHUNK} bytes")
        self.regions.locate(gpa, length, write=False)
        if self.ram is None:
            return None
        data = self.ram.read(gpa, length)
        metrics.MEMORY_READ.inc(len(data))
        return data

    async def relay_read(self, gpa: int, length: int) -> bytes:
        """A read the VMM serves (HB_MSG_MEM_READ), at most MEMORY_RELAY_TIMEOUT_S."""
        conn = self.conn
        tag = conn.next_tag()
        fut: asyncio.Future[proto.MemReadReply] = asyncio.get_running_loop().create_future()
        conn.mem_waiters[tag] = fut
        conn.send(proto.encode(proto.MemRead(self.vm_id, gpa, length), tag))
        try:
            answer = await asyncio.wait_for(fut, MEMORY_RELAY_TIMEOUT_S)
        except (TimeoutError, ConnectionError) as e:
            conn.mem_waiters.pop(tag, None)
            raise MemoryAccessError(errno.ETIMEDOUT, f"VMM did not serve the read: {e}") from None
        if answer.status != 0:
            raise MemoryAccessError(-answer.status, "VMM refused the read")
        if len(answer.data) != length:
            raise MemoryAccessError(errno.EIO, f"VMM returned {len(answer.data)} bytes")
        metrics.MEMORY_READ.inc(len(answer.data))
        return answer.data

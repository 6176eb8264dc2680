"""Who the broker is talking to: one HostSession per agent's host, one VmSession per VM.

A HostSession lives across its agent's reconnections: a reconnecting agent gets the same
session back, so results finished while it was away go out on the new stream, and guest-memory
requests the old stream never answered are sent again. It builds the next outbound frame in
place. A VmSession is one VM under the policy version it registered with; each vCPU keeps its
last (seq, result) so a re-sent call is answered from the record instead of being run twice.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

from hyperbroker.broker import metrics
from hyperbroker.broker.policy_versions import PolicyVersion
from hyperbroker.broker.store import Lease, StoreBatch
from hyperbroker.calls import Call, Result
from hyperbroker.handlers.api import GuestMemoryError, VmInfo
from hyperbroker.wire.v1 import broker_pb2

if TYPE_CHECKING:
    from hyperbroker.broker.context import StateDoc
    from hyperbroker.broker.dispatch import DispatchInfo

MEMORY_TIMEOUT_S = 2.0
NO_SEQ = -1
STORED_LEN = struct.Struct("<I")
VM_ID = struct.Struct("<I")  # the head of struct hb_result


class FrameWriter(Protocol):
    async def write(self, frame: broker_pb2.BrokerFrame) -> None: ...


class VcpuRecord:
    __slots__ = ("calls", "in_flight_seq", "last_call", "last_result", "last_seq", "last_writes")

    def __init__(self) -> None:
        self.last_seq = NO_SEQ
        self.last_result: bytes | None = None  # the hb_result record (with its actions)
        self.last_writes: broker_pb2.ResultWrites | None = None
        # The last call whose state changes were committed, with its handler and Result: what
        # an undo needs if the agent reports that the guest got the fallback instead.
        self.last_call: tuple[str, Call, Result] | None = None
        self.in_flight_seq = NO_SEQ
        self.calls = 0

    def rename(self, vm_id: int) -> None:
        """The recorded result names the VM by the agent's handle: give it the current one."""
        if self.last_result is not None:
            self.last_result = VM_ID.pack(vm_id) + self.last_result[VM_ID.size:]
        if self.last_writes is not None:
            self.last_writes.vm_id = vm_id


def stored_result(record: bytes, writes: broker_pb2.ResultWrites | None) -> bytes:
    """A last-result record as the store keeps it: length, hb_result record, its writes."""
    return STORED_LEN.pack(len(record)) + record + (writes.SerializeToString() if writes else b"")


def load_stored_result(blob: bytes) -> tuple[bytes, broker_pb2.ResultWrites | None]:
    (n,) = STORED_LEN.unpack_from(blob)
    record = blob[STORED_LEN.size : STORED_LEN.size + n]
    rest = blob[STORED_LEN.size + n :]
    return record, broker_pb2.ResultWrites.FromString(rest) if rest else None


def regions_of(reg: broker_pb2.VmRegistered) -> tuple[tuple[int, int, bool], ...]:
    """(start, end, read-only) of each guest-RAM region a registration declares."""
    return tuple((r.gpa, r.gpa + r.size, r.readonly) for r in reg.regions)


class VmSession:
    def __init__(self, host: str, reg: broker_pb2.VmRegistered, pv: PolicyVersion) -> None:
        self.vm_id = reg.vm_id
        self.registration = reg
        self.name = reg.name
        self.incarnation = reg.incarnation
        self.generation = 0  # the host's agent process it was last registered under
        # The store key: one boot of one VM. Agents that name no incarnation (older ones) key by
        # host and name alone, as before.
        self.key = f"{host}/{reg.name}" + (f"#{reg.incarnation}" if reg.incarnation else "")
        self.profile = reg.profile or "default"
        self.pv = pv
        self.nr_vcpus = reg.nr_vcpus
        self.regions = regions_of(reg)
        self.vcpus = [VcpuRecord() for _ in range(reg.nr_vcpus)]
        self.info = VmInfo(host, reg.name, reg.nr_vcpus, self.profile, pv.version,
                           tuple((r.gpa, r.size) for r in reg.regions))
        self.states: dict[str, StateDoc] = {}
        self.calls = 0
        cache = pv.caches.setdefault(self.profile, {})
        self.cache: dict[int, DispatchInfo] = cache  # type: ignore[assignment]

    def check_range(self, gpa: int, length: int, write: bool) -> None:
        end = gpa + length
        for base, limit, readonly in self.regions:
            if base <= gpa and end <= limit:
                if write and readonly:
                    raise GuestMemoryError(f"[{gpa:#x}, {end:#x}) is read-only guest memory")
                return
        raise GuestMemoryError(f"[{gpa:#x}, {end:#x}) is not inside one of {self.name}'s regions")


class HostSession:
    """One agent's host, across its reconnections."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.vms: dict[int, VmSession] = {}
        # The right to change this host's VMs in the store, and what waits to be committed
        # under it; one flush at a time, so batches reach the store in the order they formed.
        self.lease: Lease | None = None
        self.batch = StoreBatch()
        self.flush_lock = asyncio.Lock()
        self.on_abandon: Callable[[str], None] | None = None  # ends the stream (BrokerService)
        self.generation = 0  # counts the agent processes that said hello for this host
        self.writer: FrameWriter | None = None
        self.peer = ""
        self.connected_since_ns = 0
        self.last_read = 0.0  # time.monotonic() of the last frame its stream brought
        self.detached = asyncio.Event()  # set while no stream is attached
        self.detached.set()
        self.disconnected_at: float | None = None
        self.calls = 0
        self._frame = broker_pb2.BrokerFrame()
        self._results: list[bytes] = []
        self._dirty = False
        self.writing = False
        # The stream reader is dispatching a frame and writes what it finishes right after,
        # so finishing results need not wake the writer task meanwhile.
        self.reading = False
        self._wake = asyncio.Event()
        self._memory: dict[int, tuple[broker_pb2.MemoryRequest, asyncio.Future[bytes]]] = {}
        self._next_request = 1

    # Outbound frame, built in place and swapped out by the writer.
    def queue_result(self, record: bytes, writes: broker_pb2.ResultWrites | None) -> None:
        self._results.append(record)
        if writes is not None:
            self._frame.memory_writes.append(writes)
        self._dirty = True

    def queue_policy(self, compiled: broker_pb2.CompiledPolicy) -> None:
        self._frame.policy.CopyFrom(compiled)
        self._dirty = True
        self.wake()

    def queue_reset_done(self, request_id: int) -> None:
        self._frame.resets_done.append(request_id)
        self._dirty = True
        self.wake()

    def queue_keepalive(self, sent_ns: int) -> None:
        """Echo an agent's keepalive: it proves this process, not a proxy, reads the stream."""
        self._frame.keepalive.echo_ns = sent_ns
        self._frame.keepalive.sent_ns = time.monotonic_ns()
        self._dirty = True
        self.wake()

    def queue_drain(self, reason: str) -> None:
        self._frame.drain.reason = reason
        self._dirty = True
        self.wake()

    def queue_rejected(self, vm_id: int, reason: str) -> None:
        self._frame.vms_rejected.add(vm_id=vm_id, reason=reason)
        self._dirty = True

    def wake(self) -> None:
        if self._dirty and not self.reading:
            self._wake.set()

    def take_frame(self) -> broker_pb2.BrokerFrame | None:
        if not self._dirty:
            return None
        frame, self._frame, self._dirty = self._frame, broker_pb2.BrokerFrame(), False
        if self._results:
            frame.results = b"".join(self._results)
            self._results = []
        return frame

    def attach(self, writer: FrameWriter, peer: str) -> None:
        self.writer = writer
        self.peer = peer
        self.connected_since_ns = time.time_ns()
        self.last_read = time.monotonic()
        self.detached.clear()
        self.disconnected_at = None
        # Guest-memory requests the old stream never answered go out again on this one.
        for request, fut in self._memory.values():
            if not fut.done():
                self._frame.memory_requests.append(request)
                self._dirty = True
        self.wake()

    def detach(self, writer: FrameWriter) -> None:
        if self.writer is writer:
            self.writer = None
            self.detached.set()
            self.disconnected_at = time.monotonic()

    async def run_writer(self, writer: FrameWriter,
                         flush: Callable[[HostSession], Awaitable[None]]) -> None:
        """Write what handlers finish later, for as long as `writer` is current."""
        while True:
            await self._wake.wait()
            if self.writer is not writer:
                return  # superseded: leave the wake-up for the current writer
            self._wake.clear()
            if not self.writing:
                await self.write_pending(writer, flush)

    async def write_pending(self, writer: FrameWriter,
                            flush: Callable[[HostSession], Awaitable[None]]) -> None:
        """Write everything pending, one frame per round, until nothing is left.

        The stream reader calls this right after dispatching a frame (most results are ready
        by then), which saves waking the writer task, unless the results wait for a store
        commit (then the writer task waits it out and the reader reads on); `writing` keeps
        the two from writing at once, and whoever writes loops until the frame being built is
        empty.
        """
        self.writing = True
        try:
            while (frame := self.take_frame()) is not None:
                if self.batch:
                    await flush(self)  # the state results depend on is durable before they leave
                await writer.write(frame)
                metrics.FRAMES_OUT.inc()
        finally:
            self.writing = False

    async def read_memory(self, vm_id: int, gpa: int, length: int) -> bytes:
        request_id = self._next_request
        self._next_request += 1
        request = broker_pb2.MemoryRequest(request_id=request_id, vm_id=vm_id, gpa=gpa,
                                           length=length)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._memory[request_id] = (request, fut)
        self._frame.memory_requests.append(request)
        self._dirty = True
        self.wake()
        metrics.MEMORY_REQUESTS.inc()
        try:
            return await asyncio.wait_for(fut, MEMORY_TIMEOUT_S)
        except TimeoutError:
            raise GuestMemoryError(
                f"agent {self.host} did not answer a {length}-byte read within "
                f"{MEMORY_TIMEOUT_S} s"
            ) from None
        finally:
            self._memory.pop(request_id, None)

    def memory_reply(self, reply: broker_pb2.MemoryReply) -> None:
        entry = self._memory.get(reply.request_id)
        if entry is None or entry[1].done():
            return  # answered already, or timed out
        request, fut = entry
        if reply.error:
            fut.set_exception(GuestMemoryError(
                f"agent refused read of [{request.gpa:#x}, +{request.length}): "
                f"errno {reply.error} {reply.message}"))
        elif len(reply.data) != request.length:
            fut.set_exception(GuestMemoryError(
                f"agent returned {len(reply.data)} bytes for a {request.length}-byte read"))
        else:
            fut.set_result(reply.data)

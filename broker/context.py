"""The CallContext a handler gets: the VM, its state documents, its guest memory, a logger.

State is JSON documents in the store, one per (VM, handler), loaded when the VM registers and
cached as text; a put goes into the host's pending batch and marks the call durable, so the
batch is committed (under the host's lease) before the result that depends on it leaves. IDs
come from the store's pools, one atomic operation each. Guest memory is read through
the host's agent (one round trip per read) and written by attaching writes to the result, all
within the VM's declared regions and a per-call byte budget.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING

from hyperbroker.broker import metrics
from hyperbroker.broker.sessions import HostSession, VmSession
from hyperbroker.calls import Call
from hyperbroker.handlers.api import GuestMemoryError, JsonValue, VmInfo
from hyperbroker.wire.v1 import broker_pb2

if TYPE_CHECKING:
    from hyperbroker.broker.hosts import Hosts

MAX_MEMORY_READ = 64 * 1024  # per read, as HB_MAX_MEM_CHUNK
MAX_MEMORY_PER_CALL = 1024 * 1024  # reads plus writes, per call


class StateDoc:
    """One JSON document in the store, cached as text; puts go to the pending batch."""

    __slots__ = ("key", "raw")

    def __init__(self, key: tuple[str, str], raw: str | None) -> None:
        self.key = key
        self.raw = raw


class StateView:
    """A handler's view of one StateDoc during one call: a put marks the call durable."""

    __slots__ = ("_ctx", "_doc")

    def __init__(self, doc: StateDoc, ctx: CallCtx) -> None:
        self._doc = doc
        self._ctx = ctx

    def get(self) -> JsonValue:
        raw = self._doc.raw
        return None if raw is None else json.loads(raw)

    def put(self, value: JsonValue) -> None:
        raw = json.dumps(value, separators=(",", ":"), sort_keys=True)
        self._ctx.remember(self._doc, raw)
        self._doc.raw = raw
        self._ctx.host.batch.vm_state[self._doc.key] = raw
        self._ctx.durable = True


class CallCtx:
    """handlers.api.CallContext for one call (or one lifecycle hook when `call` is None)."""

    __slots__ = (
        "_log",
        "_undo",
        "call",
        "dispatcher",
        "durable",
        "handler_name",
        "host",
        "memory_bytes",
        "memory_ns",
        "memory_round_trips",
        "session",
        "writes",
    )

    def __init__(self, dispatcher: Hosts, host: HostSession, session: VmSession,
                 handler_name: str) -> None:
        self.dispatcher = dispatcher
        self.host = host
        self.session = session
        self.handler_name = handler_name
        self.durable = False
        self.writes: list[broker_pb2.MemoryWrite] = []
        self.memory_ns = 0
        self.memory_round_trips = 0
        self.memory_bytes = 0
        self._log: logging.Logger | None = None
        self._undo: dict[int, tuple[StateDoc, str | None, str]] | None = None
        self.call: Call | None = None  # the call being handled; None in lifecycle hooks

    def remember(self, doc: StateDoc, raw: str) -> None:
        """Before this call's put of `raw`: what to restore if the call fails."""
        if self._undo is None:
            self._undo = {}
        before = self._undo.get(id(doc))
        self._undo[id(doc)] = (doc, doc.raw if before is None else before[1], raw)

    def roll_back(self) -> None:
        """The call failed (raised, timed out): none of its puts persists. A document another
        call has written since is left as that call wrote it."""
        if not self._undo:
            return
        batch = self.host.batch
        for doc, previous, mine in self._undo.values():
            if doc.raw != mine:
                continue
            doc.raw = previous
            batch.vm_state[doc.key] = previous
        self._undo = None
        self.durable = False

    # handlers.api.CallContext
    @property
    def vm(self) -> VmInfo:
        return self.session.info

    @property
    def state(self) -> StateView:
        doc = self.session.states.get(self.handler_name)
        if doc is None:  # every stored document was loaded at registration: this one is new
            doc = StateDoc((self.session.key, self.handler_name), None)
            self.session.states[self.handler_name] = doc
        return StateView(doc, self)

    @property
    def ids(self) -> CallCtx:
        return self

    # handlers.api.IdPools: the VM's boot (session key) owns what it allocates
    async def allocate(self, pool: str, first: int, last: int) -> int | None:
        return await self.dispatcher.store.allocate_id(pool, self.session.key, first, last)

    async def release(self, pool: str) -> None:
        await self.dispatcher.store.release_id(pool, self.session.key)

    async def owner(self, pool: str, id_: int) -> str | None:
        return await self.dispatcher.store.id_owner(pool, id_)

    @property
    def memory(self) -> CallCtx:
        return self

    @property
    def log(self) -> logging.Logger:
        if self._log is None:
            self._log = logging.getLogger(f"hyperbroker.handler.{self.handler_name}")
        return self._log

    def now_ns(self) -> int:
        return time.monotonic_ns()

    # handlers.api.GuestMemory
    async def read(self, gpa: int, length: int) -> bytes:
        if not 0 < length <= MAX_MEMORY_READ:
            raise GuestMemoryError(f"a read is 1..{MAX_MEMORY_READ} bytes, not {length}")
        self._account(length)
        self.session.check_range(gpa, length, write=False)
        t0 = time.monotonic_ns()
        try:
            data = await self.host.read_memory(self.session.vm_id, gpa, length)
        finally:
            self.memory_ns += time.monotonic_ns() - t0
            self.memory_round_trips += 1
        metrics.MEMORY_READ_BYTES.inc(len(data))
        return data

    def write(self, gpa: int, data: bytes) -> None:
        if not data:
            return
        self._account(len(data))
        self.session.check_range(gpa, len(data), write=True)
        self.writes.append(broker_pb2.MemoryWrite(gpa=gpa, data=bytes(data)))
        metrics.MEMORY_WRITE_BYTES.inc(len(data))

    def _account(self, n: int) -> None:
        self.memory_bytes += n
        if self.memory_bytes > MAX_MEMORY_PER_CALL:
            raise GuestMemoryError(
                f"more than {MAX_MEMORY_PER_CALL} bytes of guest memory in one call")

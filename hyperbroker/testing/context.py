"""An in-memory CallContext for driving handlers in tests, without a broker or an agent.

`FakeContext` holds guest RAM as bytearrays per region, the per-VM state document and the ID
pools (shared between contexts as the broker's store shares them), and records reads and writes
so that tests can assert on guest-memory traffic. Writes are buffered exactly as the broker
buffers them: they reach guest RAM when `commit()` is called (the broker commits them with the
result).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

from hyperbroker.broker.store.sqlite import SqliteStore
from hyperbroker.handlers.api import GuestMemoryError, JsonValue, VmInfo


class MemoryState:
    """A JSON document with the store's semantics: a put is serialised, a get parses a copy."""

    def __init__(self, value: JsonValue = None) -> None:
        self._raw = None if value is None else json.dumps(value)
        self.puts = 0

    def get(self) -> JsonValue:
        return None if self._raw is None else json.loads(self._raw)

    def put(self, value: JsonValue) -> None:
        self._raw = json.dumps(value)
        self.puts += 1


class MemoryPools:
    """Fleet-unique ID pools with the broker's own semantics: its store, in memory."""

    def __init__(self) -> None:
        self.store = SqliteStore(None)


class VmPools:
    """handlers.api.IdPools for one VM (the owner of what it allocates)."""

    def __init__(self, pools: MemoryPools, owner: str) -> None:
        self._store = pools.store
        self._owner = owner

    async def allocate(self, pool: str, first: int, last: int) -> int | None:
        return await self._store.allocate_id(pool, self._owner, first, last)

    async def release(self, pool: str) -> None:
        await self._store.release_id(pool, self._owner)

    async def owner(self, pool: str, id_: int) -> str | None:
        return await self._store.id_owner(pool, id_)


@dataclass
class FakeGuestMemory:
    """Guest RAM as regions {gpa: bytearray}; reads are bounded like the agent bounds them."""

    regions: dict[int, bytearray] = field(default_factory=dict)
    max_read: int = 64 * 1024
    pending_writes: list[tuple[int, bytes]] = field(default_factory=list)
    reads: list[tuple[int, int]] = field(default_factory=list)

    def _locate(self, gpa: int, length: int) -> tuple[bytearray, int]:
        for base, ram in self.regions.items():
            if base <= gpa and gpa + length <= base + len(ram):
                return ram, gpa - base
        raise GuestMemoryError(f"[{gpa:#x}, {gpa + length:#x}) is not guest RAM")

    async def read(self, gpa: int, length: int) -> bytes:
        if length < 0 or length > self.max_read:
            raise GuestMemoryError(f"read of {length} bytes exceeds {self.max_read}")
        ram, off = self._locate(gpa, length)
        self.reads.append((gpa, length))
        return bytes(ram[off : off + length])

    def write(self, gpa: int, data: bytes) -> None:
        self._locate(gpa, len(data))
        self.pending_writes.append((gpa, bytes(data)))

    def commit(self) -> None:
        for gpa, data in self.pending_writes:
            ram, off = self._locate(gpa, len(data))
            ram[off : off + len(data)] = data
        self.pending_writes.clear()

    def poke(self, gpa: int, data: bytes) -> None:
        """Write guest RAM directly, as the guest itself would."""
        ram, off = self._locate(gpa, len(data))
        ram[off : off + len(data)] = data

    def peek(self, gpa: int, length: int) -> bytes:
        ram, off = self._locate(gpa, length)
        return bytes(ram[off : off + length])


class FakeContext:
    def __init__(
        self,
        vm: VmInfo | None = None,
        *,
        memory: FakeGuestMemory | None = None,
        pools: MemoryPools | None = None,
    ) -> None:
        self.vm = vm or VmInfo(host="host-a", name="vm-1", nr_vcpus=2, profile="default",
                               policy_version=1)
        self.state = MemoryState()
        self.pools = pools or MemoryPools()
        self.ids = VmPools(self.pools, self.vm.key)
        self.memory = memory or FakeGuestMemory()
        self.log = logging.getLogger(f"hyperbroker.test.{self.vm.name}")

    def now_ns(self) -> int:
        return time.monotonic_ns()

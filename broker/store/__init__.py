"""The broker's state store: the contract, and `open_store(url)` to pick a backend.

What is stored: policy versions; each VM's handler documents (JSON text, one per handler), each
of its vCPUs' last result (the broker answers a re-sent call from it) and its registration (so
a broker taking a host over can rebuild the host's VMs); a lease per host; fleet-unique ID pools.

The rules every backend keeps, and tests/test_store.py checks against each:

- Every operation is atomic on the server: a batch, an allocation, a lease change is applied
  whole or not at all, never read-then-written back by the broker.
- A host's VMs are changed only under that host's lease (`Lease`): one broker holds it at a
  time, `take_lease` hands it to a new broker with a larger epoch, and every write names the
  epoch it holds; a write under an older epoch changes nothing and raises `Fenced`.
- An ID allocation is keyed by its owner: asking again returns the owner's ID, so a handler's
  retry or a second broker never hands out a second one.

Backends: `sqlite:///DIR` (DIR/hyperbroker.sqlite3, one machine, shared by its workers),
`memory://` (SQLite in memory: tests and throwaway runs), `redis://HOST:PORT/DB` and
`rediss://` (Redis or Valkey; several machines). This package knows nothing of gRPC, handlers
or agents: keys are strings, documents are JSON text, results are bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class Fenced(Exception):
    """This broker no longer holds the host's lease: another one took the host over."""


class StoreUnavailable(Exception):
    """The store could not be reached or did not answer in time; nothing was changed, or it is
    unknown whether it was (the caller treats both as "not committed")."""


class StoreUrlError(ValueError):
    """A --store URL this broker cannot use; the message says why."""


@dataclass(frozen=True, slots=True)
class StoredPolicy:
    version: int
    text: str
    digest: str


@dataclass(frozen=True, slots=True)
class Lease:
    """The right to change one host's VMs, as long as no broker takes a newer epoch."""

    host: str
    owner: str
    epoch: int


@dataclass
class StoreBatch:
    """Writes of one host's VMs to commit together. `None` as a document deletes it."""

    vm_state: dict[tuple[str, str], str | None] = field(default_factory=dict)
    last_results: dict[tuple[str, int], tuple[int, bytes]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.vm_state or self.last_results)

    def check(self) -> None:
        """Refuse, before anything is sent, what no backend can store."""
        if any(doc is not None and not isinstance(doc, str) for doc in self.vm_state.values()):
            raise TypeError("state documents are JSON text (str) or None")
        if any(not isinstance(seq, int) or not isinstance(blob, bytes)
               for seq, blob in self.last_results.values()):
            raise TypeError("last results are (int seq, bytes record)")


@dataclass(frozen=True, slots=True)
class StoredVm:
    """What the store holds for one VM: its handler documents and its vCPUs' last results."""

    docs: dict[str, str]
    results: dict[int, tuple[int, bytes]]


MAX_ID = 2**31 - 1  # ID pools hand out 1..2^31-1 at most (Redis scripts count in doubles)


class Store(Protocol):
    async def add_policy(self, text: str, digest: str) -> int:
        """A new version for `text`, unless the newest version already has this digest (then
        that version); atomic, so brokers starting together on one store agree."""
        ...

    async def get_policy(self, version: int) -> StoredPolicy | None: ...
    async def latest_policy(self) -> StoredPolicy | None: ...

    async def load_vm(self, vm_key: str) -> StoredVm: ...

    async def commit(self, lease: Lease, batch: StoreBatch) -> None:
        """Apply the batch whole, if `lease` is still current; else raise Fenced."""
        ...

    async def put_vm(self, lease: Lease, vm_key: str, record: bytes) -> None:
        """Record a VM of lease.host (its registration, for a broker taking the host over)."""
        ...

    async def host_vms(self, host: str) -> dict[str, bytes]:
        """Every VM recorded for `host`: vm_key -> record."""
        ...

    async def forget_vm(self, lease: Lease, vm_key: str) -> None:
        """Drop the VM's documents, results and record, under the host's lease."""
        ...

    async def take_lease(self, host: str, owner: str, ttl_s: float) -> Lease:
        """Take the host over, whoever held it: the epoch grows by one."""
        ...

    async def renew_lease(self, lease: Lease, ttl_s: float) -> bool:
        """Extend the lease; False when another broker has taken the host since."""
        ...

    async def release_lease(self, lease: Lease) -> None:
        """Let the lease lapse now (a broker stopping); a newer holder is left alone."""
        ...

    async def drop_lease(self, lease: Lease) -> None:
        """The host is gone for good (its VMs cleaned up): no longer among expired_leases."""
        ...

    async def expired_leases(self, for_s: float) -> list[str]:
        """Hosts whose lease lapsed (or was released) at least `for_s` ago and which nobody
        has taken since: their broker is gone and their agent never came back."""
        ...

    async def allocate_id(self, pool: str, owner: str, first: int, last: int) -> int | None:
        """The owner's ID in the pool, allocated from first..last if it has none (round robin,
        so a freed ID comes back as late as possible); None when every ID is taken. A pool
        has one range: every caller names the same first..last."""
        ...

    async def release_id(self, pool: str, owner: str) -> None: ...
    async def id_owner(self, pool: str, id_: int) -> str | None: ...
    async def close(self) -> None: ...


def open_store(url: str, *, password: str | None = None) -> Store:
    """The store a --store URL names. A password travels apart from the URL (a file or the
    environment), so it never shows in a process list."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise StoreUrlError(f"--store {url!r}: expected sqlite:///DIR, memory:// or "
                            "redis://HOST:PORT/DB")
    if scheme == "sqlite":
        from hyperbroker.broker.store.sqlite import SqliteStore

        if not rest.startswith("/") or rest == "/":
            raise StoreUrlError(f"--store {url!r}: sqlite needs an absolute directory, "
                                "sqlite:///var/lib/hyperbroker")
        return SqliteStore(rest)
    if scheme == "memory":
        from hyperbroker.broker.store.sqlite import SqliteStore

        return SqliteStore(None)
    if scheme in ("redis", "rediss"):
        from hyperbroker.broker.store.redis_store import RedisStore

        return RedisStore.from_url(url, password=password)
    raise StoreUrlError(f"--store {url!r}: unknown scheme {scheme!r} (sqlite, memory, redis, "
                        "rediss)")

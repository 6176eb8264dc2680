"""The embedded store: SQLite, in a state directory (`sqlite:///DIR`) or in memory (`memory://`).

One machine only: the broker's workers on that machine share the file (WAL readers never block;
a writer waits up to 5 s), and every contract operation is one transaction (BEGIN IMMEDIATE), so
two workers allocating or taking a lease at once serialise. The calls are synchronous on the
event loop: a local commit costs tens of microseconds, less than a hop to a thread would.

synchronous=NORMAL: a commit survives the process dying at any point (the broker crash this
store exists for); only an OS crash may lose the last transactions.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from hyperbroker.broker.store import (
    MAX_ID,
    Fenced,
    Lease,
    StoreBatch,
    StoredPolicy,
    StoredVm,
)

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS policies (
    version INTEGER PRIMARY KEY AUTOINCREMENT,
    text TEXT NOT NULL,
    digest TEXT NOT NULL,
    created_unix_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS vm_state (
    vm_key TEXT NOT NULL,
    handler TEXT NOT NULL,
    doc TEXT NOT NULL,
    PRIMARY KEY (vm_key, handler)
);
CREATE TABLE IF NOT EXISTS last_result (
    vm_key TEXT NOT NULL,
    vcpu INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    result BLOB NOT NULL,
    PRIMARY KEY (vm_key, vcpu)
);
CREATE TABLE IF NOT EXISTS vm_record (
    host TEXT NOT NULL,
    vm_key TEXT NOT NULL,
    record BLOB NOT NULL,
    PRIMARY KEY (host, vm_key)
);
CREATE TABLE IF NOT EXISTS lease (
    host TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    expires_unix_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS id_pool (
    pool TEXT NOT NULL,
    id INTEGER NOT NULL,
    owner TEXT NOT NULL,
    PRIMARY KEY (pool, id),
    UNIQUE (pool, owner)
);
CREATE TABLE IF NOT EXISTS id_next (
    pool TEXT PRIMARY KEY,
    next INTEGER NOT NULL,
    used INTEGER NOT NULL
);
"""


_U64 = 2**64 - 1


def _signed(seq: int) -> int:
    """A u64 sequence number as SQLite's signed INTEGER holds it (read back with & _U64)."""
    return seq - 2**64 if seq >= 2**63 else seq


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class SqliteStore:
    """`state_dir/hyperbroker.sqlite3`, or a private in-memory database when state_dir is None."""

    def __init__(self, state_dir: str | Path | None) -> None:
        if state_dir is None:
            self.path: Path | None = None
            target = ":memory:"
        else:
            directory = Path(state_dir)
            directory.mkdir(parents=True, exist_ok=True)
            self.path = directory / "hyperbroker.sqlite3"
            target = str(self.path)
        self._db = sqlite3.connect(target, timeout=5.0, isolation_level=None,
                                   check_same_thread=False)
        self._lock = threading.Lock()
        # Switching to WAL takes an exclusive lock and does not wait on the busy handler: when
        # several broker workers open one store at once, all but one see "database is locked".
        deadline = time.monotonic() + 10.0
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.executescript(_SCHEMA)
                break
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def _tx(self, body: Callable[[sqlite3.Connection], T]) -> T:
        """`body` in one write transaction: all of it or none of it."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                out = body(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return out

    @staticmethod
    def _check(db: sqlite3.Connection, lease: Lease) -> None:
        row = db.execute("SELECT owner, epoch FROM lease WHERE host = ?",
                         (lease.host,)).fetchone()
        if row is None or row[0] != lease.owner or row[1] != lease.epoch:
            raise Fenced(f"host {lease.host}: lease epoch {lease.epoch} of {lease.owner} is "
                         f"no longer current")

    # ---- policies --------------------------------------------------------------------------
    async def add_policy(self, text: str, digest: str) -> int:
        def body(db: sqlite3.Connection) -> int:
            row = db.execute(
                "SELECT version, digest FROM policies ORDER BY version DESC LIMIT 1").fetchone()
            if row is not None and row[1] == digest:
                return int(row[0])
            cur = db.execute(
                "INSERT INTO policies (text, digest, created_unix_ns) VALUES (?, ?, ?)",
                (text, digest, time.time_ns()))
            assert cur.lastrowid is not None
            return cur.lastrowid
        return self._tx(body)

    async def get_policy(self, version: int) -> StoredPolicy | None:
        row = self._db.execute(
            "SELECT version, text, digest FROM policies WHERE version = ?", (version,)
        ).fetchone()
        return StoredPolicy(*row) if row else None

    async def latest_policy(self) -> StoredPolicy | None:
        row = self._db.execute(
            "SELECT version, text, digest FROM policies ORDER BY version DESC LIMIT 1"
        ).fetchone()
        return StoredPolicy(*row) if row else None

    # ---- VMs -------------------------------------------------------------------------------
    async def load_vm(self, vm_key: str) -> StoredVm:
        docs = self._db.execute("SELECT handler, doc FROM vm_state WHERE vm_key = ?",
                                (vm_key,)).fetchall()
        rows = self._db.execute("SELECT vcpu, seq, result FROM last_result WHERE vm_key = ?",
                                (vm_key,)).fetchall()
        return StoredVm(dict(docs), {vcpu: (seq & _U64, bytes(blob)) for vcpu, seq, blob in rows})

    async def commit(self, lease: Lease, batch: StoreBatch) -> None:
        batch.check()

        def body(db: sqlite3.Connection) -> None:
            self._check(db, lease)
            for (vm_key, handler), doc in batch.vm_state.items():
                if doc is None:
                    db.execute("DELETE FROM vm_state WHERE vm_key = ? AND handler = ?",
                               (vm_key, handler))
                else:
                    db.execute("INSERT OR REPLACE INTO vm_state VALUES (?, ?, ?)",
                               (vm_key, handler, doc))
            db.executemany("INSERT OR REPLACE INTO last_result VALUES (?, ?, ?, ?)",
                           [(k, vcpu, _signed(seq), blob)
                            for (k, vcpu), (seq, blob) in batch.last_results.items()])
        self._tx(body)

    async def put_vm(self, lease: Lease, vm_key: str, record: bytes) -> None:
        def body(db: sqlite3.Connection) -> None:
            self._check(db, lease)
            db.execute("INSERT OR REPLACE INTO vm_record VALUES (?, ?, ?)",
                       (lease.host, vm_key, record))
        self._tx(body)

    async def host_vms(self, host: str) -> dict[str, bytes]:
        rows = self._db.execute("SELECT vm_key, record FROM vm_record WHERE host = ?",
                                (host,)).fetchall()
        return {k: bytes(r) for k, r in rows}

    async def forget_vm(self, lease: Lease, vm_key: str) -> None:
        def body(db: sqlite3.Connection) -> None:
            self._check(db, lease)
            db.execute("DELETE FROM vm_state WHERE vm_key = ?", (vm_key,))
            db.execute("DELETE FROM last_result WHERE vm_key = ?", (vm_key,))
            db.execute("DELETE FROM vm_record WHERE host = ? AND vm_key = ?",
                       (lease.host, vm_key))
        self._tx(body)

    # ---- leases ----------------------------------------------------------------------------
    async def take_lease(self, host: str, owner: str, ttl_s: float) -> Lease:
        def body(db: sqlite3.Connection) -> Lease:
            row = db.execute("SELECT epoch FROM lease WHERE host = ?", (host,)).fetchone()
            epoch = (row[0] if row else 0) + 1
            db.execute("INSERT OR REPLACE INTO lease VALUES (?, ?, ?, ?)",
                       (host, owner, epoch, _now_ms() + int(ttl_s * 1000)))
            return Lease(host, owner, epoch)
        return self._tx(body)

    async def renew_lease(self, lease: Lease, ttl_s: float) -> bool:
        def body(db: sqlite3.Connection) -> bool:
            cur = db.execute(
                "UPDATE lease SET expires_unix_ms = ? WHERE host = ? AND owner = ? AND epoch = ?",
                (_now_ms() + int(ttl_s * 1000), lease.host, lease.owner, lease.epoch))
            return cur.rowcount == 1
        return self._tx(body)

    async def release_lease(self, lease: Lease) -> None:
        self._tx(lambda db: db.execute(
            "UPDATE lease SET expires_unix_ms = ? WHERE host = ? AND owner = ? AND epoch = ?",
            (_now_ms(), lease.host, lease.owner, lease.epoch)))

    async def drop_lease(self, lease: Lease) -> None:
        # The row stays (its epoch keeps growing if the host ever comes back); -1: not swept.
        self._tx(lambda db: db.execute(
            "UPDATE lease SET expires_unix_ms = -1 WHERE host = ? AND owner = ? AND epoch = ?",
            (lease.host, lease.owner, lease.epoch)))

    async def expired_leases(self, for_s: float) -> list[str]:
        rows = self._db.execute(
            "SELECT host FROM lease WHERE expires_unix_ms >= 0 AND expires_unix_ms < ?",
            (_now_ms() - int(for_s * 1000),)).fetchall()
        return [r[0] for r in rows]

    # ---- ID pools --------------------------------------------------------------------------
    async def allocate_id(self, pool: str, owner: str, first: int, last: int) -> int | None:
        if not 0 <= first <= last <= MAX_ID:
            raise ValueError(f"ID range {first}..{last} is not within 0..{MAX_ID}")

        def body(db: sqlite3.Connection) -> int | None:
            row = db.execute("SELECT id FROM id_pool WHERE pool = ? AND owner = ?",
                             (pool, owner)).fetchone()
            if row is not None:
                return int(row[0])
            span = last - first + 1
            row = db.execute("SELECT next, used FROM id_next WHERE pool = ?",
                             (pool,)).fetchone()
            start, used = row if row is not None else (first, 0)
            if used >= span:
                return None
            if not first <= start <= last:
                start = first
            for step in range(used + 1):  # round robin: the first probe is free but after wraps
                candidate = first + (start - first + step) % span
                if db.execute("SELECT 1 FROM id_pool WHERE pool = ? AND id = ?",
                              (pool, candidate)).fetchone() is None:
                    db.execute("INSERT INTO id_pool VALUES (?, ?, ?)", (pool, candidate, owner))
                    db.execute("INSERT OR REPLACE INTO id_next VALUES (?, ?, ?)",
                               (pool, first + (candidate - first + 1) % span, used + 1))
                    return candidate
            raise AssertionError("unreachable: fewer IDs used than the range holds")
        return self._tx(body)

    async def release_id(self, pool: str, owner: str) -> None:
        def body(db: sqlite3.Connection) -> None:
            if db.execute("DELETE FROM id_pool WHERE pool = ? AND owner = ?",
                          (pool, owner)).rowcount:
                db.execute("UPDATE id_next SET used = used - 1 WHERE pool = ?", (pool,))
        self._tx(body)

    async def id_owner(self, pool: str, id_: int) -> str | None:
        row = self._db.execute("SELECT owner FROM id_pool WHERE pool = ? AND id = ?",
                               (pool, id_)).fetchone()
        return None if row is None else str(row[0])

    async def close(self) -> None:
        self._db.close()

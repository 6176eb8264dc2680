"""The broker's state store: policy versions, per-VM handler state, each vCPU's last result.

One interface, two backends: SQLite in a state directory (the default; survives a restart) and
memory (tests, throwaway runs). Writes arrive as a `StoreBatch` that is committed in one
transaction before the results it covers are sent, so a handler's state change and the
last-result record of the call that made it are durable together or not at all.
This module knows nothing of gRPC, handlers or agents: keys are strings, documents are JSON text.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True, slots=True)
class StoredPolicy:
    version: int
    text: str
    digest: str


@dataclass
class StoreBatch:
    """Writes to commit together. `None` as a document deletes it."""

    vm_state: dict[tuple[str, str], str | None] = field(default_factory=dict)
    shared_state: dict[str, str | None] = field(default_factory=dict)
    last_results: dict[tuple[str, int], tuple[int, bytes]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.vm_state or self.shared_state or self.last_results)


class Store(Protocol):
    def add_policy(self, text: str, digest: str) -> int:
        """A new version for `text`, unless the newest version already has this digest (then
        that version); atomic, so processes starting together on one store agree."""
        ...

    def get_policy(self, version: int) -> StoredPolicy | None: ...
    def latest_policy(self) -> StoredPolicy | None: ...
    def load_vm_state(self, vm_key: str, handler: str) -> str | None: ...
    def load_shared_state(self, handler: str) -> str | None: ...
    def load_last_results(self, vm_key: str) -> dict[int, tuple[int, bytes]]: ...
    def commit(self, batch: StoreBatch) -> None: ...
    def forget_vm(self, vm_key: str) -> None: ...
    def close(self) -> None: ...


class MemoryStore:
    """Everything in dicts; gone with the process."""

    def __init__(self) -> None:
        self._policies: list[StoredPolicy] = []
        self._vm: dict[tuple[str, str], str] = {}
        self._shared: dict[str, str] = {}
        self._last: dict[tuple[str, int], tuple[int, bytes]] = {}
        self.commits = 0

    def add_policy(self, text: str, digest: str) -> int:
        if self._policies and self._policies[-1].digest == digest:
            return self._policies[-1].version
        version = len(self._policies) + 1
        self._policies.append(StoredPolicy(version, text, digest))
        return version

    def get_policy(self, version: int) -> StoredPolicy | None:
        return self._policies[version - 1] if 0 < version <= len(self._policies) else None

    def latest_policy(self) -> StoredPolicy | None:
        return self._policies[-1] if self._policies else None

    def load_vm_state(self, vm_key: str, handler: str) -> str | None:
        return self._vm.get((vm_key, handler))

    def load_shared_state(self, handler: str) -> str | None:
        return self._shared.get(handler)

    def load_last_results(self, vm_key: str) -> dict[int, tuple[int, bytes]]:
        return {vcpu: rec for (key, vcpu), rec in self._last.items() if key == vm_key}

    def commit(self, batch: StoreBatch) -> None:
        # Refuse what SQLite would refuse, before changing anything (all or nothing).
        docs = [*batch.vm_state.values(), *batch.shared_state.values()]
        if any(doc is not None and not isinstance(doc, str) for doc in docs) or any(
            not isinstance(seq, int) or not isinstance(blob, bytes)
            for seq, blob in batch.last_results.values()
        ):
            raise TypeError("state documents are JSON text and results (int seq, bytes)")
        for k, doc in batch.vm_state.items():
            if doc is None:
                self._vm.pop(k, None)
            else:
                self._vm[k] = doc
        for h, doc in batch.shared_state.items():
            if doc is None:
                self._shared.pop(h, None)
            else:
                self._shared[h] = doc
        self._last.update(batch.last_results)
        self.commits += 1

    def forget_vm(self, vm_key: str) -> None:
        for state_key in [k for k in self._vm if k[0] == vm_key]:
            del self._vm[state_key]
        for result_key in [k for k in self._last if k[0] == vm_key]:
            del self._last[result_key]

    def close(self) -> None:
        pass


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
CREATE TABLE IF NOT EXISTS shared_state (
    handler TEXT PRIMARY KEY,
    doc TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS last_result (
    vm_key TEXT NOT NULL,
    vcpu INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    result BLOB NOT NULL,
    PRIMARY KEY (vm_key, vcpu)
);
"""


class SqliteStore:
    """SQLite in WAL mode in `state_dir/hyperbroker.sqlite3`.

    synchronous=NORMAL: a commit survives the process dying at any point (the broker crash this
    store exists for); only an OS crash may lose the last transactions. Several broker workers
    on one machine may share the file (WAL readers never block; writers wait up to 5 s).
    """

    def __init__(self, state_dir: str | Path) -> None:
        path = Path(state_dir)
        path.mkdir(parents=True, exist_ok=True)
        self.path = path / "hyperbroker.sqlite3"
        self._db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None,
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

    def add_policy(self, text: str, digest: str) -> int:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT version, digest FROM policies ORDER BY version DESC LIMIT 1"
                ).fetchone()
                if row is not None and row[1] == digest:
                    version = int(row[0])
                else:
                    cur = self._db.execute(
                        "INSERT INTO policies (text, digest, created_unix_ns) VALUES (?, ?, ?)",
                        (text, digest, time.time_ns()),
                    )
                    assert cur.lastrowid is not None
                    version = cur.lastrowid
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return version

    def get_policy(self, version: int) -> StoredPolicy | None:
        row = self._db.execute(
            "SELECT version, text, digest FROM policies WHERE version = ?", (version,)
        ).fetchone()
        return StoredPolicy(*row) if row else None

    def latest_policy(self) -> StoredPolicy | None:
        row = self._db.execute(
            "SELECT version, text, digest FROM policies ORDER BY version DESC LIMIT 1"
        ).fetchone()
        return StoredPolicy(*row) if row else None

    def load_vm_state(self, vm_key: str, handler: str) -> str | None:
        row = self._db.execute(
            "SELECT doc FROM vm_state WHERE vm_key = ? AND handler = ?", (vm_key, handler)
        ).fetchone()
        return row[0] if row else None

    def load_shared_state(self, handler: str) -> str | None:
        row = self._db.execute(
            "SELECT doc FROM shared_state WHERE handler = ?", (handler,)
        ).fetchone()
        return row[0] if row else None

    def load_last_results(self, vm_key: str) -> dict[int, tuple[int, bytes]]:
        rows = self._db.execute(
            "SELECT vcpu, seq, result FROM last_result WHERE vm_key = ?", (vm_key,)
        ).fetchall()
        return {vcpu: (seq, bytes(blob)) for vcpu, seq, blob in rows}

    def commit(self, batch: StoreBatch) -> None:
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                for (vm_key, handler), doc in batch.vm_state.items():
                    if doc is None:
                        db.execute("DELETE FROM vm_state WHERE vm_key = ? AND handler = ?",
                                   (vm_key, handler))
                    else:
                        db.execute("INSERT OR REPLACE INTO vm_state VALUES (?, ?, ?)",
                                   (vm_key, handler, doc))
                for handler, doc in batch.shared_state.items():
                    if doc is None:
                        db.execute("DELETE FROM shared_state WHERE handler = ?", (handler,))
                    else:
                        db.execute("INSERT OR REPLACE INTO shared_state VALUES (?, ?)",
                                   (handler, doc))
                db.executemany(
                    "INSERT OR REPLACE INTO last_result VALUES (?, ?, ?, ?)",
                    [(k, vcpu, seq, blob) for (k, vcpu), (seq, blob) in
                     batch.last_results.items()],
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def forget_vm(self, vm_key: str) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM vm_state WHERE vm_key = ?", (vm_key,))
            self._db.execute("DELETE FROM last_result WHERE vm_key = ?", (vm_key,))
            self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()

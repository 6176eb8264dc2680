"""The proxy's persistent view of one VM: its TEE sessions and its registered shared memory.

This is the document the handler keeps in `ctx.state` (one per VM, committed with each call's
result), so a broker restart loses nothing a guest relies on. Session IDs the guest sees are the
proxy's own, mapped to the TEE service's session and the service epoch it was opened in: after a
service restart the service's IDs start again, but a guest's old session can still be told apart
and reported dead (TEEC_ERROR_TARGET_DEAD) until the guest closes it. Transitions are pure: each
returns a new state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hyperbroker.handlers.optee.shm import SharedBuffer

FORMAT = 1
MAX_ORPHANS = 64  # backend sessions whose close could not be delivered, retried later


@dataclass(frozen=True, slots=True)
class SessionRecord:
    backend: int  # the TEE service's session ID
    epoch: int  # the service epoch the session was opened in
    ta: str  # the TA's UUID
    lost: bool = False  # the service no longer has it: TARGET_DEAD until the guest closes it


@dataclass(frozen=True, slots=True)
class VmTeeState:
    incarnation: str = ""  # TeeVm.incarnation; "" until the VM first reaches the service
    next_session: int = 1
    sessions: Mapping[int, SessionRecord] = field(default_factory=dict)
    shm: Mapping[int, SharedBuffer] = field(default_factory=dict)  # by cookie
    orphans: tuple[tuple[int, int], ...] = ()  # (backend session, epoch) to close again

    # JSON --------------------------------------------------------------------------------------

    @classmethod
    def from_json(cls, doc: Any) -> VmTeeState:
        if not doc:
            return cls()
        return cls(
            incarnation=str(doc.get("incarnation", "")),
            next_session=int(doc.get("next_session", 1)),
            sessions={int(k): SessionRecord(int(v["b"]), int(v["e"]), str(v["ta"]),
                                            bool(v.get("lost", False)))
                      for k, v in doc.get("sessions", {}).items()},
            shm={int(k): SharedBuffer.from_json(v) for k, v in doc.get("shm", {}).items()},
            orphans=tuple((int(b), int(e)) for b, e in doc.get("orphans", ())),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "incarnation": self.incarnation,
            "next_session": self.next_session,
            "sessions": {str(k): {"b": s.backend, "e": s.epoch, "ta": s.ta, "lost": s.lost}
                         for k, s in self.sessions.items()},
            "shm": {str(k): b.to_json() for k, b in self.shm.items()},
            "orphans": [list(o) for o in self.orphans],
        }

    # Sessions ----------------------------------------------------------------------------------

    def add_session(self, backend: int, epoch: int, ta: str) -> tuple[VmTeeState, int]:
        """Record a session the service opened; the guest's ID for it.

        Idempotent: the same (backend, epoch) keeps the ID it already has, so delivering one
        completion twice (after a fallback) cannot create two sessions.
        """
        for gid, rec in self.sessions.items():
            if rec.backend == backend and rec.epoch == epoch and not rec.lost:
                return self, gid
        gid = self.next_session
        while gid in self.sessions or gid == 0:
            gid = gid % 0xFFFF_FFFF + 1
        sessions = dict(self.sessions)
        sessions[gid] = SessionRecord(backend, epoch, ta)
        return dataclasses.replace(self, sessions=sessions,
                                   next_session=gid % 0xFFFF_FFFF + 1), gid

    def drop_session(self, gid: int) -> VmTeeState:
        if gid not in self.sessions:
            return self
        sessions = dict(self.sessions)
        del sessions[gid]
        return dataclasses.replace(self, sessions=sessions)

    def mark_lost(self, gid: int) -> VmTeeState:
        rec = self.sessions.get(gid)
        if rec is None or rec.lost:
            return self
        sessions = dict(self.sessions)
        sessions[gid] = dataclasses.replace(rec, lost=True)
        return dataclasses.replace(self, sessions=sessions)

    def add_orphan(self, backend: int, epoch: int) -> VmTeeState:
        orphans = (*self.orphans, (backend, epoch))[-MAX_ORPHANS:]
        return dataclasses.replace(self, orphans=orphans)

    def forget_orphans(self, done: frozenset[tuple[int, int]]) -> VmTeeState:
        if not done:
            return self
        return dataclasses.replace(self, orphans=tuple(o for o in self.orphans if o not in done))

    # Shared memory -----------------------------------------------------------------------------

    @property
    def shm_pages(self) -> int:
        return sum(b.num_pages for b in self.shm.values())

    def register(self, cookie: int, buffer: SharedBuffer) -> VmTeeState:
        shm = dict(self.shm)
        shm[cookie] = buffer
        return dataclasses.replace(self, shm=shm)

    def unregister(self, cookie: int) -> VmTeeState:
        if cookie not in self.shm:
            return self
        shm = dict(self.shm)
        del shm[cookie]
        return dataclasses.replace(self, shm=shm)

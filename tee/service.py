"""The TEE service proper: VMs, sessions and trusted applications, without any transport.

It behaves as OP-TEE's core does for the commands a normal world sends (OP-TEE core/tee/entry_std.c
and core/kernel/tee_ta_manager.c): a session to an unknown TA is ITEM_NOT_FOUND, an unknown
session BAD_PARAMETERS (ITEM_NOT_FOUND for close), a TA that raises is dead (TARGET_DEAD from then
on, as after a TA panic), results of TA entry points carry origin TRUSTED_APP and the service's own
errors origin TEE. Invokes on one session run one at a time (tee_ta_get_session exclusive). What it
adds for a fleet: every request names its VM and VM incarnation; sessions, session limits and
persistent data are per VM; and an `epoch`, new at every start, lets the proxy tell a session that
died with an earlier run of the service (SESSION_LOST) from one that never existed. tee.server
puts it behind gRPC; tests drive it directly.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hyperbroker.runtime.loglimit import PeerLog
from hyperbroker.tee import metrics
from hyperbroker.tee.gp import (
    ANONYMOUS_LOGINS,
    NORMAL_WORLD_LOGINS,
    NUM_PARAMS,
    Origin,
    ParamType,
    TeeResult,
)
from hyperbroker.tee.sealing import Sealer, load_master_key
from hyperbroker.tee.ta import (
    Client,
    Operation,
    Param,
    TaEnvironment,
    TaInfo,
    TrustedApp,
    VmIdentity,
)

log = logging.getLogger("hyperbroker.tee")
# A guest can make a TA fail on every call: those lines (tracebacks) are bounded per VM.
ta_log = PeerLog(log)

DEFAULT_MAX_SESSIONS_PER_VM = 32


class Status(enum.IntEnum):
    """Mirrors TeeStatus of tee.proto."""

    OK = 0
    VM_UNKNOWN = 1
    SESSION_LOST = 2


@dataclass(frozen=True, slots=True)
class Reply:
    status: Status
    ret: int = TeeResult.SUCCESS
    origin: int = Origin.TEE
    session: int = 0
    params: tuple[Param, ...] = ()

    @classmethod
    def error(cls, ret: TeeResult, origin: Origin = Origin.TEE) -> Reply:
        """An error of the service itself: no TA ran, so no parameter comes back."""
        return cls(Status.OK, ret, origin)


VM_UNKNOWN = Reply(Status.VM_UNKNOWN, TeeResult.COMMUNICATION, Origin.COMMS)
SESSION_LOST = Reply(Status.SESSION_LOST, TeeResult.TARGET_DEAD, Origin.TEE)


@dataclass(eq=False, slots=True)
class _Session:
    id: int
    app: TrustedApp
    client: Client
    context: object
    dead: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    running: set[Operation] = field(default_factory=set)


@dataclass(eq=False, slots=True)
class _Vm:
    identity: VmIdentity
    incarnation: str
    max_sessions: int
    sessions: dict[int, _Session] = field(default_factory=dict)
    next_id: int = 1

    def allocate_id(self) -> int:
        while True:
            sid, self.next_id = self.next_id, self.next_id % 0xFFFF_FFFF + 1
            if sid not in self.sessions:
                return sid


def new_epoch() -> int:
    """A random non-zero 64-bit epoch: equal epochs mean the same run of the service."""
    return secrets.randbits(64) or 1


class TeeService:
    """Hosts trusted applications for many VMs. Construct inside the event loop that serves it."""

    def __init__(self, apps: Sequence[type[TrustedApp]], state_dir: Path, *,
                 max_sessions_per_vm: int = DEFAULT_MAX_SESSIONS_PER_VM,
                 sealer: Sealer | None = None) -> None:
        if max_sessions_per_vm < 1:
            raise ValueError("max_sessions_per_vm must be at least 1")
        self.epoch = new_epoch()
        self.max_sessions_per_vm = max_sessions_per_vm
        self.state_dir = state_dir
        root = sealer or load_master_key(state_dir)
        catalogue = tuple(app.info() for app in apps)
        if len({a.uuid for a in catalogue}) != len(catalogue):
            raise ValueError("two trusted applications share a UUID")
        self.catalogue: tuple[TaInfo, ...] = catalogue
        self.apps: dict[uuid.UUID, TrustedApp] = {}
        for app in apps:
            app_dir = state_dir / "ta" / str(app.uuid)
            app_dir.mkdir(parents=True, exist_ok=True)
            self.apps[app.uuid] = app(TaEnvironment(app_dir, root.for_app(app.uuid), catalogue))
        self._vms: dict[VmIdentity, _Vm] = {}

    # VM lifecycle ------------------------------------------------------------------------------

    def _vm(self, vm: VmIdentity, incarnation: str) -> _Vm | None:
        entry = self._vms.get(vm)
        return entry if entry is not None and entry.incarnation == incarnation else None

    async def vm_created(self, vm: VmIdentity, incarnation: str, max_sessions: int = 0) -> int:
        """Register an incarnation of `vm`, closing an older one's sessions; the limit in force."""
        old = self._vms.get(vm)
        if old is not None and old.incarnation == incarnation:
            return old.max_sessions
        if old is not None:
            await self._drop(old)
        limit = self.max_sessions_per_vm
        if max_sessions:
            limit = min(limit, max_sessions)
        self._vms[vm] = _Vm(vm, incarnation, limit)
        metrics.VMS.set(len(self._vms))
        log.info("VM %s incarnation %s registered, %d sessions max", vm, incarnation, limit)
        return limit

    async def vm_destroyed(self, vm: VmIdentity, incarnation: str) -> int:
        """Forget `vm` (any incarnation when `incarnation` is empty); the sessions closed."""
        entry = self._vms.get(vm)
        if entry is None or (incarnation and entry.incarnation != incarnation):
            return 0
        return await self._drop(entry)

    async def _drop(self, entry: _Vm) -> int:
        self._vms.pop(entry.identity, None)
        metrics.VMS.set(len(self._vms))
        sessions = list(entry.sessions.values())
        entry.sessions.clear()
        for s in sessions:
            for op in s.running:
                op.cancelled.set()
            await self._close_app_session(s)
        return len(sessions)

    async def close(self) -> None:
        """Close every session (service shutdown)."""
        for entry in list(self._vms.values()):
            await self._drop(entry)

    # Sessions ----------------------------------------------------------------------------------

    async def open_session(self, vm: VmIdentity, incarnation: str, ta: uuid.UUID, login: int,
                           client_uuid: uuid.UUID, params: Sequence[Param],
                           cancel_id: int = 0) -> Reply:
        entry = self._vm(vm, incarnation)
        if entry is None:
            return VM_UNKNOWN
        bad = _check_params(params)
        if login not in NORMAL_WORLD_LOGINS or bad:
            return Reply.error(TeeResult.BAD_PARAMETERS)
        app = self.apps.get(ta)
        if app is None:
            return Reply.error(TeeResult.ITEM_NOT_FOUND)
        if len(entry.sessions) >= entry.max_sessions:
            return Reply.error(TeeResult.OUT_OF_MEMORY)
        if login in ANONYMOUS_LOGINS:
            client_uuid = uuid.UUID(int=0)
        client = Client(vm, login, client_uuid)
        op = Operation(client, _padded(params), cancel_id)
        started = time.perf_counter()
        try:
            ret, context = await app.open_session(op)
        except Exception:
            ta_log.error(f"vm {vm}", "TA %s panicked in open_session", app.name, exc_info=True)
            return Reply.error(TeeResult.TARGET_DEAD)
        finally:
            metrics.ta_seconds(app.name, "open_session").observe(time.perf_counter() - started)
        out = tuple(op.params[: len(params)])
        if ret != TeeResult.SUCCESS:
            return Reply(Status.OK, ret, Origin.TRUSTED_APP, 0, out)
        if self._vm(vm, incarnation) is not entry:  # destroyed or replaced while opening
            await _quietly_close(app, context)
            return VM_UNKNOWN
        session = _Session(entry.allocate_id(), app, client, context)
        entry.sessions[session.id] = session
        metrics.sessions(app.name).inc()
        return Reply(Status.OK, TeeResult.SUCCESS, Origin.TRUSTED_APP, session.id, out)

    def _session(self, vm: VmIdentity, incarnation: str, session: int,
                 epoch: int) -> _Session | Reply | None:
        if epoch != self.epoch:
            return SESSION_LOST
        entry = self._vm(vm, incarnation)
        if entry is None:
            return VM_UNKNOWN
        return entry.sessions.get(session)

    async def invoke(self, vm: VmIdentity, incarnation: str, session: int, epoch: int,
                     func: int, params: Sequence[Param], cancel_id: int = 0) -> Reply:
        found = self._session(vm, incarnation, session, epoch)
        if isinstance(found, Reply):
            return found
        if _check_params(params):
            return Reply.error(TeeResult.BAD_PARAMETERS)
        if found is None:
            return Reply.error(TeeResult.BAD_PARAMETERS)
        s = found
        op = Operation(s.client, _padded(params), cancel_id)
        s.running.add(op)
        try:
            async with s.lock:
                if s.dead:
                    return Reply.error(TeeResult.TARGET_DEAD)
                started = time.perf_counter()
                try:
                    ret = await s.app.invoke(s.context, func & 0xFFFF_FFFF, op)
                except Exception:
                    log.exception("TA %s panicked in invoke %#x for %s", s.app.name, func, vm)
                    s.dead = True
                    return Reply.error(TeeResult.TARGET_DEAD)
                finally:
                    metrics.ta_seconds(s.app.name, "invoke").observe(
                        time.perf_counter() - started)
        finally:
            s.running.discard(op)
        return Reply(Status.OK, ret, Origin.TRUSTED_APP, 0, tuple(op.params[: len(params)]))

    async def close_session(self, vm: VmIdentity, incarnation: str, session: int,
                            epoch: int) -> Reply:
        found = self._session(vm, incarnation, session, epoch)
        if isinstance(found, Reply):
            return found
        if found is None:
            return Reply.error(TeeResult.ITEM_NOT_FOUND)
        entry = self._vms[vm]
        del entry.sessions[found.id]
        for op in found.running:
            op.cancelled.set()
        async with found.lock:
            await self._close_app_session(found)
        return Reply(Status.OK, TeeResult.SUCCESS, Origin.TEE)

    async def cancel(self, vm: VmIdentity, incarnation: str, session: int, epoch: int,
                     cancel_id: int) -> Reply:
        found = self._session(vm, incarnation, session, epoch)
        if isinstance(found, Reply):
            return found
        if found is None:
            return Reply.error(TeeResult.BAD_PARAMETERS)
        for op in found.running:
            if op.cancel_id == cancel_id:
                op.cancelled.set()
        return Reply(Status.OK, TeeResult.SUCCESS, Origin.TEE)

    async def _close_app_session(self, s: _Session) -> None:
        metrics.sessions(s.app.name).dec()
        if not s.dead:
            await _quietly_close(s.app, s.context)

    def session_count(self, vm: VmIdentity) -> int:
        entry = self._vms.get(vm)
        return 0 if entry is None else len(entry.sessions)


async def _quietly_close(app: TrustedApp, context: object) -> None:
    try:
        await app.close_session(context)
    except Exception:
        ta_log.error(f"TA {app.name}", "failed in close_session", exc_info=True)


def _check_params(params: Sequence[Param]) -> bool:
    """True when the parameters are not something a TA can receive."""
    return len(params) > NUM_PARAMS or any(not isinstance(p.type, ParamType) for p in params)


def _padded(params: Sequence[Param]) -> list[Param]:
    return list(params) + [Param() for _ in range(NUM_PARAMS - len(params))]

"""Policy versions at run time: which compiled policy each VM lives under.

A VM keeps the policy version it registered with for its whole life (its kernel filter is
frozen once a vCPU has run), so the broker holds every version still in use, loads old ones from
the store on demand, and applies a new version only to VMs registered after it. Every document is
checked and compiled in a worker thread, within the bounds of broker.policy.bounds, so the event
loop keeps serving calls while a policy (valid or not) is loaded.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from hyperbroker.broker import metrics
from hyperbroker.broker.policy import Policy, load_policy, to_proto
from hyperbroker.broker.store import Store
from hyperbroker.handlers.api import Handler
from hyperbroker.wire.v1 import broker_pb2

log = logging.getLogger("hyperbroker.broker.policy")


_T = TypeVar("_T")
_SWITCH_S = 0.0005  # the GIL hand-over interval while a policy job runs (Python's default: 5 ms)
_jobs = 0


async def off_loop(fn: Callable[..., _T], *args: object) -> _T:
    """`fn(*args)` in a worker thread. The loop thread waits for the GIL up to the interpreter's
    switch interval each time it wakes; while a job runs the interval is cut to 0.5 ms so that
    calls in flight (deadlines of tens of ms) do not queue behind the check."""
    global _jobs
    if _jobs == 0:
        sys.setswitchinterval(_SWITCH_S)
    _jobs += 1
    try:
        return await asyncio.to_thread(fn, *args)
    finally:
        _jobs -= 1
        if _jobs == 0:
            sys.setswitchinterval(_DEFAULT_SWITCH_S)


_DEFAULT_SWITCH_S = sys.getswitchinterval()


@dataclass
class PolicyVersion:
    version: int
    policy: Policy
    compiled: broker_pb2.CompiledPolicy
    # Per profile: function ID -> dispatch information, filled on first use (broker.dispatch).
    caches: dict[str, dict[int, object]] = field(default_factory=dict)


class PolicyRegistry:
    def __init__(self, store: Store, plugins: Mapping[str, type[Handler]]) -> None:
        self.store = store
        self.plugins = plugins
        self._versions: dict[int, PolicyVersion] = {}
        self.current: PolicyVersion | None = None

    async def validate(self, text: str) -> Policy:
        """Load and check `text` off the event loop; raises broker.policy.PolicyInvalid listing
        every error (at most bounds.MAX_ERRORS of them)."""
        return await off_loop(load_policy, text, self.plugins)

    async def _compile(self, text: str, version: int) -> PolicyVersion:
        def work() -> PolicyVersion:
            policy = load_policy(text, self.plugins)
            return PolicyVersion(version, policy, to_proto(policy, version))
        return await off_loop(work)

    async def apply(self, text: str) -> PolicyVersion:
        """Make `text` the current policy; the same text as the current one keeps its version."""
        policy = await self.validate(text)
        digest = hashlib.sha256(text.encode()).hexdigest()
        version = await self.store.add_policy(text, digest)
        if self.current is None or self.current.version != version:
            log.info("policy version %d current (sha256 %s)", version, digest[:12])
        pv = self._versions.get(version)
        if pv is None:
            proto = await off_loop(to_proto, policy, version)
            pv = PolicyVersion(version, policy, proto)
        self._versions[version] = pv
        self._make_current(pv)
        return pv

    def _make_current(self, pv: PolicyVersion) -> None:
        self.current = pv
        metrics.POLICY_VERSION.set(pv.version)
        for handler in pv.policy.handlers:  # exported as 0 before the handler's first error
            metrics.HANDLER_ERRORS.labels(handler)

    async def resume_latest(self) -> PolicyVersion | None:
        """Serve the newest stored version (a restart without --policy)."""
        latest = await self.store.latest_policy()
        if latest is None:
            return None
        pv = await self.get(latest.version)
        if pv is not None:
            self._make_current(pv)
        return pv

    async def get(self, version: int) -> PolicyVersion | None:
        """The version a VM registered with; loaded from the store when not in memory."""
        pv = self._versions.get(version)
        if pv is not None:
            return pv
        stored = await self.store.get_policy(version)
        if stored is None:
            return None
        pv = await self._compile(stored.text, version)
        pv = self._versions.setdefault(version, pv)  # another task may have loaded it meanwhile
        return pv

    async def refresh(self) -> PolicyVersion | None:
        """A newer version another broker process stored, made current here; else None."""
        latest = await self.store.latest_policy()
        if latest is None or (self.current is not None and latest.version <= self.current.version):
            return None
        pv = await self.get(latest.version)
        if pv is not None:
            self._make_current(pv)
            log.info("policy version %d found in the store, now current", pv.version)
        return pv

    def all_handlers(self) -> list[Handler]:
        return [h for pv in self._versions.values() for h in pv.policy.handlers.values()]

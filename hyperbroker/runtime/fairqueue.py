"""Per-VM fair queuing on top of a per-VM token bucket, with no I/O and no clock of its own.

A call whose VM has a token and nothing queued runs at once (the fast path: one subtraction).
Otherwise it waits in its VM's FIFO. `poll(now_ns)` hands back, in deficit-round-robin order over
the VMs with a backlog, the calls whose VM has earned a token since, and every queued call whose
deadline has passed (the caller answers those with their fallback). A VM over its rate is so
slowed to its rate: its calls wait, then fall back at their deadline, and they never take a turn
from a VM under its rate. Memory is bounded per VM (`max_queued`; a call beyond it is refused at
once; 0 makes it a plain token bucket). Time is passed in, so tests drive it deterministically.
This module knows neither calls nor VMs: a key is any hashable, an item any object.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from enum import Enum
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class Admit(Enum):
    RUN = "run"  # run it now
    QUEUED = "queued"  # it comes back from poll(), released or expired
    REFUSED = "refused"  # its VM's queue is full: answer with the fallback now


@dataclass(slots=True)
class _Flow(Generic[T]):
    tokens: float
    refilled_ns: int
    queue: deque[tuple[int, T]] = field(default_factory=deque)  # (deadline_ns, item)


class FairQueue(Generic[K, T]):
    def __init__(self, rate: float, burst: float = 0.0, *, quantum: int = 1,
                 max_queued: int = 64) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, not {rate}")
        if quantum < 1 or max_queued < 0:
            raise ValueError(f"quantum must be at least 1 (not {quantum}) and max_queued "
                             f"at least 0 (not {max_queued})")
        self.rate = rate
        self.burst = burst or rate  # one second's worth
        self.quantum = quantum
        self.max_queued = max_queued
        self.flows: dict[K, _Flow[T]] = {}
        self._active: deque[K] = deque()  # VMs with a backlog, in round-robin order
        self.queued = 0

    def _flow(self, key: K, now_ns: int) -> _Flow[T]:
        flow = self.flows.get(key)
        if flow is None:
            flow = self.flows[key] = _Flow(self.burst, now_ns)
        else:
            flow.tokens = min(self.burst,
                              flow.tokens + (now_ns - flow.refilled_ns) * self.rate / 1e9)
            flow.refilled_ns = now_ns
        return flow

    def offer(self, key: K, item: T, now_ns: int, deadline_ns: int) -> Admit:
        flow = self._flow(key, now_ns)
        if not flow.queue and flow.tokens >= 1.0:
            flow.tokens -= 1.0
            return Admit.RUN
        if len(flow.queue) >= self.max_queued:
            return Admit.REFUSED
        if not flow.queue:
            self._active.append(key)
        flow.queue.append((deadline_ns, item))
        self.queued += 1
        return Admit.QUEUED

    def poll(self, now_ns: int) -> tuple[list[T], list[T]]:
        """(released, expired) since the last poll. Expired calls spend no token."""
        released: list[T] = []
        expired: list[T] = []
        for _ in range(len(self._active)):
            key = self._active.popleft()
            flow = self._flow(key, now_ns)
            q = flow.queue
            kept = deque(e for e in q if e[0] > now_ns)
            if len(kept) != len(q):
                expired.extend(item for d, item in q if d <= now_ns)
                self.queued -= len(q) - len(kept)
                flow.queue = q = kept
            n = 0
            while q and n < self.quantum and flow.tokens >= 1.0:
                flow.tokens -= 1.0
                released.append(q.popleft()[1])
                n += 1
            self.queued -= n
            if q:
                self._active.append(key)
        return released, expired

    def next_event_ns(self, now_ns: int) -> int | None:
        """When poll() has something to hand back next, or None with nothing queued."""
        best: int | None = None
        for key in self._active:
            flow = self.flows[key]
            wait = max(0.0, 1.0 - flow.tokens) * 1e9 / self.rate
            t = min(flow.refilled_ns + int(wait) + 1, min(d for d, _ in flow.queue))
            best = t if best is None else min(best, t)
        return None if best is None else max(best, now_ns)

    def forget(self, key: K) -> list[T]:
        """A VM gone: its queued calls, for the caller to drop."""
        flow = self.flows.pop(key, None)
        if flow is None:
            return []
        if flow.queue:
            self._active.remove(key)
            self.queued -= len(flow.queue)
        return [item for _, item in flow.queue]

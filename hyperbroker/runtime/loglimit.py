"""Bounded logs: a peer may make the service write a few lines, then one summary per window.

A peer (an agent host, a gRPC client's address, a VMM process) that sends bad input as fast as
it can must not turn the service's log into its amplifier. Every line a peer can cause goes
through a PeerLog: it is written while that peer's token bucket has a token, otherwise only
counted, and SUMMARY_S after the first line held back one line says how many were. The bucket
table is bounded (MAX_PEERS), so a peer that keeps changing its name cannot grow it: past the
bound a quiet peer (its bucket full again, nothing held back) is forgotten, and when none is
quiet the newcomers share one bucket, OVERFLOW. Counting what was refused is the callers' job
(their `..._malformed_total` counters count every event, logged or not).

LogBudget is the whole policy and does no I/O: the caller passes the time. Limiter adds the
clock, the event loop's timer and the summary lines; PeerLog is a logger on top of it. None of
them knows who the peers are: a peer is the name its caller gives it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TypeAlias

BURST = 10  # lines a quiet peer may cause at once
RATE_PER_S = 0.2  # then one more every 5 s
SUMMARY_S = 30.0  # how long after its first held-back line a peer's summary is written
MAX_PEERS = 1024
OVERFLOW = "other peers (log limiter table full)"

ExcInfo: TypeAlias = (bool | BaseException
                      | tuple[type[BaseException], BaseException, TracebackType | None] | None)


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float
    held: int = 0  # lines held back in the current window


@dataclass(frozen=True, slots=True)
class Summary:
    peer: str
    held: int
    window_s: float


class LogBudget:
    """Token buckets per peer; `admit` says whether a line may be written now, `due` returns
    the summaries of windows that have ended."""

    def __init__(self, *, burst: float = BURST, rate_per_s: float = RATE_PER_S,
                 summary_s: float = SUMMARY_S, max_peers: int = MAX_PEERS) -> None:
        if burst < 1 or rate_per_s < 0 or summary_s <= 0 or max_peers < 1:
            raise ValueError("LogBudget needs burst >= 1, rate >= 0, summary_s > 0, "
                             "max_peers >= 1")
        self.burst = float(burst)
        self.rate = rate_per_s
        self.summary_s = summary_s
        self.max_peers = max_peers
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()  # least recently heard first
        self._overflow: _Bucket | None = None
        # Peers with lines held back, by when their window ends; every window is summary_s
        # long, so insertion order is also the order in which they end.
        self._windows: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def admit(self, peer: str, now: float) -> bool:
        bucket = self._bucket(peer, now)
        if bucket is self._overflow:
            peer = OVERFLOW
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate)
        bucket.stamp = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return True
        if bucket.held == 0:
            self._windows[peer] = now + self.summary_s
        bucket.held += 1
        return False

    def _bucket(self, peer: str, now: float) -> _Bucket:
        bucket = self._buckets.get(peer)
        if bucket is not None:
            self._buckets.move_to_end(peer)
            return bucket
        if len(self._buckets) >= self.max_peers:
            oldest_name, oldest = next(iter(self._buckets.items()))
            refilled = oldest.tokens + (now - oldest.stamp) * self.rate
            if oldest.held or refilled < self.burst:
                if self._overflow is None:
                    self._overflow = _Bucket(self.burst, now)
                return self._overflow
            del self._buckets[oldest_name]  # quiet: a fresh bucket would look the same
        bucket = self._buckets[peer] = _Bucket(self.burst, now)
        return bucket

    def next_due(self) -> float | None:
        """When the earliest pending summary is due, or None when nothing is held back."""
        return next(iter(self._windows.values()), None)

    def due(self, now: float) -> list[Summary]:
        out = []
        while self._windows:
            peer, end = next(iter(self._windows.items()))
            if end > now:
                break
            del self._windows[peer]
            bucket = self._overflow if peer == OVERFLOW else self._buckets.get(peer)
            if bucket is not None and bucket.held:
                out.append(Summary(peer, bucket.held, self.summary_s))
                bucket.held = 0
        return out

    def pending(self) -> list[Summary]:
        """Every summary not yet due (for a process that stops)."""
        return self.due(float("inf"))


class Limiter:
    """The I/O half of a LogBudget: it writes summaries when their windows end, from a timer
    on the running event loop (with no loop running, at the next line logged), each on the
    logger of the line that opened the window, at WARNING."""

    def __init__(self, budget: LogBudget | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.budget = budget if budget is not None else LogBudget()
        self.clock = clock
        self._owners: dict[str, logging.Logger] = {}
        self._timer: asyncio.TimerHandle | None = None

    def admit(self, logger: logging.Logger, peer: str) -> bool:
        now = self.clock()
        self._summarise(self.budget.due(now))
        if self.budget.admit(peer, now):
            return True
        self._owners.setdefault(peer, logger)
        self._arm()
        return False

    def flush(self) -> None:
        """Write every pending summary now (a process that stops says what it held back)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._summarise(self.budget.pending())

    def _summarise(self, summaries: list[Summary]) -> None:
        for s in summaries:
            logger = self._owners.pop(s.peer, None) or logging.getLogger("hyperbroker")
            logger.warning("%s: suppressed %d similar messages in the last %g s", s.peer,
                           s.held, s.window_s)

    def _arm(self) -> None:
        at = self.budget.next_due()
        if at is None or self._timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._timer = loop.call_later(max(0.0, at - self.clock()), self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._summarise(self.budget.due(self.clock()))
        self._arm()


# One per process: a peer's lines share one bucket whichever module writes them.
SHARED = Limiter()


class PeerLog:
    """A logger whose every line is caused by a named peer: "PEER: message", bounded per peer
    by a Limiter (the process's SHARED one unless given)."""

    def __init__(self, logger: logging.Logger, limiter: Limiter | None = None) -> None:
        self.logger = logger
        self.limiter = limiter if limiter is not None else SHARED

    def log(self, level: int, peer: str, msg: str, *args: object,
            exc_info: ExcInfo = None) -> bool:
        """Write the line if the peer's budget allows; True when it was written."""
        if not self.logger.isEnabledFor(level) or not self.limiter.admit(self.logger, peer):
            return False
        self.logger.log(level, "%s: " + msg, peer, *args, exc_info=exc_info)
        return True

    def info(self, peer: str, msg: str, *args: object) -> bool:
        return self.log(logging.INFO, peer, msg, *args)

    def warning(self, peer: str, msg: str, *args: object, exc_info: ExcInfo = None) -> bool:
        return self.log(logging.WARNING, peer, msg, *args, exc_info=exc_info)

    def error(self, peer: str, msg: str, *args: object, exc_info: ExcInfo = None) -> bool:
        return self.log(logging.ERROR, peer, msg, *args, exc_info=exc_info)

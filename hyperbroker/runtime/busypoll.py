"""Keep an event loop polling, instead of sleeping, for a short window after activity.

At one call in flight most of a forwarded call's time is not work but wake-ups: each time a
sleeping process or thread is woken on an idle core, the core leaves its idle state first, which
costs about 50 us on a nested VM (docs/performance.md). KVM answers the same problem for vCPUs
with halt polling. BusyPoll does it for an asyncio loop: after `kick()` the loop keeps running
(a callback re-schedules itself, so each loop iteration polls its sockets with a zero timeout)
until `window_us` has passed without another kick, and then sleeps as usual. What arrives in the
window — the broker's result, the VMM's next call — is picked up without a wake-up, by code that
is still in the CPU's caches.

The price is CPU: up to one core for `window_us` after each kick. Nothing is spent while there
is no traffic, and under load the loop is busy anyway. A window of 0 turns it off.
"""

from __future__ import annotations

import asyncio
import time


class BusyPoll:
    def __init__(self, loop: asyncio.AbstractEventLoop, window_us: float) -> None:
        if window_us < 0:
            raise ValueError(f"busy-poll window must be >= 0 us, not {window_us}")
        self._loop = loop
        self._window_ns = int(window_us * 1000)
        self._until = 0
        self.active = False
        self.spins = 0  # loop iterations spent polling, for tests and curiosity

    @property
    def enabled(self) -> bool:
        return self._window_ns > 0

    def kick(self) -> None:
        """Activity: poll until `window_us` from now."""
        if self._window_ns:
            self._until = time.monotonic_ns() + self._window_ns
            if not self.active:
                self.active = True
                self._loop.call_soon(self._step)

    def _step(self) -> None:
        if time.monotonic_ns() < self._until:
            self.spins += 1
            self._loop.call_soon(self._step)
        else:
            self.active = False

"""The proxy's "OP-TEE threads": messages of a VM that are being served by the TEE backend.

OP-TEE runs each yielding call on a thread; when the call must wait it returns to the normal world
with an RPC (a foreign interrupt) and the normal world resumes the thread with RETURN_FROM_RPC,
handing back a1..a3 (OPTEE_SMC_RETURN_*, optee_smc.h; OPTEE_SMC_RPC_*, optee_smc.h). The proxy does
the same with backend calls that outlast `yield_ms`: the vCPU goes back to the guest, the backend
call goes on as a task, and RETURN_FROM_RPC picks up its completion. A thread is named by the
registers of the call that started it (a1, a2, a3: the message's address or registered-SHM cookie
and offset), which is also what a fallback that writes only a0 leaves the guest to hand back.

Like OP-TEE's threads these live in memory: after a broker restart RETURN_FROM_RPC finds nothing
and gets ERESUME (the guest reports TEEC_ERROR_COMMUNICATION for that one call). Finished threads
are kept a short while after their answer was given, so an answer the broker dropped (the agent
gave the guest a fallback first) can be given again on RETURN_FROM_RPC.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Key = tuple[int, int, int]  # a1, a2, a3 of the call that started the thread
T = TypeVar("T")

KEEP_DELIVERED_NS = 60 * 1_000_000_000


@dataclass(eq=False)
class Thread(Generic[T]):
    key: Key
    task: asyncio.Future[T]  # a Task while served, or an already resolved Future
    cookies: frozenset[int] = frozenset()  # registered SHM the thread reads or writes
    context: object = None  # what delivery needs besides the task's result (message location)
    delivered_ns: int | None = None

    @property
    def running(self) -> bool:
        return not self.task.done()


@dataclass
class ThreadTable(Generic[T]):
    """Threads per VM (by VmInfo.key)."""

    _vms: dict[str, dict[Key, Thread[T]]] = field(default_factory=dict)

    def threads(self, vm: str) -> Iterable[Thread[T]]:
        return self._vms.get(vm, {}).values()

    def running(self, vm: str) -> int:
        return sum(1 for t in self.threads(vm) if t.running)

    def get(self, vm: str, key: Key) -> Thread[T] | None:
        return self._vms.get(vm, {}).get(key)

    def users_of(self, vm: str, cookie: int) -> list[Thread[T]]:
        return [t for t in self.threads(vm) if t.running and cookie in t.cookies]

    def add(self, vm: str, thread: Thread[T], keep: int) -> None:
        """Start tracking `thread` (replacing one of the same key); of the VM's threads that no
        longer run, keep only the `keep` newest, so a guest that never resumes its messages
        cannot make the table grow."""
        threads = self._vms.setdefault(vm, {})
        threads.pop(thread.key, None)
        threads[thread.key] = thread
        self._trim(threads, keep, None)

    def delivered(self, vm: str, thread: Thread[T], now_ns: int, keep: int) -> None:
        """The thread's answer went out; it stays a while for a RETURN_FROM_RPC that repeats
        the call after a dropped answer."""
        thread.delivered_ns = now_ns
        self._trim(self._vms.get(vm, {}), keep, now_ns)

    @staticmethod
    def _trim(threads: dict[Key, Thread[T]], keep: int, now_ns: int | None) -> None:
        idle = [t for t in threads.values() if not t.running]  # oldest first
        for old in idle[: max(0, len(idle) - keep)]:
            threads.pop(old.key, None)
        if now_ns is not None:
            for old in idle:
                if old.delivered_ns is not None and now_ns - old.delivered_ns > KEEP_DELIVERED_NS:
                    threads.pop(old.key, None)

    def forget(self, vm: str) -> list[Thread[T]]:
        """Drop every thread of the VM, cancelling the running ones; returns them."""
        threads = list(self._vms.pop(vm, {}).values())
        for t in threads:
            if t.running:
                t.task.cancel()
        return threads

    def forget_all(self) -> list[Thread[T]]:
        out = []
        for vm in list(self._vms):
            out.extend(self.forget(vm))
        return out

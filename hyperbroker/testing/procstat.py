"""What a process costs, read from /proc: CPU time (user and system apart), resident memory, and
which cores it may run on. Linux only (proc(5)); used by the benchmark and the tests.

`/proc/PID/stat` of a process (its thread-group leader) sums every thread's time, gRPC core's
threads included; times are in clock ticks (`SC_CLK_TCK`, usually 10 ms), so a measurement needs
enough calls to span many ticks.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class CpuTimes:
    user_s: float
    system_s: float

    @property
    def total_s(self) -> float:
        return self.user_s + self.system_s

    def __sub__(self, other: CpuTimes) -> CpuTimes:
        return CpuTimes(self.user_s - other.user_s, self.system_s - other.system_s)


def cpu_times(pid: int) -> CpuTimes:
    """utime and stime of `pid`, all its threads (proc(5), fields 14 and 15)."""
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return CpuTimes(int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK)


def rss_bytes(pid: int) -> int:
    """Resident set size of `pid` (proc(5), /proc/PID/statm field 2, in pages)."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE


def pin(pid: int, cpus: set[int]) -> None:
    """Run every thread of `pid` on `cpus` only. sched_setaffinity(2) takes one thread: a
    process's threads that exist already are each pinned here, later ones inherit it."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(task.name), cpus)


def own_core_split() -> tuple[set[int], set[int]] | None:
    """(one core for the server under test, the other cores for everything else) among the
    cores this process may use; None on a single core."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return None
    return {cores[-1]}, set(cores[:-1])

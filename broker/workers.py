"""`hyperbroker serve --workers N`: N broker processes sharing one port and one state directory.

gRPC balances nothing inside a process that Python's GIL serialises, so a machine with several
cores runs several brokers. Each worker is an ordinary `hyperbroker serve` started with
`--reuse-port` (the kernel spreads new agent streams across them at accept time) and its own
metrics port (the base port plus its index; the parent's own metrics are on the base port plus
N). The parent supervises them: a worker that dies is logged, counted and started again after an
exponential backoff, so the parent never carries on with fewer workers. A worker that exits with
status 2 (a configuration error, the same for every restart) stops them all with 2. The parent
forwards SIGTERM/SIGINT, so every worker drains, and exits 0 when all of them did.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from hyperbroker.runtime.metrics import Counter, Gauge, MetricSet, serve

USAGE_ERROR = 2  # hyperbroker.cli: a configuration or usage error
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
STABLE_S = 60.0  # a worker up this long starts its next backoff from BACKOFF_FIRST_S again
POLL_S = 0.1

SUPERVISOR = MetricSet("workers")
RESTARTS = Counter("hyperbroker_workers_restarts_total",
                   "Broker workers started again after they died, by worker index",
                   ["worker"], registry=SUPERVISOR)
RUNNING = Gauge("hyperbroker_workers_running", "Broker worker processes running",
                registry=SUPERVISOR)
WANTED = Gauge("hyperbroker_workers_wanted", "Broker worker processes asked for (--workers)",
               registry=SUPERVISOR)


def _port_plus(address: str, index: int) -> str:
    host, _, port = address.rpartition(":")
    return f"{host}:{int(port) + index if int(port) else 0}"


def metrics_listen(argv: Sequence[str]) -> str | None:
    """The --metrics-listen value in `argv`, either form; None without one."""
    for i, arg in enumerate(argv):
        if arg == "--metrics-listen" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--metrics-listen="):
            return arg.partition("=")[2]
    return None


def worker_args(argv: Sequence[str], index: int) -> list[str]:
    """`argv` of `hyperbroker ...` rewritten for worker `index`."""
    out: list[str] = []
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == "--workers":
            skip = True
            continue
        if arg.startswith("--workers="):
            continue
        if arg == "--metrics-listen" and i + 1 < len(argv):
            out += [arg, _port_plus(argv[i + 1], index)]
            skip = True
            continue
        if arg.startswith("--metrics-listen="):
            out.append(f"--metrics-listen={_port_plus(arg.partition('=')[2], index)}")
            continue
        out.append(arg)
    return [*out, "--reuse-port"]


def backoff(pending_s: float, uptime_s: float) -> tuple[float, float]:
    """(the wait before this restart, the one after it) for a worker that died after `uptime_s`
    with `pending_s` as its next wait: doubling up to BACKOFF_MAX_S, from BACKOFF_FIRST_S again
    once the worker had run STABLE_S."""
    wait = BACKOFF_FIRST_S if uptime_s >= STABLE_S else pending_s
    return wait, min(wait * 2, BACKOFF_MAX_S)


@dataclass
class Worker:
    index: int
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    backoff_s: float = BACKOFF_FIRST_S
    restart_at: float | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "hyperbroker.cli", *self.argv])
        self.started = time.monotonic()
        self.restart_at = None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def log(message: str) -> None:
    print(f"hyperbroker serve: {message}", file=sys.stderr, flush=True)


def run_workers(n: int, argv: Sequence[str]) -> int:
    workers = [Worker(i, worker_args(argv, i)) for i in range(n)]
    for w in workers:
        RESTARTS.labels(str(w.index))  # 0 before the first restart
    WANTED.set(n)
    RUNNING.set_function(lambda: sum(w.running() for w in workers))
    base = metrics_listen(argv)
    if base is not None:
        port = serve(_port_plus(base, n), SUPERVISOR)
        log(f"supervisor metrics on :{port}")
    stopping: list[int] = []
    failed = 0

    def forward(sig: int, _frame: object) -> None:
        stopping.append(sig)
        for w in workers:
            if w.running():
                assert w.proc is not None
                w.proc.send_signal(sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for w in workers:
        w.start()
    while True:
        now = time.monotonic()
        for w in workers:
            assert w.proc is not None
            code = w.proc.poll()
            if code is None or w.restart_at is not None:
                if w.restart_at is not None and now >= w.restart_at and not stopping:
                    RESTARTS.labels(str(w.index)).inc()
                    log(f"worker {w.index}: starting it again")
                    w.start()
                continue
            if stopping:
                if code:
                    log(f"worker {w.index} exited with status {code}")
                    failed = failed or code
                w.restart_at = float("inf")  # stays down: we are stopping
                continue
            if code == USAGE_ERROR:
                log(f"worker {w.index} exited with status {code} (a configuration error: "
                    "every restart would fail alike); stopping the others")
                forward(signal.SIGTERM, None)
                failed = USAGE_ERROR
                w.restart_at = float("inf")
                continue
            wait, w.backoff_s = backoff(w.backoff_s, now - w.started)
            log(f"worker {w.index} died (status {code}); starting it again in {wait:g} s")
            w.restart_at = now + wait
        if stopping and not any(w.running() for w in workers):
            return failed
        time.sleep(POLL_S)

"""`hyperbroker serve --workers N`: N broker processes sharing one port and one state directory.

gRPC balances nothing inside a process that Python's GIL serialises, so a machine with several
cores runs several brokers. Each worker is an ordinary `hyperbroker serve` started with
`--reuse-port` (the kernel spreads new agent streams across them at accept time) and its own
metrics port (the base port plus its index). The parent forwards SIGTERM/SIGINT, so every worker
drains, and exits with the first non-zero status.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Sequence


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
            host, _, port = argv[i + 1].rpartition(":")
            out += [arg, f"{host}:{int(port) + index if int(port) else 0}"]
            skip = True
            continue
        out.append(arg)
    return [*out, "--reuse-port"]


def run_workers(n: int, argv: Sequence[str]) -> int:
    procs = [subprocess.Popen([sys.executable, "-m", "hyperbroker.cli", *worker_args(argv, i)])
             for i in range(n)]

    def forward(sig: int, _frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [p.wait() for p in procs]
    for i, code in enumerate(codes):
        if code:
            print(f"hyperbroker serve: worker {i} exited with status {code}", file=sys.stderr,
                  flush=True)
    return next((c for c in codes if c), 0)

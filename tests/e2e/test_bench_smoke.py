"""`hyperbroker bench` runs end to end and reports both paths and their ratios.

No timing is asserted here: performance is judged from the benchmark's own figures
(docs/performance.md), never from a timed test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_the_benchmark_prints_both_paths_and_the_ratios(tmp_path: Path) -> None:
    out_file = tmp_path / "bench.json"
    out = subprocess.run([sys.executable, "-m", "hyperbroker.cli", "bench", "--calls", "200",
                          "--rounds", "1", "--inflight", "1", "8", "--json", str(out_file)],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "grpc echo ping-pong (baseline)" in out.stdout
    assert "VMM -> agent -> broker -> TRNG, 8 in flight" in out.stdout
    assert "VMM -> agent -> broker -> TRNG, 1 in flight, agent busy-polls 1000 us" in out.stdout
    assert "x baseline round trip" in out.stdout
    report = json.loads(out_file.read_text())
    assert set(report["ratios"]) == {"1", "8", "1+poll", "8+poll"}
    assert all(f["calls"] > 0 and f["p50_us"] > 0 for f in report["medians"])


def test_the_benchmark_measures_stateful_calls_on_each_store(tmp_path: Path,
                                                            redis_server: object) -> None:
    """`redis_server` only to skip loudly where redis-server is missing; the bench starts its
    own."""
    out_file = tmp_path / "bench.json"
    out = subprocess.run([sys.executable, "-m", "hyperbroker.cli", "bench", "--calls", "200",
                          "--rounds", "1", "--inflight", "1", "8", "--busy-poll-us", "0",
                          "--stores", "sqlite", "redis", "--stateful", "--json", str(out_file)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "VMM -> agent -> broker -> memshare (commits), 8 in flight, redis store" in out.stdout
    report = json.loads(out_file.read_text())
    assert set(report["ratios"]) == {f"{k}{w} {s}" for k in ("1", "8")
                                     for w in ("", " memshare") for s in ("sqlite", "redis")}


def test_the_noisy_neighbour_benchmark_prints_every_setting() -> None:
    out = subprocess.run([sys.executable, "-m", "hyperbroker.cli", "bench", "--noisy-neighbour",
                          "--calls", "30"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    for setting in ("fair queue on", "fair queue off (token bucket only)", "no rate limit"):
        line = next(x for x in out.stdout.splitlines() if x.startswith(setting + " "))
        b_not_ok = line.split()[-3]
        assert b_not_ok == "0", line  # the quiet VM, under its rate, is always served

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


def test_the_sporadic_benchmark_reports_latency_and_cpu_per_call_against_the_echo(
        tmp_path: Path) -> None:
    out_file = tmp_path / "sporadic.json"
    out = subprocess.run([sys.executable, "-m", "hyperbroker.cli", "bench", "--sporadic",
                          "--rates", "100", "--seconds", "1", "--rounds", "1", "--vcpus", "2",
                          "--json", str(out_file)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "round 1/1, 100 calls/s per vCPU: forwarded" in out.stderr  # progress lines
    assert "100 calls/s: p50 = " in out.stdout and "agent = " in out.stdout
    report = json.loads(out_file.read_text())
    (row,) = report["rounds"]
    echo, fwd = row["echo"], row["forwarded"]
    for fig in (echo, fwd):
        assert fig["calls"] == 200  # 2 vCPUs x 100 calls/s x 1 s
        assert 0 < fig["p50_us"] <= fig["p99_us"]
    for cpu in (echo["echo_server_cpu_per_message"], fwd["broker_cpu_per_call"],
                fwd["agent_cpu_per_call"]):
        assert cpu["user_us"] >= 0 and cpu["system_us"] >= 0
        assert cpu["total_us"] == pytest.approx(cpu["user_us"] + cpu["system_us"])
    # Something ran: a second of calls costs the agent and the broker at least a clock tick.
    assert fwd["broker_cpu_per_call"]["total_us"] > 0 and fwd["agent_cpu_per_call"]["total_us"] > 0
    assert set(report["ratios"]["100"]) == {"p50_vs_echo", "p99_vs_echo",
                                            "broker_cpu_vs_echo_server",
                                            "agent_cpu_vs_echo_server"}


def test_the_scale_benchmark_reports_latency_cpu_and_memory_of_broker_and_agents(
        tmp_path: Path) -> None:
    out_file = tmp_path / "scale.json"
    out = subprocess.run([sys.executable, "-m", "hyperbroker.cli", "bench", "--scale",
                          "--agents", "2", "--vms", "4", "--vcpus", "2", "--rate", "20",
                          "--seconds", "2", "--json", str(out_file)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "registering 4 VMs x 2 vCPUs" in out.stderr
    assert "broker: CPU " in out.stdout and "p99.9" in out.stdout
    r = json.loads(out_file.read_text())
    assert (r["agents"], r["vms"], r["vcpus_per_vm"]) == (2, 4, 2)
    assert r["calls"] > 0 and 0 <= r["not_ok"] < r["calls"]  # fallbacks only if the machine stalls
    assert 0 < r["p50_us"] <= r["p99_us"] <= r["p999_us"]
    assert r["broker"]["rss_mib"] > 10 and r["agent_each"]["rss_mib_max"] > 10
    assert r["broker"]["cpu_pct_of_core"] > 0 and r["agents_total"]["cpu_pct_of_core"] > 0


def test_the_benchmark_modes_are_one_at_a_time() -> None:
    out = subprocess.run([sys.executable, "-m", "hyperbroker.cli", "bench", "--sporadic",
                          "--scale"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "give one of --sporadic, --scale, --noisy-neighbour" in out.stderr

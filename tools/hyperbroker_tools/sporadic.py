"""`hyperbroker bench --sporadic`: calls as guests make them, and what each one costs in CPU.

A vCPU makes a hypercall, runs for a while, makes another: each of `--vcpus` vCPUs (a blocking
thread each, with a VM and a VMM connection of its own, as a VMM's vCPU thread) waits an
exponentially distributed gap (mean 1/rate) after each result before its next call, at each
rate of `--rates` in turn. The baseline, in the same round: the bare grpc.aio echo with the very
same gaps (the same seeds), one stream per vCPU. Latency is the round trip alone, never the gap.

CPU per call comes from /proc/PID/stat over each measurement (user and system apart, every
thread of the process): the broker's and the agent's per forwarded call against the echo
server's per message at the same rate. Where there are two cores or more, the broker and the
echo server (its counterpart) run on a core of their own and everything else on the others.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from hyperbroker.testing.procs import start_agent, start_broker
from hyperbroker.testing.procstat import CpuTimes, cpu_times, own_core_split, pin
from hyperbroker.testing.vmm import VmmClient
from hyperbroker_tools.bench import BENCH_POLICY, EchoBaseline, vcpu_thread

SEED = 13


def gaps_for(rate: float, seconds: float, vcpus: int, round_no: int) -> list[list[float]]:
    """Each vCPU's gaps: exponential with mean 1/rate, `rate * seconds` of them, seeded so that
    the baseline and the forwarded path see the same sequence."""
    n = max(1, round(rate * seconds))
    return [[random.Random(SEED + 1000 * round_no + v).expovariate(rate) for _ in range(n)]
            for v in range(vcpus)]


def quantile_us(lat: list[int], q: float) -> float:
    s = sorted(lat)
    return s[min(len(s) - 1, int(q * len(s)))] / 1e3


def cpu_per_call_us(delta: CpuTimes, calls: int) -> dict[str, float]:
    return {"user_us": delta.user_s / calls * 1e6, "system_us": delta.system_s / calls * 1e6,
            "total_us": delta.total_s / calls * 1e6}


class CpuMeter:
    """CPU spent by a few processes between `start` and `stop`."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._t0 = {name: cpu_times(pid) for name, pid in pids.items()}

    def stop(self) -> dict[str, CpuTimes]:
        return {name: cpu_times(pid) - self._t0[name] for name, pid in self.pids.items()}


def _latency(lat: list[int]) -> dict[str, float]:
    return {"calls": len(lat), "p50_us": quantile_us(lat, 0.5), "p99_us": quantile_us(lat, 0.99)}


async def _forwarded(agent_socket: Path, name: str, gaps: list[list[float]],
                     pool: ThreadPoolExecutor, pids: dict[str, int]) -> dict[str, Any]:
    """Each vCPU its own VM and connection; a blocking thread each, calling with its gaps."""
    loop = asyncio.get_running_loop()
    clients, vm_ids = [], []
    for v in range(len(gaps)):
        client = await VmmClient.connect(str(agent_socket), "seqpacket")
        vm_ids.append((await client.register(f"{name}-{v}", 1)).vm_id)
        loop.remove_reader(client.sock.fileno())
        client.sock.setblocking(True)
        clients.append(client)
    try:
        await asyncio.gather(*(loop.run_in_executor(pool, vcpu_thread, c.sock, vm, 1, 20, [])
                               for c, vm in zip(clients, vm_ids, strict=True)))  # warm-up
        meter = CpuMeter(pids)
        t0 = time.perf_counter()
        lats = await asyncio.gather(*(
            loop.run_in_executor(pool, vcpu_thread, c.sock, vm, 1001, len(g), [], False, g)
            for c, vm, g in zip(clients, vm_ids, gaps, strict=True)))
        wall = time.perf_counter() - t0
        cpu = meter.stop()
    finally:
        for c in clients:
            c.sock.close()
    lat = [x for one in lats for x in one]
    return {**_latency(lat), "calls_per_s": len(lat) / wall,
            **{f"{who}_cpu_per_call": cpu_per_call_us(d, len(lat)) for who, d in cpu.items()}}


async def _echo(echo: EchoBaseline, gaps: list[list[float]]) -> dict[str, Any]:
    await echo.run_gapped([[0.0] * 20 for _ in gaps])  # warm-up, every stream
    meter = CpuMeter({"echo_server": echo.server_pid})
    t0 = time.perf_counter()
    lat = await echo.run_gapped(gaps)
    wall = time.perf_counter() - t0
    cpu = meter.stop()["echo_server"]
    return {**_latency(lat), "calls_per_s": len(lat) / wall,
            "echo_server_cpu_per_message": cpu_per_call_us(cpu, len(lat))}


def ratios(echo: dict[str, Any], path: dict[str, Any]) -> dict[str, float]:
    """The issue's targets, as ratios to the same round's echo."""
    per_msg = echo["echo_server_cpu_per_message"]["total_us"] or float("nan")
    return {"p50_vs_echo": path["p50_us"] / echo["p50_us"],
            "p99_vs_echo": path["p99_us"] / echo["p99_us"],
            "broker_cpu_vs_echo_server": path["broker_cpu_per_call"]["total_us"] / per_msg,
            "agent_cpu_vs_echo_server": path["agent_cpu_per_call"]["total_us"] / per_msg}


async def _measure(args: argparse.Namespace, progress: Any) -> list[dict[str, Any]]:
    split = None if args.no_pin else own_core_split()
    if split is not None:
        pin(os.getpid(), split[1])  # the VMMs and the echo client: off the servers' core
    out: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="hb-sporadic-") as tmp, \
            ThreadPoolExecutor(max_workers=args.vcpus) as pool:
        policy = Path(tmp) / "policy.yaml"
        policy.write_text(BENCH_POLICY)
        broker = start_broker(policy, Path(tmp) / "state", metrics=False)
        agents = []
        try:
            agents.append(("", start_agent(broker.address, "sporadic", Path(tmp),
                                           metrics=False)))
            if args.busy_poll_us:
                agents.append((f"+poll {args.busy_poll_us:g}", start_agent(
                    broker.address, "sporadic-poll", Path(tmp), metrics=False,
                    extra=["--busy-poll-us", str(args.busy_poll_us)])))
            async with EchoBaseline() as echo:
                if split is not None:
                    pin(broker.process.proc.pid, split[0])
                    pin(echo.server_pid, split[0])
                    for _, a in agents:
                        pin(a.process.proc.pid, split[1])
                for r in range(args.rounds):
                    for rate in args.rates:
                        gaps = gaps_for(rate, args.seconds, args.vcpus, r)
                        progress(f"round {r + 1}/{args.rounds}, {rate:g} calls/s per vCPU: "
                                 f"echo")
                        row: dict[str, Any] = {"round": r + 1, "rate": rate,
                                               "echo": await _echo(echo, gaps)}
                        for label, a in agents:
                            progress(f"round {r + 1}/{args.rounds}, {rate:g} calls/s per "
                                     f"vCPU: forwarded{label}")
                            pids = {"broker": broker.process.proc.pid,
                                    "agent": a.process.proc.pid}
                            fig = await _forwarded(a.socket, f"r{r}-{rate:g}{label}", gaps,
                                                   pool, pids)
                            fig["ratios"] = ratios(row["echo"], fig)
                            row["forwarded" + label] = fig
                        out.append(row)
        finally:
            for _, a in agents:
                a.process.stop()
            broker.process.stop()
    return out


def _median(rows: list[dict[str, Any]], *path: str) -> float:
    def get(row: dict[str, Any]) -> float:
        v: Any = row
        for p in path:
            v = v[p]
        return float(v)
    return statistics.median(get(r) for r in rows)


def run_sporadic(args: argparse.Namespace) -> int:
    from hyperbroker.runtime.loop import run as run_async

    def progress(line: str) -> None:
        print(f"[sporadic {time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)

    rows: list[dict[str, Any]] = []

    async def go() -> int:
        rows.extend(await _measure(args, progress))
        return 0

    run_async(go())
    paths = [k for k in rows[0] if k.startswith("forwarded")]
    print(f"sporadic: {args.vcpus} vCPU(s), exponential gaps, {args.seconds:g} s per "
          f"measurement, {args.rounds} round(s), medians over rounds; CPU per call in us "
          "(user+system)")
    print(f"{'rate/vCPU':>9} {'path':24} {'calls':>6} {'p50 us':>8} {'p99 us':>8} "
          f"{'server CPU us (u/s)':>20} {'agent CPU us (u/s)':>19}")
    summary: dict[str, Any] = {}
    for rate in args.rates:
        mine = [r for r in rows if r["rate"] == rate]
        e = "echo", "echo_server_cpu_per_message"
        print(f"{rate:>9g} {'grpc echo (baseline)':24} {int(_median(mine, 'echo', 'calls')):>6} "
              f"{_median(mine, 'echo', 'p50_us'):>8.0f} {_median(mine, 'echo', 'p99_us'):>8.0f} "
              f"{_median(mine, *e, 'total_us'):>8.0f} ({_median(mine, *e, 'user_us'):.0f}/"
              f"{_median(mine, *e, 'system_us'):.0f})")
        for p in paths:
            b, a = (p, "broker_cpu_per_call"), (p, "agent_cpu_per_call")
            print(f"{'':>9} {'VMM->agent->broker' + p[len('forwarded'):]:24} "
                  f"{int(_median(mine, p, 'calls')):>6} {_median(mine, p, 'p50_us'):>8.0f} "
                  f"{_median(mine, p, 'p99_us'):>8.0f} {_median(mine, *b, 'total_us'):>8.0f} "
                  f"({_median(mine, *b, 'user_us'):.0f}/{_median(mine, *b, 'system_us'):.0f})"
                  f"{_median(mine, *a, 'total_us'):>9.0f} ({_median(mine, *a, 'user_us'):.0f}/"
                  f"{_median(mine, *a, 'system_us'):.0f})")
    print()
    for rate in args.rates:
        mine = [r for r in rows if r["rate"] == rate]
        for p in paths:
            rt = {k: _median(mine, p, "ratios", k) for k in mine[0][p]["ratios"]}
            summary[f"{rate:g}{p[len('forwarded'):]}"] = rt
            print(f"{rate:>6g} calls/s{p[len('forwarded'):]}: p50 = {rt['p50_vs_echo']:.2f} x "
                  f"echo (target <= 1.4), p99 = {rt['p99_vs_echo']:.2f} x (<= 1.5); CPU per "
                  f"call: broker = {rt['broker_cpu_vs_echo_server']:.2f} x echo server's "
                  f"(<= 1.2), agent = {rt['agent_cpu_vs_echo_server']:.2f} x (<= 1.3)")
    if args.json:
        Path(args.json).write_text(json.dumps({"mode": "sporadic", "vcpus": args.vcpus,
                                               "seconds": args.seconds, "rounds": rows,
                                               "ratios": summary}, indent=2))
    return 0

"""`hyperbroker bench --scale`: one broker, many hosts, many VMs calling now and then.

`--agents` real agent processes on one real broker (SQLite store), `--vms` VMs spread over them
round robin, each with `--vcpus` vCPUs and a VMM connection of its own; every vCPU waits an
exponentially distributed gap (mean 1/`--rate`) after each result before its next
TRNG_RND64. The VMMs are this process's event loop. After a warm-up (a tenth of the run, at
least two seconds) the run measures for `--seconds`: p50/p99/p99.9, calls/s, the broker's and
the agents' CPU (/proc/PID/stat, user and system apart) and resident memory. Where there are two
cores or more the broker has one of its own and the agents and VMMs share the others, as a
broker on its own machine would. Progress goes to stderr every few seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hyperbroker.testing.procs import AgentProcess, start_agents, start_broker
from hyperbroker.testing.procstat import CpuTimes, cpu_times, own_core_split, pin, rss_bytes
from hyperbroker.testing.vmm import VmmClient
from hyperbroker_tools.bench import BENCH_POLICY, LoadGenerator
from hyperbroker_tools.sporadic import quantile_us

MiB = 1 << 20
PROGRESS_S = 5.0
REGISTER_AT_ONCE = 32
MEASURED_SEQ = 1 << 20  # first sequence number of the measured phase (the warm-up's are below)


def gaps_until(rng: random.Random, rate: float, deadline: float) -> Iterator[float]:
    """Exponential gaps for as long as the next call would still start before `deadline`."""
    while True:
        gap = rng.expovariate(rate)
        if time.monotonic() + gap >= deadline:
            return
        yield gap


class Fleet:
    """The VMs of the run: a connection, a load generator and a VM id each."""

    def __init__(self) -> None:
        self.vms: list[tuple[LoadGenerator, int]] = []

    async def register(self, agents: list[AgentProcess], nr_vms: int, nr_vcpus: int) -> None:
        gate = asyncio.Semaphore(REGISTER_AT_ONCE)

        async def one(i: int) -> tuple[LoadGenerator, int]:
            async with gate:
                client = await VmmClient.connect(str(agents[i % len(agents)].socket),
                                                 "seqpacket")
                reg = await client.register(f"scale-vm-{i}", nr_vcpus)
                return LoadGenerator(client), reg.vm_id

        self.vms = list(await asyncio.gather(*(one(i) for i in range(nr_vms))))

    async def run(self, nr_vcpus: int, rate: float, seconds: float, first_seq: int,
                  lat: list[int], seed: int) -> None:
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(
            gen.vcpu(vm_id, v, v << 24, 0, lat, first_seq=first_seq,
                     gaps=gaps_until(random.Random(seed + i * 256 + v), rate, deadline))
            for i, (gen, vm_id) in enumerate(self.vms) for v in range(nr_vcpus)))

    @property
    def not_ok(self) -> int:
        return sum(gen.errors for gen, _ in self.vms)

    def close(self) -> None:
        for gen, _ in self.vms:
            gen.loop.remove_reader(gen.sock.fileno())
            gen.sock.close()


async def _progress(lat: list[int], t0: float, total_s: float, say: Any) -> None:
    while True:
        await asyncio.sleep(PROGRESS_S)
        n = len(lat)
        say(f"{time.monotonic() - t0:.0f} of {total_s:.0f} s measured: {n} calls, "
            f"{n / (time.monotonic() - t0):.0f}/s, p50 so far "
            f"{quantile_us(lat, 0.5) if n else 0:.0f} us")


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(needed, soft)), hard))


async def measure(args: argparse.Namespace, say: Any) -> dict[str, Any]:
    _raise_fd_limit(args.vms * 2 + 256)
    split = None if args.no_pin else own_core_split()
    if split is not None:
        pin(os.getpid(), split[1])
    extra = ["--busy-poll-us", str(args.busy_poll_us)] if args.busy_poll_us else []
    fleet = Fleet()
    with tempfile.TemporaryDirectory(prefix="hb-scale-") as tmp:
        policy = Path(tmp) / "policy.yaml"
        policy.write_text(BENCH_POLICY)
        broker = start_broker(policy, Path(tmp) / "state", metrics=False)
        agents: list[AgentProcess] = []
        try:
            say(f"starting {args.agents} agents")
            agents = start_agents(broker.address, [f"scale-{i}" for i in range(args.agents)],
                                  Path(tmp), metrics=False, extra=extra,
                                  timeout=60 + args.agents)
            bpid = broker.process.proc.pid
            apids = [a.process.proc.pid for a in agents]
            if split is not None:
                pin(bpid, split[0])
                for pid in apids:
                    pin(pid, split[1])
            broker_rss_idle = rss_bytes(bpid)
            say(f"registering {args.vms} VMs x {args.vcpus} vCPUs")
            await fleet.register(agents, args.vms, args.vcpus)
            warmup = max(2.0, args.seconds / 10)
            say(f"warm-up {warmup:.0f} s at {args.rate:g} calls/s per vCPU "
                f"({args.vms * args.vcpus * args.rate:.0f} calls/s offered)")
            await fleet.run(args.vcpus, args.rate, warmup, 1, [], seed=1)
            not_ok_before = fleet.not_ok
            lat: list[int] = []
            t0_cpu = {"broker": cpu_times(bpid)}
            t0_cpu.update({f"agent{i}": cpu_times(pid) for i, pid in enumerate(apids)})
            t0 = time.monotonic()
            ticker = asyncio.ensure_future(_progress(lat, t0, args.seconds, say))
            try:
                await fleet.run(args.vcpus, args.rate, args.seconds, MEASURED_SEQ, lat, seed=2)
            finally:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
            wall = time.monotonic() - t0
            broker_cpu = cpu_times(bpid) - t0_cpu["broker"]
            agent_cpu = [cpu_times(pid) - t0_cpu[f"agent{i}"] for i, pid in enumerate(apids)]
            broker_rss = rss_bytes(bpid)
            agent_rss = [rss_bytes(pid) for pid in apids]
            not_ok = fleet.not_ok - not_ok_before
        finally:
            fleet.close()
            for a in agents:
                a.process.stop()
            broker.process.stop()
    if not lat:
        raise RuntimeError(f"no call finished in {wall:.1f} s: raise --seconds or --rate")
    agents_cpu = CpuTimes(sum(c.user_s for c in agent_cpu), sum(c.system_s for c in agent_cpu))
    n = len(lat)
    p50, p99, p999 = (quantile_us(lat, q) for q in (0.5, 0.99, 0.999))
    return {
        "mode": "scale", "agents": args.agents, "vms": args.vms, "vcpus_per_vm": args.vcpus,
        "rate_per_vcpu": args.rate, "seconds": wall, "pinned": split is not None,
        "busy_poll_us": args.busy_poll_us,
        "offered_per_s": args.vms * args.vcpus * args.rate,
        "calls": n, "not_ok": not_ok, "calls_per_s": n / wall,
        "p50_us": p50, "p99_us": p99, "p999_us": p999, "p99_vs_p50": p99 / p50,
        "broker": {"cpu_pct_of_core": broker_cpu.total_s / wall * 100,
                   "user_pct": broker_cpu.user_s / wall * 100,
                   "system_pct": broker_cpu.system_s / wall * 100,
                   "cpu_per_call_us": broker_cpu.total_s / n * 1e6,
                   "rss_mib": broker_rss / MiB, "rss_idle_mib": broker_rss_idle / MiB},
        "agents_total": {"cpu_pct_of_core": agents_cpu.total_s / wall * 100,
                         "user_pct": agents_cpu.user_s / wall * 100,
                         "system_pct": agents_cpu.system_s / wall * 100,
                         "cpu_per_call_us": agents_cpu.total_s / n * 1e6,
                         "rss_mib": sum(agent_rss) / MiB},
        "agent_each": {"cpu_pct_of_core_mean": agents_cpu.total_s / wall * 100 / len(apids),
                       "rss_mib_mean": sum(agent_rss) / len(agent_rss) / MiB,
                       "rss_mib_max": max(agent_rss) / MiB},
    }


def run_scale(args: argparse.Namespace) -> int:
    from hyperbroker.runtime.loop import run as run_async

    if min(args.agents, args.vms, args.vcpus) < 1 or args.vcpus > 255:
        print("hyperbroker bench --scale: --agents and --vms must be >= 1 and --vcpus 1..255",
              file=sys.stderr)
        return 2

    def say(line: str) -> None:
        print(f"[scale {time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)

    out: dict[str, Any] = {}

    async def go() -> int:
        out.update(await measure(args, say))
        return 0

    run_async(go())
    b, at, ae = out["broker"], out["agents_total"], out["agent_each"]
    print(f"scale: {out['agents']} agents, {out['vms']} VMs x {out['vcpus_per_vm']} vCPUs, "
          f"{out['rate_per_vcpu']:g} calls/s per vCPU ({out['offered_per_s']:.0f}/s offered), "
          f"{out['seconds']:.0f} s measured, broker "
          f"{'on a core of its own' if out['pinned'] else 'not pinned'}")
    print(f"calls {out['calls']} ({out['calls_per_s']:.0f}/s), not OK {out['not_ok']}; "
          f"latency p50 {out['p50_us']:.0f} us, p99 {out['p99_us']:.0f} us, p99.9 "
          f"{out['p999_us']:.0f} us")
    print(f"broker: CPU {b['cpu_pct_of_core']:.1f}% of a core (user {b['user_pct']:.1f}%, "
          f"system {b['system_pct']:.1f}%), {b['cpu_per_call_us']:.0f} us per call; RSS "
          f"{b['rss_mib']:.0f} MiB ({b['rss_idle_mib']:.0f} MiB before the VMs)")
    print(f"agents: CPU {at['cpu_pct_of_core']:.1f}% of a core in all (user {at['user_pct']:.1f}%"
          f", system {at['system_pct']:.1f}%), {ae['cpu_pct_of_core_mean']:.2f}% each, "
          f"{at['cpu_per_call_us']:.0f} us per call; RSS {at['rss_mib']:.0f} MiB in all, "
          f"{ae['rss_mib_mean']:.0f} MiB each (max {ae['rss_mib_max']:.0f})")
    print(f"targets (at 1,000 VMs x 4 vCPUs over 50 agents, 0.1 calls/s per vCPU): broker CPU "
          f"{b['cpu_pct_of_core']:.1f}% (<= 15%), broker RSS {b['rss_mib']:.0f} MiB (<= 150), "
          f"p99 = {out['p99_vs_p50']:.1f} x p50 (<= 5)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0

"""`hyperbroker demo`: a broker, an agent and simulated guests, with latency shown live.

Starts a real broker and a real agent as processes, then plays a VMM that runs a few guests
(two vCPUs each) making a mix of calls: TRNG entropy (forwarded to the broker), TRNG_VERSION
(answered by the agent from the compiled policy), PSCI and FF-A version calls, KVM_FEATURES (the
memshare handler), a bad TRNG bit count (the ABI's error), and a PV-time call no rule forwards
(SMCCC NOT_SUPPORTED from the broker), under examples/policy.yaml's default profile. Every second it
prints calls per second and latency percentiles per source and outcome; at the end, a summary.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

from hyperbroker.calls import Outcome
from hyperbroker.testing.procs import start_agent, start_broker
from hyperbroker.testing.vmm import GuestRam, VmmClient
from hyperbroker.wire.vmm import ResultSource

EXAMPLE_POLICY = Path(__file__).resolve().parents[2] / "examples" / "policy.yaml"
DEMO_POLICY = """\
handlers:
  trng: {}
profiles:
  default:
    rules:
      - {name: trng, abi: trng, action: forward, handler: trng, deadline_ms: 100}
"""
# (weight, label, function ID, x1)
MIX = [
    (55, "TRNG_RND64(192)", 0xC400_0053, 192),
    (12, "TRNG_VERSION", 0x8400_0050, 0),
    (8, "PSCI_VERSION", 0x8400_0000, 0),
    (6, "FFA_VERSION(1.2)", 0x8400_0063, 0x1_0002),
    (5, "KVM_FEATURES", 0x8600_0000, 0),
    (4, "TRNG_FEATURES(RND32)", 0x8400_0051, 0x8400_0053),
    (5, "TRNG_RND32(0): bad bit count", 0x8400_0053, 0),
    (5, "PV_TIME_FEATURES: no rule", 0xC500_0020, 0),
]


class Tally:
    def __init__(self) -> None:
        self.lat: dict[tuple[str, str], list[float]] = defaultdict(list)
        self.by_call: Counter[str] = Counter()
        self.total = 0
        self.window: list[float] = []

    def add(self, label: str, source: str, outcome: str, us: float) -> None:
        self.lat[source, outcome].append(us)
        self.by_call[label] += 1
        self.total += 1
        self.window.append(us)


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * q))]


async def guest(client: VmmClient, vm_id: int, vcpu: int, stop: asyncio.Event,
                tally: Tally) -> None:
    weights = [w for w, *_ in MIX]
    rng = random.Random(vm_id * 100 + vcpu)
    while not stop.is_set():
        _, label, fid, x1 = rng.choices(MIX, weights)[0]
        r = await client.call(vm_id, vcpu, fid, [x1])
        tally.add(label, ResultSource(r.timing.source).name.lower(),
                  Outcome(r.outcome).name.lower(),
                  (r.timing.agent_ns + r.timing.link_ns + r.timing.broker_queue_ns
                   + r.timing.handler_ns) / 1e3)
        await asyncio.sleep(rng.uniform(0.0005, 0.003))


async def _demo(duration: float, vms: int) -> int:
    with tempfile.TemporaryDirectory(prefix="hb-demo-") as tmp:
        policy = EXAMPLE_POLICY if EXAMPLE_POLICY.exists() else Path(tmp) / "policy.yaml"
        if policy != EXAMPLE_POLICY:
            policy.write_text(DEMO_POLICY)
        print(f"starting broker (policy {policy}) and agent ...", flush=True)
        broker = start_broker(policy, Path(tmp) / "state")
        agent = start_agent(broker.address, "demo-host", Path(tmp))
        print(f"broker on {broker.address} (metrics :{broker.metrics_port}), agent socket "
              f"{agent.socket} (metrics :{agent.metrics_port})", flush=True)
        client = await VmmClient.connect(str(agent.socket))
        rams = [GuestRam(0x4000_0000, 1 << 20, f"guest{i}") for i in range(vms)]
        tally = Tally()
        stop = asyncio.Event()
        try:
            regs = [await client.register(f"guest-{i}", 2, "", rams[i]) for i in range(vms)]
            for i, reg in enumerate(regs):
                print(f"guest-{i}: vm {reg.vm_id}, policy v{reg.policy_version}, "
                      f"{len(reg.filters)} kernel filter records", flush=True)
            tasks = [asyncio.create_task(guest(client, reg.vm_id, v, stop, tally))
                     for reg in regs for v in range(2)]
            t0 = time.monotonic()
            live = sys.stdout.isatty()
            last = 0
            tick = t0
            while (elapsed := time.monotonic() - t0) < duration:
                await asyncio.sleep(min(1.0, duration - elapsed))
                now = time.monotonic()
                elapsed, interval, tick = now - t0, now - tick, now
                window, tally.window = tally.window, []
                rate = (tally.total - last) / interval
                last = tally.total
                line = (f"[{elapsed:5.1f}s / {duration:.0f}s] {tally.total:7d} calls, "
                        f"{rate:6.0f}/s")
                if window:
                    line += (f", last second p50 {statistics.median(window):7.1f} us, "
                             f"p99 {_pct(window, 0.99):7.1f} us")
                print(("\r" + line) if live else line, end="" if live else "\n", flush=True)
            stop.set()
            await asyncio.gather(*tasks)
            if live:
                print()
            for reg in regs:
                await client.destroy(reg.vm_id)
        finally:
            client.close()
            for ram in rams:
                ram.close()
            agent.process.stop()
            broker.process.stop()
    print("\nsummary (latency = agent + link + broker, as each result reports it)")
    print(f"  {'answered by':12} {'outcome':14} {'calls':>7} {'p50 us':>9} {'p99 us':>9}")
    for (source, outcome), values in sorted(tally.lat.items()):
        print(f"  {source:12} {outcome:14} {len(values):>7} {statistics.median(values):>9.1f} "
              f"{_pct(values, 0.99):>9.1f}")
    print("  calls: " + ", ".join(f"{k} {v}" for k, v in tally.by_call.most_common()))
    return 0 if tally.total else 1


def run_demo(duration: float, vms: int) -> int:
    from hyperbroker.runtime.loop import run as run_async

    return run_async(_demo(duration, vms))

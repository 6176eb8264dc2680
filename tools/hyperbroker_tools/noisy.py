"""`hyperbroker bench --noisy-neighbour`: does a flooding VM raise its neighbour's latency?

VM B calls TRNG_RND64 every 10 ms from one vCPU (a blocking thread, as a VMM's vCPU thread);
its p50/p99 are measured alone, then while VM A, on the same agent, floods from 8 vCPUs back to
back. Both run against a broker with `--vm-rate-limit` and its fair queue on, then with
`--no-fair-queue` (the token bucket alone), then with no limit. A's calls over its rate wait or
fall back; B stays under the rate. Absolute figures depend on the (shared) machine; the ratio of
B's p99 with A flooding to B's p99 alone, in the same run, is what counts.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import tempfile
import time
from pathlib import Path

from hyperbroker.testing.procs import start_agent, start_broker
from hyperbroker.testing.vmm import VmmClient
from hyperbroker_tools.bench import BENCH_POLICY, ok_timing, rnd64_call

FLOOD_VCPUS = 8
B_PERIOD_S = 0.01


def _neighbour(sock: socket.socket, vm_id: int, first_seq: int, n: int) -> tuple[list[int], int]:
    """B's vCPU: one call every 10 ms; its latencies and how many did not end OK."""
    lat, errors = [], 0
    for seq in range(first_seq, first_seq + n):
        t = time.perf_counter_ns()
        sock.send(rnd64_call(vm_id, 0, seq, seq))
        data = sock.recv(65536)
        lat.append(time.perf_counter_ns() - t)
        errors += ok_timing(data) is None
        time.sleep(B_PERIOD_S)
    return lat, errors


async def _flood(client: VmmClient, vm_id: int, stop: asyncio.Event) -> list[int]:
    """A's vCPUs, each calling back to back until `stop`: [OK, not OK] counts."""
    loop = asyncio.get_running_loop()
    sock = client.sock
    loop.remove_reader(sock.fileno())
    waiters: dict[int, asyncio.Future[bool]] = {}
    counts = [0, 0]

    def readable() -> None:
        while True:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                return
            fut = waiters.pop(int.from_bytes(data[12:16], "little"), None)
            if fut is not None and not fut.done():
                fut.set_result(ok_timing(data) is not None)

    async def vcpu(v: int) -> None:
        seq = 0
        while not stop.is_set():
            seq += 1
            tag = (v << 24) + seq
            fut = waiters[tag] = loop.create_future()
            sock.send(rnd64_call(vm_id, v, seq, tag))
            counts[0 if await fut else 1] += 1

    loop.add_reader(sock.fileno(), readable)
    try:
        await asyncio.gather(*(vcpu(v) for v in range(FLOOD_VCPUS)))
    finally:
        loop.remove_reader(sock.fileno())
    return counts


def _p(lat: list[int], q: float) -> float:
    s = sorted(lat)
    return s[min(len(s) - 1, int(q * len(s)))] / 1e3


async def _one_setting(tmp: Path, name: str, extra: list[str], calls: int) -> dict[str, float]:
    policy = tmp / "policy.yaml"
    policy.write_text(BENCH_POLICY)
    broker = start_broker(policy, tmp / f"state-{name}", metrics=False, extra=extra)
    agent = start_agent(broker.address, f"noisy-{name}", tmp, metrics=False)
    try:
        b = await VmmClient.connect(str(agent.socket), "seqpacket")
        a = await VmmClient.connect(str(agent.socket), "seqpacket")
        vm_b = await b.register(f"b-{name}", 1)
        vm_a = await a.register(f"a-{name}", FLOOD_VCPUS)
        asyncio.get_running_loop().remove_reader(b.sock.fileno())
        b.sock.setblocking(True)
        await asyncio.to_thread(_neighbour, b.sock, vm_b.vm_id, 1, 20)  # warm up
        alone, err_alone = await asyncio.to_thread(_neighbour, b.sock, vm_b.vm_id, 1000, calls)
        stop = asyncio.Event()
        flood = asyncio.ensure_future(_flood(a, vm_a.vm_id, stop))
        await asyncio.sleep(0.5)  # A's burst spent, its queue full
        t0 = time.monotonic()
        noisy, err_noisy = await asyncio.to_thread(_neighbour, b.sock, vm_b.vm_id, 10_000,
                                                   calls)
        stop.set()
        a_ok, a_not_ok = await flood
        a_rate = a_ok / (time.monotonic() - t0 + 0.5)
        b.sock.close()
        a.sock.close()
    finally:
        agent.process.stop()
        broker.process.stop()
    return {"b_alone_p50_us": _p(alone, 0.5), "b_alone_p99_us": _p(alone, 0.99),
            "b_noisy_p50_us": _p(noisy, 0.5), "b_noisy_p99_us": _p(noisy, 0.99),
            "b_not_ok": err_alone + err_noisy, "a_ok_per_s": a_rate, "a_not_ok": a_not_ok,
            "p99_ratio": _p(noisy, 0.99) / _p(alone, 0.99)}


def run_noisy_neighbour(args: argparse.Namespace) -> int:
    from hyperbroker.runtime.loop import run as run_async

    rate = str(args.vm_rate_limit)
    settings = [("fair queue on", "fair", ["--vm-rate-limit", rate]),
                ("fair queue off (token bucket only)", "bucket",
                 ["--vm-rate-limit", rate, "--no-fair-queue"]),
                ("no rate limit", "none", [])]
    rows: list[tuple[str, dict[str, float]]] = []

    async def go() -> int:
        with tempfile.TemporaryDirectory(prefix="hb-noisy-") as tmp:
            for label, name, extra in settings:
                rows.append((label, await _one_setting(Path(tmp), name, extra, args.calls)))
        return 0

    run_async(go())
    print(f"VM B: 1 vCPU, a call every {B_PERIOD_S * 1e3:.0f} ms, {args.calls} calls; VM A: "
          f"{FLOOD_VCPUS} vCPUs back to back; --vm-rate-limit {rate}")
    print(f"{'setting':36} {'B alone p50/p99 us':>20} {'B w/ A p50/p99 us':>20} "
          f"{'p99 x alone':>11} {'B not OK':>8} {'A OK/s':>8} {'A not OK':>8}")
    for label, r in rows:
        print(f"{label:36} {r['b_alone_p50_us']:>9.0f}/{r['b_alone_p99_us']:<10.0f} "
              f"{r['b_noisy_p50_us']:>9.0f}/{r['b_noisy_p99_us']:<10.0f} "
              f"{r['p99_ratio']:>11.2f} {r['b_not_ok']:>8.0f} {r['a_ok_per_s']:>8.0f} "
              f"{r['a_not_ok']:>8.0f}")
    return 0

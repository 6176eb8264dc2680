"""`hyperbroker bench`: the full forwarded-call path against a bare gRPC baseline, in one run.

Full path: a simulated VMM (this process) → agent socket (SEQPACKET) → agent → gRPC stream →
broker → TRNG handler (RND64, so nothing is answered by the agent's static table) → back, with
real broker and agent processes and the broker's default SQLite store. `--stateful` adds a call
that changes handler state, so every result waits for a store commit: memshare MEM_SHARE and
MEM_UNSHARE of one granule per vCPU, in turn. `--stores sqlite redis` repeats everything on each
store (Redis: a redis-server of the bench's own, AOF on, fsync every second). Baseline: a bare
grpc.aio bidi echo stream between this process and a subprocess, with messages the size of one
call. Both run on uvloop. Absolute figures depend on the machine; the ratios are what to
compare.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from hyperbroker.testing.procs import RedisServer, start_agent, start_broker
from hyperbroker.testing.vmm import GuestRam, VmmClient
from hyperbroker.wire import vmm as proto
from hyperbroker.wire.v1 import broker_pb2

RND64 = 0xC400_0053
RND64_X = (RND64, 192) + (0,) * 16  # x0..x17 of every benchmark call
MEM_SHARE, MEM_UNSHARE = 0xC600_0003, 0xC600_0004  # pKVM vendor-hyp calls (memshare handler)
RAM_BASE = 0x4000_0000
BENCH_POLICY = """\
handlers:
  trng: {}
  memshare: {config: {granule: 4096, ram: [{base: 0x40000000, size: 0x100000}]}}
profiles:
  default:
    rules:
      - {name: trng, abi: trng, action: forward, handler: trng, deadline_ms: 1000}
      - {name: pkvm, abi: vendor-hyp, action: forward, handler: memshare, deadline_ms: 1000}
"""
ECHO_METHOD = "/bench.Echo/Stream"
TIMES = struct.Struct("<QQQQ")  # hb_timing: agent_ns, link_ns, broker_queue_ns, handler_ns


@dataclass
class Figures:
    name: str
    inflight: int
    calls: int
    p50_us: float
    p99_us: float
    per_s: float
    breakdown_us: dict[str, float] | None = None
    key: str = ""  # the column's short name in the ratios (in flight, +poll, workload, store)


def _figures(name: str, inflight: int, lat_ns: list[int], wall_s: float) -> Figures:
    lat = sorted(lat_ns)
    return Figures(name, inflight, len(lat), statistics.median(lat) / 1e3,
                   lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1e3, len(lat) / wall_s)


# ---- baseline: bare grpc.aio bidi echo ---------------------------------------------------------
async def _echo_server(port_file: str) -> None:
    async def stream(request_iterator: object, context: grpc.aio.ServicerContext[bytes, bytes]
                     ) -> None:
        while True:
            msg = await context.read()
            if msg is grpc.aio.EOF:
                return
            await context.write(msg)

    handler = grpc.method_handlers_generic_handler("bench.Echo", {
        "Stream": grpc.stream_stream_rpc_method_handler(stream)})
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    Path(port_file).write_text(str(port))
    await server.wait_for_termination()


def call_sized_message() -> bytes:
    """An AgentFrame carrying one call with realistic registers: the baseline's message."""
    record = proto.CALL.pack(1, 3, 123456, RND64, 0, time.monotonic_ns(), *RND64_X)
    return broker_pb2.AgentFrame(calls=record).SerializeToString()


class EchoBaseline:
    """A bare grpc.aio bidi echo stream to a subprocess server, kept open across rounds."""

    async def __aenter__(self) -> EchoBaseline:
        self._tmp = tempfile.TemporaryDirectory()
        port_file = os.path.join(self._tmp.name, "port")
        self._proc = subprocess.Popen([sys.executable, "-m", "hyperbroker_tools.bench",
                                       "--echo-server", port_file])
        for _ in range(400):
            if os.path.exists(port_file) and Path(port_file).read_text():
                break
            await asyncio.sleep(0.05)
        port = int(Path(port_file).read_text())
        self._channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self._stream = self._channel.stream_stream(ECHO_METHOD)()
        self._msg = call_sized_message()
        return self

    @property
    def server_pid(self) -> int:
        return self._proc.pid

    async def run(self, n: int) -> Figures:
        for _ in range(100):  # warm-up
            await self._stream.write(self._msg)
            await self._stream.read()
        lat: list[int] = []
        t0 = time.perf_counter()
        await self._ping_pong(self._stream, [0.0] * n, lat)
        return _figures("grpc echo ping-pong (baseline)", 1, lat, time.perf_counter() - t0)

    async def _ping_pong(self, stream: grpc.aio.StreamStreamCall[bytes, bytes],
                         gaps: list[float], lat: list[int]) -> None:
        """One message per gap, each sent `gap` seconds after the previous echo came back."""
        msg = self._msg
        for gap in gaps:
            if gap:
                await asyncio.sleep(gap)
            t = time.perf_counter_ns()
            await stream.write(msg)
            await stream.read()
            lat.append(time.perf_counter_ns() - t)

    async def run_gapped(self, gaps: list[list[float]]) -> list[int]:
        """One stream per list of gaps (a vCPU each), all at once: the round trips."""
        streams = [self._stream] + [self._channel.stream_stream(ECHO_METHOD)()
                                    for _ in gaps[1:]]
        lat: list[int] = []
        try:
            await asyncio.gather(*(self._ping_pong(s, g, lat) for s, g in zip(streams, gaps,
                                                                                strict=True)))
        finally:
            for s in streams[1:]:
                s.cancel()
        return lat

    async def __aexit__(self, *exc: object) -> None:
        self._stream.cancel()
        await self._channel.close()
        self._proc.terminate()
        self._proc.wait()
        self._tmp.cleanup()


# ---- full path ---------------------------------------------------------------------------------
class LoadGenerator:
    """Drives calls over one SEQPACKET connection with as little Python per call as possible."""

    def __init__(self, client: VmmClient) -> None:
        self.sock = client.sock
        self.loop = asyncio.get_running_loop()
        self.loop.remove_reader(self.sock.fileno())  # take the socket over from the client
        self.waiters: dict[int, asyncio.Future[int]] = {}
        self.loop.add_reader(self.sock.fileno(), self._readable)
        self.errors = 0
        self.timings: list[tuple[int, int, int, int]] = []  # agent, link, queue, handler ns

    def _readable(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            tag = int.from_bytes(data[12:16], "little")
            fut = self.waiters.pop(tag, None)
            timing = ok_timing(data)
            if timing is None:
                self.errors += 1
            else:
                self.timings.append(timing)
            if fut is not None:
                fut.set_result(time.perf_counter_ns())

    async def vcpu(self, vm_id: int, vcpu: int, tag_base: int, n: int, lat: list[int],
                   stateful: bool = False, first_seq: int = 1,
                   gaps: Iterator[float] | None = None) -> None:
        """`n` calls back to back, or with `gaps`: each call that many seconds after the
        previous result, for as long as `gaps` yields."""
        seqs: Iterable[int] = range(first_seq, first_seq + n) if gaps is None else \
            itertools.count(first_seq)
        for seq in seqs:
            if gaps is not None:
                gap = next(gaps, None)
                if gap is None:
                    return
                await asyncio.sleep(gap)
            tag = tag_base + seq
            fut = self.loop.create_future()
            self.waiters[tag] = fut
            frame = (share_call if stateful else rnd64_call)(vm_id, vcpu, seq, tag)
            t = time.perf_counter_ns()
            self.sock.send(frame)
            lat.append(await fut - t)


def rnd64_call(vm_id: int, vcpu: int, seq: int, tag: int) -> bytes:
    """A CALL frame: TRNG_RND64 for 192 bits."""
    return proto.HEADER.pack(proto.MAGIC, proto.VERSION, proto.MsgType.CALL, proto.CALL.size,
                             tag) + proto.CALL.pack(vm_id, vcpu, seq, RND64, 0, 0, *RND64_X)


def share_call(vm_id: int, vcpu: int, seq: int, tag: int) -> bytes:
    """A CALL frame that changes handler state: MEM_SHARE of the vCPU's own granule on odd
    sequence numbers, MEM_UNSHARE of it on even ones, so each one succeeds and commits."""
    fid = MEM_SHARE if seq % 2 else MEM_UNSHARE
    x = (fid, RAM_BASE + vcpu * 0x1000) + (0,) * 16
    return proto.HEADER.pack(proto.MAGIC, proto.VERSION, proto.MsgType.CALL, proto.CALL.size,
                             tag) + proto.CALL.pack(vm_id, vcpu, seq, fid, 0, 0, *x)


def ok_timing(data: bytes) -> tuple[int, int, int, int] | None:
    """The timing of a RESULT frame whose outcome is OK; None for anything else."""
    if data[6] != proto.MsgType.RESULT or \
            data[proto.HEADER.size + proto.RESULT_OUTCOME_OFFSET] != 0:
        return None
    agent, link, queue, handler = TIMES.unpack_from(
        data, proto.HEADER.size + proto.RESULT_TIMING_OFFSET)
    return agent, link, queue, handler


def vcpu_thread(sock: socket.socket, vm_id: int, first_seq: int, n: int,
                timings: list[tuple[int, int, int, int]], stateful: bool = False,
                gaps: list[float] | None = None) -> list[int]:
    """One vCPU as a VMM's vCPU thread runs it: send the exit, block until the result; with
    `gaps`, the guest runs gaps[i] seconds before call i (and `n` is len(gaps))."""
    lat = []
    errors = 0
    for seq in range(first_seq, first_seq + n):
        if gaps:
            time.sleep(gaps[seq - first_seq])
        frame = (share_call if stateful else rnd64_call)(vm_id, 0, seq, seq)
        t = time.perf_counter_ns()
        sock.send(frame)
        data = sock.recv(65536)
        lat.append(time.perf_counter_ns() - t)
        timing = ok_timing(data)
        if timing is None:
            errors += 1
        else:
            timings.append(timing)
    if errors:
        raise RuntimeError(f"{errors} calls did not end OK")
    return lat


def ping_thread(sock: socket.socket, n: int) -> list[int]:
    """VMM <-> agent round trips alone: PING is answered by the agent itself."""
    lat = []
    for i in range(n):
        t = time.perf_counter_ns()
        sock.send(proto.encode(proto.Ping(), 0xFF00_0000 + i))
        sock.recv(65536)
        lat.append(time.perf_counter_ns() - t)
    return lat


async def full_path(agent_socket: Path, inflight: int, n: int, name: str, label: str,
                    stateful: bool = False) -> Figures:
    """`inflight` vCPUs of one VM calling back to back. At one in flight the vCPU is a blocking
    thread, as in a real VMM (and in vmm/arm64); more vCPUs share this process's event loop."""
    client = await VmmClient.connect(str(agent_socket), "seqpacket")
    ram = GuestRam(RAM_BASE, 1 << 20)
    reg = await client.register(f"bench-{name}-{inflight}", inflight, "", ram)
    timings: list[tuple[int, int, int, int]] = []
    ping: list[int] = []
    if inflight == 1:
        asyncio.get_running_loop().remove_reader(client.sock.fileno())
        client.sock.setblocking(True)
        await asyncio.to_thread(vcpu_thread, client.sock, reg.vm_id, 1, 20, [], stateful)
        t0 = time.perf_counter()
        lat = await asyncio.to_thread(vcpu_thread, client.sock, reg.vm_id, 1001, n, timings,
                                      stateful)
        wall = time.perf_counter() - t0
        ping = await asyncio.to_thread(ping_thread, client.sock, 500)
    else:
        gen = LoadGenerator(client)
        per_vcpu = max(1, n // inflight)
        warm: list[int] = []
        await asyncio.gather(*(gen.vcpu(reg.vm_id, v, v << 24, 20, warm, stateful)
                               for v in range(inflight)))
        lat = []
        t0 = time.perf_counter()
        await asyncio.gather(*(gen.vcpu(reg.vm_id, v, v << 24, per_vcpu, lat, stateful, 1001)
                               for v in range(inflight)))
        wall = time.perf_counter() - t0
        timings = gen.timings[-len(lat):]
        gen.loop.remove_reader(client.sock.fileno())
        if gen.errors:
            raise RuntimeError(f"{gen.errors} calls did not end OK")
    client.sock.close()
    ram.close()
    what = "memshare (commits)" if stateful else "TRNG"
    fig = _figures(f"VMM -> agent -> broker -> {what}, {inflight} in flight{label}", inflight,
                   lat, wall)
    fig.breakdown_us = {
        name: statistics.median(t[i] for t in timings) / 1e3
        for i, name in enumerate(("agent", "link", "broker_queue", "handler"))
    }
    if ping:
        fig.breakdown_us["vmm_agent_ping_rtt"] = statistics.median(ping) / 1e3
    return fig


async def _bench(calls: int, inflights: list[int], rounds: int, busy_poll_us: float,
                 stores: list[str], stateful: bool) -> list[list[Figures]]:
    """`rounds` rounds, each measuring the baseline and every path back to back, so that a
    noisy neighbour slows both sides of a ratio alike. Every in-flight level runs, on a broker
    of each store, against an agent with default settings and, when `busy_poll_us` is set,
    against a second agent (same broker) that busy-polls that long after activity; with
    `stateful`, with the memshare call as well as TRNG."""
    out: list[list[Figures]] = []
    with tempfile.TemporaryDirectory(prefix="hb-bench-") as tmp:
        policy = Path(tmp) / "policy.yaml"
        policy.write_text(BENCH_POLICY)
        redis: RedisServer | None = None
        brokers = []
        agents: list[tuple[str, str, Path]] = []  # (store, label, agent socket)
        procs = []
        try:
            for store in stores:
                url = None
                if store == "redis":
                    # AOF with one fsync a second, as docs/operations.md recommends.
                    redis = RedisServer(Path(tmp) / "redis", appendfsync="everysec").start()
                    url = redis.url
                broker = start_broker(policy, Path(tmp) / f"state-{store}", metrics=False,
                                      store=url)
                brokers.append(broker)
                a = start_agent(broker.address, f"bench-{store}", Path(tmp), metrics=False)
                procs.append(a)
                agents.append((store, "", a.socket))
                if busy_poll_us:
                    a = start_agent(broker.address, f"bench-{store}-poll", Path(tmp),
                                    metrics=False, extra=["--busy-poll-us", str(busy_poll_us)])
                    procs.append(a)
                    agents.append((store, f", agent busy-polls {busy_poll_us:g} us", a.socket))
            workloads = [False, True] if stateful else [False]
            async with EchoBaseline() as echo:
                for r in range(rounds):
                    row = [await echo.run(calls)]
                    for k in inflights:
                        for store, label, sock in agents:
                            for w in workloads:
                                tail = label + (f", {store} store" if len(stores) > 1 or
                                                store != "sqlite" else "")
                                fig = await full_path(sock, k, calls,
                                                      f"r{r}{store}{'p' if label else ''}",
                                                      tail, w)
                                fig.key = (f"{k}" + ("+poll" if label else "")
                                           + (" memshare" if w else "")
                                           + (f" {store}" if len(stores) > 1 else ""))
                                row.append(fig)
                    out.append(row)
        finally:
            for a in procs:
                a.process.stop()
            for b in brokers:
                b.process.stop()
            if redis is not None:
                redis.stop()
    return out


def _median_figures(column: list[Figures]) -> Figures:
    return Figures(column[0].name, column[0].inflight, sum(f.calls for f in column),
                   statistics.median(f.p50_us for f in column),
                   statistics.median(f.p99_us for f in column),
                   statistics.median(f.per_s for f in column), key=column[0].key)


def run_bench(args: argparse.Namespace) -> int:
    from hyperbroker.runtime.loop import run as run_async

    rows: list[list[Figures]] = []

    async def go() -> int:
        rows.extend(await _bench(args.calls, args.inflight, args.rounds, args.busy_poll_us,
                                 args.stores, args.stateful))
        return 0

    run_async(go())
    out = [_median_figures([row[i] for row in rows]) for i in range(len(rows[0]))]
    print(f"{args.rounds} rounds of {args.calls} calls each; medians over rounds")
    print(f"{'path':72} {'in flight':>9} {'p50 us':>8} {'p99 us':>8} {'per s':>9}")
    for f in out:
        print(f"{f.name:72} {f.inflight:>9} {f.p50_us:>8.1f} {f.p99_us:>8.1f} {f.per_s:>9.0f}")
    keys = [f.key for f in out]
    for i in range(1, len(out)):
        parts = [r.breakdown_us for r in (row[i] for row in rows) if r.breakdown_us]
        if parts:
            print(f"  {keys[i]} in flight, median breakdown (us): " + ", ".join(
                f"{k} {statistics.median(p[k] for p in parts):.1f}" for k in parts[0]))
    print()
    ratios: dict[str, dict[str, float]] = {}
    for i, key in enumerate(keys[1:], start=1):
        # The ratio of each round, then the median: both sides of a ratio share their round.
        p50_ratio = statistics.median(row[i].p50_us / row[0].p50_us for row in rows)
        rate_ratio = statistics.median(row[i].per_s / row[0].per_s for row in rows)
        ratios[key] = {"p50_vs_baseline_rtt": p50_ratio, "rate_vs_baseline_rate": rate_ratio}
        print(f"{key:>8} in flight: p50 = {p50_ratio:.2f} x baseline round trip, "
              f"calls/s = {rate_ratio:.2f} x baseline messages/s")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"rounds": [[asdict(f) for f in row] for row in rows],
             "medians": [asdict(f) for f in out], "ratios": ratios}, indent=2))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--echo-server":
        from hyperbroker.runtime.loop import run as _run

        async def _serve() -> int:
            await _echo_server(sys.argv[2])
            return 0

        sys.exit(_run(_serve()))

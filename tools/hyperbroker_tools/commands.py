"""The tools' subcommands of `hyperbroker`: `demo` and `bench` (entry-point group
`hyperbroker.commands`; each function adds its parser to the CLI's subparsers)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from hyperbroker.cli.main import non_negative


def demo(sub: Any) -> None:
    p = sub.add_parser("demo", help="broker, agent and simulated guests, with live latency")
    p.add_argument("--duration", type=float, default=10.0, help="seconds to run")
    p.add_argument("--vms", type=int, default=3, help="simulated guests")
    p.add_argument("--real-kvm", action="store_true",
                   help="boot a real arm64 guest under KVM (QEMU) instead of simulated ones")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    if args.real_kvm:
        from hyperbroker_tools import kvm_bed

        return int(kvm_bed.run_demo(args.duration))
    from hyperbroker_tools.demo import run_demo as simulated

    return simulated(args.duration, args.vms)


def bench(sub: Any) -> None:
    p = sub.add_parser("bench", help="full-path benchmark against a bare gRPC baseline")
    p.add_argument("--calls", type=int, default=3000, help="calls per measurement")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians reported)")
    p.add_argument("--inflight", type=int, nargs="+", default=[1, 64],
                   help="calls in flight at once, one measurement per level")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--busy-poll-us", type=non_negative, default=None, metavar="US",
                   help="also measure against an agent run with --busy-poll-us US (0: skip; "
                        "default 1000 back to back, 0 with --sporadic; with --scale every "
                        "agent runs with it)")
    p.add_argument("--stores", nargs="+", choices=["sqlite", "redis", "memory"],
                   default=["sqlite"],
                   help="measure on a broker of each store (redis: a redis-server of the "
                        "bench's own, AOF on; needs redis-server installed)")
    p.add_argument("--stateful", action="store_true",
                   help="also measure a call that commits handler state (memshare MEM_SHARE / "
                        "MEM_UNSHARE)")
    p.add_argument("--noisy-neighbour", action="store_true",
                   help="instead: a VM's p50/p99 alone and while another floods, with the "
                        "broker's fair queue on and off (--calls of the quiet VM)")
    p.add_argument("--vm-rate-limit", type=float, default=500.0,
                   help="with --noisy-neighbour: the broker's --vm-rate-limit")
    p.add_argument("--sporadic", action="store_true",
                   help="instead: each vCPU calls with exponentially distributed gaps, against "
                        "the bare echo with the same gaps; latency and CPU per call")
    p.add_argument("--scale", action="store_true",
                   help="instead: --agents agents, --vms VMs of --vcpus vCPUs, --rate calls/s "
                        "per vCPU; latency, calls/s, broker and agent RSS and CPU")
    p.add_argument("--rates", type=positive, nargs="+", default=[20.0, 200.0],
                   help="with --sporadic: calls/s per vCPU, each measured in turn")
    p.add_argument("--seconds", type=positive, default=None,
                   help="length of each measurement (default 10 with --sporadic, 30 with "
                        "--scale)")
    p.add_argument("--vcpus", type=int, default=None,
                   help="vCPUs (default 1 with --sporadic; per VM, default 4, with --scale)")
    p.add_argument("--agents", type=int, default=10, help="with --scale: agent processes")
    p.add_argument("--vms", type=int, default=100, help="with --scale: VMs over all agents")
    p.add_argument("--rate", type=positive, default=1.0,
                   help="with --scale: calls/s per vCPU")
    p.add_argument("--no-pin", action="store_true",
                   help="with --sporadic or --scale: do not give the broker a core of its own")
    p.set_defaults(func=run_bench)


def positive(text: str) -> float:
    value = float(text)
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be > 0, not {text}")
    return value


def run_bench(args: argparse.Namespace) -> int:
    if args.sporadic + args.scale + args.noisy_neighbour > 1:
        print("hyperbroker bench: give one of --sporadic, --scale, --noisy-neighbour",
              file=sys.stderr)
        return 2
    if args.sporadic:
        from hyperbroker_tools.sporadic import run_sporadic

        args.seconds, args.vcpus = args.seconds or 10.0, args.vcpus or 1
        args.busy_poll_us = args.busy_poll_us or 0.0
        return run_sporadic(args)
    if args.scale:
        from hyperbroker_tools.scale import run_scale

        args.seconds, args.vcpus = args.seconds or 30.0, args.vcpus or 4
        args.busy_poll_us = args.busy_poll_us or 0.0
        return run_scale(args)
    if args.busy_poll_us is None:
        args.busy_poll_us = 1000.0
    if args.noisy_neighbour:
        from hyperbroker_tools.noisy import run_noisy_neighbour

        return run_noisy_neighbour(args)
    from hyperbroker_tools.bench import run_bench as measure

    return measure(args)

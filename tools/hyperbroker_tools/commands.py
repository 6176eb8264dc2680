"""The tools' subcommands of `hyperbroker`: `demo` and `bench` (entry-point group
`hyperbroker.commands`; each function adds its parser to the CLI's subparsers)."""

from __future__ import annotations

import argparse
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
    p.add_argument("--busy-poll-us", type=non_negative, default=1000.0, metavar="US",
                   help="also measure every level against an agent run with --busy-poll-us US "
                        "(0: skip)")
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
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    if args.noisy_neighbour:
        from hyperbroker_tools.noisy import run_noisy_neighbour

        return run_noisy_neighbour(args)
    from hyperbroker_tools.bench import run_bench as measure

    return measure(args)

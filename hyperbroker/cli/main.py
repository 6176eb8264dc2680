"""The `hyperbroker` command: serve, agent, policy, call, status, inspect, tee-serve.

Commands that are not the product (the demo, the benchmark, the KVM test bed) come from the
source tree's tools distribution (tools/), which adds its subcommands through the entry-point
group `hyperbroker.commands`: each entry point is called with the subparsers object.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path

from hyperbroker import __version__
from hyperbroker.cli import errors
from hyperbroker.runtime import logformat, options
from hyperbroker.runtime.loop import run as run_loop
from hyperbroker.runtime.tls import TlsFiles

COMMANDS_GROUP = "hyperbroker.commands"
LOG_LEVELS = ("debug", "info", "warning", "error")
BROKER_HELP = "the broker's gRPC address (its --listen)"


def _tls_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-cert", help="PEM certificate (mTLS)")
    p.add_argument("--tls-key", help="PEM private key (mTLS)")
    p.add_argument("--tls-ca", help="PEM CA bundle that signs the peers (mTLS)")


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE",
                   help="TOML file of settings, the flags' names as keys (lease-ttl = 30); a "
                        "flag or a HYPERBROKER_* variable wins over it")


def _admin_client_args(p: argparse.ArgumentParser) -> None:
    _tls_args(p)
    p.add_argument("--admin-token-file", metavar="FILE",
                   help="file holding a bearer token for the Admin API (or set "
                        "HYPERBROKER_ADMIN_TOKEN); never on the command line")


def _tls(args: argparse.Namespace) -> TlsFiles | None:
    return TlsFiles.from_args(args.tls_cert, args.tls_key, args.tls_ca)


def cmd_serve(args: argparse.Namespace) -> int:
    from hyperbroker.broker.server import BrokerConfig, serve

    if args.store and args.memory_store:
        print("hyperbroker serve: give --store or --memory-store, not both", file=sys.stderr)
        return 2
    store = args.store or ("memory://" if args.memory_store
                           else f"sqlite://{Path(args.state_dir).resolve()}")
    password = os.environ.get("HYPERBROKER_STORE_PASSWORD")
    if args.store_password_file:
        try:
            password = Path(args.store_password_file).read_text().strip()
        except OSError as e:
            print(f"hyperbroker serve: --store-password-file: {e.strerror}: "
                  f"{args.store_password_file}", file=sys.stderr)
            return 2
    if not 0 < args.housekeeping * 2 <= args.lease_ttl:
        print(f"hyperbroker serve: --lease-ttl {args.lease_ttl:g} must be at least twice "
              f"--housekeeping {args.housekeeping:g} (leases are renewed every round)",
              file=sys.stderr)
        return 2
    from hyperbroker.broker.security import AdminConfig

    config = BrokerConfig(
        admin=AdminConfig(
            ca=Path(args.admin_ca) if args.admin_ca else None,
            writers=tuple(args.admin_write), readers=tuple(args.admin_read),
            tokens=Path(args.admin_tokens) if args.admin_tokens else None,
            insecure=args.insecure_admin),
        spiffe_template=args.spiffe_template,
        housekeeping_s=args.housekeeping,
        listen=args.listen,
        policy_path=Path(args.policy) if args.policy else None,
        store=store,
        store_password=password,
        lease_ttl_s=args.lease_ttl,
        metrics_listen=args.metrics_listen,
        tls=_tls(args),
        drain_grace_s=args.drain_grace,
        reuse_port=args.reuse_port or args.workers > 1,
        host_expiry_s=args.host_expiry,
        reregister_grace_s=args.reregister_grace,
        health_listen=args.health_listen,
        vm_rate=args.vm_rate_limit,
        vm_burst=args.vm_burst,
        fair_queue=not args.no_fair_queue,
    )
    if args.workers > 1:
        from hyperbroker.broker.workers import run_workers

        if args.listen.endswith(":0"):
            print("hyperbroker serve: --workers needs a fixed --listen port", file=sys.stderr)
            return 2
        # Each worker resolves its settings again: the same file and variables, but one worker
        # each, and its own metrics port counted up from the resolved one (workers.py).
        os.environ["HYPERBROKER_WORKERS"] = "1"
        argv = sys.argv[1:] + (["--metrics-listen", args.metrics_listen]
                               if args.metrics_listen else [])
        return run_workers(args.workers, argv)
    return run_loop(serve(config))


def non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be >= 0, not {text}")
    return value


def positive(text: str) -> float:
    value = float(text)
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be > 0, not {text}")
    return value


def cmd_agent(args: argparse.Namespace) -> int:
    from hyperbroker.agent.core import AgentConfig
    from hyperbroker.agent.server import run_agent
    from hyperbroker.runtime.net import host_id_problem

    if not args.socket and not args.stream_socket:
        print("hyperbroker agent: give --socket and/or --stream-socket", file=sys.stderr)
        return 2
    problem = host_id_problem(args.host_id)
    if problem:
        print(f"hyperbroker agent: --host-id: {problem}", file=sys.stderr)
        return 2
    if args.broker_silence < 2 * args.broker_keepalive:
        print("hyperbroker agent: --broker-silence must be at least twice --broker-keepalive",
              file=sys.stderr)
        return 2
    config = AgentConfig(
        broker=args.broker, host_id=args.host_id,
        socket_path=Path(args.socket) if args.socket else None,
        stream_socket_path=Path(args.stream_socket) if args.stream_socket else None,
        metrics_listen=args.metrics_listen, tls=_tls(args), busy_poll_us=args.busy_poll_us,
        keepalive_s=args.broker_keepalive, silence_s=args.broker_silence)
    return run_loop(run_agent(config))


def cmd_policy_check(args: argparse.Namespace) -> int:
    from hyperbroker.cli import policy as policy_cli

    return policy_cli.run(args)


def cmd_policy_schema(args: argparse.Namespace) -> int:
    import json

    from hyperbroker.broker.policy.schema import policy_schema
    from hyperbroker.handlers.api import discover_plugins

    print(json.dumps(policy_schema(discover_plugins()), indent=2))
    return 0


def cmd_call(args: argparse.Namespace) -> int:
    from hyperbroker.cli.call import run_call

    return run_loop(run_call(args))


def cmd_status(args: argparse.Namespace) -> int:
    from hyperbroker.cli.admin import run_status

    return run_loop(run_status(args))


def cmd_inspect(args: argparse.Namespace) -> int:
    from hyperbroker.cli.admin import run_inspect

    return run_loop(run_inspect(args))


def cmd_policy_apply(args: argparse.Namespace) -> int:
    from hyperbroker.cli.admin import run_apply

    return run_loop(run_apply(args))


def cmd_tee_serve(args: argparse.Namespace) -> int:
    from hyperbroker.tee.server import main as tee_main

    return int(tee_main(args.tee_args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hyperbroker",
        description="Broker arm64 SMCCC hypercalls forwarded by KVM to one policy-driven service.")
    parser.add_argument("--version", action="version", version=f"hyperbroker {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("HYPERBROKER_LOG", "info"),
                        type=str.lower, choices=LOG_LEVELS,
                        help="debug also shows the traceback of an error (HYPERBROKER_LOG is "
                             "the variable's older name)")
    parser.add_argument("--log-format", default="text", choices=logformat.FORMATS,
                        help="json: one object per line (time, level, logger, message, extra "
                             "fields), for log collectors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the broker")
    p.add_argument("--listen", default="127.0.0.1:50051", help="gRPC address (Broker, Admin)")
    p.add_argument("--policy", help="policy YAML; without it the newest stored version is served")
    p.add_argument("--store", metavar="URL",
                   help="state store: sqlite:///DIR (one machine), redis://HOST:PORT/DB or "
                        "rediss://... (replicas on several machines; password from "
                        "--store-password-file or HYPERBROKER_STORE_PASSWORD), memory://; "
                        "none: sqlite:// of --state-dir")
    p.add_argument("--store-password-file", metavar="FILE",
                   help="file holding the Redis password (never put it in the URL)")
    p.add_argument("--state-dir", default="state",
                   help="SQLite state directory, when no --store is given")
    p.add_argument("--memory-store", action="store_true",
                   help="keep state in memory only (the same as --store memory://)")
    p.add_argument("--lease-ttl", type=float, default=30.0, metavar="S",
                   help="seconds a host's lease lasts unless renewed; at least twice "
                        "--housekeeping")
    p.add_argument("--housekeeping", type=float, default=2.0, metavar="S",
                   help="seconds between rounds that renew leases, pick up newer policy "
                        "versions and expire hosts")
    p.add_argument("--metrics-listen", help="Prometheus endpoint, e.g. 127.0.0.1:9464")
    p.add_argument("--health-listen",
                   help="plaintext address serving only grpc.health.v1 (probes under mTLS)")
    p.add_argument("--drain-grace", type=float, default=5.0,
                   help="seconds in-flight calls get on SIGTERM")
    p.add_argument("--reuse-port", action="store_true",
                   help="SO_REUSEPORT: several broker processes share one port")
    p.add_argument("--workers", type=int, default=1,
                   help="broker processes on this machine sharing the port (SO_REUSEPORT) and "
                        "the state directory; metrics ports count up from --metrics-listen")
    p.add_argument("--vm-rate-limit", type=float, default=0.0,
                   help="calls per second each VM may have handled (beyond: its calls wait "
                        "in its fair queue, then get the rule's fallback at their deadline); "
                        "0: no limit")
    p.add_argument("--vm-burst", type=float, default=0.0,
                   help="calls a VM may make at once above its rate (0: one second's)")
    p.add_argument("--no-fair-queue", action="store_true",
                   help="with --vm-rate-limit: a call over the rate falls back at once "
                        "instead of waiting its turn")
    p.add_argument("--host-expiry", type=float, default=600.0,
                   help="seconds a host's agent may be away before its VMs are cleaned up")
    p.add_argument("--reregister-grace", type=non_negative, default=60.0, metavar="S",
                   help="after an agent restarts, seconds its VMMs have to register again the "
                        "VMs that still run; the host's others are then cleaned up")
    _tls_args(p)
    p.add_argument("--spiffe-template", metavar="URI",
                   help="agents prove their host by this URI SAN, e.g. "
                        "spiffe://TRUST-DOMAIN/host/{host} (none: a DNS SAN equal to the host "
                        "id)")
    p.add_argument("--admin-ca", metavar="FILE",
                   help="the CA of admin client certificates (never the agents' --tls-ca)")
    p.add_argument("--admin-write", action="append", default=[], metavar="NAME",
                   help="a SAN (DNS name or URI) of an --admin-ca certificate that may change "
                        "the policy; repeatable")
    p.add_argument("--admin-read", action="append", default=[], metavar="NAME",
                   help="a SAN of an --admin-ca certificate that may only read; repeatable")
    p.add_argument("--admin-tokens", metavar="FILE",
                   help="bearer tokens for the Admin API, lines 'read|write NAME TOKEN'")
    p.add_argument("--insecure-admin", action="store_true",
                   help="without TLS, let anyone who reaches the port change the policy "
                        "(demos and tests only)")
    _config_arg(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("agent", help="run the per-host agent")
    p.add_argument("--broker", default="127.0.0.1:50051", help="broker address")
    p.add_argument("--host-id", default=socket.gethostname(), help="this host's identity")
    p.add_argument("--socket", help="SOCK_SEQPACKET path for VMMs (guest RAM by fd)")
    p.add_argument("--stream-socket", help="SOCK_STREAM path for VMMs (guest RAM by messages)")
    p.add_argument("--metrics-listen", help="Prometheus endpoint, e.g. 127.0.0.1:9465")
    p.add_argument("--busy-poll-us", type=non_negative, default=0.0, metavar="US",
                   help="keep polling this long after each call and broker frame instead of "
                        "sleeping: lower latency for up to a core of CPU (0: off)")
    p.add_argument("--broker-keepalive", type=positive, default=2.0, metavar="S",
                   help="send a keepalive after this long without a frame from the broker")
    p.add_argument("--broker-silence", type=positive, default=8.0, metavar="S",
                   help="give the stream up and reconnect after this long without any frame "
                        "from a broker that echoes keepalives; also the wait for a welcome")
    _tls_args(p)
    _config_arg(p)
    p.set_defaults(func=cmd_agent)

    p = sub.add_parser("policy", help="check or apply a policy")
    psub = p.add_subparsers(dest="policy_command", required=True)
    pc = psub.add_parser("check", help="validate a policy file and print what it compiles to")
    from hyperbroker.cli import policy as policy_cli

    policy_cli.add_arguments(pc)
    pc.set_defaults(func=cmd_policy_check)
    ps = psub.add_parser("schema", help="print the policy format as a JSON Schema (for "
                                        "editors and CI), with the installed plugins")
    ps.set_defaults(func=cmd_policy_schema)
    pa = psub.add_parser("apply", help="make a policy file current on a running broker")
    pa.add_argument("file")
    pa.add_argument("--broker", default="127.0.0.1:50051", help=BROKER_HELP)
    pa.add_argument("--timeout", type=float, default=30.0,
                    help="seconds to wait for the broker's verdict")
    _admin_client_args(pa)
    pa.set_defaults(func=cmd_policy_apply)

    p = sub.add_parser("call", help="act as a VMM for one call against a running agent")
    p.add_argument("--socket", required=True, help="the agent's VMM socket")
    p.add_argument("--mode", choices=["auto", "seqpacket", "stream"], default="auto",
                   help="how guest RAM reaches the agent: by fd (seqpacket), by messages "
                        "(stream), or whichever the socket is (auto)")
    p.add_argument("--name", default=f"call-{os.getpid()}", help="VM name to register")
    p.add_argument("--profile", default="", help="policy profile ('': 'default')")
    p.add_argument("--vcpu", type=int, default=0, help="the vCPU that makes the call")
    p.add_argument("--smc", action="store_true", help="mark the exit as SMC (off: HVC)")
    p.add_argument("--hold", action="store_true",
                   help="after the call, keep the VM registered until Ctrl-C or SIGTERM")
    p.add_argument("function", help="a name (TRNG_VERSION ...) or a function ID (0x84000050)")
    p.add_argument("args", nargs="*", help="x1.. as integers (0x.. allowed)")
    p.set_defaults(func=cmd_call)

    p = sub.add_parser("status", help="hosts, VMs and per-function latency of a running broker")
    p.add_argument("--broker", default="127.0.0.1:50051", help=BROKER_HELP)
    p.add_argument("--watch", type=float, default=0.0,
                   help="refresh every N seconds: in a terminal, in place; into a pipe, one "
                        "block of plain lines per refresh (0: once)")
    _admin_client_args(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("inspect", help="what one handler holds for one VM (memshare record, "
                                       "Hyper-V crashes ...)")
    p.add_argument("vm", help="HOST/VM")
    p.add_argument("handler", help="handler instance name in the VM's policy")
    p.add_argument("--broker", default="127.0.0.1:50051", help=BROKER_HELP)
    _admin_client_args(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("tee-serve", help="run the reference TEE service (OP-TEE proxy backend)",
                       add_help=False)
    p.add_argument("tee_args", nargs=argparse.REMAINDER,
                   help="the TEE service's own arguments (tee-serve --help)")
    p.set_defaults(func=cmd_tee_serve)

    for ep in entry_points(group=COMMANDS_GROUP):
        ep.load()(sub)
    for each in options.all_parsers(parser):
        each.formatter_class = options.HelpFormatter
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if "tee-serve" in argv:  # its arguments are the TEE service's own, passed through whole
            i = argv.index("tee-serve")
            args = options.parse(build_parser(), [*argv[:i], "tee-serve"])
            args.tee_args = argv[i + 1 :]
        else:
            args = options.parse(build_parser(), argv)
    except options.OptionError as e:
        print(f"hyperbroker: {e}", file=sys.stderr)
        return errors.USAGE
    except OSError as e:  # the --config file
        print(f"hyperbroker: --config: {errors.describe(e)[1]}", file=sys.stderr)
        return errors.USAGE
    if args.log_level not in LOG_LEVELS:  # argparse checks choices only when given as a flag
        print(f"hyperbroker: HYPERBROKER_LOG={args.log_level!r} is not a log level: set it to "
              f"one of {', '.join(LOG_LEVELS)} or unset it", file=sys.stderr)
        return errors.USAGE
    logformat.configure(args.log_level, args.log_format)
    command = " ".join(filter(None, (args.command, getattr(args, "policy_command", None))))
    return errors.run_command(command, args.func, args, debug=args.log_level == "debug")


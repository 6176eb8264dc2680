"""`hyperbroker status` and `hyperbroker policy apply`: the Admin API from the command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import grpc

from hyperbroker.broker.policy import bounds
from hyperbroker.runtime.tls import TlsFiles
from hyperbroker.wire import views
from hyperbroker.wire.v1 import admin_pb2, admin_pb2_grpc

CLEAR_SCREEN = "\x1b[2J\x1b[H"  # ECMA-48 ED 2 (erase display), CUP (cursor home)


class _BearerToken(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, token: str) -> None:
        self.metadata = (("authorization", f"Bearer {token}"),)

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        details = details._replace(metadata=(*(details.metadata or ()), *self.metadata))
        return await continuation(details, request)


def admin_token(args: argparse.Namespace) -> str | None:
    """The bearer token from --admin-token-file or HYPERBROKER_ADMIN_TOKEN (never argv)."""
    if args.admin_token_file:
        try:
            return Path(args.admin_token_file).read_text().strip() or None
        except OSError as e:
            raise ValueError(f"--admin-token-file: {e.strerror}: {args.admin_token_file}"
                             ) from None
    return os.environ.get("HYPERBROKER_ADMIN_TOKEN") or None


def channel(address: str, args: argparse.Namespace) -> grpc.aio.Channel:
    tls = TlsFiles.from_args(args.tls_cert, args.tls_key, args.tls_ca)
    token = admin_token(args)
    interceptors = [_BearerToken(token)] if token else None
    if tls is None:
        return grpc.aio.insecure_channel(address, interceptors=interceptors)
    return grpc.aio.secure_channel(address, tls.channel_credentials(),
                                   interceptors=interceptors)


def render_status(hosts: admin_pb2.ListHostsResponse, vms: admin_pb2.ListVmsResponse,
                  stats: admin_pb2.Stats) -> str:
    out = [f"policy v{stats.policy_version}: {stats.calls} calls, {stats.duplicates} duplicates, "
           f"{stats.handler_errors} handler errors; {stats.agents} agents, {stats.vms} VMs"]
    out.append("")
    out.append(f"{'host':24} {'up':3} {'vms':>4} {'calls':>10}  peer")
    for h in hosts.hosts:
        out.append(f"{h.host:24} {'yes' if h.connected else 'no':3} {h.vms:>4} {h.calls:>10}  "
                   f"{h.peer}")
    out.append("")
    out.append(f"{'vm':32} {'profile':12} {'policy':>6} {'vcpus':>5} {'calls':>10}")
    for v in vms.vms:
        out.append(f"{v.host + '/' + v.name:32} {v.profile:12} {'v' + str(v.policy_version):>6} "
                   f"{v.nr_vcpus:>5} {v.calls:>10}")
    out.append("")
    out.append(f"{'handler':10} {'function':28} {'outcome':14} {'calls':>7} {'p50 us':>9} "
               f"{'p99 us':>9}   (the last 2048 calls of each)")
    for f in stats.functions:
        out.append(f"{f.handler:10} {f.function:28} {f.outcome:14} {f.calls:>7} "
                   f"{f.p50_us:>9.1f} {f.p99_us:>9.1f}")
    return "\n".join(out)


async def run_status(args: argparse.Namespace) -> int:
    async with channel(args.broker, args) as ch:
        stub = admin_pb2_grpc.AdminStub(ch)
        while True:
            try:
                hosts = await stub.ListHosts(admin_pb2.ListHostsRequest(), timeout=5)
                vms = await stub.ListVms(admin_pb2.ListVmsRequest(), timeout=5)
                stats = await stub.GetStats(admin_pb2.GetStatsRequest(), timeout=5)
            except grpc.aio.AioRpcError as e:
                print(f"hyperbroker status: {args.broker}: {e.code().name} {e.details()}",
                      file=sys.stderr)
                return 1
            text = render_status(hosts, vms, stats)
            if not args.watch:
                print(text)
                return 0
            # In a terminal, redraw in place; into a pipe or a file, plain blocks one after
            # another (an empty line between), which a reader or `grep` can take line by line.
            print(CLEAR_SCREEN + text if sys.stdout.isatty() else text + "\n", flush=True)
            await asyncio.sleep(args.watch)


async def run_inspect(args: argparse.Namespace) -> int:
    host, _, vm = args.vm.partition("/")
    async with channel(args.broker, args) as ch:
        try:
            view = await admin_pb2_grpc.AdminStub(ch).GetVmHandlerView(
                admin_pb2.VmHandlerViewRequest(host=host, vm=vm, handler=args.handler), timeout=5)
        except grpc.aio.AioRpcError as e:
            print(f"hyperbroker inspect: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    print(json.dumps(views.from_struct(view.view), indent=2, sort_keys=True))
    return 0


async def run_apply(args: argparse.Namespace) -> int:
    """Exit 0 applied, 1 refused by the broker or the broker unreachable, 2 unreadable file.
    Every failure is one line per reason on stderr, never a traceback."""
    try:
        data = Path(args.file).read_bytes()
        if len(data) > bounds.MAX_BYTES:  # the broker refuses it too: do not send it
            print(f"hyperbroker policy apply: {args.file}: {len(data)} bytes; a policy is at "
                  f"most {bounds.MAX_BYTES} bytes; policy refused", file=sys.stderr)
            return 1
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"hyperbroker policy apply: cannot read {args.file}: {exc}", file=sys.stderr)
        return 2
    try:
        async with channel(args.broker, args) as ch:
            report = await admin_pb2_grpc.AdminStub(ch).ApplyPolicy(
                admin_pb2.PolicyText(yaml=text), timeout=args.timeout)
    except grpc.aio.AioRpcError as e:
        details = bounds.clip(e.details() or "")
        print(f"hyperbroker policy apply: broker {args.broker}: {e.code().name}: {details}",
              file=sys.stderr)
        return 1
    if not report.ok:
        for err in report.errors:
            print(f"error: {bounds.clip(err.message)}"
                  + (f" [{err.errno_name}]" if err.errno_name else ""), file=sys.stderr)
        print(f"{args.file}: {len(report.errors)} error(s); policy refused", file=sys.stderr)
        return 1
    print(f"policy v{report.version} is current; VMs registered from now on get it")
    return 0

"""`hyperbroker call`: register a throwaway VM, make one call, print the decoded result (with
--hold, keep the VM registered until stopped, for `status` and `inspect` to see)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from hyperbroker import smccc
from hyperbroker.broker.policy.abis import AbiCatalog
from hyperbroker.calls import Outcome
from hyperbroker.cli.errors import Unavailable
from hyperbroker.handlers.api import discover_plugins
from hyperbroker.kvm import KVM_HYPERCALL_EXIT_SMC
from hyperbroker.testing.vmm import AgentError, GuestRam, VmmClient
from hyperbroker.wire.vmm import ResultMsg, ResultSource

SMCCC_ERRORS = {-1: "NOT_SUPPORTED", -2: "NOT_REQUIRED / INVALID_PARAMETERS",
                -3: "INVALID_PARAMETER / NO_ENTROPY"}


def function_names() -> dict[int, str]:
    """Every function the installed handlers and SMCCC name (TRNG_RND64, PSCI_CPU_ON ...)."""
    return AbiCatalog.from_plugins(discover_plugins()).names


def format_result(fid: int, r: ResultMsg, names: dict[int, str]) -> str:
    name = names.get(fid, smccc.default_function_name(fid))
    outcome = Outcome(r.outcome).name.lower()
    source = ResultSource(r.timing.source).name.lower()
    lines = [f"{name} ({fid:#010x}) -> {outcome}, answered by {source}"]
    for i in range(smccc.NR_ARGS):
        if r.reg_mask >> i & 1:
            v = r.x[i]
            signed = smccc.to_s64(v)
            note = f"  ({signed}: {SMCCC_ERRORS[signed]})" if signed in SMCCC_ERRORS else ""
            lines.append(f"  x{i:<2} = {v:#018x}{note}")
    t = r.timing
    lines.append(
        f"  latency: agent {t.agent_ns / 1e3:.1f} us, link {t.link_ns / 1e3:.1f} us, "
        f"broker queue {t.broker_queue_ns / 1e3:.1f} us, handler {t.handler_ns / 1e3:.1f} us"
        + (f", guest memory {t.memory_ns / 1e3:.1f} us in {t.memory_round_trips} round trips"
           if t.memory_round_trips else ""))
    for a in r.actions:
        lines.append(f"  action: {a.kind.name} vcpu={a.vcpu} address={a.address:#x} "
                     f"value={a.value:#x}")
    return "\n".join(lines)


async def run_call(args: argparse.Namespace) -> int:
    names = function_names()
    fid = smccc.parse_function(args.function, names)
    call_args = [int(a, 0) & smccc.U64_MASK for a in args.args]
    try:
        client = await VmmClient.connect(args.socket, args.mode)
    except OSError as e:
        raise Unavailable(f"cannot connect to the agent at {args.socket}: {e.strerror}; start "
                          f"`hyperbroker agent --socket {args.socket}` or give the --socket "
                          f"it listens on") from e
    ram = GuestRam(0x4000_0000, 2 * 1024 * 1024)
    try:
        reg = await client.register(args.name, args.vcpu + 1, args.profile, ram)
        try:
            result = await client.call(reg.vm_id, args.vcpu, fid, call_args,
                                       KVM_HYPERCALL_EXIT_SMC if args.smc else 0)
            print(format_result(fid, result, names), flush=True)
            if args.hold:
                await hold(args.name)
        finally:
            await client.destroy(reg.vm_id)
    except AgentError as e:
        print(f"hyperbroker call: agent refused: {e}", file=sys.stderr)
        return 1
    finally:
        client.close()
        ram.close()
    return 0


async def hold(name: str) -> None:
    """Keep the VM registered, as a VMM whose guest still runs, until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"holding VM {name!r} registered; Ctrl-C or SIGTERM ends it", flush=True)
    await stop.wait()

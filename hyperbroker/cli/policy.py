"""`hyperbroker policy check`: validate a policy file and show what it compiles to.

Prints, per profile, the kernel filter records with their rule, handler, deadline, fallback and
the named functions each forwarded range serves, then each discovery call and what it claims; or,
with --json, broker.policy.to_json. With --records it instead replays raw struct kvm_smccc_filter
records through the kernel model (broker.kernel_filter), so that the real-KVM test bed can run
the same table against real KVM and compare. It reads files and writes text; the policy logic
itself lives in broker.policy.
Exit status: 0 valid, 1 the policy is refused, 2 the input could not be read or is malformed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from hyperbroker.broker.kernel_filter import KernelFilterModel
from hyperbroker.broker.policy import (
    Action,
    Policy,
    PolicyInvalid,
    discovery_name,
    load_policy,
    static_answers,
    to_json,
)
from hyperbroker.handlers.api import Handler, discover_plugins
from hyperbroker.kvm import SMCCC_FILTER, SmcccFilter, errno_name
from hyperbroker.smccc import merge_ranges, to_s64

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_INPUT = 2

U8_MAX = 0xFF
U32_MAX = 0xFFFF_FFFF
PAD_LEN = SMCCC_FILTER.size - 9  # __u8 pad[15] after base, nr_functions, action
_RECORD_KEYS = ("base", "nr_functions", "action", "pad", "ran_before")


class InputError(Exception):
    """The file could not be read, or a records file is not a list of records."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", nargs="?", help="the policy YAML ('-' reads stdin)")
    parser.add_argument("--json", action="store_true",
                        help="print the compiled policy (or the errors) as JSON")
    parser.add_argument(
        "--records", metavar="FILE.json",
        help="instead of a policy, replay a JSON list of raw filter records "
             '[{"base", "nr_functions", "action", "pad"?, "ran_before"?}] through the kernel '
             'model and print each one\'s errno as JSON; an entry {"ran_before": true} alone '
             "marks where a vCPU runs",
    )


def run(args: argparse.Namespace, *, plugins: Mapping[str, type[Handler]] | None = None) -> int:
    """The subcommand; `plugins` defaults to the installed entry points (tests pass their own)."""
    out, err = sys.stdout, sys.stderr
    try:
        if args.records is not None:
            if args.file is not None:
                raise InputError("give a policy FILE or --records FILE.json, not both")
            rows = replay_records(json.loads(_read(args.records)))
            print(json.dumps(rows, indent=1), file=out)
            return EXIT_OK
        if args.file is None:
            raise InputError("give a policy FILE (or --records FILE.json)")
        text = _read(args.file)
    except (InputError, json.JSONDecodeError) as exc:
        print(f"hyperbroker policy check: {exc}", file=err)
        return EXIT_INPUT
    try:
        policy = load_policy(text, discover_plugins() if plugins is None else plugins)
    except PolicyInvalid as exc:
        for e in exc.errors:
            print(f"error: {e}", file=err)
        print(f"{args.file}: {len(exc.errors)} error(s); policy refused", file=err)
        if args.json:
            errors = [{"message": e.message, "errno": e.errno_name, "rules": list(e.rules)}
                      for e in exc.errors]
            print(json.dumps({"errors": errors}, indent=1), file=out)
        return EXIT_INVALID
    if args.json:
        print(json.dumps(to_json(policy), indent=1), file=out)
    else:
        print_tables(policy, args.file, out)
    return EXIT_OK


def _read(path: str) -> str:
    try:
        if path == "-":
            return sys.stdin.read()
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# --records


def _field(entry: Mapping[str, Any], key: str, high: int, where: str) -> int:
    value = entry.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= high:
        raise InputError(f"{where}: {key} must be an integer 0..{high:#x} as in struct "
                         f"kvm_smccc_filter, not {value!r}")
    return value


def parse_record(entry: object, where: str) -> tuple[SmcccFilter, bool]:
    """One record of a --records file and whether mark_ran() comes before it."""
    if not isinstance(entry, dict):
        raise InputError(f"{where}: must be an object with base, nr_functions, action")
    unknown = set(entry) - set(_RECORD_KEYS)
    if unknown:
        raise InputError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: "
                         f"{', '.join(_RECORD_KEYS)}")
    base = _field(entry, "base", U32_MAX, where)
    nr = _field(entry, "nr_functions", U32_MAX, where)
    action = _field(entry, "action", U8_MAX, where)
    pad = entry.get("pad", [])
    if (not isinstance(pad, list) or len(pad) > PAD_LEN
            or not all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= U8_MAX
                       for b in pad)):
        raise InputError(f"{where}: pad must be a list of at most {PAD_LEN} bytes (0..255), "
                         "the rest zero")
    ran_before = entry.get("ran_before", False)
    if not isinstance(ran_before, bool):
        raise InputError(f"{where}: ran_before must be true or false")
    return SmcccFilter(base, nr, action, bytes(pad).ljust(PAD_LEN, b"\0")), ran_before


def replay_records(entries: object) -> list[dict[str, Any]]:
    """Run the records, in order, through one fresh KernelFilterModel (one VM).

    A vCPU runs (mark_ran) before a record carrying "ran_before": true, or where an entry is
    just {"ran_before": true}; such a marker entry gets no output row.
    """
    if not isinstance(entries, list):
        raise InputError("a records file holds a JSON list of records")
    parsed: list[tuple[SmcccFilter | None, bool]] = []
    for i, entry in enumerate(entries):
        if entry == {"ran_before": True}:
            parsed.append((None, True))
        else:
            parsed.append(parse_record(entry, f"record {i}"))
    model = KernelFilterModel()
    rows = []
    for record, ran_before in parsed:
        if ran_before:
            model.mark_ran()
        if record is None:
            continue
        rows.append({
            "base": record.base,
            "nr_functions": record.nr_functions,
            "action": record.action,
            "errno": errno_name(model.set_filter(record)),
        })
    return rows


# ---------------------------------------------------------------------------------------------
# The table


def _deadline(us: int) -> str:
    return f"{us // 1000} ms" if us % 1000 == 0 else f"{us} us"


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Columns padded to their widest cell; the third (nr) right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.rjust(w) if i == 2 else c.ljust(w)
                             for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
            for r in rows]


def print_tables(policy: Policy, source: str, out: TextIO) -> None:
    print(f"policy {source}: valid, sha256 {policy.digest}", file=out)
    print("ranges are [base, end): end is one past the last function ID", file=out)
    for name, handler in policy.handlers.items():
        owns = ", ".join(str(r) for r in merge_ranges(handler.ranges))
        print(f"handler {name!r}: plugin {type(handler).plugin}, owns {owns}", file=out)
    for profile in policy.profiles.values():
        print(file=out)
        print(f"profile {profile.name!r}: {len(profile.kernel_filter)} kernel filter record(s), "
              f"default deadline {_deadline(profile.default_deadline_us)}", file=out)
        lines = []
        for rule in profile.rules:
            for r in rule.ranges:
                if rule.action is Action.FORWARD:
                    names = policy.named_functions(r, rule.handler)
                    lines.append((r.base, [
                        f"{r.base:#010x}", f"{r.end:#010x}", str(r.count), "fwd_to_user",
                        rule.name, str(rule.handler), _deadline(rule.deadline_us),
                        str(to_s64(rule.fallback.register(0))), ", ".join(names.values()),
                    ]))
                else:
                    action = "deny" if rule.action is Action.DENY else "handle (no record)"
                    lines.append((r.base, [
                        f"{r.base:#010x}", f"{r.end:#010x}", str(r.count), action, rule.name,
                        "-", "-", "-", "",
                    ]))
        if not lines:
            print("  no rules: the kernel serves every call as it would without a filter",
                  file=out)
            continue
        header = ["base", "end", "nr", "action", "rule", "handler", "deadline", "fallback x0",
                  "functions"]
        for line in _table([header, *(cells for _, cells in sorted(lines))]):
            print(line, file=out)
        answers = static_answers(policy, profile)
        if answers:
            served = ", ".join(f"{policy.function_name(fid)} ({fid:#010x})" for fid in answers)
            print(f"  the agent answers itself: {served}", file=out)
        for claim in profile.discovery:
            # Each claim is served by the discovery call's own handler unless another is named.
            claims = ", ".join(
                discovery_name(policy, server, fid)
                + ("" if server == claim.handler else f" ({server})")
                for fid, server in claim.served_by)
            print(f"  discovery: {discovery_name(policy, claim.handler, claim.call)} "
                  f"({claim.call:#010x}, {claim.handler}) claims {claims}", file=out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hyperbroker policy check", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

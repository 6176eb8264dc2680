"""Policy on the real bed: deny in the kernel, unserved functions, refused policies, and the
kernel's own filter errnos against `hyperbroker policy check` (issue 3 item 4).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hyperbroker.kvm import SmcccFilter
from hyperbroker.smccc import U64_MASK, default_function_name
from hyperbroker_tools import kvm_bed

from .conftest import DENIED_FUNCTION, FILTER_TABLE, UNSERVED_FUNCTION, MainRun

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

NOT_SUPPORTED = -1 & U64_MASK


def hyperbroker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*kvm_bed.hyperbroker_command(), *args], capture_output=True,
                          text=True, timeout=60, check=False)


def test_every_vm_gets_exactly_its_profiles_kernel_filter(main_run: MainRun) -> None:
    compiled = json.loads(hyperbroker("policy", "check", "--json", str(main_run.policy)).stdout)
    expected = {
        name: [(r["base"], r["nr_functions"], {"deny": 1, "fwd_to_user": 2}[r["action"]])
               for r in profile["kernel_filter"]]
        for name, profile in compiled["profiles"].items()
    }
    assert {r["profile"] for r in main_run.result.registrations} == set(expected)
    for reg in main_run.result.registrations:
        installed = [(int(f["base"], 0), int(f["nr"], 0), int(f["action"]))
                     for f in main_run.result.filters if f["vm"] == reg["vm"]]
        assert installed == expected[reg["profile"]], reg
    assert {f["errno"] for f in main_run.result.filters} == {"OK"}


def test_a_denied_function_gets_not_supported_without_leaving_the_kernel(
    main_run: MainRun,
) -> None:
    call = main_run.result.call("calls", "arg0")
    assert call.fid == DENIED_FUNCTION
    # arch/arm64/kvm/hypercalls.c: DENY -> x0 = -1, x1..x3 = 0
    assert call.x == (NOT_SUPPORTED, 0, 0, 0)
    # No KVM_EXIT_HYPERCALL reached the VMM for it ...
    assert DENIED_FUNCTION not in main_run.result.run("calls").fids
    # ... so neither agent nor broker ever saw it.
    label = default_function_name(DENIED_FUNCTION)
    assert not [s for s in main_run.broker_metrics if s.labels.get("function") == label]


def test_a_forwarded_function_no_handler_serves_gets_not_supported_from_the_broker(
    main_run: MainRun,
) -> None:
    call = main_run.result.call("calls", "arg1")
    assert call.fid == UNSERVED_FUNCTION
    assert call.x[0] == NOT_SUPPORTED
    assert main_run.result.run("calls").fids == {UNSERVED_FUNCTION: 1}
    label = default_function_name(UNSERVED_FUNCTION)
    answered = [s for s in main_run.broker_metrics
                if s.name.endswith("_count") and s.labels.get("function") == label and s.value]
    assert answered, "the broker answered the unserved call"


OVERLAPPING_POLICY = """\
handlers: {}
profiles:
  default:
    rules:
      - {name: deny-a, functions: [0x86000100, 0x86000101], action: deny}
      - {name: deny-b, functions: [0x86000101], action: deny}
"""


def test_a_policy_with_overlapping_ranges_is_refused_before_any_vm_starts(
    tmp_path: Path,
) -> None:
    policy = tmp_path / "overlap.yaml"
    policy.write_text(OVERLAPPING_POLICY)
    check = hyperbroker("policy", "check", str(policy))
    assert check.returncode != 0
    assert "deny-a" in check.stdout + check.stderr and "deny-b" in check.stdout + check.stderr
    serve = subprocess.run(
        [*kvm_bed.hyperbroker_command(), "serve", "--listen", "127.0.0.1:0", "--memory-store",
         "--policy", str(policy)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert serve.returncode != 0
    assert "overlaps" in serve.stdout + serve.stderr


def _records_json(table: list[tuple[SmcccFilter | kvm_bed.RanBefore, str | None]]) -> list[
        dict[str, object]]:
    """The `policy check --records` input: a RanBefore marks the record after it."""
    out: list[dict[str, object]] = []
    ran = False
    for record, _ in table:
        if isinstance(record, kvm_bed.RanBefore):
            ran = True
            continue
        entry: dict[str, object] = {"base": record.base, "nr_functions": record.nr_functions,
                                    "action": record.action, "pad": list(record.pad)}
        if ran:
            entry["ran_before"] = True
            ran = False
        out.append(entry)
    return out


def _describe(record: SmcccFilter | kvm_bed.RanBefore) -> str:
    assert isinstance(record, SmcccFilter)
    pad = "pad!=0" if any(record.pad) else ""
    return f"{record.base:#010x}+{record.nr_functions:#x} action={record.action} {pad}"


def test_real_kvm_filter_errnos_match_policy_check(main_run: MainRun, tmp_path: Path) -> None:
    """One table, two sources: KVM_SET_DEVICE_ATTR in L1, and the kernel model."""
    real = [p.errno for p in main_run.result.probes if not p.ran]
    records = tmp_path / "records.json"
    records.write_text(json.dumps(_records_json(FILTER_TABLE)))
    replay = hyperbroker("policy", "check", "--records", str(records))
    assert replay.returncode == 0, replay.stderr
    predicted = [row["errno"] for row in json.loads(replay.stdout)]
    expected = [errno for _, errno in FILTER_TABLE if errno is not None]
    table = "\n".join(
        f"{_describe(r):<44} real={a:<7} predicted={b:<7} reference={c}"
        for r, a, b, c in zip(
            [r for r, e in FILTER_TABLE if e is not None], real, predicted, expected,
            strict=False,
        )
    )
    print(table, file=sys.stderr)
    assert real == expected, table
    assert predicted == real, table

"""broker.policy_cli (`hyperbroker policy check`): run in-process, and once as a real process."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from hyperbroker.calls import NOT_SUPPORTED, Call, Result
from hyperbroker.cli import policy as policy_cli
from hyperbroker.handlers.api import CallContext, Handler
from hyperbroker.smccc import FunctionRange

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "policy.yaml"


def check(argv: Sequence[str], capsys: pytest.CaptureFixture[str],
          **kwargs: Any) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    policy_cli.add_arguments(parser)
    code = policy_cli.run(parser.parse_args(argv), **kwargs)
    out, err = capsys.readouterr()
    return code, out, err


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


BAD_POLICY = """
handlers: {trng: {}}
profiles:
  default:
    rules:
      - {name: trng, abi: trng, action: forward, handler: trng}
      - {name: arch, functions: [0x80008000], action: deny}
      - {name: again, functions: [TRNG_RND64], action: deny}
"""


def test_a_valid_policy_prints_a_table_per_profile_and_exits_0(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = check([str(EXAMPLE)], capsys)
    assert code == 0 and err == ""
    assert "profile 'default': 14 kernel filter record(s), default deadline 100 ms" in out
    header = next(line for line in out.splitlines() if line.strip().startswith("base"))
    assert header.split() == ["base", "end", "nr", "action", "rule", "handler", "deadline",
                              "fallback", "x0", "functions"]
    row = next(line for line in out.splitlines() if line.strip().startswith("0xc4000050"))
    assert row.split()[:8] == ["0xc4000050", "0xc4000060", "16", "fwd_to_user", "trng", "trng",
                               "50", "ms"]
    assert row.endswith("TRNG_RND64")
    deny = next(line for line in out.splitlines() if line.strip().startswith("0x82000000"))
    assert deny.split() == ["0x82000000", "0x82010000", "65536", "deny", "no-firmware-services",
                            "-", "-", "-"]
    assert "the agent answers itself: TRNG_VERSION (0x84000050)" in out
    assert ("  discovery: TRNG_FEATURES (0x84000051, trng) claims TRNG_VERSION, TRNG_FEATURES, "
            "TRNG_GET_UUID, TRNG_RND32, TRNG_RND64\n") in out
    assert "  discovery: PSCI_FEATURES (0x8400000a, psci) claims SMCCC_VERSION (kernel), " in out
    assert "profile 'in-kernel'" in out and "no rules: the kernel serves every call" in out


def test_json_prints_the_compiled_policy(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = check([str(EXAMPLE), "--json"], capsys)
    assert code == 0
    compiled = json.loads(out)
    records = compiled["profiles"]["default"]["kernel_filter"]
    fwd, deny = "fwd_to_user", "deny"
    assert [(r["base"], r["nr_functions"], r["action"], r["rule"]) for r in records] == [
        (0x0600_0000, 0x1_0000, fwd, "pkvm-services"),
        (0x4600_0000, 0x1_0000, fwd, "pkvm-services"),
        (0x8200_0000, 0x1_0000, deny, "no-firmware-services"),
        (0x8300_0000, 0x1_0000, deny, "no-firmware-services"),
        (0x8400_0000, 0x20, fwd, "psci"),
        (0x8400_0050, 0x10, fwd, "trng"),
        (0x8400_0060, 0xA0, fwd, "ffa"),
        (0x8600_0000, 0x1_0000, fwd, "pkvm-services"),
        (0xC200_0000, 0x1_0000, deny, "no-firmware-services"),
        (0xC300_0000, 0x1_0000, deny, "no-firmware-services"),
        (0xC400_0000, 0x20, fwd, "psci"),
        (0xC400_0050, 0x10, fwd, "trng"),
        (0xC400_0060, 0xA0, fwd, "ffa"),
        (0xC600_0000, 0x1_0000, fwd, "pkvm-services"),
    ]
    discovery = {d["name"]: d for d in compiled["profiles"]["default"]["discovery"]}
    trng = discovery["TRNG_FEATURES"]
    assert trng["handler"] == "trng" and trng["function_id"] == 0x8400_0051
    assert {"function_id": 0xC400_0053, "name": "TRNG_RND64", "served_by": "trng"} in trng["claims"]
    assert compiled["profiles"]["in-kernel"]["kernel_filter"] == []
    assert compiled["profiles"]["in-kernel"]["discovery"] == []


def test_a_refused_policy_prints_every_error_with_its_errno_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = check([write(tmp_path, "bad.yaml", BAD_POLICY)], capsys)
    assert code == 1 and out == ""
    lines = err.splitlines()
    assert lines[0].startswith("error: profile 'default', rule 'arch': [0x80008000, 0x80008001) "
                               "overlaps [0x80000000, 0x80010000), which the kernel keeps")
    assert lines[0].endswith("[EEXIST]")
    assert lines[1] == ("error: profile 'default': rule 'trng' [0xc4000050, 0xc4000060) overlaps "
                        "rule 'again' [0xc4000053, 0xc4000054) [EEXIST]")
    assert lines[-1].endswith("bad.yaml: 3 error(s); policy refused")


def test_a_refused_policy_with_json_also_prints_the_errors_as_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = check([write(tmp_path, "bad.yaml", BAD_POLICY), "--json"], capsys)
    assert code == 1
    errors = json.loads(out)["errors"]
    assert [(e["errno"], e["rules"]) for e in errors] == [
        ("EEXIST", ["arch"]), ("EEXIST", ["trng", "again"]), ("", ["again", "trng"]),
    ]
    assert errors[2]["message"].startswith("profile 'default': rule 'again' (deny) covers "
                                           "[0xc4000053, 0xc4000054) of the ABI of handler")


def test_test_local_plugins_can_be_given(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    class Clock(Handler):
        plugin = "clock"

        @property
        def ranges(self) -> Sequence[FunctionRange]:
            return (FunctionRange(0x8600_0001, 1),)

        async def handle(self, call: Call, ctx: CallContext) -> Result:
            return NOT_SUPPORTED

        def function_name(self, fid: int) -> str | None:
            return "ptp"

    text = ("handlers: {clock: {}}\nprofiles: {default: {rules: [{name: c, functions: "
            "[0x86000001], action: forward, handler: clock, fallback: {x0: 5}}]}}")
    code, out, _ = check([write(tmp_path, "p.yaml", text)], capsys, plugins={"clock": Clock})
    assert code == 0
    row = next(line for line in out.splitlines() if line.strip().startswith("0x86000001"))
    assert row.split()[3:] == ["fwd_to_user", "c", "clock", "100", "ms", "5", "ptp"]


def test_handle_rules_are_shown_without_a_record(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    text = "profiles: {default: {rules: [{name: k, abi: psci, action: handle}]}}"
    code, out, _ = check([write(tmp_path, "p.yaml", text)], capsys)
    assert code == 0 and "0 kernel filter record(s)" in out
    assert "handle (no record)" in out


def test_the_policy_may_come_from_stdin(capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(EXAMPLE.read_text()))
    code, out, _ = check(["-", "--json"], capsys)
    assert code == 0 and "entropy-batch" in json.loads(out)["profiles"]


@pytest.mark.parametrize("argv", [[], ["/nonexistent/policy.yaml"],
                                  [str(EXAMPLE), "--records", str(EXAMPLE)]])
def test_unreadable_or_missing_input_exits_2(argv: list[str],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = check(argv, capsys)
    assert code == 2 and out == "" and err.startswith("hyperbroker policy check: ")


# --- --records: the kernel model as a table (tools/testing/selftests/kvm/arm64/smccc_filter.c;
# arch/arm64/kvm/hypercalls.c) -----------------

SELFTEST_RECORDS: list[tuple[dict[str, Any], str]] = [
    ({"base": 0x8400_0000, "nr_functions": 1, "action": 1, "pad": [255]}, "EINVAL"),  # 1
    ({"base": 0xC400_0003, "nr_functions": 0, "action": 1}, "EINVAL"),  # 2
    ({"base": 0xFFFF_FFFF, "nr_functions": 0xFFFF_FFFF, "action": 1}, "EINVAL"),  # 3
    ({"base": 0xC400_0003, "nr_functions": 1, "action": 255}, "EINVAL"),  # 4
    ({"base": 0x8000_8000, "nr_functions": 1, "action": 1}, "EEXIST"),  # 5a
    ({"base": 0xC000_0000, "nr_functions": 1, "action": 1}, "EEXIST"),  # 5b
    ({"base": 0xC400_0003, "nr_functions": 1, "action": 1}, "OK"),  # 6, first
    ({"base": 0xC400_0003, "nr_functions": 1, "action": 1}, "EEXIST"),  # 6, second
    ({"base": 0, "nr_functions": 0, "action": 1}, "EEXIST"),  # the whole space
    ({"base": 0x8400_0000, "nr_functions": 1, "action": 2}, "OK"),  # 8
    ({"base": 0x8400_0050, "nr_functions": 16, "action": 2, "ran_before": True}, "EBUSY"),
]


def test_records_replay_through_the_kernel_model_in_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    path = write(tmp_path, "records.json", json.dumps([r for r, _ in SELFTEST_RECORDS]))
    code, out, _ = check(["--records", path], capsys)
    assert code == 0
    rows = json.loads(out)
    assert [row["errno"] for row in rows] == [e for _, e in SELFTEST_RECORDS]
    assert rows[0] == {"base": 0x8400_0000, "nr_functions": 1, "action": 1, "errno": "EINVAL"}


def test_a_ran_before_marker_entry_freezes_the_filter_and_prints_no_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    # The real-KVM test bed writes the run as its own entry (hyperbroker_tools.kvm_bed.RanBefore).
    records = [{"base": 0x8400_0050, "nr_functions": 16, "action": 2}, {"ran_before": True},
               {"base": 0xC400_0050, "nr_functions": 16, "action": 2}]
    code, out, _ = check(["--records", write(tmp_path, "r.json", json.dumps(records))], capsys)
    assert code == 0
    assert [(row["base"], row["errno"]) for row in json.loads(out)] == [
        (0x8400_0050, "OK"), (0xC400_0050, "EBUSY"),
    ]


@pytest.mark.parametrize("records", [
    {"base": 1},
    [{"base": 1, "nr_functions": 1}],
    [{"base": -1, "nr_functions": 1, "action": 1}],
    [{"base": 1 << 32, "nr_functions": 1, "action": 1}],
    [{"base": 1, "nr_functions": 1, "action": 256}],
    [{"base": 1, "nr_functions": 1, "action": True}],
    [{"base": 1, "nr_functions": 1, "action": 1, "pad": [0] * 16}],
    [{"base": 1, "nr_functions": 1, "action": 1, "pad": [256]}],
    [{"base": 1, "nr_functions": 1, "action": 1, "ran_before": 1}],
    [{"ran_before": False}],
    [{"base": 1, "nr_functions": 1, "action": 1, "flags": 0}],
    [7],
])
def test_malformed_records_exit_2(records: object, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = check(["--records", write(tmp_path, "r.json", json.dumps(records))], capsys)
    assert code == 2 and out == "" and err


def test_records_that_are_not_json_exit_2(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = check(["--records", write(tmp_path, "r.json", "[{")], capsys)
    assert code == 2 and "hyperbroker policy check:" in err


# --- as a process -----------------------------------------------------------------------------


def test_the_module_runs_as_a_command(tmp_path: Path) -> None:
    ok = subprocess.run([sys.executable, "-m", "hyperbroker.cli.policy", str(EXAMPLE), "--json"],
                        capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    assert ok.returncode == 0, ok.stderr
    records = json.loads(ok.stdout)["profiles"]["entropy-batch"]["kernel_filter"]
    assert records[0]["rule"] == "trng-discovery"
    bad = subprocess.run([sys.executable, "-m", "hyperbroker.cli.policy",
                          write(tmp_path, "bad.yaml", BAD_POLICY)],
                         capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    assert bad.returncode == 1 and "[EEXIST]" in bad.stderr and bad.stdout == ""

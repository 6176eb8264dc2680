"""docs/tee-proxy.md stays true: its call table, its defaults, its UUIDs and its policy example
are checked against the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hyperbroker.broker.policy import load_policy
from hyperbroker.calls import Call
from hyperbroker.handlers.optee import abi
from hyperbroker.handlers.optee.abi import SmcReturn
from hyperbroker.handlers.optee.grpc_backend import OpteePlugin
from hyperbroker.tee.uuids import WELL_KNOWN
from hyperbroker.testing.optee import Harness

DOC = (Path(__file__).resolve().parent.parent / "docs" / "tee-proxy.md").read_text()


def section(title: str) -> str:
    start = DOC.index(f"## {title}")
    end = DOC.find("\n## ", start + 1)
    return DOC[start:end if end > 0 else None]


def table_rows(text: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("| ---"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows[1:]  # without the header


CALL_ROWS = [r for r in table_rows(section("Calls: hyperbroker beside Xen's mediator"))
             if re.fullmatch(r"0x[0-9A-F]{8}", r[1])]


def test_the_call_table_covers_every_named_function() -> None:
    listed = {int(r[1], 16) for r in CALL_ROWS}
    assert set(abi.FUNCTION_NAMES) <= listed


@pytest.mark.parametrize("row", CALL_ROWS, ids=[r[0] for r in CALL_ROWS])
async def test_each_call_answers_what_the_table_says(tmp_path: Path, row: list[str]) -> None:
    name, fid_text, a0_text = row[0], row[1], row[2]
    fid = int(fid_text, 16)
    if fid in abi.FUNCTION_NAMES:
        assert abi.FUNCTION_NAMES[fid] == "OPTEE_" + name
    h = Harness(tmp_path)
    result = await h.handler.handle(Call(0, 1, fid, (fid,) + (0,) * 17), h.guest().ctx)
    want = SmcReturn[a0_text] if a0_text in SmcReturn.__members__ else int(a0_text, 0)
    assert result.x[0] == want


def test_the_configuration_defaults_are_the_documented_ones() -> None:
    rows = {key.strip("`"): r[1] for r in table_rows(section("Configuration"))
            for key in r[0].split(", ")}
    h = OpteePlugin({"backend": "127.0.0.1:1"})
    assert int(rows["timeout_ms"]) / 1000 == h.backend.timeout  # type: ignore[attr-defined]
    assert int(rows["yield_ms"]) / 1000 == h.yield_s
    assert int(rows["thread_count"]) == h.thread_count
    assert int(rows["max_memref_bytes"]) == h.limits.max_memref_bytes
    assert int(rows["max_shm_buffers"]) == h.limits.max_shm_buffers
    assert int(rows["max_shm_buffer_pages"]) == h.limits.max_shm_buffer_pages
    assert int(rows["max_shm_pages"]) == h.limits.max_shm_pages
    assert int(rows["max_sessions"]) == h.limits.max_sessions
    assert rows["os_revision"].strip("`") == "{}.{}".format(*h.fast.os_revision)
    assert set(rows) == set(OpteePlugin.config_keys())


def test_the_shipped_ta_uuids_are_the_documented_ones() -> None:
    text = section("The reference TEE service")
    for ta in WELL_KNOWN:
        assert str(ta) in text


def test_the_policy_example_compiles_with_the_handler() -> None:
    example = re.search(r"```yaml\n(handlers:.*?)```", DOC, re.S)
    assert example is not None
    text = "\n".join(line for line in example.group(1).splitlines() if "tls_" not in line)
    policy = load_policy(text, {"optee": OpteePlugin})
    rules = {r.name: r for p in policy.profiles.values() for r in p.rules}
    assert rules["optee-yield"].fallback.mask == 0x1

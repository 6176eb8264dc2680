"""Broken policies are refused quickly, each reason one bounded line: in process, by
`hyperbroker policy check` and by `hyperbroker serve` (real processes). The Admin API and
`policy apply` against a running broker are tested in tests/e2e/test_policy_bounds.py."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from hyperbroker.broker.policy import PolicyInvalid, bounds, load_policy
from hyperbroker.handlers.api import discover_plugins
from hyperbroker.testing.broken_policies import BROKEN

LIMIT_S = 2.0
LINE = bounds.MAX_MESSAGE + 20  # a message, its errno and the "error: " prefix


def test_the_corpus_is_big_enough() -> None:
    assert len(BROKEN) >= 30


@pytest.mark.parametrize("name", list(BROKEN))
def test_each_broken_policy_is_refused_quickly_with_bounded_one_line_reasons(name: str) -> None:
    plugins = discover_plugins()
    start = time.monotonic()
    with pytest.raises(PolicyInvalid) as refused:
        load_policy(BROKEN[name], plugins)
    elapsed = time.monotonic() - start
    assert elapsed < LIMIT_S, f"{name}: {elapsed:.2f} s"
    errors = refused.value.errors
    assert 1 <= len(errors) <= bounds.MAX_ERRORS
    for e in errors:
        assert "\n" not in e.message and len(e.message) <= bounds.MAX_MESSAGE, e.message[:200]


def _write_all(tmp_path: Path) -> list[tuple[str, Path]]:
    files = []
    for i, (name, text) in enumerate(BROKEN.items()):
        p = tmp_path / f"broken-{i}.yaml"
        p.write_text(text)
        files.append((name, p))
    return files


def _assert_lines(name: str, stderr: str) -> None:
    assert "Traceback" not in stderr, f"{name}: {stderr[-2000:]}"
    lines = stderr.splitlines()
    assert lines, f"{name}: no reason printed"
    assert len(lines) <= bounds.MAX_ERRORS + 5, f"{name}: {len(lines)} lines"
    assert all(len(line) <= LINE for line in lines), f"{name}: a line of {max(map(len, lines))}"


@pytest.mark.slow
def test_policy_check_refuses_each_in_one_line_per_reason(tmp_path: Path) -> None:
    for name, path in _write_all(tmp_path):
        start = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "hyperbroker.cli", "policy", "check",
                              str(path)], capture_output=True, text=True, timeout=60)
        elapsed = time.monotonic() - start
        assert out.returncode == 1, f"{name}: exit {out.returncode}: {out.stderr[-500:]}"
        _assert_lines(name, out.stderr)
        assert "policy refused" in out.stderr.splitlines()[-1]
        # The whole process, interpreter start and plugin discovery included.
        assert elapsed < 3 * LIMIT_S, f"{name}: {elapsed:.2f} s"


@pytest.mark.slow
def test_serve_refuses_each_with_exit_2_and_no_traceback(tmp_path: Path) -> None:
    for name, path in _write_all(tmp_path):
        start = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "hyperbroker.cli", "serve", "--listen",
                              "127.0.0.1:0", "--memory-store", "--policy", str(path)],
                             capture_output=True, text=True, timeout=60)
        elapsed = time.monotonic() - start
        assert out.returncode == 2, f"{name}: exit {out.returncode}: {out.stderr[-500:]}"
        _assert_lines(name, out.stderr)
        assert "policy refused" in out.stderr
        assert elapsed < 3 * LIMIT_S, f"{name}: {elapsed:.2f} s"

"""`hyperbroker demo` runs its simulated guests through real processes and exits cleanly."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_the_demo_runs_and_exits_0() -> None:
    out = subprocess.run([sys.executable, "-m", "hyperbroker.cli", "demo", "--duration", "3"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "summary" in out.stdout
    for source in ("agent ", "broker "):
        assert source in out.stdout
    assert "PV_TIME_FEATURES: no rule" in out.stdout

"""`hyperbroker demo --real-kvm` as a function: boots, shows calls live, exits cleanly."""

from __future__ import annotations

import pytest

from hyperbroker_tools import kvm_bed

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_demo_shows_calls_flowing_and_exits_cleanly(
    bed: kvm_bed.Artifacts, capsys: pytest.CaptureFixture[str],
) -> None:
    assert kvm_bed.run_demo(2) == 0
    out = capsys.readouterr().out
    assert "guest -> trng.version" in out
    assert "guest -> denied" in out or "guest -> trng.rnd64" in out
    assert "done:" in out and "run ok" in out

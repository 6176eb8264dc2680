"""A VMM written in C against include/hyperbroker/vmm_protocol.h alone talks to a real agent."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from hyperbroker.testing.procs import AgentProcess

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc) on this machine")
def test_a_c_vmm_registers_and_gets_a_trng_answer(agent: AgentProcess, tmp_path: Path) -> None:
    exe = tmp_path / "trng_call"
    subprocess.run(["cc", "-std=c11", "-Wall", "-Wextra", "-Werror", "-O2",
                    f"-I{ROOT / 'include'}", str(ROOT / "tests/c/trng_call.c"), "-o", str(exe)],
                   check=True)
    out = subprocess.run([str(exe), str(agent.socket)], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "filter base 0x84000050 nr 16 action 2" in out.stdout
    assert "TRNG answer OK" in out.stdout

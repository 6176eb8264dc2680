"""Real broker and agent processes on loopback, with the test plugins installed."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from hyperbroker.testing.procs import AgentProcess, Broker, start_agent, start_broker

PLUGINS = Path(__file__).resolve().parent.parent / "plugins"
POLICY = """\
handlers:
  trng: {}
  counter: {plugin: test-counter}
profiles:
  default:
    rules:
      - {name: trng, abi: trng, action: forward, handler: trng, deadline_ms: 300}
      - name: counter
        abi: sip
        action: forward
        handler: counter
        deadline_ms: 3000
        fallback: {x0: -3, x1: 0xfa11}
  second:
    rules:
      - {name: trng, abi: trng, action: forward, handler: trng, deadline_ms: 300,
         agent_static: false}
"""


def plugin_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": f"{PLUGINS}{os.pathsep}{path}" if path else str(PLUGINS)}


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    p = tmp_path / "policy.yaml"
    p.write_text(POLICY)
    return p


@pytest.fixture
def broker(tmp_path: Path, policy_file: Path) -> Iterator[Broker]:
    b = start_broker(policy_file, tmp_path / "state", env=plugin_env(), log_level="info")
    yield b
    b.process.stop()


@pytest.fixture
def agent(tmp_path: Path, broker: Broker) -> Iterator[AgentProcess]:
    a = start_agent(broker.address, "host-a", tmp_path, log_level="info")
    yield a
    a.process.stop()

"""Every user error of the `hyperbroker` command is one line and an exit status, never a
traceback; every server stops on SIGTERM with exit 0. The real CLI, as a subprocess
(docs/operations.md, "Exit codes")."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hyperbroker.cli import errors
from hyperbroker.testing.procs import spawn_cli, start_agent, start_broker

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_POLICY = ROOT / "examples" / "policy.yaml"
# Log lines are not the error: the service's own ("2026-12-04 18:33:38,283 INFO ...") and grpc's
# C core, which logs a failed bind itself ("E1204 17:54:21.19 7620 add_port.cc:83] ...").
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ |"
                      r"[DIWE]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\])")

pytestmark = pytest.mark.slow


def hyperbroker(*args: str, env: dict[str, str] | None = None,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hyperbroker.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def one_error_line(run: subprocess.CompletedProcess[str], status: int, command: str) -> str:
    """The run exited `status` and said why in one line of its own on stderr."""
    assert "Traceback" not in run.stderr, run.stderr
    ours = [line for line in run.stderr.splitlines() if not LOG_LINE.match(line)]
    assert len(ours) == 1, run.stderr
    assert ours[0].startswith(f"hyperbroker {command}: "), ours[0]
    assert run.returncode == status, (run.returncode, run.stderr)
    return ours[0]


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port another process (here: this one) listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def test_a_missing_policy_file_is_a_configuration_error(tmp_path: Path) -> None:
    missing = tmp_path / "policy.yaml"
    run = hyperbroker("serve", "--policy", str(missing), "--memory-store",
                      "--listen", "127.0.0.1:0")
    line = one_error_line(run, errors.USAGE, "serve")
    assert str(missing) in line and "No such file" in line


def test_debug_keeps_the_traceback(tmp_path: Path) -> None:
    run = hyperbroker("--log-level", "debug", "serve", "--policy", str(tmp_path / "none.yaml"),
                      "--memory-store", "--listen", "127.0.0.1:0")
    assert run.returncode != 0
    assert "Traceback" in run.stderr and "FileNotFoundError" in run.stderr


def test_a_busy_port_is_a_configuration_error_of_every_server(held_port: int,
                                                              tmp_path: Path) -> None:
    busy = f"127.0.0.1:{held_port}"
    line = one_error_line(hyperbroker("serve", "--policy", str(EXAMPLE_POLICY), "--memory-store",
                                      "--listen", busy), errors.USAGE, "serve")
    assert busy in line and "--listen" in line
    line = one_error_line(hyperbroker("serve", "--policy", str(EXAMPLE_POLICY), "--memory-store",
                                      "--listen", "127.0.0.1:0", "--metrics-listen", busy),
                          errors.USAGE, "serve")
    assert busy in line and "metrics" in line and "in use" in line
    line = one_error_line(hyperbroker("agent", "--socket", str(tmp_path / "a.sock"),
                                      "--metrics-listen", busy), errors.USAGE, "agent")
    assert busy in line and "in use" in line
    line = one_error_line(hyperbroker("tee-serve", "--listen", busy, "--state-dir",
                                      str(tmp_path / "tee")), errors.USAGE, "tee-serve")
    assert busy in line


def test_call_without_an_agent_says_which_socket(tmp_path: Path) -> None:
    sock = tmp_path / "agent.sock"
    line = one_error_line(hyperbroker("call", "--socket", str(sock), "TRNG_VERSION"),
                          errors.UNAVAILABLE, "call")
    assert str(sock) in line and "hyperbroker agent" in line


def test_an_unknown_function_for_call_is_a_usage_error(tmp_path: Path) -> None:
    line = one_error_line(hyperbroker("call", "--socket", str(tmp_path / "a.sock"), "NOPE"),
                          errors.USAGE, "call")
    assert "NOPE" in line


def test_policy_check_into_a_closed_pipe_ends_quietly() -> None:
    # 80 kB of JSON: more than a pipe holds, so the writer meets the closed pipe.
    run = subprocess.run(
        ["bash", "-c", f"'{sys.executable}' -m hyperbroker.cli policy check --json "
                       f"'{EXAMPLE_POLICY}' | head -c 10 >/dev/null; "
                       "echo ${PIPESTATUS[0]} >&2"],
        capture_output=True, text=True, timeout=120)
    assert run.stderr.strip() == str(errors.BROKEN_PIPE), run.stderr


def test_a_bad_hyperbroker_log_names_the_variable() -> None:
    run = hyperbroker("status", env={"HYPERBROKER_LOG": "verbose"})
    assert "Traceback" not in run.stderr and run.returncode == errors.USAGE
    assert run.stderr.count("\n") == 1 and "HYPERBROKER_LOG='verbose'" in run.stderr


def test_policy_apply_of_a_missing_file(tmp_path: Path) -> None:
    line = one_error_line(hyperbroker("policy", "apply", str(tmp_path / "new-policy.yaml"),
                                      "--broker", "127.0.0.1:1"), errors.USAGE, "policy apply")
    assert "new-policy.yaml" in line


def test_policy_apply_without_a_broker(tmp_path: Path) -> None:
    line = one_error_line(hyperbroker("policy", "apply", str(EXAMPLE_POLICY),
                                      "--broker", "127.0.0.1:1"), errors.UNAVAILABLE,
                          "policy apply")
    assert "UNAVAILABLE" in line


def test_an_agent_socket_it_may_not_create(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # root passes every permission check of an ordinary directory (and this interpreter
        # may sit where an unprivileged user cannot run it): sysfs refuses any new socket
        # with EPERM, the same PermissionError path.
        sock = Path("/sys/hyperbroker/agent.sock")
    else:
        locked = tmp_path / "run"
        locked.mkdir(mode=0o500)
        sock = locked / "agent.sock"
    line = one_error_line(hyperbroker("agent", "--socket", str(sock)), errors.USAGE, "agent")
    assert str(sock) in line and f"write access to {sock.parent}" in line


def test_every_server_stops_on_sigterm_with_exit_0(tmp_path: Path) -> None:
    broker = start_broker(EXAMPLE_POLICY, None)
    agent = start_agent(broker.address, "sigterm-host", tmp_path)
    tee = spawn_cli("tee-serve", ["tee-serve", "--listen", "127.0.0.1:0",
                                  "--state-dir", str(tmp_path / "tee")])
    try:
        tee.wait_for(r"listening on ")
    finally:
        for proc in (tee, agent.process, broker.process):
            proc.signal(signal.SIGTERM)  # once, as systemd and Kubernetes send it
        statuses = {p.name: p.proc.wait(timeout=60) for p in (tee, agent.process, broker.process)}
        for proc in (tee, agent.process, broker.process):
            proc.stop()  # collects the output
    for proc in (tee, agent.process, broker.process):
        assert not [line for line in proc.lines if "Traceback" in line], proc.lines
    assert statuses == {"tee-serve": 0, "agent-sigterm-host": 0, "broker": 0}

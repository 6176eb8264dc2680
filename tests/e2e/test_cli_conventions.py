"""The conventions an operator expects of the `hyperbroker` command, through the real CLI:
--help shows every option's default and variable; every option of serve, agent and tee-serve
comes from a flag, a HYPERBROKER_* variable or a --config TOML file, in that precedence; bad
settings are one line and exit 2; --log-format json; `status --watch` into a pipe
(docs/operations.md, "Configuration" and "Logs")."""

from __future__ import annotations

import json
import logging
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hyperbroker.cli import errors
from hyperbroker.cli.main import build_parser
from hyperbroker.runtime import logformat, options
from hyperbroker.tee.server import build_parser as tee_parser
from hyperbroker.testing.procs import spawn_cli

pytestmark = pytest.mark.slow


def hyperbroker(*args: str, env: dict[str, str] | None = None,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("HYPERBROKER_")}
    return subprocess.run([sys.executable, "-m", "hyperbroker.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env={**base, **(env or {})})


def one_line(run: subprocess.CompletedProcess[str], status: int = errors.USAGE) -> str:
    assert "Traceback" not in run.stderr, run.stderr
    assert run.returncode == status, run.stdout + run.stderr
    assert run.stderr.count("\n") == 1, run.stderr
    return run.stderr.strip()


@pytest.mark.parametrize("command", ["serve", "agent", "tee-serve", "call", "policy apply"])
def test_help_shows_every_default_and_variable(command: str) -> None:
    run = hyperbroker(*command.split(), "--help")
    assert run.returncode == 0, run.stderr
    text = re.sub(r"\s+", " ", run.stdout)
    parser = tee_parser() if command == "tee-serve" else build_parser()
    for word in () if command == "tee-serve" else command.split():
        parser = next(a for a in parser._actions
                      if isinstance(a, options.argparse._SubParsersAction)).choices[word]
    actions = list(options.settings(parser))
    assert actions
    for action in actions:
        assert f"[env {options.env_name(action)}]" in text, action.option_strings
    assert text.count("(default: ") == len(actions), text


def lease_error(run: subprocess.CompletedProcess[str]) -> tuple[str, str]:
    """serve refuses --lease-ttl under twice --housekeeping, naming the values it resolved."""
    m = re.search(r"--lease-ttl (\S+) must be at least twice --housekeeping (\S+)", one_line(run))
    assert m, run.stderr
    return m.group(1), m.group(2)


def test_a_flag_wins_over_its_variable_which_wins_over_the_file(tmp_path: Path) -> None:
    config = tmp_path / "serve.toml"
    config.write_text("lease-ttl = 3\nhousekeeping = 1.75\n")
    file_only = hyperbroker("serve", "--config", str(config))
    assert lease_error(file_only) == ("3", "1.75")
    env = {"HYPERBROKER_LEASE_TTL": "3.25"}
    assert lease_error(hyperbroker("serve", "--config", str(config), env=env)) == ("3.25", "1.75")
    flag = hyperbroker("serve", "--config", str(config), "--lease-ttl", "3.4", env=env)
    assert lease_error(flag) == ("3.4", "1.75")
    # Without the file, the default: housekeeping 2.
    assert lease_error(hyperbroker("serve", "--lease-ttl", "1")) == ("1", "2")
    # The config file itself may be named by its variable.
    assert lease_error(hyperbroker("serve", env={"HYPERBROKER_CONFIG": str(config)})) == \
        ("3", "1.75")


def test_servers_start_from_a_file_and_variables_alone(tmp_path: Path) -> None:
    policy = Path(__file__).resolve().parents[2] / "examples" / "policy.yaml"
    (tmp_path / "serve.toml").write_text(
        f'policy = "{policy}"\nmemory-store = true\ninsecure-admin = true\n')
    (tmp_path / "agent.toml").write_text(
        f'socket = "{tmp_path / "a.sock"}"\nhost-id = "conf-host"\n')
    clean = {k: "" for k in os.environ if k.startswith("HYPERBROKER_")}
    broker = spawn_cli("broker", ["serve", "--config", str(tmp_path / "serve.toml")],
                       env={**clean, "HYPERBROKER_LISTEN": "127.0.0.1:0"})
    procs = [broker]
    try:
        port = broker.wait_for(r"listening on [\d.]+:(\d+)", timeout=60).group(1)
        agent = spawn_cli("agent", ["agent", "--config", str(tmp_path / "agent.toml")],
                          env={**clean, "HYPERBROKER_BROKER": f"127.0.0.1:{port}"})
        procs.append(agent)
        agent.wait_for(rf"ready: broker 127.0.0.1:{port} socket {tmp_path / 'a.sock'}",
                       timeout=60)
        tee = spawn_cli("tee-serve", ["tee-serve"],  # --state-dir is required: from a variable
                        env={**clean, "HYPERBROKER_STATE_DIR": str(tmp_path / "tee"),
                             "HYPERBROKER_LISTEN": "127.0.0.1:0"})
        procs.append(tee)
        tee.wait_for(r"listening on", timeout=60)
        status = hyperbroker("status", env={"HYPERBROKER_BROKER": f"127.0.0.1:{port}"})
        assert status.returncode == 0, status.stderr
        assert re.search(r"^conf-host +yes", status.stdout, re.M), status.stdout
    finally:
        codes = [p.stop() for p in reversed(procs)]
    assert codes == [0] * len(procs), [p.lines[-10:] for p in procs]


@pytest.mark.parametrize(("text", "expected"), [
    ("leese-ttl = 3\n", "'leese-ttl' is not a setting of `hyperbroker serve`; did you mean "
                        "'lease-ttl'?"),
    ('lease-ttl = "soon"\n', "lease-ttl: must be a number, not 'soon'"),
    ("listen = 50051\n", "listen: must be a string, not 50051"),
    ("insecure-admin = 1\n", "insecure-admin: must be true or false, not 1"),
    ('admin-write = "ops"\n', "admin-write: must be a list, not 'ops'"),
    ("workers = 1.5\n", "workers: must be an integer, not 1.5"),
    ("reregister-grace = -1\n", "reregister-grace: must be >= 0, not -1"),
    ("lease-ttl = \n", "not valid TOML"),
])
def test_a_bad_config_file_is_one_line_and_exit_2(tmp_path: Path, text: str,
                                                  expected: str) -> None:
    config = tmp_path / "serve.toml"
    config.write_text(text)
    line = one_line(hyperbroker("serve", "--config", str(config)))
    assert line.startswith(f"hyperbroker: {config}: ") and expected in line, line


@pytest.mark.parametrize(("command", "variable", "value", "expected"), [
    ("serve", "HYPERBROKER_LEASE_TTL", "soon", "could not convert string to float"),
    ("serve", "HYPERBROKER_INSECURE_ADMIN", "maybe", "give 1 or 0"),
    ("agent", "HYPERBROKER_BUSY_POLL_US", "-5", "must be >= 0"),
    ("tee-serve", "HYPERBROKER_MAX_SESSIONS_PER_VM", "many", "invalid literal for int()"),
    ("status", "HYPERBROKER_LOG_FORMAT", "xml", "not one of text, json"),
])
def test_a_bad_variable_is_one_line_and_exit_2(command: str, variable: str, value: str,
                                               expected: str) -> None:
    line = one_line(hyperbroker(command, env={variable: value}))
    assert f"{variable}={value!r}: " in line and expected in line, line


def test_a_missing_config_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    line = one_line(hyperbroker("agent", "--config", str(tmp_path / "agent.toml")))
    assert "agent.toml: No such file or directory" in line


def test_log_format_json_is_one_object_per_line(tmp_path: Path) -> None:
    # An agent whose broker is not there logs a warning at once and keeps trying.
    agent = subprocess.Popen(
        [sys.executable, "-m", "hyperbroker.cli", "--log-format", "json", "agent", "--broker",
         "127.0.0.1:1", "--socket", str(tmp_path / "a.sock")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert agent.stderr is not None
        ready, _, _ = select.select([agent.stderr], [], [], 60.0)  # the first log line
        assert ready, "the agent logged nothing within 60 s"
        line = agent.stderr.readline()
    finally:
        agent.terminate()
        _, rest = agent.communicate(timeout=30)
    records = [json.loads(x) for x in [line, *rest.splitlines()] if x.startswith("{")]
    assert len(records) == len([x for x in [line, *rest.splitlines()] if x.strip()]), rest
    first = records[0]
    assert list(first)[:4] == ["time", "level", "logger", "message"]
    assert first["level"] == "warning" and first["logger"].startswith("hyperbroker.agent")
    assert "127.0.0.1:1" in first["message"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00", first["time"])


def test_a_json_record_carries_the_extra_fields_and_the_traceback() -> None:
    record = logging.LogRecord("hyperbroker.x", logging.ERROR, __file__, 1, "crash of %s",
                               ("vm-1",), None)
    record.hyperbroker_event = {"vm": "vm-1"}
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record.exc_info = sys.exc_info()
    out = json.loads(logformat.JsonFormatter().format(record))
    assert out["message"] == "crash of vm-1" and out["hyperbroker_event"] == {"vm": "vm-1"}
    assert "RuntimeError: boom" in out["exception"]


def blocks(lines: list[str]) -> list[int]:
    return [i for i, x in enumerate(lines) if x.startswith("policy v1:")]


def test_status_watch_into_a_pipe_prints_plain_blocks_and_on_a_terminal_redraws() -> None:
    broker = spawn_cli("broker", ["serve", "--memory-store", "--listen", "127.0.0.1:0",
                                  "--policy", str(Path(__file__).resolve().parents[2]
                                                  / "examples" / "policy.yaml")])
    try:
        port = broker.wait_for(r"listening on [\d.]+:(\d+)", timeout=60).group(1)
        watch = spawn_cli("status", ["status", "--watch", "0.2", "--broker",
                                     f"127.0.0.1:{port}"])
        try:
            deadline = time.monotonic() + 60
            while len(blocks(watch.lines)) < 3 and time.monotonic() < deadline:
                assert watch.proc.poll() is None, watch.lines
                time.sleep(0.05)
        finally:
            watch.stop()
        on_tty = terminal_output(["status", "--watch", "0.2", "--broker", f"127.0.0.1:{port}"])
    finally:
        broker.stop()
    heads = blocks(watch.lines)
    assert len(heads) >= 3, watch.lines
    assert not any("\x1b" in line for line in watch.lines), watch.lines[:5]
    assert watch.lines[heads[1] - 1] == "" and watch.lines[heads[2] - 1] == ""
    assert on_tty.count("\x1b[2J\x1b[H") >= 2, on_tty[:300]


def terminal_output(args: list[str], refreshes: int = 2) -> str:
    """What the command writes on a terminal (a pseudo-terminal) until `refreshes` screens."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "hyperbroker.cli", *args], stdout=follower,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    os.close(follower)
    out = b""
    deadline = time.monotonic() + 60
    try:
        while out.count(b"policy v1:") < refreshes and time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 1.0)
            if ready:
                out += os.read(leader, 65536)
            elif proc.poll() is not None:
                break
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        os.close(leader)
    return out.decode(errors="replace")

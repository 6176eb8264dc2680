"""`serve --workers N` supervises its workers: ports per worker in both flag forms, a dead worker
started again (counted on the parent's metrics), a configuration error stops them all."""

from __future__ import annotations

import os
import signal
import socket
import time
import urllib.request
from pathlib import Path

import pytest

from hyperbroker.broker.workers import (
    BACKOFF_FIRST_S,
    STABLE_S,
    backoff,
    metrics_listen,
    worker_args,
)
from hyperbroker.testing.procs import free_port, spawn_cli

from .conftest import plugin_env

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("form", [["--metrics-listen", "0.0.0.0:9464"],
                                  ["--metrics-listen=0.0.0.0:9464"]])
def test_each_worker_gets_its_own_metrics_port_in_either_flag_form(form: list[str]) -> None:
    argv = ["serve", "--workers", "3", *form, "--listen", "0.0.0.0:50051"]
    assert metrics_listen(argv) == "0.0.0.0:9464"
    for i in range(3):
        args = worker_args(argv, i)
        assert metrics_listen(args) == f"0.0.0.0:{9464 + i}"
        assert "--workers" not in args and args[-1] == "--reuse-port"
    assert metrics_listen(worker_args(["serve", "--metrics-listen=127.0.0.1:0"], 1)) == \
        "127.0.0.1:0"  # any port stays any port


def test_restarts_back_off_exponentially_up_to_30_s_and_start_over_after_a_stable_run() -> None:
    pending, waits = BACKOFF_FIRST_S, []
    for _ in range(10):  # a worker that dies at once, again and again
        wait, pending = backoff(pending, uptime_s=0.1)
        waits.append(wait)
    assert waits == [0.5, 1, 2, 4, 8, 16, 30, 30, 30, 30]
    assert backoff(pending, uptime_s=STABLE_S) == (0.5, 1)  # it had run a minute


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        return str(r.read().decode())


def wait_until(condition: object, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise TimeoutError(what)


def test_a_dead_worker_is_started_again_and_counted(tmp_path: Path, policy_file: Path) -> None:
    port, base = free_port(), free_port()
    workers = spawn_cli("workers", [
        "--log-level", "info", "serve", "--workers", "2", "--listen", f"127.0.0.1:{port}",
        f"--metrics-listen=127.0.0.1:{base}", "--policy", str(policy_file),
        "--state-dir", str(tmp_path / "state")], plugin_env())
    try:
        supervisor = int(workers.wait_for(r"supervisor metrics on :(\d+)").group(1))
        assert supervisor == base + 2
        bound = set()
        for _ in range(2):
            m = workers.wait_for(r"listening on [\d.]+:\d+ policy v\d+ metrics on :(\d+)")
            bound.add(int(m.group(1)))
            workers.lines.remove(m.string)
        assert bound == {base, base + 1}  # the = form rewritten per worker: no EADDRINUSE
        text = scrape(supervisor)
        assert 'hyperbroker_workers_restarts_total{worker="0"} 0.0' in text
        assert "hyperbroker_workers_running 2.0" in text
        victim = children(workers.proc.pid)[0]
        os.kill(victim, signal.SIGKILL)
        workers.wait_for(r"worker \d died \(status -9\); starting it again in 0.5 s")
        workers.wait_for(r"listening on [\d.]+:\d+ policy v\d+ metrics on :\d+", timeout=120)
        wait_until(lambda: "hyperbroker_workers_running 2.0" in scrape(supervisor),
                   "the worker did not come back")
        text = scrape(supervisor)
        restarts = [line for line in text.splitlines()
                    if line.startswith("hyperbroker_workers_restarts_total{")]
        assert sorted(line.split()[-1] for line in restarts) == ["0.0", "1.0"], restarts
        assert victim not in children(workers.proc.pid)
        assert len(children(workers.proc.pid)) == 2
    finally:
        workers.signal(signal.SIGTERM)
        code = workers.proc.wait(30)
    assert code == 0, "\n".join(workers.lines[-40:])


def test_a_worker_with_a_configuration_error_stops_them_all_with_2(tmp_path: Path,
                                                                    policy_file: Path) -> None:
    port, held = free_port(), free_port()

    with socket.socket() as s:  # worker 1's metrics port is taken: CannotListen, exit 2
        s.bind(("127.0.0.1", held + 1))
        s.listen()
        workers = spawn_cli("workers", [
            "serve", "--workers", "2", "--listen", f"127.0.0.1:{port}",
            "--metrics-listen", f"127.0.0.1:{held}", "--policy", str(policy_file),
            "--state-dir", str(tmp_path / "state")], plugin_env())
        code = workers.proc.wait(120)
    workers.stop()
    out = "\n".join(workers.lines)
    assert code == 2, out
    assert "worker 1 exited with status 2 (a configuration error" in out

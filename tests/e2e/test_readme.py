"""README.md, executed: its quick start and its "by hand" steps, as the README prints them.

The shell blocks are read from README.md itself, so a README that drifts from the program fails
here. What this test changes, and nothing else:

- The by-hand steps run in a fresh temporary directory holding `.venv` (a link to the
  virtualenv running this test) and `examples/` (a link to the project's), as a checkout would.
- Free ports replace 127.0.0.1:50051, :9464 and :9465 where the commands name them; the
  commands that name no --broker get the broker's port from HYPERBROKER_BROKER, their --broker
  flag's variable (docs/operations.md, "Configuration").
- `serve`, `agent`, `call --hold` and `status --watch` keep running (a reader gives each its
  own terminal): each is started, waited for until it shows that it works, and at the end
  stopped as a reader would (SIGTERM for the servers and the held VM: exit 0; Ctrl-C for
  `status --watch`: exit 130).
- As root, the steps run as the user nobody where nobody may run this interpreter; where it may
  not (an interpreter under /root), they run as root and the test says so with a warning.

In the quick start, `make demo` runs as printed, in the project's directory (the Makefile's);
`make test` is what runs this test, so it is dry-run (`make -n test`) to show its steps exist.
The developer tools' block (`bench`, `demo --real-kvm`) is parsed by the real parser here and run
by tests/e2e/test_bench_smoke.py and tests/kvm_bed/test_kvm_bed_demo.py.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from hyperbroker.cli.main import build_parser
from hyperbroker.testing.procs import ManagedProcess, free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
VENV = Path(sys.prefix)
PORTS = ("127.0.0.1:50051", "127.0.0.1:9464", "127.0.0.1:9465")


def shell_blocks() -> list[list[str]]:
    """README.md's ```sh blocks, each as its commands (continuation lines joined)."""
    blocks = re.findall(r"^```sh\n(.*?)^```$", README.read_text(), re.M | re.S)
    out = []
    for block in blocks:
        commands, current = [], ""
        for line in block.splitlines():
            current += line + "\n"
            if not line.rstrip().endswith("\\"):
                commands.append(current.strip())
                current = ""
        out.append(commands)
    return out


def words(command: str) -> list[str]:
    return shlex.split(command, comments=True)


def block_running(program: str) -> list[str]:
    found = [b for b in shell_blocks() if b and words(b[0])[0] == program]
    assert len(found) == 1, f"README.md has {len(found)} blocks of `{program}` commands"
    return found[0]


def by_hand() -> list[str]:
    first = [b for b in shell_blocks() if b and words(b[0])[1:3] == ["policy", "check"]]
    assert len(first) == 1, "README.md's by-hand block starts with `hyperbroker policy check`"
    return first[0]


def run_as() -> str | None:
    """The unprivileged user to run the steps as, or None (then warn why not)."""
    if os.geteuid() != 0:
        return None
    try:
        probe = subprocess.run([str(VENV / "bin" / "python"), "-c", "import hyperbroker"],
                               user="nobody", capture_output=True, text=True, check=False)
        why = probe.stderr.strip()[-200:] if probe.returncode else ""
    except OSError as e:
        why = str(e)
    if why:
        warnings.warn("README steps run as root: the user nobody cannot run this interpreter "
                      f"({sys.executable}): {why}", stacklevel=2)
        return None
    return "nobody"


@pytest.fixture
def checkout() -> Iterator[Path]:
    """A directory like a reader's checkout, writable by the user the steps run as."""
    d = Path(tempfile.mkdtemp(prefix="hb-readme-"))
    (d / ".venv").symlink_to(VENV)
    (d / "examples").symlink_to(ROOT / "examples")
    yield d
    subprocess.run(["rm", "-rf", str(d)], check=False)


def test_the_by_hand_steps_run_as_printed(checkout: Path) -> None:
    user = run_as()
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(checkout, entry.pw_uid, entry.pw_gid)
    ports = {p: f"127.0.0.1:{free_port()}" for p in PORTS}
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYPERBROKER_BROKER": ports[PORTS[0]]}
    env.pop("HYPERBROKER_LOG", None)
    steps = by_hand()
    text = "\n".join(steps)
    for port in PORTS:
        assert port in text, f"the by-hand steps no longer name {port}: update this test"
    running: list[tuple[ManagedProcess, int]] = []
    outputs: dict[str, str] = {}
    try:
        for step in steps:
            command = step
            for old, new in ports.items():
                command = command.replace(old, new)
            argv = words(step)
            sub = argv[1]
            proc = subprocess.Popen(["bash", "-c", "exec " + command], cwd=checkout, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True, user=user)
            mp = ManagedProcess(sub, proc)
            mp.start_reader()
            if sub in ("serve", "agent") or "--hold" in argv:
                ready = {"serve": r"listening on", "agent": r"ready:"}.get(sub, r"holding VM")
                mp.wait_for(ready, timeout=60)
                running.append((mp, signal.SIGTERM))
            elif "--watch" in argv:
                _wait_for_refreshes(mp, 2)
                running.append((mp, signal.SIGINT))
            else:
                code = proc.wait(timeout=120)
                mp.stop()
                assert code == 0, f"`{step}` exited {code}:\n" + "\n".join(mp.lines)
            outputs[" ".join(argv[1:3])] = "\n".join(mp.lines)
        status = next(mp for mp, _ in running if mp.name == "status")
        assert not any("\x1b" in line for line in status.lines), "escape codes into a pipe"
    finally:
        stopped = [(mp, sig, _stop(mp, sig)) for mp, sig in reversed(running)]
    for mp, sig, code in stopped:
        assert code == (130 if sig == signal.SIGINT else 0), \
            f"{mp.name} exited {code} on {signal.Signals(sig).name}:\n" + "\n".join(mp.lines)
    assert "valid" in outputs["policy check"]
    assert "TRNG_RND64" in outputs["call --socket"] and "answered by broker" in \
        outputs["call --socket"]
    view = json.loads(outputs["inspect host-a/vm-1"])
    assert isinstance(view, dict)
    assert re.search(r"policy v2 is current", outputs["policy apply"])


def _wait_for_refreshes(mp: ManagedProcess, n: int, timeout: float = 60.0) -> None:
    """`status --watch` has printed `n` blocks into its pipe, the first naming vm-1."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        heads = [i for i, line in enumerate(mp.lines) if re.match(r"policy v\d+:", line)]
        if len(heads) >= n and any("host-a/vm-1" in line for line in mp.lines[:heads[1]]):
            return
        if mp.proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"status --watch printed no {n} refreshes naming host-a/vm-1:\n"
                         + "\n".join(mp.lines[-40:]))


def _stop(mp: ManagedProcess, sig: int) -> int:
    mp.signal(sig)
    try:
        return mp.proc.wait(timeout=30)
    finally:
        mp.stop()


def test_make_demo_runs_as_printed_and_make_test_exists() -> None:
    quick = block_running("make")
    assert [words(c) for c in quick] == [["make", "demo"], ["make", "test"]], quick
    variables = [] if VENV == ROOT / ".venv" else [f"VENV={VENV}"]  # a virtualenv elsewhere
    demo = subprocess.run(["make", "demo", *variables], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "summary" in demo.stdout
    for source in ("agent ", "broker "):
        assert source in demo.stdout
    assert "PV_TIME_FEATURES: no rule" in demo.stdout
    dry = subprocess.run(["make", "-n", "test", *variables], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=False)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    for step in ("ruff check", "mypy", "pytest"):
        assert step in dry.stdout, dry.stdout


def test_the_developer_tools_block_parses() -> None:
    tools = [b for b in shell_blocks() if words(b[0])[0] == ".venv/bin/hyperbroker"
             and words(b[0])[1] in ("bench", "demo")]
    assert len(tools) == 1, "README.md has one block of developer tools"
    # Every shell block of README.md is one of the three this file runs or parses.
    assert len(shell_blocks()) == 3, shell_blocks()
    parser = build_parser()
    for command in tools[0]:
        argv = words(command)
        assert argv[0] == ".venv/bin/hyperbroker", command
        parser.parse_args(argv[1:])  # exits 2 on a command or flag the CLI does not know

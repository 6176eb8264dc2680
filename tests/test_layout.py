"""The package's shape: one top-level package, seams enforced, files a reader can hold.

The import contracts live in pyproject.toml ([tool.importlinter]) and run in `make lint`; these
tests prove they bite (a deliberate violation in a copy of the tree is refused), that no code
reaches the top-level folders by their old generic names, that the wheel installs `hyperbroker`
and nothing else, and that every long file says why it is long.
"""

from __future__ import annotations

import ast
import re
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from hyperbroker.testing.procs import ManagedProcess

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
OLD_NAMES = {"broker", "agent", "handlers", "tee"}
LONG = 500


def python_files() -> list[Path]:
    out = []
    for top in ("broker", "agent", "handlers", "tee", "hyperbroker", "tools", "tests", "scripts"):
        for path in (ROOT / top).rglob("*.py"):
            if "/wire/v1/" in str(path) or path.is_relative_to(ROOT / "hyperbroker" / "broker"):
                continue  # generated, or the same files again through a symlink
            if any(path.is_relative_to(ROOT / "hyperbroker" / d) for d in OLD_NAMES):
                continue
            out.append(path)
    return sorted(out)


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    command = [str(LINT_IMPORTS), "--no-cache", "--config", str(tree / "pyproject.toml")]
    return subprocess.run(command, cwd=tree, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": f"{tree}:{tree / 'tools'}", "PATH": "/usr/bin:/bin"})


def copy_tree(dest: Path) -> Path:
    """The project's Python packages and its pyproject, symlinks resolved into real folders."""
    dest.mkdir()
    shutil.copy(ROOT / "pyproject.toml", dest)
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "hyperbroker", dest / "hyperbroker", symlinks=False, ignore=ignore)
    shutil.copytree(ROOT / "tools" / "hyperbroker_tools", dest / "tools" / "hyperbroker_tools",
                    ignore=ignore)
    return dest


def test_the_import_contracts_hold_and_refuse_a_new_violation(tmp_path: Path) -> None:
    clean = lint_imports(copy_tree(tmp_path / "clean"))
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "0 broken" in clean.stdout
    broken = copy_tree(tmp_path / "broken")
    (broken / "hyperbroker" / "agent" / "shortcut.py").write_text(
        "from hyperbroker.broker.dispatch import Dispatcher\n")
    refused = lint_imports(broken)
    assert refused.returncode == 1
    assert "hyperbroker.agent.shortcut -> hyperbroker.broker.dispatch" in refused.stdout


def test_no_code_imports_the_folders_by_their_generic_names() -> None:
    offenders = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}"
                          for n in names if n.split(".")[0] in OLD_NAMES]
    assert offenders == []


def test_every_file_over_500_lines_says_why_at_its_top() -> None:
    long_unexplained = []
    for path in python_files():
        text = path.read_text()
        if text.count("\n") > LONG and "Longer than 500 lines" not in text[:3000]:
            long_unexplained.append(f"{path.relative_to(ROOT)} ({text.count(chr(10))} lines)")
    assert long_unexplained == []


def source_copy(dest: Path) -> Path:
    """What `pip install .` reads, copied with its symlinks, so building leaves the tree alone."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dest)
    for top in ("hyperbroker", "broker", "agent", "handlers", "tee"):
        shutil.copytree(ROOT / top, dest / top, symlinks=True, ignore=ignore)
    return dest


@pytest.mark.slow
def test_the_wheel_installs_one_package_and_no_tools(tmp_path: Path) -> None:
    source = source_copy(tmp_path / "src")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                            "--no-build-isolation", "--wheel-dir", str(tmp_path), str(source)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("hyperbroker-*.whl")
    archive = zipfile.ZipFile(wheel)
    names = archive.namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"hyperbroker"}
    assert not [n for n in names if "kvm_bed" in n or "bench" in n or "hyperbroker_tools" in n]
    for sub in ("broker", "agent", "handlers", "tee", "wire", "runtime", "cli", "testing"):
        assert f"hyperbroker/{sub}/__init__.py" in names
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "hyperbroker = hyperbroker.cli.main:main" in archive.read(entry_points).decode()

    # Installed on its own (the tree's editable install is shadowed), the command runs.
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--target", str(site), str(wheel)], check=True, capture_output=True,
                   timeout=300)
    run = subprocess.run(
        [sys.executable, "-c", "import hyperbroker, sys; print(hyperbroker.__file__); "
         "sys.argv = ['hyperbroker', '--help']; from hyperbroker.cli.main import main; main()"],
        cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(str(site / "hyperbroker")), run.stdout
    assert "serve" in run.stdout and "agent" in run.stdout


def runtime_dependencies() -> set[Path]:
    """What the wheel's declared dependencies install (their packages and dist-info), found
    from this interpreter's installed metadata: nothing the wheel does not ask for."""
    from importlib.metadata import distribution

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    paths: set[Path] = set()
    seen: set[str] = set()
    todo: list[tuple[str, frozenset[str]]] = [("hyperbroker", frozenset())]
    while todo:
        name, extras = todo.pop()
        dist = distribution(name)
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate({"extra": e})
                                         for e in extras or {""}):
                todo.append((req.name, frozenset(req.extras)))
        key = canonicalize_name(name)
        if key in seen or key == "hyperbroker":
            seen.add(key)
            continue
        seen.add(key)
        for f in dist.files or []:
            if not str(f).startswith(".."):
                paths.add(Path(str(dist.locate_file(f.parts[0]))))
    return paths


@pytest.mark.slow
def test_the_image_layout_serves_from_the_wheel_alone(tmp_path: Path) -> None:
    """deploy/container/Containerfile's layout without a container runtime: the wheel installed
    into a fresh venv (/opt/hyperbroker there), run from outside the source tree; `serve`,
    `agent` and `tee-serve` start from it, a call goes through, and each stops on SIGTERM."""
    containerfile = (ROOT / "deploy" / "container" / "Containerfile").read_text()
    assert "pip install /wheels/*.whl" in containerfile and "COPY . ." in containerfile
    assert re.search(r"^USER [1-9]\d*:[1-9]\d*$", containerfile, re.M), "runs as non-root"

    source = source_copy(tmp_path / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "--wheel-dir", str(tmp_path), str(source)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("hyperbroker-*.whl")
    venv = tmp_path / "opt" / "hyperbroker"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c",
                                "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                    "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    # The dependencies: this machine has no index to fetch them from, so the ones already
    # installed here are linked in, exactly the closure of the wheel's Requires-Dist.
    deps = tmp_path / "deps"
    deps.mkdir()
    for path in runtime_dependencies():
        (deps / path.name).symlink_to(path)
    (site / "runtime-deps.pth").write_text(f"{deps}\n")

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    exe = str(venv / "bin" / "hyperbroker")
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "PYTHONUNBUFFERED": "1"}
    policy = run_dir / "policy.yaml"
    shutil.copy(ROOT / "examples" / "policy.yaml", policy)

    def start(name: str, *args: str) -> ManagedProcess:
        proc = subprocess.Popen([exe, "--log-level", "warning", *args], cwd=run_dir, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        managed = ManagedProcess(name, proc)
        managed.start_reader()
        return managed

    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import hyperbroker.tee, hyperbroker.handlers.optee.metrics as m; "
                            "print(m.__file__)"], cwd=run_dir, env=env, capture_output=True,
                           text=True, timeout=60)
    assert where.stdout.startswith(str(site / "hyperbroker")), where.stderr
    procs: list[ManagedProcess] = []
    try:
        tee = start("tee-serve", "tee-serve", "--listen", "127.0.0.1:0", "--state-dir", "tee")
        procs.append(tee)
        tee.wait_for(r"listening on ", timeout=120)
        broker = start("broker", "serve", "--policy", str(policy), "--state-dir", "state",
                       "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0")
        procs.append(broker)
        port = broker.wait_for(r"listening on [\d.]+:(\d+)", timeout=120).group(1)
        agent = start("agent", "agent", "--broker", f"127.0.0.1:{port}", "--host-id", "img",
                      "--socket", "sockets/agent.sock", "--metrics-listen", "127.0.0.1:0")
        procs.append(agent)
        agent.wait_for(r"ready: ", timeout=120)
        call = subprocess.run([exe, "call", "--socket", "sockets/agent.sock", "TRNG_VERSION"],
                              cwd=run_dir, env=env, capture_output=True, text=True, timeout=120)
        assert call.returncode == 0 and "TRNG_VERSION" in call.stdout, call.stderr
    finally:
        for p in procs:
            p.signal(signal.SIGTERM)
        statuses = {p.name: p.proc.wait(timeout=60) for p in procs}
        for p in procs:
            p.stop()
    assert statuses == {"tee-serve": 0, "broker": 0, "agent": 0}, [p.lines for p in procs]

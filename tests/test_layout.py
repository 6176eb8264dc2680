"""The package's shape: one top-level package, seams enforced, files a reader can hold.

The import contracts live in pyproject.toml ([tool.importlinter]) and run in `make lint`; these
tests prove they bite (a deliberate violation in a copy of the tree is refused), that no code
reaches the top-level folders by their old generic names, that the wheel installs `hyperbroker`
and nothing else, and that every long file says why it is long.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

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

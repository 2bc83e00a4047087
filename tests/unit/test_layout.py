"""The contract knows no side: bakgrab.tasks imports neither bakgrab.client nor
bakgrab.worker, and `bakgrab --help` lists only the commands of the sides that
are installed (issue 18). tests/check-wheel.sh checks the same on the built
wheel, and that it installs no top-level name but ``bakgrab``."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SIDES = ("client", "worker")


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_no_module_of_the_contract_imports_a_side() -> None:
    """Every import in tasks/, at any depth of the module (inside functions
    too), names neither side."""
    offenders = []
    files = sorted((REPO / "tasks").glob("*.py"))
    assert len(files) > 5, files
    for path in files:
        for module in imported_modules(path):
            parts = module.split(".")
            if parts[0] in SIDES or parts[:2] in (["bakgrab", s] for s in SIDES):
                offenders.append(f"{path.name}: {module}")
    assert offenders == []


def test_sides_import_under_the_bakgrab_name_only() -> None:
    """No module of the three packages imports ``tasks``, ``client`` or
    ``worker`` as a top-level name: installed, those do not exist."""
    offenders = []
    for side in ("tasks", *SIDES):
        for path in sorted((REPO / side).glob("*.py")):
            for module in imported_modules(path):
                if module.split(".")[0] in ("tasks", *SIDES):
                    offenders.append(f"{side}/{path.name}: {module}")
    assert offenders == []


CONTRACT_ONLY = textwrap.dedent("""
    import importlib, importlib.util, sys
    # Forget how this venv finds the three packages (setuptools' editable
    # finder) and offer only a copy of the contract.
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in str(f).lower()]
    sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in str(h).lower()]
    sys.path[:] = [p for p in sys.path if "editable" not in p.lower()]
    sys.path_importer_cache.clear()
    sys.path.insert(0, sys.argv[1])
    for side in ("bakgrab.client", "bakgrab.worker"):
        assert importlib.util.find_spec(side) is None, side
    for mod in ("app", "cli", "config", "errors", "request", "result", "sealed", "doctor"):
        importlib.import_module("bakgrab.tasks." + mod)
    loaded = sorted(m for m in sys.modules if m.startswith(("bakgrab.client", "bakgrab.worker")))
    assert loaded == [], loaded
    from bakgrab.tasks.cli import main
    sys.argv[1:] = sys.argv[2:]
    main()
""")


def run_contract_only(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    copy = tmp_path / "site" / "bakgrab" / "tasks"
    if not copy.is_dir():
        shutil.copytree(REPO / "tasks", copy, ignore=shutil.ignore_patterns("__pycache__"))
    return subprocess.run([sys.executable, "-I", "-c", CONTRACT_ONLY, str(tmp_path / "site"),
                           *args], capture_output=True, text=True, timeout=60, cwd=tmp_path)


def commands_listed(help_text: str) -> list[str]:
    lines = help_text.split("Commands:\n", 1)[1].splitlines()
    return [line.split()[0] for line in lines if line.startswith("  ") and line.split()]


def test_contract_alone_lists_only_its_own_commands(tmp_path: Path) -> None:
    """With neither side present, bakgrab.tasks imports, and `bakgrab --help`
    lists doctor (whose halves come with the sides) and no side's command."""
    done = run_contract_only(tmp_path, "--help")
    assert done.returncode == 0, done.stderr
    assert commands_listed(done.stdout) == ["doctor"]
    unknown = run_contract_only(tmp_path, "backup", "--help")
    assert unknown.returncode == 2 and "No such command 'backup'" in unknown.stderr


def test_contract_alone_doctor_says_which_side_is_missing(tmp_path: Path) -> None:
    """`bakgrab doctor --role worker` on a host without the worker side fails
    (exit 2) with a line saying so, not a traceback."""
    done = run_contract_only(tmp_path, "doctor", "--role", "worker")
    assert done.returncode == 2, done.stderr
    assert "FAIL  role: the worker side of bakgrab is not installed" in done.stdout
    assert "Traceback" not in done.stderr


def test_both_sides_installed_lists_every_command() -> None:
    """The installed bakgrab lists the commands of both sides, as before."""
    done = subprocess.run([str(Path(sys.executable).parent / "bakgrab"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert commands_listed(done.stdout) == [
        "backup", "doctor", "flower", "key", "list", "protect", "prune", "restore", "scheduler",
        "status", "trust", "unprotect", "verify", "versions", "worker"]

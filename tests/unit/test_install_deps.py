"""deploy/install-deps.sh installs Debian packages without starting or
enabling the system's sshd or Redis (issue 13): its install_packages function
run against stand-ins for apt-get and deb-systemd-helper that record what they
were asked and whether policy-rc.d forbade service starts meanwhile."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "install-deps.sh"


def run(tmp_path: Path, *packages: str, apt_fails: bool = False,
        policy_exists: bool = False) -> tuple[subprocess.CompletedProcess[str], Path, Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "log"
    policy = tmp_path / "policy-rc.d"
    if policy_exists:
        policy.write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "apt-get").write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = install ]; then\n'
        f'  if [ -x "{policy}" ] && "{policy}" ssh start; then r=allowed; else r=forbidden; fi\n'
        f'  echo "apt-get $* starts=$r" >> "{log}"\n'
        f"  {'exit 100' if apt_fails else 'exit 0'}\n"
        "fi\n")
    (bin_dir / "deb-systemd-helper").write_text(f'#!/bin/sh\necho "disable-helper $*" >> "{log}"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    function = subprocess.run(["sed", "-n", "/^install_packages()/,/^}/p", str(SCRIPT)],
                              capture_output=True, text=True, check=True).stdout
    assert function.startswith("install_packages()"), "install_packages is gone"
    done = subprocess.run(
        ["bash", "-c", f'set -euo pipefail; {function}\ninstall_packages "$@"', "x", str(policy),
         *packages],
        capture_output=True, text=True, timeout=30,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin"})
    return done, log, policy


def test_no_service_starts_and_sshd_redis_are_disabled(tmp_path: Path) -> None:
    done, log, policy = run(tmp_path, "rsync", "openssh-server", "redis-server")
    assert done.returncode == 0, done.stderr
    lines = log.read_text().splitlines()
    assert lines[0].startswith("apt-get install -y -qq --no-install-recommends rsync "
                               "openssh-server redis-server")
    assert lines[0].endswith("starts=forbidden")
    assert lines[1:] == ["disable-helper disable ssh.service ssh.socket",
                         "disable-helper disable redis-server.service"]
    assert not policy.exists(), "the policy-rc.d made for the install was left behind"


def test_a_failed_install_removes_its_policy_and_fails(tmp_path: Path) -> None:
    done, log, policy = run(tmp_path, "openssh-server", apt_fails=True)
    assert done.returncode == 100
    assert "disable-helper" not in log.read_text()
    assert not policy.exists()


def test_an_existing_policy_is_left_as_it_was(tmp_path: Path) -> None:
    done, _, policy = run(tmp_path, "rsync", policy_exists=True)
    assert done.returncode == 0, done.stderr
    assert policy.read_text() == "#!/bin/sh\nexit 0\n"


def closed_checkout(tmp_path: Path) -> Path:
    """A stand-in checkout under a 0700 dir (root's home, say): the real
    tests/run.sh, with stand-ins for what it runs. The stand-in pytest records
    where it runs, whether user nobody can read the checkout there, its
    arguments and the .venv it was given, writes an artifact and exits 3."""
    closed = tmp_path / "home"
    repo = closed / "repo"
    (repo / "tests").mkdir(parents=True)
    (repo / "deploy").mkdir()
    (repo / "tests" / "run.sh").write_text((SCRIPT.parents[1] / "tests" / "run.sh").read_text())
    (repo / "tests" / "mypy.sh").write_text("exit 0\n")
    (repo / "tests" / "check-wheel.sh").write_text("exit 0\n")
    (repo / ".venv").mkdir()
    (repo / ".venv" / "from-the-original").write_text("")
    (repo / "deploy" / "install-deps.sh").write_text(
        'cd "$(dirname "$0")/.."; mkdir -p .venv/bin\n'
        "printf '#!/bin/sh\\nexit 0\\n' > .venv/bin/ruff\n"
        "cat > .venv/bin/pytest <<'END'\n"
        "#!/bin/sh\n"
        'echo "pwd=$PWD" > "$RECORD"\n'
        'echo "args=$*" >> "$RECORD"\n'
        "if setpriv --reuid=65534 --regid=65534 --clear-groups cat tests/run.sh >/dev/null 2>&1;"
        ' then echo reachable >> "$RECORD"; fi\n'
        'if [ -e .venv/from-the-original ]; then echo "original venv" >> "$RECORD"; fi\n'
        "mkdir -p tests/artifacts; echo shot > tests/artifacts/shot.png\n"
        "exit 3\n"
        "END\n"
        "chmod 755 .venv/bin/ruff .venv/bin/pytest\n")
    tmp_path.chmod(0o755)
    closed.chmod(0o700)
    return repo


def test_run_sh_runs_a_closed_checkout_from_a_copy_other_users_can_reach(tmp_path: Path) -> None:
    """A clone under a 0700 dir: tests/run.sh runs the tests from a copy in a
    dir other users can reach (the throwaway users run bakgrab from it), with
    a .venv of its own, passes the arguments and the exit code on, brings the
    artifacts back and removes the copy (issue 13)."""
    repo = closed_checkout(tmp_path)
    parent = Path(tempfile.mkdtemp(prefix="bakgrab-copies-"))
    try:
        parent.chmod(0o755)
        record = parent / "record"
        done = subprocess.run(["bash", "tests/run.sh", "-k", "backup"], cwd=repo,
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "BAKGRAB_TESTS_COPY_DIR": str(parent),
                                   "RECORD": str(record)})
        assert done.returncode == 3, done.stderr
        lines = record.read_text().splitlines()
        where = Path(lines[0].removeprefix("pwd="))
        assert where.parent == parent and where.name.startswith("bakgrab-tests."), lines
        assert lines[1:] == ["args=-q -n 2 --dist loadfile -k backup", "reachable"], lines
        assert f"{repo.parent} (mode 700) is closed to other users" in done.stderr
        assert (repo / "tests" / "artifacts" / "shot.png").read_text() == "shot\n"
        assert sorted(p.name for p in parent.iterdir()) == ["record"], "the copy was left behind"
    finally:
        shutil.rmtree(parent)


def test_run_sh_stops_at_once_when_the_copy_would_be_closed_too(tmp_path: Path) -> None:
    """Where the copy's dir is closed to other users as well, tests/run.sh says
    what to do (exit 2) before installing anything."""
    repo = closed_checkout(tmp_path)
    shut = tmp_path / "shut"
    shut.mkdir(mode=0o700)
    done = subprocess.run(["bash", "tests/run.sh"], cwd=repo, capture_output=True, text=True,
                          timeout=30, env={**os.environ, "BAKGRAB_TESTS_COPY_DIR": str(shut)})
    assert done.returncode == 2, done.stderr
    assert f"and so is {shut}" in done.stderr
    assert "BAKGRAB_TESTS_COPY_DIR" in done.stderr
    assert list(shut.iterdir()) == [], "a copy was made"
    assert not (repo / ".venv" / "bin").exists(), "it installed before stopping"


def test_mypy_sh_removes_its_link_farm_and_keeps_mypys_exit_code(tmp_path: Path) -> None:
    """tests/mypy.sh reads the packages through a link farm in a temp dir:
    the farm is gone afterwards (an exec'd mypy had left one per run in /tmp)
    and mypy's exit code is the script's."""
    repo = tmp_path / "repo"
    (repo / "tests").mkdir(parents=True)
    (repo / "tests" / "mypy.sh").write_text((SCRIPT.parents[1] / "tests" / "mypy.sh").read_text())
    for side in ("tasks", "client", "worker"):
        (repo / side).mkdir()
    (repo / ".venv" / "bin").mkdir(parents=True)
    mypy = repo / ".venv" / "bin" / "mypy"
    mypy.write_text('#!/bin/sh\nls "$MYPYPATH/bakgrab" > "$RECORD"\nexit 3\n')
    mypy.chmod(0o755)
    temp = tmp_path / "temp"
    temp.mkdir()
    record = tmp_path / "record"
    done = subprocess.run(["bash", "tests/mypy.sh"], cwd=repo, capture_output=True, text=True,
                          timeout=30, env={**os.environ, "TMPDIR": str(temp),
                                           "RECORD": str(record)})
    assert done.returncode == 3, done.stderr
    assert record.read_text().split() == ["client", "tasks", "worker"]
    assert list(temp.iterdir()) == [], "the link farm was left behind"

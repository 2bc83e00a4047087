"""deploy/install-deps.sh installs Debian packages without starting or
enabling the system's sshd or Redis (issue 13): its install_packages function
run against stand-ins for apt-get and deb-systemd-helper that record what they
were asked and whether policy-rc.d forbade service starts meanwhile."""

from __future__ import annotations

import subprocess
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


def test_run_sh_stops_at_once_in_a_checkout_closed_to_other_users(tmp_path: Path) -> None:
    """A clone under a 0700 dir (root's home, say): tests/run.sh says what to
    do (exit 2) before installing anything, instead of failing tests later."""
    closed = tmp_path / "home"
    (closed / "repo" / "tests").mkdir(parents=True)
    (closed / "repo" / "tests" / "run.sh").write_text((SCRIPT.parents[1] / "tests" / "run.sh")
                                                      .read_text())
    tmp_path.chmod(0o755)
    closed.chmod(0o700)
    done = subprocess.run(["bash", "tests/run.sh"], cwd=closed / "repo", capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2, done.stderr
    assert f"{closed} (mode 700) is closed to other users" in done.stderr
    assert f"chmod o+x {closed}" in done.stderr

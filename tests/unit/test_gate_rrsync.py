"""The gate runs rsync's own rrsync in its own interpreter (issue 19): from the
gate's start to rsync, one Python and no ionice; rrsync's refusals still
refuse; where rrsync cannot run there (not a script for the gate's Python), it
is exec'd as a program, as strict as before; where ``ioprio_set`` is not known,
ionice is exec'd."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bakgrab.client.gate import check

OPTS = "-vlogDtpre.iLsfxCIvu"
PULL = f"rsync --server --sender {OPTS} . /"
RRSYNC = shutil.which("rrsync") or "/usr/bin/rrsync"
IONICE = shutil.which("ionice") or "/usr/bin/ionice"

pytestmark = pytest.mark.skipif(
    not (shutil.which("rrsync") and shutil.which("ionice") and shutil.which("rsync")),
    reason="rsync, rrsync and ionice needed",
)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "file").write_text("precious\n")
    return src


def gate(mode: str, root: Path, log: Path, command: str, *, rrsync: str = RRSYNC,
         ionice: str = IONICE, prefix: tuple[str, ...] = (),
         code: str | None = None) -> subprocess.CompletedProcess[str]:
    """The gate as sshd runs it (``code``: the gate's main run by ``python -I -c``
    instead, after that code). Its stdin is empty: a served rsync starts, finds
    no peer and exits 12."""
    start = ["-m", "bakgrab.client.gate"] if code is None else [
        "-c", f"import sys\nfrom bakgrab.client import gate\n{code}\nsys.exit(gate.main())"]
    return subprocess.run(
        [*prefix, sys.executable, "-I", *start, mode, str(root), str(log), ionice, rrsync],
        env={"PATH": os.environ["PATH"], "SSH_ORIGINAL_COMMAND": command},
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, cwd=root.parent)


def execs(trace: Path) -> list[str]:
    """The programs every successful execve() in an ``strace -f`` log ran."""
    return re.findall(r'execve\("([^"]+)", .*\) = 0$', trace.read_text(), re.MULTILINE)


def test_one_interpreter_from_gate_to_rsync(source: Path, tmp_path: Path) -> None:
    """From the gate's start to the rsync serving a pull, strace sees two
    programs: the gate's Python and rsync. No ionice, no rrsync as a program
    (it ran in the gate), and the pull's rsync ran (exit 12: no peer)."""
    trace = tmp_path / "trace"
    done = gate("ro", source, tmp_path / "gate.log", PULL,
                prefix=("strace", "-f", "-qq", "-e", "trace=execve", "-o", str(trace)))
    assert done.returncode == 12, done.stderr
    assert "connection unexpectedly closed" in done.stderr
    assert execs(trace) == [sys.executable, "/usr/bin/rsync"]
    assert not (tmp_path / "gate.log").exists()


@pytest.mark.parametrize(("mode", "command", "option"), [
    ("ro", f"rsync --server --sender {OPTS} --log-file={{canary}}/log . /", "--log-file"),
    ("ro", f"rsync --server --sender {OPTS} --remove-source-files . /", "--remove-source-files"),
    ("ro", f"rsync --server --sender {OPTS} -L . /", "-L"),
    ("ro", f"rsync --server --sender {OPTS} --copy-devices . /", "--copy-devices"),
    ("wo", f"rsync --server {OPTS} --delete . /", "--delete"),
    ("wo", f"rsync --server {OPTS} --remove-source-files . /", "--remove-source-files"),
])
def test_rrsync_refusals_still_refuse(tmp_path: Path, mode: str, command: str,
                                      option: str) -> None:
    """An option the gate's own check lets through but rrsync disables (in
    -ro, or by -no-del in -wo) is refused with rrsync's own message, exit 1,
    a refusal line in the gate's log, and nothing written."""
    canary = tmp_path / "canary"
    canary.mkdir()
    command = command.format(canary=canary)
    wrap = tmp_path / "wrap"
    (wrap / "r").mkdir(parents=True)
    wrap.chmod(0o700)
    root = wrap / "r"
    (root / "file").write_text("precious\n")
    log = tmp_path / "gate.log"
    assert check(mode, command) is None
    done = gate(mode, root, log, command)
    assert done.returncode == 1
    assert done.stderr == f"{RRSYNC} error: option {option} has been disabled on this server.\n"
    assert log.read_text().splitlines()[-1].endswith(
        f" refused: rrsync (exit 1; its reason went to the peer): {command!r}")
    assert sorted(os.listdir(root)) == ["file"] and os.listdir(canary) == []
    assert (root / "file").read_text() == "precious\n"


def not_for_this_python(tmp_path: Path) -> dict[str, Path]:
    """rrsyncs the gate cannot run in its own interpreter, each still rsync's
    own rrsync once started: a shell wrapper around it (a non-Python rrsync),
    and a copy whose #! line carries an option."""
    wrapper = tmp_path / "rrsync-sh"
    wrapper.write_text(f'#!/bin/sh\nexec /usr/bin/python3 {RRSYNC} "$@"\n')
    flagged = tmp_path / "rrsync-flag"
    text = Path(RRSYNC).read_text()
    flagged.write_text("#!/usr/bin/python3 -E\n" + text.split("\n", 1)[1])
    for path in (wrapper, flagged):
        path.chmod(0o755)
    return {"shell": wrapper, "flagged": flagged}


@pytest.mark.parametrize("kind", ["shell", "flagged"])
def test_rrsync_not_for_this_python_is_exec_d(source: Path, tmp_path: Path, kind: str) -> None:
    """An rrsync that is not a script for the gate's Python is exec'd as a
    program, as before, with a note in the gate's log: a pull reaches rsync
    (exit 12: no peer), and rrsync still refuses --log-file with its message."""
    rrsync = str(not_for_this_python(tmp_path)[kind])
    log = tmp_path / "gate.log"
    trace = tmp_path / "trace"
    done = gate("ro", source, log, PULL, rrsync=rrsync,
                prefix=("strace", "-f", "-qq", "-e", "trace=execve", "-o", str(trace)))
    assert done.returncode == 12, done.stderr
    assert execs(trace)[:2] == [sys.executable, rrsync]
    assert execs(trace)[-1] == "/usr/bin/rsync"
    assert f"note: rrsync {rrsync} runs as a program: " in log.read_text()
    refused = f"rsync --server --sender {OPTS} --log-file={tmp_path}/x . /"
    done = gate("ro", source, log, refused, rrsync=rrsync)
    assert done.returncode == 1
    assert done.stderr.endswith(" error: option --log-file has been disabled on this server.\n")
    assert not (tmp_path / "x").exists()


def test_missing_rrsync_refuses(source: Path, tmp_path: Path) -> None:
    """No rrsync at the path the client resolved: the gate refuses, exit 1."""
    log = tmp_path / "gate.log"
    done = gate("ro", source, log, PULL, rrsync=str(tmp_path / "nothing"))
    assert done.returncode == 1
    assert done.stderr.startswith("bakgrab gate: refused: cannot start rrsync: ")
    assert " refused: cannot start rrsync: " in log.read_text()


def test_unknown_ioprio_set_execs_ionice(source: Path, tmp_path: Path) -> None:
    """Where the gate knows no ioprio_set number, it execs ionice as before:
    ``ionice -c 3 -t RRSYNC -ro -no-lock DIR`` (a stand-in ionice shows it)."""
    ionice = tmp_path / "ionice"
    ionice.write_text('#!/bin/sh\necho "$*"\n')
    ionice.chmod(0o755)
    log = tmp_path / "gate.log"
    done = gate("ro", source, log, PULL, ionice=str(ionice), code="gate.IOPRIO_SET.clear()")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"-c 3 -t {RRSYNC} -ro -no-lock {source}\n"
    assert f"note: no ioprio_set known for {os.uname().machine}: exec'd ionice" in log.read_text()


def test_rrsync_failure_ends_the_gate(source: Path, tmp_path: Path) -> None:
    """rrsync runs from the path the client resolved, and a failure inside it
    (here a copy whose rsync is missing) ends the gate as it would end
    rrsync: exit 1, the traceback on stderr, a refusal in the log."""
    missing = tmp_path / "no-rsync"
    text = Path(RRSYNC).read_text()
    copy = tmp_path / "rrsync"
    copy.write_text(text.replace("RSYNC = '/usr/bin/rsync'", f"RSYNC = '{missing}'", 1))
    assert copy.read_text() != text
    copy.chmod(0o755)
    log = tmp_path / "gate.log"
    done = gate("ro", source, log, PULL, rrsync=str(copy))
    assert done.returncode == 1
    assert f'File "{copy}", line ' in done.stderr  # the copy ran, in the gate
    assert done.stderr.endswith("FileNotFoundError: [Errno 2] No such file or directory\n")
    assert log.read_text().splitlines()[-1].endswith(
        f" refused: rrsync failed (FileNotFoundError): {PULL!r}")

"""A real pull through the one-shot sshd (issue 19): the rsync that serves it
is the gate's own process, started from one Python interpreter and without
ionice, in the idle I/O class and at nice 19; strace of the whole server sees
every program each session ran."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bakgrab.client import keys
from tests import support

pytestmark = pytest.mark.integration

SERVER = """
import sys
from pathlib import Path
from bakgrab.client import keys
from bakgrab.client.sshd import OneShotServer, ServerConfig, parse_allow

host_key, _ = keys.host_key(Path(sys.argv[3]))
with OneShotServer(ServerConfig(source=Path(sys.argv[1]), public_key=sys.argv[2],
                                allow=parse_allow("127.0.0.1"), host_key=host_key,
                                listen="127.0.0.1", max_connections=2)) as srv:
    print(srv.port, flush=True)
    sys.stdin.read()
"""
"""A one-shot server in a process of its own, until its stdin closes."""


class Traced:
    def __init__(self, proc: subprocess.Popen[str], port: int, trace: Path) -> None:
        self.proc, self.port, self.trace = proc, port, trace

    def execs(self) -> dict[int, list[str]]:
        """The programs each process ran (successful execve() calls), by pid."""
        seen: dict[int, list[str]] = {}
        for pid, program in re.findall(r'^(\d+) +execve\("([^"]+)", .*\) = 0$',
                                       self.trace.read_text(), re.MULTILINE):
            seen.setdefault(int(pid), []).append(program)
        return seen


@pytest.fixture
def traced_server(tmp_path: Path) -> Iterator[tuple[Traced, Path, Path]]:
    """A one-shot server run under ``strace -f`` (execve only), a source with
    a 256 KiB file, and the one-time key; stopped by pid afterwards."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "data").write_bytes(os.urandom(256 * 1024))
    pair = keys.one_time_key()
    key = tmp_path / "key"
    key.write_text(pair.private)
    key.chmod(0o600)
    trace = tmp_path / "trace"
    proc = subprocess.Popen(
        ["strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=execve", "-o", str(trace),
         sys.executable, "-c", SERVER, str(src), pair.public, str(tmp_path / "state")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield Traced(proc, port, trace), src, key
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def served_rsync(root: int) -> int | None:
    for pid in support.descendants(root):
        if support.comm(pid) == "rsync":
            return pid
    return None


def test_pull_is_served_by_the_gate_process(traced_server: tuple[Traced, Path, Path],
                                            tmp_path: Path) -> None:
    """While a real (bandwidth-limited) pull runs, the rsync serving it is in
    the idle I/O class (``ionice -p``), at nice 19, a child of sshd; the
    session ran the login shell, the gate's Python and rsync, and no ionice,
    no rrsync as a program, no second Python. The pull copies the bytes."""
    server, src, key = traced_server
    ssh = (f"ssh -F /dev/null -p {server.port} -i {key} -o BatchMode=yes -o IdentitiesOnly=yes "
           "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR")
    dest = tmp_path / "dest"
    pull = subprocess.Popen(["rsync", "-a", "--bwlimit=64", "-e", ssh, "root@127.0.0.1:/",
                             f"{dest}/"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        pid = int(support.wait_for(lambda: served_rsync(server.proc.pid), 30,
                                   "the rsync serving the pull", interval=0.02))
        io_class = subprocess.run(["ionice", "-p", str(pid)], capture_output=True, text=True,
                                  check=True).stdout.strip()
        nice = os.getpriority(os.PRIO_PROCESS, pid)
        parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        parent_exe = os.readlink(f"/proc/{parent}/exe")
        out, err = pull.communicate(timeout=60)
    finally:
        pull.kill()
        pull.wait(timeout=10)
    assert pull.returncode == 0, err
    assert (dest / "data").read_bytes() == (src / "data").read_bytes()
    assert io_class == "idle"
    assert nice == 19
    assert os.path.basename(parent_exe).startswith("sshd"), parent_exe
    assert server.proc.stdin is not None
    server.proc.stdin.close()
    server.proc.wait(timeout=30)
    programs = server.execs()[pid]
    assert programs[-2:] == [sys.executable, "/usr/bin/rsync"], programs
    assert [p for p in programs if "python" in os.path.basename(p)] == [sys.executable]
    everything = [os.path.basename(p) for ps in server.execs().values() for p in ps]
    assert "ionice" not in everything and "rrsync" not in everything, everything

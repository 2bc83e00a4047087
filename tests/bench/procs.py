"""Servers the benchmark starts, and how it measures what programs cost.

Every process started here is tracked by pid, runs in its own process group
and is stopped by that pid (never by name). Servers listen on free loopback
ports, and a server counts as up only once the listening socket is seen to
belong to its own pid (another process may hold the port we picked).
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

REQUIRED = {
    # program: Debian package
    "rsync": "rsync",
    "sshd": "openssh-server",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "redis-server": "redis-server",
    "rsnapshot": "rsnapshot",
    "borg": "borgbackup",
    "du": "coreutils",
    "ionice": "util-linux",
}


def find(program: str) -> str | None:
    return shutil.which(program) or shutil.which(program, path="/usr/sbin:/sbin")


def missing_programs() -> list[tuple[str, str]]:
    return [(prog, pkg) for prog, pkg in REQUIRED.items() if find(prog) is None]


def install_hint(missing: Sequence[tuple[str, str]]) -> str:
    pkgs = " ".join(sorted({pkg for _, pkg in missing}))
    progs = ", ".join(prog for prog, _ in missing)
    return (f"missing program(s): {progs}. Install them with:\n"
            f"    apt-get install -y {pkgs}\n"
            "(borg also comes from PyPI: pip install borgbackup)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class Proc:
    """A started process in its own process group, stopped by its pid."""

    def __init__(self, argv: Sequence[str], log: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.argv = list(argv)
        self.log = log
        self._out = open(log, "ab")  # noqa: SIM115
        self.popen = subprocess.Popen(self.argv, stdout=self._out, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                                      start_new_session=True)
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> None:
        from tests.support import stop_group

        stop_group(self.popen, timeout)
        self._out.close()


def listening_inodes(port: int, pid: int | None = None) -> set[str]:
    """Socket inodes listening on ``port`` (TCP), in ``pid``'s network
    namespace (scenario 8's client side has its own), else ours."""
    found = set()
    base = f"/proc/{pid}/net" if pid else "/proc/net"
    for table in (f"{base}/tcp", f"{base}/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                found.add(f[9])
    return found


def owns_listener(pid: int, port: int) -> bool:
    inodes = listening_inodes(port, pid)
    if not inodes:
        return False
    for pid_ in [pid, *descendants(pid)]:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid_}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid_}/fd/{fd}")
                    if link.startswith("socket:[") and link[8:-1] in inodes:
                        return True
    return False


def start_server(make_argv: Callable[[int], Sequence[str]], log: Path, what: str,
                 env: dict[str, str] | None = None, tries: int = 5) -> tuple[Proc, int]:
    """Start a server on a free loopback port that is really its own."""
    for _ in range(tries):
        port = free_port()
        proc = Proc(make_argv(port), log, env=env)
        try:
            wait_for(lambda p=proc, n=port: owns_listener(p.pid, n) or not p.alive(),  # type: ignore[misc]
                     15, what)
        except TimeoutError:
            proc.stop()
            continue
        if proc.alive():
            return proc, port
        proc.stop()
    tail = log.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"{what} did not start; see {log}:\n{tail}")


# -- measuring ------------------------------------------------------------------

def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
                out += [int(c) for c in text.split()]
    except OSError:
        pass
    return out


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = children(pid)
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children(p)
    return out


def proc_cpu(pid: int) -> float:
    """utime + stime of ``pid`` and of the children it has reaped, in seconds."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2:].split()
    # fields[11..14] are utime, stime, cutime, cstime (stat fields 14-17)
    return sum(int(x) for x in fields[11:15]) / CLK_TCK


def tree_cpu(pids: Sequence[int]) -> float:
    """CPU of long-lived servers: each pid and its live children (pool processes),
    each with what it has reaped (their rsync and ssh children)."""
    seen = set()
    total = 0.0
    for pid in pids:
        for p in [pid, *children(pid)]:
            if p not in seen:
                seen.add(p)
                total += proc_cpu(p)
    return total


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def pss_kib(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of one process in KiB; (0, 0) if it is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0, 0
    pss = re.search(r"^Pss:\s+(\d+)", text, re.M)
    rss = re.search(r"^Rss:\s+(\d+)", text, re.M)
    return (int(pss.group(1)) if pss else 0, int(rss.group(1)) if rss else 0)


def tree_memory(pid: int) -> dict[str, int]:
    """PSS and RSS (KiB) of ``pid`` and all its descendants, and their count."""
    pids = [pid, *descendants(pid)]
    pss = rss = 0
    for p in pids:
        a, b = pss_kib(p)
        pss += a
        rss += b
    return {"pss_kib": pss, "rss_kib": rss, "processes": len(pids)}


class MemorySampler:
    """Samples the memory of a process tree in a thread; keeps the peak."""

    def __init__(self, pid: int, every: float = 0.05) -> None:
        self.pid = pid
        self.every = every
        self.peak = {"pss_kib": 0, "rss_kib": 0, "processes": 0}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            m = tree_memory(self.pid)
            self.samples += 1
            if m["pss_kib"] > self.peak["pss_kib"]:
                self.peak = m
            self._stop.wait(self.every)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def disk_usage(path: Path) -> tuple[int, int]:
    """(bytes of allocated blocks, inodes) under ``path``, each inode counted
    once however many links it has (two ``du -sx`` run side by side)."""
    runs = [subprocess.Popen(["du", "-sx", arg, str(path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
            for arg in ("-B1", "--inodes")]
    values = []
    for p in runs:
        out, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"du {path} failed: {err.strip()}")
        values.append(int(out.split()[0]))
    return values[0], values[1]


def load_average() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return []


def run_timed(argv: Sequence[str], *, env: dict[str, str] | None = None,
              stdout: Any = subprocess.DEVNULL, stderr: Any = subprocess.PIPE,
              timeout: float = 3600, cwd: Path | None = None) -> tuple[float, float, str, int]:
    """Run one program to its end: (wall s, CPU s of it and every descendant
    it reaped, stderr tail, exit code)."""
    cpu0 = children_cpu()
    t0 = time.monotonic()
    p = subprocess.run(list(argv), env=env, stdout=stdout, stderr=stderr, timeout=timeout,
                       cwd=cwd, stdin=subprocess.DEVNULL)
    wall = time.monotonic() - t0
    cpu = children_cpu() - cpu0
    err = p.stderr.decode(errors="replace")[-3000:] if isinstance(p.stderr, bytes) else ""
    return wall, cpu, err, p.returncode

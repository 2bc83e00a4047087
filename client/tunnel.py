"""The SSH tunnel from the client to the backup host's broker.

``ssh -N -L 127.0.0.1:LOCAL:BROKER_HOST:BROKER_PORT USER@HOST`` with
``ExitOnForwardFailure`` and keepalives, so a dead tunnel ends instead of
hanging. The broker URL is rewritten to the local end; the backup host is
authenticated by the user's own ssh known_hosts (or the options given).

Invariants: :meth:`Tunnel.start` returns a ready tunnel or raises with the
ssh child gone, within ``connect_timeout + READY_GRACE`` seconds per attempt
whatever the other end does (an sshd that never answers the key exchange
keeps ssh alive for ever: it is killed before its stderr is read, issue 13);
``check`` is called while waiting, so a multi-target run can stop it.
"""

from __future__ import annotations

import os
import re
import socket
import time
import urllib.parse
from collections.abc import Callable, Sequence

from bakgrab.tasks import process
from bakgrab.tasks.errors import ClientSetupError

TARGET_RE = re.compile(
    r"(?:(?P<user>[A-Za-z_][A-Za-z0-9_.-]*)@)?"
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)"
    r"(?::(?P<port>\d{1,5}))?")
READY_GRACE = 5
"""Seconds a tunnel may take to be ready beyond ssh's own ``ConnectTimeout``."""
STDERR_DRAIN = 1.0
"""Seconds spent reading a failed ssh's stderr after it was killed (a
ProxyCommand child that left the process group could hold it open)."""


def _never() -> None:
    """The default ``check``: nothing ever stops a tunnel's start."""


def parse_target(text: str) -> tuple[str | None, str, int]:
    """``USER@HOST[:PORT]`` to its parts (IPv6 hosts in brackets)."""
    m = TARGET_RE.fullmatch(text)
    if not m or not 0 < int(m.group("port") or 22) < 65536:
        raise ClientSetupError(f"--tunnel {text!r}: expected USER@HOST[:PORT]")
    return m.group("user"), m.group("host").strip("[]"), int(m.group("port") or 22)


def broker_endpoint(url: str) -> tuple[str, int]:
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        raise ClientSetupError("broker: not a valid redis://[:PASSWORD@]HOST[:PORT]/DB URL "
                               "(is the port a number from 1 to 65535?)") from None
    if parts.scheme not in ("redis", "rediss"):
        raise ClientSetupError(f"broker {redact_url(url)}: only redis:// URLs are supported")
    if port == 0:
        raise ClientSetupError(f"broker {redact_url(url)}: port 0 is not a port")
    return parts.hostname or "127.0.0.1", port or 6379


def with_endpoint(url: str, host: str, port: int) -> str:
    parts = urllib.parse.urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    hostport = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    netloc = f"{userinfo}@{hostport}" if userinfo else hostport
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def redact_url(url: str) -> str:
    """The URL with any password replaced, for messages."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 -- raises on a malformed netloc
    except ValueError:
        return "<malformed URL>"
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Tunnel:
    """A running ``ssh -N -L`` to the broker; use as a context manager."""

    def __init__(self, target: str, broker_url: str, alive_interval: int = 15,
                 ssh_options: Sequence[str] = (), connect_timeout: int = 20,
                 reverse_port: int = 0, check: Callable[[], None] = _never) -> None:
        self.user, self.host, self.ssh_port = parse_target(target)
        self.check = check
        """Called while the tunnel starts as a context manager; may raise to stop."""
        self.remote = broker_endpoint(broker_url)
        self.broker_url = broker_url
        self.alive_interval = alive_interval
        self.ssh_options = list(ssh_options)
        self.reverse_port = reverse_port
        """Local port of the one-shot sshd to offer on the backup host's loopback
        (``--reverse``, for clients behind NAT); 0 for none."""
        self.remote_port = 0
        """The port the backup host allocated for that reverse forward."""
        self.connect_timeout = connect_timeout
        self.child: process.Child | None = None
        self.local_port = 0
        self._stderr = b""
        """What ssh wrote on stderr, read once it is dead (or while it says
        the port of a reverse forward)."""

    @property
    def url(self) -> str:
        return with_endpoint(self.broker_url, "127.0.0.1", self.local_port)

    def start(self, check: Callable[[], None] = _never) -> Tunnel:
        """Start ssh and wait until the forward works; ``check`` is called
        while waiting and may raise to give up (the ssh child is then killed)."""
        rhost, rport = self.remote
        rhost = f"[{rhost}]" if ":" in rhost else rhost
        dest = f"{self.user}@{self.host}" if self.user else self.host
        allowed = self.connect_timeout + READY_GRACE
        err = ""
        for _ in range(3):
            self.local_port = free_port()
            argv = ["ssh", "-N", "-T", "-p", str(self.ssh_port),
                    "-L", f"127.0.0.1:{self.local_port}:{rhost}:{rport}",
                    "-o", "ExitOnForwardFailure=yes", "-o", "BatchMode=yes",
                    "-o", f"ServerAliveInterval={self.alive_interval}",
                    "-o", "ServerAliveCountMax=3",
                    "-o", f"ConnectTimeout={self.connect_timeout}",
                    "-o", "ClearAllForwardings=no", "-o", "ForwardAgent=no",
                    "-o", "ForwardX11=no", "-o", "PermitLocalCommand=no"]
            if self.reverse_port:
                argv += ["-R", f"127.0.0.1:0:127.0.0.1:{self.reverse_port}"]
            for opt in self.ssh_options:
                argv += ["-o", opt]
            argv += ["--", dest]
            self._stderr = b""
            self.child = process.spawn(argv, stdout=process.subprocess.DEVNULL)
            try:
                ready = self._wait_ready(time.monotonic() + allowed, check)
            except BaseException:
                self.close()
                raise
            if ready:
                return self
            stalled = self.child.poll() is None
            # Kill before reading: a live ssh never closes its stderr, and
            # reading it to the end would wait for ever (issue 13).
            self.close()
            err = self._stderr.decode(errors="replace").strip()
            if stalled:
                raise ClientSetupError(
                    f"SSH tunnel to {dest} port {self.ssh_port} was not ready within {allowed}s "
                    f"(connect_timeout + {READY_GRACE}): ssh was still connecting, the server "
                    "never completed the SSH handshake or the forward; check the --tunnel host "
                    f"and port{': ' + err[-300:] if err else ''}")
            if "forwarding" not in err.lower():  # a port race is worth another try
                break
        raise ClientSetupError(f"SSH tunnel to {dest} port {self.ssh_port} failed: {err[-400:]}")

    def _wait_ready(self, deadline: float, check: Callable[[], None]) -> bool:
        assert self.child is not None
        if self.reverse_port and not self._read_allocated_port(deadline, check):
            return False
        while time.monotonic() < deadline:
            check()
            if self.child.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.local_port), timeout=1):
                    return True
            except OSError:
                time.sleep(0.05)
        return False

    def _read_allocated_port(self, deadline: float, check: Callable[[], None]) -> bool:
        """ssh says ``Allocated port N for remote forward to ...`` on stderr once
        the backup host listens for us; read N (or fail when ssh exits)."""
        assert self.child is not None and self.child.stderr is not None
        import select

        fd = self.child.stderr.fileno()
        while time.monotonic() < deadline:
            check()
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    return False
                self._stderr += chunk
                m = re.search(rb"Allocated port (\d+) for remote forward", self._stderr)
                if m:
                    self.remote_port = int(m.group(1))
                    return True
            elif self.child.poll() is not None:
                return False
        return False

    def _drain_stderr(self) -> None:
        """Add what ssh wrote on stderr to ``_stderr``, waiting at most
        STDERR_DRAIN for the end (ssh is dead or about to be)."""
        if self.child is None or self.child.stderr is None or self.child.stderr.closed:
            return
        import select

        fd = self.child.stderr.fileno()
        deadline = time.monotonic() + STDERR_DRAIN
        while len(self._stderr) < 1 << 16:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                break
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            self._stderr += chunk

    def close(self) -> None:
        """Kill ssh (its whole process group), keep the end of its stderr."""
        if self.child is not None:
            if self.child.poll() is None:
                self.child.kill(grace=1.0)
            self._drain_stderr()
            self.child.__exit__(None, None, None)

    def __enter__(self) -> Tunnel:
        return self.start(self.check)

    def __exit__(self, *exc: object) -> None:
        self.close()

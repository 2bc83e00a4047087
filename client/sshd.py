"""The one-shot sshd: a listening socket that serves the backup host, and no one else.

The client listens itself and, for each accepted connection, checks the
peer's address against the allowed ones *before* any sshd starts; an allowed
connection gets a fresh ``sshd -i`` (inetd mode) with a generated config:

* only the one-time public key, with ``restrict,from="...",expiry-time=...``;
* public-key authentication only, no forwarding of any kind, no tty, no
  user rc, no environment, no sftp subsystem, short ``LoginGraceTime``;
* ``ForceCommand`` = the gate (:mod:`bakgrab.client.gate`), which lets only a
  read-only rsync pull through;
* the client's persistent host key (pinned by the worker).

At most ``max_connections`` sessions are served (the job's attempts). When
the server closes, every sshd it started is killed and its files removed.
Invariant: sshd children are started from the accept thread, which lives
until :meth:`OneShotServer.close` (their parent-death signal is tied to it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import os
import select
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from bakgrab.tasks import process
from bakgrab.tasks.errors import ClientSetupError

log = logging.getLogger(__name__)

IpNet = ipaddress.IPv4Network | ipaddress.IPv6Network
LOGIN_GRACE = 30
SSHD_PRIVSEP_DIR = Path("/run/sshd")
"""Debian's compiled-in privilege separation dir, needed when sshd runs as root."""


@dataclasses.dataclass
class ServerConfig:
    source: Path
    public_key: str
    allow: list[IpNet]
    host_key: Path
    listen: str
    port: int = 0
    max_connections: int = 4
    lifetime: int = 24 * 3600
    mode: str = "ro"


def parse_allow(text: str) -> list[IpNet]:
    """``IP[,IP/NN...]`` to networks; a clear error for anything else."""
    nets = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            net = ipaddress.ip_network(part, strict=False)
            if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped:
                # peers are compared as IPv4, so an IPv4-mapped entry is one too
                prefix = max(net.prefixlen - 96, 0)
                net = ipaddress.ip_network(f"{net.network_address.ipv4_mapped}/{prefix}",
                                           strict=False)
            nets.append(net)
        except ValueError:
            raise ClientSetupError(
                f"--allow-from: {part!r} is not an IP address or network") from None
    if not nets:
        raise ClientSetupError("--allow-from: give at least one address")
    return nets


def peer_allowed(peer: str, allow: list[IpNet]) -> bool:
    addr = ipaddress.ip_address(peer.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return any(addr in net for net in allow)


def sshd_config(cfg: ServerConfig, workdir: Path, user: str, gate: str) -> str:
    return "\n".join([
        f"HostKey {cfg.host_key}",
        f"AuthorizedKeysFile {workdir / 'authorized_keys'}",
        "AuthorizedKeysCommand none",
        "AuthorizedPrincipalsFile none",
        f"AllowUsers {user}",
        "AuthenticationMethods publickey",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "HostbasedAuthentication no",
        "GSSAPIAuthentication no",
        "KerberosAuthentication no",
        "PermitEmptyPasswords no",
        "PermitRootLogin prohibit-password",
        "DisableForwarding yes",
        "AllowTcpForwarding no",
        "AllowStreamLocalForwarding no",
        "AllowAgentForwarding no",
        "X11Forwarding no",
        "PermitTunnel no",
        "PermitTTY no",
        "PermitUserRC no",
        "PermitUserEnvironment no",
        "GatewayPorts no",
        "UsePAM no",
        "UseDNS no",
        "PrintMotd no",
        "PrintLastLog no",
        "Compression no",
        "MaxAuthTries 2",
        "MaxSessions 1",
        f"LoginGraceTime {LOGIN_GRACE}",
        "ClientAliveInterval 15",
        "ClientAliveCountMax 4",
        # We write the key file ourselves into a private 0700 dir; the default
        # StrictModes walks every parent up to /, and /tmp is world-writable.
        "StrictModes no",
        "LogLevel VERBOSE",
        "PidFile none",
        f"ForceCommand {gate}",
        "",
    ])


class OneShotServer:
    """Listen, check peers, serve each allowed connection with ``sshd -i``."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.workdir = Path(tempfile.mkdtemp(prefix="bakgrab-sshd-"))
        self.children: list[process.Child] = []
        self.served = 0
        self.refused: list[str] = []
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()  # wakes the accept loop at close
        self._thread: threading.Thread | None = None
        self.sock: socket.socket | None = None
        self.user = login_user()

    @property
    def gate_log(self) -> Path:
        return self.workdir / "gate.log"

    @property
    def port(self) -> int:
        assert self.sock is not None
        return int(self.sock.getsockname()[1])

    def start(self) -> OneShotServer:
        cfg = self.cfg
        if not cfg.source.is_dir():
            raise ClientSetupError(f"--source {cfg.source}: not a directory")
        if os.geteuid() == 0 and not SSHD_PRIVSEP_DIR.is_dir():
            SSHD_PRIVSEP_DIR.mkdir(mode=0o755)
        gate = "exec " + " ".join(shlex.quote(a) for a in [
            sys.executable, "-I", "-m", "bakgrab.client.gate", cfg.mode, str(cfg.source.absolute()),
            str(self.gate_log), process.which("ionice"), process.which("rrsync"),
        ])
        expiry = time.strftime("%Y%m%d%H%M%SZ", time.gmtime(time.time() + cfg.lifetime))
        sources = ",".join(str(n) if n.num_addresses > 1 else str(n.network_address)
                           for n in cfg.allow)
        options = f'restrict,from="{sources}",expiry-time="{expiry}"'
        if '"' not in gate and "\\" not in gate:
            options += f',command="{gate}"'
        key_line = f"{options} {cfg.public_key}\n"
        write_private(self.workdir / "authorized_keys", key_line)
        write_private(self.workdir / "sshd_config", sshd_config(cfg, self.workdir, self.user, gate))
        self.gate_log.touch(mode=0o600)
        family = socket.AF_INET6 if ":" in cfg.listen else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((cfg.listen, cfg.port))
        except OSError as e:
            sock.close()
            raise ClientSetupError(f"cannot listen on {cfg.listen} port {cfg.port}: {e}") from None
        sock.listen(8)
        self.sock = sock
        self._thread = threading.Thread(target=self._serve, name="one-shot-sshd", daemon=True)
        self._thread.start()
        log.debug("one-shot sshd listening on %s port %d", cfg.listen, self.port)
        return self

    def _serve(self) -> None:
        assert self.sock is not None
        sshd = process.which("sshd")
        while not self._stop.is_set():
            listening = self.sock.fileno()
            ready, _, _ = select.select([listening, self._wake_r], [], [], 5)
            if self._stop.is_set():
                break
            if listening not in ready:
                continue
            try:
                conn, peer = self.sock.accept()
            except OSError:
                continue
            with conn:
                if not peer_allowed(peer[0], self.cfg.allow):
                    log.warning("refused connection from %s: not an allowed address", peer[0])
                    self.refused.append(peer[0])
                    continue
                if self.served >= self.cfg.max_connections:
                    log.warning("refused connection from %s: all %d sessions used",
                                peer[0], self.cfg.max_connections)
                    self.refused.append(peer[0])
                    continue
                self.served += 1
                errlog = open(self.workdir / f"sshd-{self.served}.log", "wb")  # noqa: SIM115
                with errlog:
                    child = process.spawn(
                        [sshd, "-i", "-e", "-f", str(self.workdir / "sshd_config")],
                        stdin=conn.fileno(), stdout=conn.fileno(), stderr=errlog,
                    )
                self.children.append(child)
                log.info("serving backup host %s (session %d of %d)",
                         peer[0], self.served, self.cfg.max_connections)

    def close(self) -> None:
        """Stop listening, kill every sshd served, remove the generated files."""
        if self._stop.is_set():
            return  # closed already
        self._stop.set()
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(5)
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self.sock is not None:
            self.sock.close()
        for child in self.children:
            if child.poll() is None:
                child.kill(grace=1.0)
        self._kill_sessions()
        self._report_gate_refusals()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _kill_sessions(self) -> None:
        """Kill the process group of every command the gate let through."""
        from bakgrab.client.gate import start_time

        try:
            lines = (self.workdir / "sessions").read_text().splitlines()
        except OSError:
            return
        for line in lines:
            pgid, _, started = line.partition(" ")
            # Only the group whose leader is still the process the gate was:
            # a pid reused by someone else is left alone.
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int(pgid) > 1 and start_time(int(pgid)) == started:
                    os.killpg(int(pgid), signal.SIGKILL)

    def _report_gate_refusals(self) -> None:
        try:
            text = self.gate_log.read_text()
        except OSError:
            return
        for line in text.splitlines():
            log.warning("gate %s", line)

    def __enter__(self) -> OneShotServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def login_user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)

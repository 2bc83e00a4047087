"""The one-shot sshd: a listening socket that serves the backup host, and no one else.

The client listens itself and, for each accepted connection, checks the
peer's address against the allowed ones *before* any sshd starts; an allowed
connection gets a fresh ``sshd -i`` (inetd mode) with a generated config:

* only the one-time public key, with ``restrict,from="...",expiry-time=...``;
* public-key authentication only, no forwarding of any kind, no tty, no
  user rc, no environment, no sftp subsystem, short ``LoginGraceTime``;
* ``ForceCommand`` = the gate (:mod:`bakgrab.client.gate`), which lets only a
  read-only rsync pull through;
* the client's persistent host key, which is also its identity: it signs
  every request and is registered for the name on the backup host (issue 11).

At most ``max_connections`` sessions are served (the job's attempts), and
only a connection that authenticated with the one-time key counts as one
(issue 13): no sshd starts for a connection until its peer has said a word
(an SSH client sends its version at once; a silent one is dropped after
``SILENT_WAIT``), and at most ``MAX_AUTHENTICATING`` sshd authenticate at
once, a new one cutting the oldest (what ``MaxStartups`` does for a
listening sshd; in inetd mode it is ours to do). So a local user opening
connections can neither use up the job's sessions nor block the backup
host's. When the server closes, every sshd it started is killed and its
files removed; a failed start removes them too.
A client killed by SIGKILL cannot remove its ``bakgrab-sshd-*`` dir; the
next server of the same user removes it (:func:`sweep_stale`). A dir's owner
holds an flock on its ``owner.lock`` for as long as the dir is in use, so a
dir is stale exactly when that lock can be taken: no pid guessing, no age.
Invariant: sshd children are started from the accept thread, which lives
until :meth:`OneShotServer.close` (their parent-death signal is tied to it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import ipaddress
import logging
import os
import selectors
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
SILENT_WAIT = 10.0
"""Seconds an accepted connection may stay silent before it is dropped."""
MAX_SILENT = 64
"""Silent connections kept at once; one more drops the oldest."""
MAX_AUTHENTICATING = 8
"""sshd children still authenticating at once; one more cuts the oldest."""
WORKDIR_PREFIX = "bakgrab-sshd-"
OWNER_LOCK = "owner.lock"
"""In each workdir: flocked by the live server that owns the dir (issue 13)."""


def authenticated(log: bytes, user: str) -> bool:
    """Whether an ``sshd -i -e`` log (LogLevel VERBOSE) says the connection
    authenticated as ``user``: from then on it is one of the job's sessions.

    Only a line that *starts* with sshd's own words counts: the peer chooses
    the user name sshd logs in "Invalid user ..." lines, and sshd escapes
    control characters, so a peer can put these words in a line but never
    at its start."""
    head = b"Accepted publickey for " + user.encode() + b" from "
    return any(line.startswith(head) for line in log.splitlines())
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
        self.user = login_user()
        self.children: list[process.Child] = []
        self.served = 0
        """sshd started (one per connection that spoke; ``sshd-N.log`` is the Nth)."""
        self.refused: list[str] = []
        self.dropped = 0
        """Connections closed before they authenticated: silent too long, or
        cut for a newer one (issue 13)."""
        self._authenticated: list[int] = []
        self._authenticating: list[int] = []
        """Indexes in ``children`` of the sshd that have not authenticated yet."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sock: socket.socket | None = None
        self._wake_r, self._wake_w = os.pipe()  # wakes the accept loop at close
        sweep_stale(Path(tempfile.gettempdir()))
        # Last: nothing after it can fail and leave the dir behind (issue 13).
        self.workdir, self._owner_lock = make_workdir()

    @property
    def sessions(self) -> int:
        """Connections that authenticated: the job's sessions used so far."""
        return len(self._authenticated)

    @property
    def gate_log(self) -> Path:
        return self.workdir / "gate.log"

    @property
    def port(self) -> int:
        assert self.sock is not None
        return int(self.sock.getsockname()[1])

    def start(self) -> OneShotServer:
        """Write the config, check it with ``sshd -t`` and listen; on any
        failure everything made so far is removed (issue 13)."""
        try:
            return self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> OneShotServer:
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
        # Every session runs this config: find a broken one (a host key sshd
        # cannot load, an option it refuses) now, not at each of the job's attempts.
        checked = process.run(
            [process.which("sshd"), "-t", "-f", str(self.workdir / "sshd_config")],
            timeout=30, check=False)
        if checked.returncode != 0:
            why = " ".join(checked.stderr.decode(errors="replace").split())[-300:]
            raise ClientSetupError(f"sshd refuses the one-shot server's configuration: {why}")
        family = socket.AF_INET6 if ":" in cfg.listen else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((cfg.listen, cfg.port))
        except OSError as e:
            sock.close()
            raise ClientSetupError(f"cannot listen on {cfg.listen} port {cfg.port}: {e}") from None
        sock.listen(MAX_SILENT)
        self.sock = sock
        self._thread = threading.Thread(target=self._serve, name="one-shot-sshd", daemon=True)
        self._thread.start()
        log.debug("one-shot sshd listening on %s port %d", cfg.listen, self.port)
        return self

    def _serve(self) -> None:
        assert self.sock is not None
        sshd = process.which("sshd")
        silent: dict[socket.socket, tuple[str, float]] = {}
        """Accepted, allowed connections whose peer has not said a word yet."""
        # epoll: hundreds of connections are no problem (select() stops at fd 1024).
        with selectors.DefaultSelector() as sel:
            sel.register(self.sock, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            try:
                while not self._stop.is_set():
                    events = sel.select(1.0 if silent or self._authenticating else 5.0)
                    if self._stop.is_set():
                        break
                    self._update_sessions()
                    for key, _ in events:
                        if key.fileobj is self.sock:
                            self._accept(sel, silent)
                        elif key.fileobj in silent:  # not dropped meanwhile
                            conn = key.fileobj
                            assert isinstance(conn, socket.socket)
                            peer, _ = silent.pop(conn)
                            sel.unregister(conn)
                            with conn:
                                self._start_sshd(sshd, conn, peer)
                    now = time.monotonic()
                    for conn, (peer, deadline) in list(silent.items()):
                        if deadline <= now:
                            log.info("dropped a connection from %s: silent for %.0fs",
                                     peer, SILENT_WAIT)
                            self._drop(sel, silent, conn)
            finally:
                for conn in silent:
                    conn.close()

    def _accept(self, sel: selectors.BaseSelector,
                silent: dict[socket.socket, tuple[str, float]]) -> None:
        assert self.sock is not None
        try:
            conn, addr = self.sock.accept()
        except OSError:
            return
        peer = str(addr[0])
        if not peer_allowed(peer, self.cfg.allow):
            log.warning("refused connection from %s: not an allowed address", peer)
            self.refused.append(peer)
            conn.close()
            return
        if self.sessions >= self.cfg.max_connections:
            log.warning("refused connection from %s: all %d sessions used",
                        peer, self.cfg.max_connections)
            self.refused.append(peer)
            conn.close()
            return
        if len(silent) >= MAX_SILENT:
            oldest = next(iter(silent))
            log.warning("dropped a silent connection from %s: %d connections wait for a word",
                        silent[oldest][0], MAX_SILENT)
            self._drop(sel, silent, oldest)
        silent[conn] = (peer, time.monotonic() + SILENT_WAIT)
        sel.register(conn, selectors.EVENT_READ)

    def _drop(self, sel: selectors.BaseSelector,
              silent: dict[socket.socket, tuple[str, float]], conn: socket.socket) -> None:
        sel.unregister(conn)
        del silent[conn]
        self.dropped += 1  # counted before the peer can see the close
        conn.close()

    def _start_sshd(self, sshd: str, conn: socket.socket, peer: str) -> None:
        """Serve ``conn``, whose peer has spoken, with a fresh ``sshd -i``."""
        try:
            spoke = conn.recv(1, socket.MSG_PEEK)
        except OSError:
            spoke = b""
        if not spoke:
            return  # closed without a word
        self._update_sessions()
        if self.sessions >= self.cfg.max_connections:
            log.warning("refused connection from %s: all %d sessions used",
                        peer, self.cfg.max_connections)
            self.refused.append(peer)
            return
        if len(self._authenticating) >= MAX_AUTHENTICATING:
            oldest = self._authenticating.pop(0)
            log.warning("cut connection %d: %d others are still authenticating",
                        oldest + 1, MAX_AUTHENTICATING)
            self.dropped += 1  # counted before the peer can see the cut
            self.children[oldest].kill(grace=0.5)
        number = self.served + 1  # children[i] logs to sshd-(i+1).log
        try:
            with open(self.workdir / f"sshd-{number}.log", "wb") as errlog:
                child = process.spawn(
                    [sshd, "-i", "-e", "-f", str(self.workdir / "sshd_config")],
                    stdin=conn.fileno(), stdout=conn.fileno(), stderr=errlog,
                )
        except OSError as e:  # out of processes or descriptors: this connection only
            log.warning("connection from %s: cannot start sshd: %s", peer, e)
            return
        self.served = number
        self.children.append(child)
        self._authenticating.append(len(self.children) - 1)
        log.info("connection %d from %s: sshd started (%d of %d sessions used)",
                 self.served, peer, self.sessions, self.cfg.max_connections)

    def _update_sessions(self) -> None:
        """Count the sshd that authenticated since the last look; cut one that
        would exceed the job's sessions (only the key's holder can get there)."""
        waiting = []
        for index in self._authenticating:
            child = self.children[index]
            ended = child.poll() is not None
            try:
                said = (self.workdir / f"sshd-{index + 1}.log").read_bytes()
            except OSError:
                said = b""
            if authenticated(said, self.user):
                if self.sessions >= self.cfg.max_connections:
                    log.warning("cut connection %d: all %d sessions used",
                                index + 1, self.cfg.max_connections)
                    child.kill(grace=0.5)
                else:
                    self._authenticated.append(index)
                    log.info("backup host authenticated on connection %d (session %d of %d)",
                             index + 1, self.sessions, self.cfg.max_connections)
            elif not ended:
                waiting.append(index)
        self._authenticating = waiting

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
        os.close(self._owner_lock)  # after the rmtree: a sweep finds nothing of ours

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
            # The rest are the gate's notes, e.g. that it had to exec rrsync.
            log.log(logging.WARNING if " refused: " in line else logging.DEBUG, "gate %s", line)

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


def make_workdir() -> tuple[Path, int]:
    """A fresh private ``bakgrab-sshd-*`` dir in the temp dir, and the fd of
    its ``owner.lock``, flocked. The lock file is locked under another name
    and then renamed into place, so no sweep ever sees it unlocked; on any
    failure the dir is removed (issue 13)."""
    workdir = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX))
    try:
        fd = os.open(workdir / f"{OWNER_LOCK}.new",
                     os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(workdir / f"{OWNER_LOCK}.new", workdir / OWNER_LOCK)
        except BaseException:
            os.close(fd)
            raise
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return workdir, fd


def sweep_stale(tmp: Path) -> list[Path]:
    """Remove the ``bakgrab-sshd-*`` dirs in ``tmp`` whose server is gone
    (a client killed by SIGKILL, issue 13); the removed dirs.

    Only a real directory (not a symlink) owned by this user, whose
    ``owner.lock`` this process can flock, is removed, while holding that
    lock: a live server holds its lock, so its dir is never touched; another
    user's dir, or one without a lock (being made right now, or left by a
    bakgrab before this sweep existed), is left alone. Never raises: a
    sweep that cannot look is no reason to refuse a backup.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(tmp))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(WORKDIR_PREFIX):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if not entry.is_dir(follow_symlinks=False) or st.st_uid != os.geteuid():
                continue
            dir_fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            try:
                fd = os.open(OWNER_LOCK, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC,
                             dir_fd=dir_fd)
            except OSError:
                continue  # no lock: not ours to judge
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue  # its server lives
            try:
                # Same dir still at that name (not swapped meanwhile)?
                if os.stat(entry.path, follow_symlinks=False).st_ino == st.st_ino:
                    shutil.rmtree(entry.path, ignore_errors=True)
                    removed.append(Path(entry.path))
            finally:
                os.close(fd)
        finally:
            os.close(dir_fd)
    for path in removed:
        log.info("removed %s, left by a client that was killed", path)
    return removed

"""Hostile sessions against a real one-shot sshd: the gate and rrsync refuse
everything but a read-only pull inside the source, and forwarding of any kind
does nothing.

One server serves the whole module (one key, up to 300 sessions). Every case
is sent by a real ``ssh`` (or a real ``rsync`` client) holding the one-time
key, so it is exactly what someone who stole that key could do. After each
case the source tree and everything around it (a canary dir for hostile
writes, a secret file outside the source, the key and state) are compared
with their state before: names, modes, owners, sizes, mtimes, contents and
link targets.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bakgrab.client import keys
from bakgrab.client.sshd import OneShotServer, ServerConfig, parse_allow
from tests import support

pytestmark = pytest.mark.integration

SECRET = "OUTSIDE-THE-ROOT-7f3a9c"
"""Content of a file next to the source: no byte of it may ever come back."""

PULL = "rsync --server --sender -vlogDtpre.iLsfxCIvu"
"""What a real `rsync -a host:/ dst` asks the client's sshd to run."""


@dataclass
class Env:
    srv: OneShotServer
    base: Path
    src: Path
    outside: Path
    canary: Path
    key: Path

    def ssh(self, *extra: str) -> list[str]:
        return ["ssh", "-F", "/dev/null", "-p", str(self.srv.port), "-i", str(self.key),
                "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10", *extra]

    def fill(self, text: str) -> str:
        return text.format(canary=self.canary, outside=self.outside, src=self.src)


def tree_state(root: Path, skip: Path | None = None) -> dict[str, tuple[object, ...]]:
    """Every entry below ``root`` with its type, mode, owner, size, mtime and
    content digest (or link target)."""
    st = root.lstat()
    state: dict[str, tuple[object, ...]] = {
        ".": (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, sorted(os.listdir(root)))}
    for dirpath, dirnames, filenames in os.walk(root):
        if skip is not None and Path(dirpath) == skip.parent:
            dirnames[:] = [d for d in dirnames if Path(dirpath, d) != skip]
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            if p.is_symlink():
                content: object = os.readlink(p)
            elif p.is_file():
                content = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                content = None
            state[str(p.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, st.st_size,
                                               st.st_mtime_ns, content)
    return state


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("gate")
    src = base / "src"
    (src / "dir").mkdir(parents=True)
    (src / "dir" / "file").write_text("client data\n")
    (src / "dir" / "rules").write_text("- file\n")
    outside = base / "outside"
    outside.mkdir()
    (outside / "secret").write_text(SECRET + "\n")
    (outside / "list").write_text("secret\n")
    # Links that lead out of the root: a pull must send them as links.
    os.symlink(outside / "secret", src / "abs-link")
    os.symlink("../outside", src / "dirlink")
    os.symlink("../../outside/secret", src / "dir" / "rel-link")
    canary = base / "canary"
    canary.mkdir()
    pair = keys.one_time_key()
    key = base / "key"
    key.write_text(pair.private)
    key.chmod(0o600)
    host_key, _ = keys.host_key(base / "state")
    srv = OneShotServer(ServerConfig(
        source=src, public_key=pair.public, allow=parse_allow("127.0.0.1"),
        host_key=host_key, listen="127.0.0.1", max_connections=300,
    ))
    srv.start()
    try:
        yield Env(srv, base, src, outside, canary, key)
    finally:
        srv.close()


def gates_running(env: Env) -> bool:
    """Whether a gate of this server is still running: one whose client gave
    up (a refused tty) outlives its sshd and writes its refusal late."""
    marker = str(env.srv.gate_log).encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if marker in Path(f"/proc/{entry}/cmdline").read_bytes():
                    return True
    return False


@contextlib.contextmanager
def nothing_changes(env: Env) -> Iterator[None]:
    """The source and everything around it are the same afterwards, once every
    session started meanwhile has ended (sshd may still run the gate after a
    client that gave up has gone)."""
    first = env.srv.served
    src_before = tree_state(env.src)
    around_before = tree_state(env.base, skip=env.src)
    yield
    support.wait_for(lambda: all(c.poll() is not None for c in env.srv.children[first:])
                     and not gates_running(env), 15, "the sessions' sshd and gate to end",
                     interval=0.02)
    assert tree_state(env.src) == src_before, "the client's source tree changed"
    assert tree_state(env.base, skip=env.src) == around_before, "a file changed outside the source"
    assert list(env.canary.iterdir()) == []


# id, extra ssh options, remote command. {canary} is an empty dir outside the
# source where a hostile write would land; {outside} holds the secret file.
MATRIX = [
    ("push-to-root", [], "rsync --server -vlogDtpre.iLsfxCIvu . /"),
    ("push-to-subdir", [], "rsync --server -vlogDtpre.iLsfxCIvu . /dir/"),
    ("push-outside", [], "rsync --server -vlogDtpre.iLsfxCIvu . {canary}/"),
    ("remove-source-files", [], f"{PULL} --remove-source-files . /dir/file"),
    ("remove-sent-files", [], f"{PULL} --remove-sent-files . /dir/file"),
    ("delete", [], f"{PULL} --delete . /"),
    ("delete-excluded", [], f"{PULL} --delete-excluded . /"),
    ("log-file-outside", [], f"{PULL} --log-file={{canary}}/x . /"),
    ("log-file-inside", [], f"{PULL} --log-file=/dir/evil.log . /"),
    ("short-s-protect-args", [], f"rsync --server --sender -s {PULL[24:]} . /"),
    ("secluded-args", [], f"{PULL} --secluded-args . /"),
    ("protect-args", [], f"{PULL} --protect-args . /"),
    ("copy-devices", [], f"{PULL} --copy-devices . /"),
    ("open-noatime", [], f"{PULL} --open-noatime . /"),
    ("open-noatime-as-file-arg", [], f"{PULL} . / --open-noatime"),
    ("write-devices", [], f"{PULL} --write-devices . /"),
    ("server-daemon", [], f"{PULL} --daemon . /"),
    ("rsync-daemon", [], "rsync --daemon --no-detach --port=1"),
    ("rsync-daemon-config", [], "rsync --daemon --config={canary}/rsyncd.conf"),
    ("server-config", [], f"{PULL} --config={{canary}}/rsyncd.conf . /"),
    ("files-from-etc-passwd", [], f"{PULL} --files-from=/etc/passwd . /"),
    ("files-from-dotdot", [], f"{PULL} --files-from=../outside/list . /"),
    ("files-from-outside-abs", [], f"{PULL} --files-from={{outside}}/list . /"),
    ("files-from-via-link", [], f"{PULL} --files-from=/dirlink/list . /"),
    ("source-dotdot", [], f"{PULL} . ../.."),
    ("source-dotdot-inside", [], f"{PULL} . /dir/../../outside/secret"),
    ("source-etc-shadow", [], f"{PULL} . /etc/shadow"),
    ("source-outside-abs", [], f"{PULL} . {{outside}}/secret"),
    ("source-via-dir-link", [], f"{PULL} . /dirlink/secret"),
    ("source-dir-link-contents", [], f"{PULL} . /dirlink/"),
    ("no-munge-links", [], f"{PULL} --no-munge-links . /"),
    ("copy-links-L", [], f"rsync --server --sender -L {PULL[24:]} . /"),
    ("copy-unsafe-links", [], f"{PULL} --copy-unsafe-links . /"),
    ("copy-dirlinks-k", [], f"rsync --server --sender -k {PULL[24:]} . /"),
    ("debug", [], f"{PULL} --debug=ALL . /"),
    ("confine-root-override", [], f"{PULL} --confine-root=/ . /"),
    ("no-confine-root", [], f"{PULL} --no-confine-root . /"),
    ("rsh-option", [], f"{PULL} --rsh=sh . /"),
    ("semicolon", [], f"{PULL} . /; touch {{canary}}/semicolon"),
    ("and-and", [], f"{PULL} . / && touch {{canary}}/and"),
    ("pipe", [], f"{PULL} . / | tee {{canary}}/pipe"),
    ("backticks", [], f"{PULL} . /`touch {{canary}}/backtick`"),
    ("dollar-paren", [], f"{PULL} . /$(touch {{canary}}/dollar)"),
    ("redirect-out", [], f"{PULL} . / > {{canary}}/redirect"),
    ("redirect-in", [], f"{PULL} . / < /etc/shadow"),
    ("newline", [], f"{PULL} . /\ntouch {{canary}}/newline"),
    ("quoted-shell", [], "sh -c 'touch {canary}/quoted'"),
    ("sh", [], "sh"),
    ("bash-i", [], "bash -i"),
    ("cat-shadow", [], "cat /etc/shadow"),
    ("true", [], "true"),
    ("scp-sink", [], "scp -t /"),
    ("scp-source", [], "scp -f /etc/shadow"),
    ("sftp-server", [], "/usr/lib/openssh/sftp-server"),
    ("internal-sftp", [], "internal-sftp"),
    ("absolute-rsync", [], f"/usr/bin/{PULL} . /"),
    ("empty-command", [], None),
    ("empty-string", [], ""),
    ("tty-shell", ["-tt"], "sh"),
    ("tty-no-command", ["-tt"], None),
    ("sftp-subsystem", ["-s"], "sftp"),
]

SSHD_REFUSALS = ("PTY allocation request failed", "subsystem request failed")
"""What sshd itself says when it refuses a session request before the gate."""


@pytest.mark.parametrize(("ssh_args", "command"), [c[1:] for c in MATRIX],
                         ids=[c[0] for c in MATRIX])
def test_hostile_command_is_refused(env: Env, ssh_args: list[str], command: str | None) -> None:
    """A command other than a read-only pull inside the root exits non-zero,
    runs nothing (no rsync protocol bytes on stdout, no file written anywhere,
    no byte from outside the root returned), and its refusal is on record: a
    gate log line naming it, rrsync's error, or sshd's refusal."""
    log_before = env.srv.gate_log.read_text()  # earlier sessions have all ended
    remote = [] if command is None else [env.fill(command)]
    tty = ssh_args if "-tt" in ssh_args or "-s" in ssh_args else ["-T", *ssh_args]
    with nothing_changes(env):
        done = subprocess.run([*env.ssh(*tty), "root@127.0.0.1", *remote],
                              capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    assert done.returncode != 0
    # A server-side rsync that started would have sent its protocol version.
    assert done.stdout == b""
    stderr = done.stderr.decode(errors="replace")
    assert SECRET not in stderr
    new_log = env.srv.gate_log.read_text()[len(log_before):].splitlines()
    shown = repr((remote[0] if remote else "")[:500])
    # Every new line is a refusal. One may be an earlier session's: sshd's
    # session process can outlive the client (-tt) and start its gate only
    # after that test's wait (no process then names the gate log yet).
    assert all(" refused: " in line for line in new_log), new_log
    gate_refused = [line for line in new_log if line.endswith(shown)]
    assert (gate_refused or "rrsync error:" in stderr
            or any(s in stderr for s in SSHD_REFUSALS)), stderr


def pulled_text(dest: Path) -> str:
    """Every file's bytes and every link target under ``dest``."""
    if not dest.exists():
        return ""
    parts = []
    for p in sorted(dest.rglob("*")):
        if p.is_symlink():
            parts.append(os.readlink(p))
        elif p.is_file():
            parts.append(p.read_text(errors="replace"))
    return "\n".join(parts)


# id, rsync client arguments, whether the transfer itself is allowed.
RSYNC_CASES = [
    ("plain-pull-sends-links-as-links", ["-a", "root@127.0.0.1:/", "{dest}/"], True),
    ("copy-links", ["-aL", "root@127.0.0.1:/", "{dest}/"], False),
    ("copy-unsafe-links", ["-a", "--copy-unsafe-links", "root@127.0.0.1:/", "{dest}/"], False),
    ("copy-dirlinks", ["-ak", "root@127.0.0.1:/", "{dest}/"], False),
    ("keep-dirlinks", ["-aK", "root@127.0.0.1:/", "{dest}/"], True),
    ("remote-no-munge-links", ["-a", "-M--no-munge-links", "root@127.0.0.1:/", "{dest}/"], False),
    ("remote-munge-links", ["-a", "-M--munge-links", "root@127.0.0.1:/", "{dest}/"], True),
    ("remote-copy-links", ["-a", "-M-L", "root@127.0.0.1:/", "{dest}/"], False),
    ("pull-through-dir-link", ["-a", "root@127.0.0.1:/dirlink/", "{dest}/"], False),
    ("pull-link-target", ["-a", "root@127.0.0.1:/dirlink/secret", "{dest}/"], False),
    ("pull-dotdot", ["-a", "root@127.0.0.1:/../outside/", "{dest}/"], False),
    ("files-from-outside", ["-a", "--files-from=:{outside}/list", "root@127.0.0.1:/", "{dest}/"], False),
    ("files-from-dotdot", ["-a", "--files-from=:/../outside/list", "root@127.0.0.1:/", "{dest}/"], False),
    ("files-from-via-link", ["-a", "--files-from=:/dirlink/list", "root@127.0.0.1:/", "{dest}/"], False),
    ("files-from-list-dotdot", ["-a", "--files-from={list_dotdot}", "root@127.0.0.1:/", "{dest}/"], False),
    ("files-from-list-through-link", ["-a", "--files-from={list_link}", "root@127.0.0.1:/", "{dest}/"], False),
    ("files-from-list-link-dir", ["-ar", "--files-from={list_link_dir}", "root@127.0.0.1:/", "{dest}/"], False),
    ("relative-through-link", ["-aR", "root@127.0.0.1:/./dirlink/secret", "{dest}/"], False),
    ("glob-through-link", ["-a", "root@127.0.0.1:/*/secret", "{dest}/"], False),
    ("dir-merge-outside", ["-a", "--filter=:_{outside}/secret", "root@127.0.0.1:/", "{dest}/"], True),
    ("remote-log-file", ["-a", "-M--log-file={canary}/log", "root@127.0.0.1:/", "{dest}/"], False),
    ("remote-copy-devices", ["-a", "-M--copy-devices", "root@127.0.0.1:/", "{dest}/"], False),
    ("remote-only-write-batch", ["-a", "-M--only-write-batch={canary}/batch", "root@127.0.0.1:/", "{dest}/"], False),
    ("open-noatime", ["-a", "--open-noatime", "root@127.0.0.1:/", "{dest}/"], False),
    ("remove-source-files", ["-a", "--remove-source-files", "root@127.0.0.1:/dir/file", "{dest}/"], False),
    ("upload", ["-a", "{upload}", "root@127.0.0.1:/"], False),
    ("upload-outside", ["-a", "{upload}", "root@127.0.0.1:{canary}/"], False),
    ("delete-push", ["-a", "--delete", "{empty}/", "root@127.0.0.1:/dir/"], False),
]


@pytest.mark.parametrize(("args", "allowed"), [c[1:] for c in RSYNC_CASES],
                         ids=[c[0] for c in RSYNC_CASES])
def test_real_rsync_client_gets_nothing_from_outside(env: Env, tmp_path: Path, args: list[str],
                                                     allowed: bool) -> None:
    """A real rsync client with link-following, remote options, file lists
    (remote, or local ones the sender reads over the wire), globs or filter
    rules that point outside the root, or a write: a refused one exits
    non-zero; an allowed one exits 0. Either way no byte of the file outside
    the root comes back, links arrive as links, and nothing is written."""
    dest = tmp_path / "dest"
    (tmp_path / "upload").write_text("evil\n")
    (tmp_path / "empty").mkdir()
    lists = {"list_dotdot": "../outside/secret\n", "list_link": "dirlink/secret\n",
             "list_link_dir": "dirlink/\n"}
    for name, text in lists.items():
        (tmp_path / name).write_text(text)
    argv = [a.format(dest=dest, upload=tmp_path / "upload", empty=tmp_path / "empty",
                     outside=env.outside, canary=env.canary,
                     **{name: tmp_path / name for name in lists}) for a in args]
    with nothing_changes(env):
        done = subprocess.run(["rsync", "-e", " ".join(env.ssh()), *argv],
                              capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
    assert (done.returncode == 0) == allowed, done.stderr
    assert SECRET not in done.stdout + done.stderr + pulled_text(dest)
    if allowed:
        assert (dest / "dir" / "file").read_text() == "client data\n"
        assert os.readlink(dest / "abs-link") == str(env.outside / "secret")
        assert os.readlink(dest / "dirlink") == "../outside"


class Target:
    """A TCP listener that a working forward would reach: counts connections."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            with conn:
                conn.sendall(b"TARGET REACHED\n")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def target() -> Iterator[Target]:
    t = Target()
    yield t
    t.close()


def session_log(env: Env, number: int) -> str:
    return (env.srv.workdir / f"sshd-{number}.log").read_text(errors="replace")


def recv_all(sock: socket.socket) -> bytes:
    data = b""
    with contextlib.suppress(OSError):
        while chunk := sock.recv(4096):
            data += chunk
    return data


@contextlib.contextmanager
def background_ssh(env: Env, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([*env.ssh(*args), "root@127.0.0.1"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        proc.kill()
        proc.communicate(timeout=10)


def test_local_forward_reaches_nothing(env: Env, target: Target) -> None:
    """ssh -L: the local listener accepts, but the forwarded connection is
    closed without a byte from the target, which never sees a connection;
    sshd logs the refused forward."""
    session = env.srv.served + 1
    local = support.free_port()
    with nothing_changes(env), background_ssh(env, "-N", "-L",
                                              f"{local}:127.0.0.1:{target.port}"):
        support.wait_for(lambda: support.port_open(local), 15, "the local listener of ssh -L")
        with socket.create_connection(("127.0.0.1", local), timeout=5) as s:
            s.settimeout(5)
            assert recv_all(s) == b""
    assert target.accepted == 0
    assert "refused local port forward" in session_log(env, session)


def test_unix_socket_forward_reaches_nothing(env: Env, tmp_path: Path) -> None:
    """ssh -L to a Unix socket on the client: the socket never gets a connection."""
    path = tmp_path / "target.sock"
    with socket.socket(socket.AF_UNIX) as unix:
        unix.bind(str(path))
        unix.listen(1)
        unix.settimeout(0.5)
        local = support.free_port()
        with nothing_changes(env), background_ssh(env, "-N", "-L", f"{local}:{path}"):
            support.wait_for(lambda: support.port_open(local), 15, "the listener of ssh -L")
            with socket.create_connection(("127.0.0.1", local), timeout=5) as s:
                s.settimeout(5)
                assert recv_all(s) == b""
        with pytest.raises(TimeoutError):
            unix.accept()


def test_dynamic_forward_reaches_nothing(env: Env, target: Target) -> None:
    """ssh -D: a SOCKS5 CONNECT through it gets no reply and the target sees
    no connection; sshd logs the refused forward."""
    session = env.srv.served + 1
    local = support.free_port()
    with nothing_changes(env), background_ssh(env, "-N", "-D", str(local)):
        support.wait_for(lambda: support.port_open(local), 15, "the SOCKS listener of ssh -D")
        with socket.create_connection(("127.0.0.1", local), timeout=5) as s:
            s.settimeout(5)
            s.sendall(b"\x05\x01\x00")
            assert s.recv(2) == b"\x05\x00"  # ssh's own SOCKS greeting
            s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1")
                      + target.port.to_bytes(2, "big"))
            reply = recv_all(s)
    assert not reply.startswith(b"\x05\x00")  # no "succeeded" reply
    assert b"TARGET" not in reply
    assert target.accepted == 0
    assert "refused local port forward" in session_log(env, session)


def test_remote_forward_is_refused(env: Env, target: Target) -> None:
    """ssh -R: sshd refuses to listen; ssh exits non-zero and the port stays closed."""
    remote = support.free_port()
    with nothing_changes(env):
        done = subprocess.run(
            [*env.ssh("-N", "-o", "ExitOnForwardFailure=yes", "-R",
                      f"{remote}:127.0.0.1:{target.port}"), "root@127.0.0.1"],
            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert done.returncode == 255
    assert "remote port forwarding failed" in done.stderr
    assert not support.port_open(remote)
    assert target.accepted == 0


def test_stdio_forward_is_refused(env: Env, target: Target) -> None:
    """ssh -W: the stdio forward is refused, ssh exits non-zero, the target
    sees no connection."""
    with nothing_changes(env):
        done = subprocess.run([*env.ssh("-W", f"127.0.0.1:{target.port}"), "root@127.0.0.1"],
                              capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    assert done.returncode == 255
    assert done.stdout == b""
    assert b"forwarding failed" in done.stderr
    assert target.accepted == 0


@pytest.fixture
def agent(tmp_path: Path, env: Env) -> Iterator[Path]:
    """A real ssh-agent holding the one-time key, stopped by pid."""
    sock = tmp_path / "agent.sock"
    proc = support.Proc(["ssh-agent", "-D", "-a", str(sock)], tmp_path / "agent.log")
    try:
        support.wait_for(sock.exists, 10, "ssh-agent")
        subprocess.run(["ssh-add", str(env.key)], env={**os.environ, "SSH_AUTH_SOCK": str(sock)},
                       check=True, capture_output=True, timeout=10)
        yield sock
    finally:
        proc.stop()


def server_rsync(env: Env, first_session: int) -> int | None:
    """The rsync the gate let through for a session from ``first_session`` on."""
    for child in env.srv.children[first_session - 1:]:
        for pid in support.descendants(child.pid):
            if support.comm(pid) == "rsync":
                return pid
    return None


CLIENT_ENV = {"SSH_AUTH_SOCK", "DISPLAY", "SSH_TTY", "LD_PRELOAD", "PYTHONPATH", "PYTHONSTARTUP",
              "RSYNC_RSH", "SENDME"}
"""Variables a client could try to plant in the session (agent, X11, tty,
SetEnv/SendEnv): the server-side rsync must have none of them. (LANG and
LC_ALL may come from the login user's own shell startup; the values the
client sent for them must not.)"""


@pytest.mark.parametrize("options", [
    ["-A"],
    ["-X", "-o", "ForwardX11Trusted=yes"],
    ["-o", "SetEnv=LD_PRELOAD=/nonexistent.so PYTHONPATH={canary} PYTHONSTARTUP={canary}/x "
     "RSYNC_RSH=sh"],
    ["-o", "SendEnv=LANG LC_ALL SENDME"],
], ids=["agent", "x11", "setenv", "sendenv"])
def test_session_gets_nothing_from_the_client(env: Env, agent: Path, options: list[str]) -> None:
    """Agent or X11 forwarding, or environment variables sent by the client,
    on a pull the gate lets through: the server-side rsync has none of them in
    its environment, no agent socket is made for the session, and its stdin
    is no tty."""
    session = env.srv.served + 1
    client_env = {**os.environ, "SSH_AUTH_SOCK": str(agent), "DISPLAY": "127.0.0.1:57",
                  "LANG": "xx_XX.UTF-8", "LC_ALL": "xx_XX.UTF-8", "SENDME": "planted"}
    with nothing_changes(env):
        proc = subprocess.Popen([*env.ssh(*(env.fill(o) for o in options)), "root@127.0.0.1",
                                 f"{PULL} . /"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=client_env)
        try:
            # The server's rsync waits for our protocol version: it stays up
            # for as long as we keep its stdin open.
            pid = int(support.wait_for(lambda: server_rsync(env, session), 15,
                                       "the server-side rsync"))
            environ = dict(
                item.split(b"=", 1) for item in
                Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in item)
            stdin = os.readlink(f"/proc/{pid}/fd/0")
            sshd = env.srv.children[session - 1].pid
            session_pids = {sshd, *support.descendants(sshd)}
            agent_sockets = [p for p in Path("/tmp").glob("ssh-*/agent.*")
                             if p.name.split(".", 1)[1].isdigit()
                             and int(p.name.split(".", 1)[1]) in session_pids]
        finally:
            proc.kill()
            proc.communicate(timeout=10)
    assert {k.decode() for k in environ} & CLIENT_ENV == set()
    assert b"planted" not in b"".join(environ.values())
    assert b"xx_XX" not in b"".join(environ.values())
    assert agent_sockets == []
    assert not stdin.startswith("/dev/pts")

"""The operator's deployment (deploy/): install both sides, then back up through it.

One deployment per module, installed with ``--prefix`` into a scratch root
by the real scripts: a backup host (deploy/backup-host/install.sh, one
client added with add-client.sh) and a client (deploy/client/install.sh),
with throwaway user names that the module removes at the end. Redis runs
from the generated config snippet and ACL file; a root sshd on a free
loopback port includes the generated Match block for the tunnel user; the
worker, Flower and the client run as the units say (their user, their
capabilities, their environment files), started with ``setpriv`` since this
machine's PID 1 is not systemd. What is not reproduced here: the units'
mount namespaces (ProtectSystem= and friends); ``systemd-analyze verify``
checks those lines where it is installed.

The helpers are also used by test_redis_acl.py.
"""

from __future__ import annotations

import base64
import configparser
import contextlib
import dataclasses
import hashlib
import json
import os
import pwd
import re
import secrets
import select
import shlex
import shutil
import signal
import stat
import subprocess
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from bakgrab.tasks import config
from tests import support
from tests.conftest import need_root

pytestmark = [pytest.mark.integration, pytest.mark.root]

DEPLOY = support.REPO / "deploy"
HOST_INSTALL = DEPLOY / "backup-host" / "install.sh"
ADD_CLIENT = DEPLOY / "backup-host" / "add-client.sh"
CLIENT_INSTALL = DEPLOY / "client" / "install.sh"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
WORKER_CAPS = {"CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_MKNOD",
               "CAP_SETFCAP"}
CAP_BITS = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_FOWNER": 3, "CAP_FSETID": 4,
            "CAP_MKNOD": 27, "CAP_SETFCAP": 31}
"""Bit numbers in /proc/PID/status (linux/capability.h)."""


# -- helpers (also used by test_redis_acl.py) ---------------------------------------

class Secret(str):
    """A password, or a URL or setting holding one. Its repr, which pytest
    prints when an assertion fails, is masked: no password in test output."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "'<secret>'"


def leaked(text: str, secrets: list[Secret]) -> list[int]:
    """Which of ``secrets`` appear in ``text`` (their indexes, not their values)."""
    return [i for i, s in enumerate(secrets) if s in text]


def script(path: Path, *args: str, stdin: str | None = None,
           check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one of the deploy scripts as root, with a plain environment."""
    done = subprocess.run(["bash", str(path), *args], input=stdin, capture_output=True,
                          text=True, timeout=60, env={"PATH": PATH, "LANG": "C.UTF-8"})
    if check and done.returncode != 0:
        raise AssertionError(f"{path.name} {args} failed ({done.returncode}):\n{done.stderr}")
    return done


def read_env(path: Path) -> dict[str, str]:
    """A systemd EnvironmentFile: KEY=VALUE lines."""
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


def read_secrets(path: Path) -> dict[str, Secret]:
    """An environment file holding secrets, each value masked in reprs."""
    return {k: Secret(v) for k, v in read_env(path).items()}


def read_unit(path: Path) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, strict=True, delimiters=("=",),
                                     comment_prefixes=("#", ";"), empty_lines_in_values=False)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(path.read_text())
    return unit


def remove_user(name: str) -> None:
    subprocess.run(["userdel", name], capture_output=True, check=False)
    subprocess.run(["groupdel", name], capture_output=True, check=False)


@contextlib.contextmanager
def removed_afterwards(*names: str) -> Iterator[None]:
    """Every user (and group) named here is gone afterwards, however the test ends."""
    for name in names:
        assert subprocess.run(["getent", "passwd", name], capture_output=True).returncode == 2, (
            f"user {name} exists already")
    try:
        yield
    finally:
        for name in names:
            remove_user(name)


@dataclasses.dataclass
class Host:
    """A backup host installed under ``prefix``."""

    prefix: Path
    worker_user: str
    tunnel_user: str
    redis_port: int
    queue: str = "bakgrab"

    @property
    def etc(self) -> Path:
        return self.prefix / "etc" / "bakgrab"

    @property
    def storage(self) -> Path:
        return self.prefix / "srv" / "bakgrab"

    @property
    def acl_file(self) -> Path:
        return self.prefix / "etc" / "redis" / "bakgrab-users.acl"

    @property
    def redis_snippet(self) -> Path:
        return self.prefix / "etc" / "redis" / "bakgrab.conf"

    @property
    def sshd_snippet(self) -> Path:
        return self.prefix / "etc" / "ssh" / "sshd_config.d" / "bakgrab.conf"

    @property
    def authorized_keys(self) -> Path:
        return self.prefix / "var" / "lib" / self.tunnel_user / ".ssh" / "authorized_keys"

    def unit(self, name: str) -> Path:
        return self.prefix / "etc" / "systemd" / "system" / name

    def secret(self, name: str) -> Secret:
        return Secret((self.etc / "private" / f"{name}.password").read_text().strip())

    def broker(self, env_file: str) -> Secret:
        return read_secrets(self.etc / env_file)["BAKGRAB_BROKER"]

    def admin(self) -> redis.Redis:
        return redis.Redis(port=self.redis_port, username="admin",
                           password=self.secret("redis-admin"), socket_timeout=10)

    def add_client(self, name: str, public_key: str, *args: str) -> Secret:
        """add-client.sh NAME with the key on stdin; the client's broker URL."""
        script(ADD_CLIENT, "--prefix", str(self.prefix), *args, name, "-", stdin=public_key)
        return self.broker(f"clients/{name}.env")


def install_host(prefix: Path, suffix: str, redis_port: int, *args: str) -> Host:
    host = Host(prefix, f"bkw{suffix}", f"bkt{suffix}", redis_port)
    script(HOST_INSTALL, "--prefix", str(prefix), "--user", host.worker_user,
           "--tunnel-user", host.tunnel_user, "--redis-port", str(redis_port),
           "--bakgrab", support.BAKGRAB, *args)
    return host


def start_redis(host: Host, tmp: Path) -> support.Proc:
    """redis-server with the generated snippet as its config (port, bind, ACL file)."""
    tmp.mkdir(parents=True, exist_ok=True)
    proc = support.Proc(["redis-server", str(host.redis_snippet), "--dir", str(tmp),
                         "--save", "", "--appendonly", "no"], tmp / "redis.log")

    def up() -> bool:
        if not proc.alive():
            raise RuntimeError(f"redis-server died:\n{proc.text()[-2000:]}")
        try:
            return bool(host.admin().ping())
        except redis.ConnectionError:
            return False

    try:
        support.wait_for(up, 10, "redis-server")
    except BaseException:
        proc.stop()
        raise
    return proc


def new_key(path: Path) -> str:
    """A fresh ed25519 key pair at ``path``; its public line."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test", "-f", str(path)],
                   check=True)
    return path.with_name(path.name + ".pub").read_text().strip()


def caps_flag(caps: set[str]) -> str:
    """CAP_X CAP_Y -> +x,+y (setpriv's form)."""
    return ",".join("+" + c.removeprefix("CAP_").lower() for c in sorted(caps))


def as_unit(unit_path: Path, user: str | None = None) -> tuple[list[str], dict[str, str]]:
    """The argv and environment systemd would give the unit's ExecStart: its
    user, its capabilities (ambient and bounding), no new privileges, its
    Environment= and EnvironmentFile=. ``user`` stands in for DynamicUser."""
    svc = read_unit(unit_path)["Service"]
    user = user or svc["User"]
    entry = pwd.getpwnam(user)
    env = {"PATH": PATH, "LANG": "C.UTF-8", "HOME": entry.pw_dir, "USER": user,
           "LOGNAME": user}
    if "EnvironmentFile" in svc:
        env.update(read_secrets(Path(svc["EnvironmentFile"])))
    for pair in shlex.split(svc.get("Environment", "")):
        key, _, value = pair.partition("=")
        env[key] = value
    ambient = set(svc.get("AmbientCapabilities", "").split())
    bounding = set(svc.get("CapabilityBoundingSet", "").split())
    argv = ["setpriv", f"--reuid={user}", f"--regid={entry.pw_gid}", "--init-groups",
            "--bounding-set=-all" + ("," + caps_flag(bounding) if bounding else "")]
    if ambient:
        argv += [f"--inh-caps=-all,{caps_flag(ambient)}", f"--ambient-caps={caps_flag(ambient)}"]
    if svc.get("NoNewPrivileges") == "yes":
        argv.append("--no-new-privs")
    return argv + shlex.split(svc["ExecStart"]), env


def tree_state(root: Path) -> dict[str, tuple[int, int, int, str]]:
    """Every path under ``root``: mode, owner, group and a digest of its content."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        if stat.S_ISREG(st.st_mode):
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        elif stat.S_ISLNK(st.st_mode):
            digest = os.readlink(path)
        else:
            digest = ""
        out[str(path.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, digest)
    return out


def acl_denials(host: Host) -> list[str]:
    return [f"{e.get('username')}: {e.get('reason')} {e.get('object')}"
            for e in host.admin().acl_log()]


# -- the deployment ---------------------------------------------------------------

@dataclasses.dataclass
class Deployment:
    root: Path
    host: Host
    client_prefix: Path
    client_user: str
    ssh_port: int
    client_key: str
    client_broker: Secret = dataclasses.field(repr=False)
    tmp: Path = dataclasses.field(default=Path())
    sshd: support.Proc | None = None

    @property
    def client_etc(self) -> Path:
        return self.client_prefix / "etc" / "bakgrab"

    @property
    def client_home(self) -> Path:
        return self.client_prefix / "var" / "lib" / self.client_user

    def client_install(self, *args: str) -> subprocess.CompletedProcess[str]:
        return script(CLIENT_INSTALL, "--prefix", str(self.client_prefix), *args)


SSHD_CONFIG = """\
Include {snippet}
Port {port}
ListenAddress 127.0.0.1
HostKey {host_key}
PidFile none
UsePAM no
AllowUsers {tunnel_user}
AuthorizedKeysFile none
PasswordAuthentication no
KbdInteractiveAuthentication no
LogLevel VERBOSE
"""


@pytest.fixture(scope="module")
def deployment() -> Iterator[Deployment]:
    need_root()
    suffix = secrets.token_hex(3)
    root = support.readable_tmp(Path("/tmp"))
    procs: list[support.Proc] = []
    try:
        with removed_afterwards(f"bkw{suffix}", f"bkt{suffix}", f"bkc{suffix}"):
            host = install_host(root / "host", suffix, support.free_port())
            tmp = root / "tmp"
            tmp.mkdir(mode=0o700)
            ssh_port = support.free_port()
            host_pub = new_key(tmp / "ssh_host_ed25519_key")
            client_prefix = root / "client"
            dep = Deployment(root, host, client_prefix, f"bkc{suffix}", ssh_port, "", Secret(),
                             tmp)
            out = dep.client_install(
                "--user", dep.client_user, "--tunnel-user", host.tunnel_user,
                "--backup-host", f"127.0.0.1:{ssh_port}", "--backup-host-key", host_pub,
                "--bakgrab", support.BAKGRAB, "--name", "deployed", "--source",
                str(root / "src"), "--cron").stdout
            dep.client_key = next(ln for ln in out.splitlines() if ln.startswith("ssh-ed25519 "))
            # the client's bakgrab key, registered for the name (issue 11)
            identity = re.search(r"add-client\.sh --key '(ssh-ed25519 [^']+)' NAME", out)
            assert identity, out
            dep.client_broker = host.add_client("deployed", dep.client_key,
                                                "--key", identity.group(1))
            shutil.copy(host.etc / "clients" / "deployed.env", tmp / "deployed.env")
            dep.client_install("--broker-env", str(tmp / "deployed.env"))
            support.build_fidelity_tree(root / "src")

            procs.append(start_redis(host, tmp / "redis"))
            (tmp / "sshd_config").write_text(SSHD_CONFIG.format(
                snippet=host.sshd_snippet, port=ssh_port, host_key=tmp / "ssh_host_ed25519_key",
                tunnel_user=host.tunnel_user))
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privsep dir
            sshd = support.Proc(["/usr/sbin/sshd", "-D", "-e", "-f", str(tmp / "sshd_config")],
                                tmp / "sshd.log")
            procs.append(sshd)
            dep.sshd = sshd
            support.wait_for(lambda: "listening on" in sshd.text() or not sshd.alive(), 10,
                             "sshd listening")
            assert sshd.alive(), sshd.text()
            yield dep
    finally:
        for proc in reversed(procs):
            proc.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def deployed_worker(deployment: Deployment) -> Iterator[support.Proc]:
    """`bakgrab worker` as bakgrab-worker.service runs it."""
    argv, env = as_unit(deployment.host.unit("bakgrab-worker.service"))
    log = deployment.tmp / f"worker-{secrets.token_hex(2)}.log"
    proc = support.Proc(argv, log, env=env)
    try:
        support.wait_for(lambda: " ready." in proc.text() or not proc.alive(), 60, "worker ready")
        assert proc.alive(), proc.text()[-3000:]
        status = dict(line.split(":\t", 1) for line in
                      Path(f"/proc/{proc.pid}/status").read_text().splitlines() if ":\t" in line)
        assert int(status["Uid"].split()[0]) == pwd.getpwnam(deployment.host.worker_user).pw_uid
        assert int(status["CapAmb"], 16) == sum(1 << CAP_BITS[c] for c in WORKER_CAPS)
        yield proc
    finally:
        proc.stop()


# -- what the install scripts write -------------------------------------------------

def mode_owner(path: Path) -> tuple[int, str]:
    st = path.stat()
    return stat.S_IMODE(st.st_mode), pwd.getpwuid(st.st_uid).pw_name


def test_backup_host_files_have_safe_modes_and_no_password_in_clear(
        deployment: Deployment) -> None:
    """Storage 0700 of the worker's user (issue 11: it holds clients' device
    nodes and setuid files); secrets 0600 root; the ACL file holds hashes
    only; the config file parses with every default but storage."""
    host = deployment.host
    assert mode_owner(host.storage) == (0o700, host.worker_user)
    assert mode_owner(host.prefix / "var" / "lib" / host.worker_user) == (0o750, host.worker_user)
    for name in ["worker.env", "flower.env", "clients/deployed.env", "clients/deployed.hash",
                 "private/redis-admin.password", "private/redis-worker.password",
                 "private/redis-flower.password", "private/flower-web.password"]:
        assert mode_owner(host.etc / name) == (0o600, "root"), name
    for name in ["private", "clients"]:
        assert mode_owner(host.etc / name) == (0o700, "root"), name
    assert stat.S_IMODE(host.acl_file.stat().st_mode) == 0o640

    passwords = [host.secret(n) for n in ("redis-admin", "redis-worker", "redis-flower",
                                          "flower-web")]
    passwords.append(client_password(deployment))
    assert len(set(passwords)) == 5 and all(re.fullmatch(r"[A-Za-z0-9]{32}", p) for p in passwords)
    acl = host.acl_file.read_text()
    assert leaked(acl, passwords) == []
    for pw in passwords[:3] + passwords[4:]:
        assert "#" + hashlib.sha256(pw.encode()).hexdigest() in acl
    assert acl.splitlines()[0] == "user default off resetpass resetkeys resetchannels -@all"
    # (compared into a bool: pytest would print a failing string comparison's diff)
    worker_url = host.broker("worker.env") == (
        f"redis://worker:{host.secret('redis-worker')}@127.0.0.1:{host.redis_port}/0")
    assert worker_url, "worker.env does not hold the worker's broker URL"
    flower_auth = read_env(host.etc / "flower.env")["BAKGRAB_FLOWER_BASIC_AUTH"] == (
        f"admin:{host.secret('flower-web')}")
    assert flower_auth, "flower.env does not hold Flower's login"
    # nothing in any world-readable file carries a password
    for path in host.prefix.rglob("*"):
        if path.is_file() and path.stat().st_mode & 0o004:
            assert leaked(path.read_text(errors="replace"), passwords) == [], path

    settings = config.load(config_file=host.etc / "bakgrab.toml", environ={})
    assert settings == config.Settings(storage=str(host.storage))

    snippet = host.redis_snippet.read_text()
    assert "\nbind 127.0.0.1 -::1\n" in snippet
    assert f"\nport {host.redis_port}\n" in snippet
    assert f"\naclfile {host.acl_file}\n" in snippet


def test_tunnel_key_and_sshd_block_allow_only_the_forward_to_redis(
        deployment: Deployment) -> None:
    """The client's key is in the root-owned authorized_keys with restrict,
    port-forwarding and permitopen to Redis; sshd -T shows the Match block
    applies to the tunnel user only."""
    host = deployment.host
    key = deployment.client_key.split()
    assert host.authorized_keys.read_text() == (
        f'restrict,port-forwarding,permitopen="127.0.0.1:{host.redis_port}" '
        f"{key[0]} {key[1]} bakgrab:deployed\n")
    assert mode_owner(host.authorized_keys) == (0o644, "root")
    assert mode_owner(host.authorized_keys.parent) == (0o755, "root")
    assert mode_owner(host.authorized_keys.parent.parent) == (0o755, "root")
    shadow = subprocess.run(["getent", "shadow", host.tunnel_user], capture_output=True,
                            text=True, check=True).stdout.split(":")
    assert shadow[1] == "*"  # not locked: sshd refuses a locked account
    assert pwd.getpwnam(host.tunnel_user).pw_shell == "/usr/sbin/nologin"

    cfg = deployment.tmp / "sshd_config"

    def effective(user: str) -> dict[str, str]:
        out = subprocess.run(["/usr/sbin/sshd", "-T", "-f", str(cfg), "-C",
                              f"user={user},host=client,addr=127.0.0.1"],
                             capture_output=True, text=True, check=True).stdout
        return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)

    tunnel = effective(host.tunnel_user)
    assert tunnel["allowtcpforwarding"] == "local"
    assert tunnel["permitopen"] == f"127.0.0.1:{host.redis_port}"
    assert tunnel["permitlisten"] == "none"
    for option in ("allowstreamlocalforwarding", "allowagentforwarding", "x11forwarding",
                   "permittty", "permituserrc", "passwordauthentication", "permittunnel"):
        assert tunnel[option] == "no", option
    assert tunnel["forcecommand"] == "/bin/false"
    assert tunnel["authenticationmethods"] == "publickey"
    other = effective("root")
    assert other["forcecommand"] == "none" and other["permitopen"] == "any"


def test_client_files(deployment: Deployment) -> None:
    """The client user is not locked, has /bin/sh; its tunnel key, state dir
    and known_hosts are its own and private; the exclude list and the broker
    credentials are in place."""
    user = pwd.getpwnam(deployment.client_user)
    home = deployment.client_home
    assert user.pw_shell == "/bin/sh" and user.pw_dir == str(home)
    shadow = subprocess.run(["getent", "shadow", user.pw_name], capture_output=True, text=True,
                            check=True).stdout.split(":")
    assert shadow[1] == "*"
    for path, mode in [(home, 0o700), (home / ".ssh", 0o700), (home / ".ssh" / "id_ed25519", 0o600),
                       (home / ".local" / "state" / "bakgrab", 0o700)]:
        assert mode_owner(path) == (mode, user.pw_name), path
    known = (home / ".ssh" / "known_hosts").read_text()
    host_pub = (deployment.tmp / "ssh_host_ed25519_key.pub").read_text().split()
    assert known == f"[127.0.0.1]:{deployment.ssh_port} {host_pub[0]} {host_pub[1]}\n"
    assert mode_owner(deployment.client_etc / "client.env") == (0o600, "root")
    assert read_secrets(deployment.client_etc / "client.env") == {
        "BAKGRAB_BROKER": deployment.client_broker}
    excludes = [ln for ln in (deployment.client_etc / "exclude").read_text().splitlines()
                if ln and not ln.startswith("#")]
    for pattern in ("/proc/*", "/sys/*", "/dev/*", "/run/*", "/tmp/*", "/mnt/*", "/media/*",
                    "/lost+found", "/var/cache/*", "/home/*/.cache", "/var/tmp/*", "/swapfile"):
        assert pattern in excludes
    from bakgrab.client.backup import read_excludes
    from bakgrab.tasks.request import check_excludes

    assert check_excludes(read_excludes(deployment.client_etc / "exclude"))


# -- the systemd units --------------------------------------------------------------

def units(deployment: Deployment) -> dict[str, Path]:
    host_units = deployment.host.prefix / "etc" / "systemd" / "system"
    client_units = deployment.client_prefix / "etc" / "systemd" / "system"
    return {p.name: p for p in [*host_units.iterdir(), *client_units.iterdir()]}


def test_units_grant_only_the_needed_capabilities(deployment: Deployment) -> None:
    """Key settings of each unit, read as systemd reads them: the worker's
    capabilities (ambient = bounding), no new privileges, everything read-only
    but the storage, SIGTERM to the main process with a stop timeout above
    the worker's shutdown grace; the client's one capability, daily timer;
    Flower's secrets in an environment file."""
    found = units(deployment)
    assert set(found) == {"bakgrab-worker.service", "bakgrab-flower.service",
                          "bakgrab-scheduler.service",  # issue 17
                          "bakgrab-backup.service", "bakgrab-backup.timer"}
    host = deployment.host
    worker = read_unit(found["bakgrab-worker.service"])["Service"]
    assert worker["User"] == host.worker_user
    assert set(worker["AmbientCapabilities"].split()) == WORKER_CAPS
    assert set(worker["CapabilityBoundingSet"].split()) == WORKER_CAPS
    assert worker["NoNewPrivileges"] == "yes"
    assert worker["ProtectSystem"] == "strict"
    assert worker["ReadWritePaths"] == str(host.storage)
    assert worker["KillMode"] == "mixed"
    assert int(worker["TimeoutStopSec"]) >= config.Settings().shutdown_grace + 20
    assert worker["EnvironmentFile"] == str(host.etc / "worker.env")
    assert shlex.split(worker["ExecStart"]) == [support.BAKGRAB, "worker"]
    for forbidden in ("PrivateDevices", "RestrictSUIDSGID", "DeviceAllow", "ProtectClock"):
        assert forbidden not in worker, forbidden

    flower = read_unit(found["bakgrab-flower.service"])["Service"]
    assert flower["EnvironmentFile"] == str(host.etc / "flower.env")
    argv = shlex.split(flower["ExecStart"])
    assert argv[:2] == [support.BAKGRAB, "flower"] and "--basic-auth" not in argv
    assert argv[argv.index("--address") + 1] == "127.0.0.1"
    assert flower["DynamicUser"] == "yes" and flower["CapabilityBoundingSet"] == ""

    client = read_unit(found["bakgrab-backup.service"])["Service"]
    assert client["User"] == deployment.client_user
    assert client["AmbientCapabilities"] == client["CapabilityBoundingSet"] == "CAP_DAC_READ_SEARCH"
    assert client["NoNewPrivileges"] == "yes" and client["Type"] == "oneshot"
    assert "ProtectHome" not in client and "PrivateDevices" not in client
    assert shlex.split(client["ExecStart"]) == [
        support.BAKGRAB, "backup", "--name", "deployed", "--source",
        str(deployment.root / "src"), "--tunnel",
        f"{host.tunnel_user}@127.0.0.1:{deployment.ssh_port}",
        "--exclude-from", str(deployment.client_etc / "exclude")]
    timer = read_unit(found["bakgrab-backup.timer"])["Timer"]
    assert timer["OnCalendar"] == "daily" and timer["Persistent"] == "true"
    assert timer["RandomizedDelaySec"]


def test_units_pass_systemd_analyze_verify(deployment: Deployment) -> None:
    """`systemd-analyze verify` loads every generated unit without a warning."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed here (Debian package systemd); "
                    "the units' key settings are checked by the test above")
    found = units(deployment)
    done = subprocess.run([tool, "verify", "--man=no", *map(str, found.values())],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    mine = [ln for ln in (done.stdout + done.stderr).splitlines()
            if any(name in ln for name in found)]
    assert mine == []


# -- reruns and bad input -----------------------------------------------------------

def test_install_scripts_are_idempotent(deployment: Deployment) -> None:
    """Running every script again with the same options changes no file, no
    mode, no owner, no password and no user."""
    host = deployment.host
    users = [host.worker_user, host.tunnel_user, deployment.client_user]

    def state() -> tuple[dict[str, tuple[int, int, int, str]], list[str]]:
        passwd = [subprocess.run(["getent", db, u], capture_output=True, text=True).stdout
                  for u in users for db in ("passwd", "shadow", "group")]
        return tree_state(deployment.root / "host") | tree_state(deployment.client_prefix), passwd

    before = state()
    install_host(host.prefix, host.worker_user[3:], host.redis_port)
    script(HOST_INSTALL, "--prefix", str(host.prefix))  # the options remembered
    host.add_client("deployed", deployment.client_key)
    deployment.client_install("--broker-env", str(deployment.tmp / "deployed.env"))
    deployment.client_install()
    assert state() == before


@pytest.mark.parametrize("name, key, message", [
    ("../evil", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFXq", "name"),
    ("ok", "not a key", "public key"),
    ("ok", "ssh-ed25519 AAAAnotbase64!", "base64"),
    ("ok", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBROKEN", "ssh-keygen"),
    ("other", "", "already another client's"),
])
def test_add_client_refuses_bad_input(deployment: Deployment, name: str, key: str,
                                      message: str) -> None:
    """A bad name, a bad key, or a key another client has: refused, nothing changed."""
    host = deployment.host
    before = tree_state(host.prefix)
    done = script(ADD_CLIENT, "--prefix", str(host.prefix), name, "-",
                  stdin=key or deployment.client_key, check=False)
    assert done.returncode != 0
    assert message in done.stderr
    assert tree_state(host.prefix) == before


def test_add_client_rotate_and_remove(deployment: Deployment) -> None:
    """--rotate gives a client a new password (never printed) that works at
    once; --remove takes its Redis user and its tunnel key away."""
    host = deployment.host
    key = new_key(deployment.tmp / f"k{secrets.token_hex(2)}")
    url = host.add_client("second", key)
    done = script(ADD_CLIENT, "--prefix", str(host.prefix), "--rotate", "second", "-", stdin=key)
    rotated = host.broker("clients/second.env")
    assert rotated != url
    password = Secret(rotated.split(":")[2].split("@")[0])
    assert leaked(done.stdout + done.stderr, [password]) == []
    client = redis.Redis.from_url(rotated)
    assert client.ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(url).ping()
    assert "bakgrab:second" in host.authorized_keys.read_text()

    script(ADD_CLIENT, "--prefix", str(host.prefix), "--remove", "second")
    assert "bakgrab:second" not in host.authorized_keys.read_text()
    assert "bakgrab:deployed" in host.authorized_keys.read_text()
    assert not (host.etc / "clients" / "second.hash").exists()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(rotated).ping()


# -- it works ---------------------------------------------------------------------

def test_tunnel_user_cannot_run_commands_or_forward_elsewhere(deployment: Deployment) -> None:
    """With the client's key, the tunnel user gets neither a command nor a
    forward to another port than Redis's."""
    dep = deployment
    ssh = ["setpriv", f"--reuid={dep.client_user}", f"--regid={dep.client_user}",
           "--init-groups", "ssh", "-p", str(dep.ssh_port), "-o", "BatchMode=yes",
           "-o", "ConnectTimeout=10"]
    target = f"{dep.host.tunnel_user}@127.0.0.1"
    ran = subprocess.run([*ssh, target, "echo", "RAN"], capture_output=True, text=True,
                         timeout=30)
    assert ran.returncode != 0 and "RAN" not in ran.stdout

    # -W asks sshd for one forwarded connection, to port 22 of this host
    other = subprocess.run([*ssh, "-W", f"127.0.0.1:{dep.ssh_port}", target],
                           capture_output=True, text=True, timeout=30, input="")
    assert other.returncode != 0
    assert "administratively prohibited" in other.stderr or "open failed" in other.stderr
    redis_ok = subprocess.run([*ssh, "-W", f"127.0.0.1:{dep.host.redis_port}", target],
                              capture_output=True, timeout=30, input=b"PING\r\nQUIT\r\n")
    assert b"NOAUTH" in redis_ok.stdout
    assert not reverse_forward(dep)


def reverse_forward(dep: Deployment) -> bool:
    """Whether the tunnel user may listen on the backup host's loopback (ssh -R)."""
    argv = ["setpriv", f"--reuid={dep.client_user}", f"--regid={dep.client_user}",
            "--init-groups", "ssh", "-N", "-p", str(dep.ssh_port), "-o", "BatchMode=yes",
            "-o", "ExitOnForwardFailure=yes", "-R", "127.0.0.1:0:127.0.0.1:9",
            f"{dep.host.tunnel_user}@127.0.0.1"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = b""
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if select.select([proc.stderr], [], [], 0.2)[0]:
                chunk = os.read(proc.stderr.fileno(), 4096)
                err += chunk
                if b"Allocated port" in err:
                    return True
                if b"forwarding failed" in err or not chunk:
                    return False
        raise AssertionError(f"ssh -R said neither yes nor no: {err!r}")
    finally:
        proc.kill()
        proc.wait()


def reload_sshd(dep: Deployment) -> None:
    assert dep.sshd is not None
    count = dep.sshd.text().count("Server listening on")
    dep.sshd.signal(signal.SIGHUP)
    support.wait_for(lambda: dep.sshd.text().count("Server listening on") > count,  # type: ignore[union-attr]
                     10, "sshd to restart")


def test_allow_reverse_lets_clients_listen_on_loopback_only(deployment: Deployment) -> None:
    """install.sh --allow-reverse (for clients behind NAT, `--reverse`): the
    tunnel user may listen on the backup host's loopback, nowhere else, and
    every client's key line says so; --no-reverse takes it back."""
    dep = deployment
    host = dep.host
    try:
        script(HOST_INSTALL, "--prefix", str(host.prefix), "--allow-reverse")
        assert host.authorized_keys.read_text().startswith(
            f'restrict,port-forwarding,permitopen="127.0.0.1:{host.redis_port}",'
            'permitlisten="127.0.0.1:*" ssh-ed25519 ')
        out = subprocess.run(["/usr/sbin/sshd", "-T", "-f", str(dep.tmp / "sshd_config"), "-C",
                              f"user={host.tunnel_user},host=client,addr=127.0.0.1"],
                             capture_output=True, text=True, check=True).stdout
        assert "\nallowtcpforwarding yes\n" in out and "\npermitlisten 127.0.0.1:*\n" in out
        assert "\ngatewayports no\n" in out
        reload_sshd(dep)
        assert reverse_forward(dep)
    finally:
        script(HOST_INSTALL, "--prefix", str(host.prefix), "--no-reverse")
        reload_sshd(dep)
    assert "permitlisten" not in host.authorized_keys.read_text()
    assert not reverse_forward(dep)


def test_deployed_backup_end_to_end(deployment: Deployment,
                                    deployed_worker: support.Proc) -> None:
    """Through the deployment only: the client runs as bakgrab-backup.service
    says (its user, CAP_DAC_READ_SEARCH only, its credentials file), reaches
    Redis through the tunnel user's sshd as client-NAME, and the worker runs
    as bakgrab-worker.service says (its user and capabilities, not root).
    The snapshot is identical to the source, root-only files and owners
    included; then the cron line does a second, hard-linked backup. Redis
    denied nobody anything, and no password reached a log."""
    dep = deployment
    host = dep.host
    src = dep.root / "src"
    host.admin().acl_log_reset()
    argv, env = as_unit(dep.client_prefix / "etc" / "systemd" / "system" /
                        "bakgrab-backup.service")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr + deployed_worker.text()[-3000:]
    assert "deployed: snapshot deployed." in done.stdout
    first = support.snapshots(host.storage, "deployed")
    assert len(first) == 1
    assert support.rsync_diff(src, first[0]) == []
    assert (first[0] / "secret" / "shadow").read_bytes() == b"root-only\n"
    assert (first[0] / "data" / "owned-by-nobody").stat().st_uid == pwd.getpwnam("nobody").pw_uid
    assert stat.S_ISCHR((first[0] / "data" / "null-dev").lstat().st_mode)
    meta = json.loads((host.storage / ".bakgrab" / "meta" / f"{first[0].name}.json").read_text())
    assert meta["client"]["user"] == dep.client_user  # its one-shot sshd ran as that user

    # the cron line, as cron would run it (its own PATH; syslog stood in for)
    cron = (dep.client_prefix / "etc" / "cron.d" / "bakgrab-backup").read_text()
    line = next(ln for ln in cron.splitlines() if re.match(r"^\d+ \d+ \* \* \* root ", ln))
    command = line.split(" ", 6)[6]
    fake_bin = dep.tmp / "bin"
    fake_bin.mkdir(exist_ok=True)
    (fake_bin / "logger").write_text(f"#!/bin/sh\ncat >> {dep.tmp / 'syslog'}\n")
    (fake_bin / "logger").chmod(0o755)
    cron_done = subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True,
                               timeout=120, env={"PATH": f"{fake_bin}:{PATH}", "HOME": "/root"})
    assert cron_done.returncode == 0 and cron_done.stderr == "", cron_done.stderr
    assert "deployed: snapshot deployed." in (dep.tmp / "syslog").read_text()
    second = support.snapshots(host.storage, "deployed")
    assert len(second) == 2
    a, b = (s / "data" / "file.txt" for s in second)
    assert a.stat().st_ino == b.stat().st_ino

    assert acl_denials(host) == []
    blob = deployed_worker.text() + done.stdout + done.stderr + cron_done.stdout
    passwords = [host.secret("redis-worker"), client_password(dep)]
    assert leaked(blob, passwords) == []
    assert leaked(Path(f"/proc/{deployed_worker.pid}/cmdline").read_text(), passwords) == []


def readme_block(after: str) -> str:
    """The first ``sh`` code block of deploy/README.md after the line ``after``."""
    text = (DEPLOY / "README.md").read_text()
    rest = text[text.index(after):]
    return rest.split("```sh\n", 1)[1].split("```", 1)[0]


def test_restore_as_the_readme_says(deployment: Deployment,
                                    deployed_worker: support.Proc) -> None:
    """deploy/README.md's restore commands, run on the client as root with
    its credentials and tunnel key, bring files back from the deployed
    snapshot with their owners and modes."""
    dep = deployment
    host = dep.host
    if not support.snapshots(host.storage, "deployed"):
        test_deployed_backup_end_to_end(dep, deployed_worker)
    into = dep.tmp / "restore"
    shutil.rmtree(into, ignore_errors=True)
    commands = readme_block("## Restoring")
    for old, new in [("/etc/bakgrab/", f"{dep.client_etc}/"),
                     ("/var/lib/bakgrab-client/", f"{dep.client_home}/"),
                     ("/opt/bakgrab/bin/bakgrab", support.BAKGRAB),
                     ("bakgrab-tunnel@backup.example.org",
                      f"{host.tunnel_user}@127.0.0.1:{dep.ssh_port}"),
                     ('"$(hostname)"', "deployed"), ("/root/restore", str(into)),
                     ("etc/fstab home/alice", "secret data/file.txt")]:
        assert old in commands, old
        commands = commands.replace(old, new)
    env = {"PATH": PATH, "HOME": str(dep.tmp), "XDG_STATE_HOME": str(dep.tmp / "root-state"),
           "BAKGRAB_CONFIG": str(dep.client_etc / "bakgrab.toml")}
    done = subprocess.run(["bash", "-euc", commands], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr + deployed_worker.text()[-3000:]
    src = dep.root / "src"
    assert (into / "secret" / "shadow").read_bytes() == b"root-only\n"
    assert stat.S_IMODE((into / "secret" / "shadow").stat().st_mode) == 0o600
    assert (into / "data" / "file.txt").read_text() == (src / "data" / "file.txt").read_text()
    assert leaked(done.stdout + done.stderr, [client_password(dep)]) == []
    # root left nothing of its own in the client user's home (the next backup
    # as that user must still be able to write there)
    uid = pwd.getpwnam(dep.client_user).pw_uid
    assert [p for p in dep.client_home.rglob("*") if p.lstat().st_uid != uid] == []


def client_password(dep: Deployment) -> Secret:
    return Secret(dep.client_broker.split(":")[2].split("@")[0])


def test_deployed_flower_shows_the_worker(deployment: Deployment,
                                          deployed_worker: support.Proc) -> None:
    """bakgrab-flower.service's command, with its environment file and the
    flower Redis user, serves the API behind the generated basic auth."""
    host = deployment.host
    unit = host.unit("bakgrab-flower.service")
    argv, env = as_unit(unit, user="nobody")  # DynamicUser: any unprivileged user
    port = support.free_port()
    argv[argv.index("--port") + 1] = str(port)
    proc = support.Proc(argv, deployment.tmp / "flower.log", env=env)
    base = f"http://127.0.0.1:{port}"
    token = base64.b64encode(f"admin:{host.secret('flower-web')}".encode()).decode()

    def get(path: str, auth: bool) -> tuple[int, bytes]:
        req = urllib.request.Request(base + path)  # noqa: S310 -- loopback http
        if auth:
            req.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 -- loopback http
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, b""
        except OSError:
            return 0, b""

    try:
        def workers() -> dict:  # type: ignore[type-arg]
            if not proc.alive():
                raise RuntimeError(proc.text()[-3000:])
            status, body = get("/api/workers?refresh=1", True)
            return json.loads(body) if status == 200 and body.strip() not in (b"", b"{}") else {}

        seen = support.wait_for(workers, 60, "Flower to list the worker", interval=0.5)
        assert any(name.startswith("bakgrab.") for name in seen)
        assert get("/api/workers", False)[0] == 401
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_text()
        assert leaked(cmdline + proc.text(), [host.secret("flower-web")]) == []
    finally:
        proc.stop()
    assert [d for d in acl_denials(host) if d.startswith("flower")] == []


def test_toml_example_is_what_the_host_config_was_made_from(deployment: Deployment) -> None:
    """The installed config is deploy/bakgrab.toml.example with storage and
    queue set: every setting stays documented on the backup host."""
    example = (DEPLOY / "bakgrab.toml.example").read_text().splitlines()
    installed = (deployment.host.etc / "bakgrab.toml").read_text().splitlines()
    assert len(example) == len(installed)
    changed = [(a, b) for a, b in zip(example, installed, strict=True) if a != b]
    assert [b.split(" = ")[0] for _, b in changed] == ["queue", "storage"]
    assert tomllib.loads("\n".join(installed))["bakgrab"]["storage"] == str(
        deployment.host.storage)

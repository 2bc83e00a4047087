"""Many hosts at once: network namespaces made by the test, addresses from
198.18.0.0/15, backup hosts with their own Redis, worker and tunnel sshd, and
clients that reach them only through SSH tunnels."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bakgrab.client import keys
from tests import support
from tests.conftest import need_root

pytestmark = [pytest.mark.integration, pytest.mark.root]

NET = "198.18.0"
CLIENTS = 8


def ip(*args: str) -> None:
    """Run ``ip ARGS``; on failure the error shows ip's own stderr (issue 13)."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} exited {done.returncode}: "
                           f"{done.stderr.strip() or done.stdout.strip()}")


def namespaces() -> set[str]:
    """The network namespaces that exist now (``ip netns list``)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


class Topology:
    """A switch namespace with a bridge, and host namespaces wired to it.

    Invariant: every namespace this object made is in ``created`` from the
    moment ``ip netns add`` made it, and :meth:`close` deletes exactly those,
    by name, also when a set-up step failed half-way (issue 13). The
    constructor closes what it made if it fails itself.
    """

    def __init__(self) -> None:
        self.tag = secrets.token_hex(3)
        self.switch = f"bkg{self.tag}-sw"
        self.hosts: list[str] = []
        self.created: list[str] = []
        self.procs: list[support.Proc] = []
        try:
            self._add_netns(self.switch)
            ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            ip("-n", self.switch, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    def _add_netns(self, ns: str) -> None:
        ip("netns", "add", ns)
        self.created.append(ns)

    def host(self, role: str, octet: int) -> str:
        ns = f"bkg{self.tag}-{role}"
        self._add_netns(ns)
        self.hosts.append(ns)
        peer = f"p{octet}"
        ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", peer,
           "netns", self.switch)
        ip("-n", ns, "addr", "add", f"{NET}.{octet}/24", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", self.switch, "link", "set", peer, "master", "br0")
        ip("-n", self.switch, "link", "set", peer, "up")
        return ns

    def run(self, ns: str, argv: list[str], log: Path, env: dict[str, str] | None = None,
            ) -> support.Proc:
        proc = support.Proc(["ip", "netns", "exec", ns, *argv], log, env=env)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        """Stop the processes (by pid), then delete the namespaces made here;
        raises if one of them is still there afterwards."""
        for proc in reversed(self.procs):
            proc.stop()
        self.procs = []
        failed = []
        for ns in reversed(self.created):
            done = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True,
                                  timeout=30)
            if done.returncode != 0:
                failed.append(f"{ns}: {done.stderr.strip()}")
        left = set(self.created) & namespaces()
        self.created = []
        if left:
            raise RuntimeError(f"network namespaces left behind: {sorted(left)} {failed}")


class BackupHost:
    """Redis, a worker and the tunnel sshd, in a namespace of their own."""

    def __init__(self, topo: Topology, role: str, octet: int, tmp: Path,
                 client_key: keys.KeyPair) -> None:
        self.ns = topo.host(role, octet)
        self.addr = f"{NET}.{octet}"
        self.dir = tmp / role
        self.storage = self.dir / "storage"
        self.storage.mkdir(parents=True)
        topo.run(self.ns, ["redis-server", "--port", "6379", "--bind", "127.0.0.1",
                           "--save", "", "--appendonly", "no", "--dir", str(self.dir)],
                 self.dir / "redis.log")
        host_key, self.host_public = keys.host_key(self.dir / "sshd")
        (self.dir / "authorized_keys").write_text(client_key.public + "\n")
        (self.dir / "sshd_config").write_text("\n".join([
            f"ListenAddress {self.addr}", "Port 22", f"HostKey {host_key}", "PidFile none",
            f"AuthorizedKeysFile {self.dir / 'authorized_keys'}",
            "PermitRootLogin prohibit-password", "StrictModes no", "UsePAM no",
            "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "AllowTcpForwarding yes", "PermitOpen 127.0.0.1:6379", "PermitListen any",
            "AllowStreamLocalForwarding no", "X11Forwarding no", "PermitTTY no",
            "ForceCommand /bin/false", "",
        ]))
        topo.run(self.ns, [support.which("sshd"), "-D", "-e", "-f",
                           str(self.dir / "sshd_config")], self.dir / "sshd.log")
        support.wait_for(lambda: subprocess.run(
            ["ip", "netns", "exec", self.ns, "redis-cli", "ping"],
            capture_output=True, text=True).stdout.strip() == "PONG", 15, "redis in netns")
        env = support.worker_env(retry_backoff="0.3", retry_backoff_max="1", max_retries="1",
                                 connect_timeout="3", rsync_timeout="10")
        self.worker = topo.run(
            self.ns, [support.BAKGRAB, "worker", "--storage", str(self.storage), "--broker",
                      "redis://127.0.0.1:6379/0", "--concurrency", str(CLIENTS)],
            self.dir / "worker.log", env=env)
        support.wait_for(lambda: " ready." in self.worker.text() or not self.worker.alive(),
                         60, "worker in netns")
        assert self.worker.alive(), self.worker.text()[-2000:]


@pytest.fixture
def topo(tmp_path: Path) -> Iterator[tuple[Topology, Path, keys.KeyPair]]:
    need_root()
    topology = Topology()
    key = keys.one_time_key()
    key_file = tmp_path / "tunnel_key"
    key_file.write_text(key.private)
    key_file.chmod(0o600)
    try:
        yield topology, key_file, key
    finally:
        topology.close()


def client_backup(topo: Topology, ns: str, tmp: Path, name: str, key_file: Path,
                  hosts: list[BackupHost], *extra: str) -> subprocess.CompletedProcess[str]:
    known = tmp / f"known_hosts-{name}"
    known.write_text("".join(f"{h.addr} {h.host_public}\n" for h in hosts))
    src = tmp / "src" / name
    src.mkdir(parents=True, exist_ok=True)
    (src / "hostname").write_text(f"{name}\n")
    (src / "data").write_bytes(os.urandom(200_000))
    env = {**os.environ, "XDG_STATE_HOME": str(tmp / "state" / name)}
    opts = [f"--ssh-option={o}" for o in (f"IdentityFile={key_file}", "IdentitiesOnly=yes",
                                          f"UserKnownHostsFile={known}",
                                          "StrictHostKeyChecking=yes")]
    if len(hosts) == 1:
        where = ["--tunnel", f"root@{hosts[0].addr}"]
    else:
        where = [arg for h in hosts for arg in ("--to", f"tunnel=root@{h.addr}")]
    return subprocess.run(
        ["ip", "netns", "exec", ns, support.BAKGRAB, "backup", "--name", name, "--source",
         str(src), "--broker", "redis://127.0.0.1:6379/0", *where, *opts, "--json", *extra],
        capture_output=True, text=True, timeout=180, env=env)


def test_eight_clients_back_up_at_once_through_their_tunnels(topo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Eight client namespaces, each with its own address, back up concurrently
    through SSH tunnels to one backup host; each gets its own snapshot, pulled
    from its own address; a client whose --allow-from excludes the backup host
    is refused."""
    topology, key_file, key = topo
    bk = BackupHost(topology, "bk", 1, tmp_path, key)
    clients = [topology.host(f"c{i}", 10 + i) for i in range(CLIENTS)]
    bad = topology.host("bad", 99)
    results: dict[str, subprocess.CompletedProcess[str]] = {}

    def run(i: int, ns: str) -> None:
        results[f"c{i}"] = client_backup(topology, ns, tmp_path, f"c{i}", key_file, [bk])

    threads = [threading.Thread(target=run, args=(i, ns)) for i, ns in enumerate(clients)]
    threads.append(threading.Thread(target=lambda: results.__setitem__("bad", client_backup(
        topology, bad, tmp_path, "bad", key_file, [bk], "--allow-from", f"{NET}.250"))))
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)

    for i in range(CLIENTS):
        done = results[f"c{i}"]
        assert done.returncode == 0, done.stderr + bk.worker.text()[-3000:]
        snap = support.snapshots(bk.storage, f"c{i}")
        assert len(snap) == 1
        assert (snap[0] / "hostname").read_text() == f"c{i}\n"
        meta = json.loads((bk.storage / ".bakgrab" / "meta" / f"{snap[0].name}.json")
                          .read_text())
        assert meta["client"]["address"] == f"{NET}.{10 + i}"
    # The refusal is the client's own, of the backup host's address, before
    # any sshd: the worker's ssh is cut at once, each attempt (the first and
    # its one retry), and the job fails as a transfer that a retry may fix
    # (exit 9), not for any other reason (issue 13).
    bad = results["bad"]
    assert bad.returncode == 9, bad.stderr + bk.worker.text()[-3000:]
    refusals = re.findall(r"refused connection from (\S+): not an allowed address", bad.stderr)
    assert refusals == [bk.addr, bk.addr], bad.stderr
    assert "Accepted publickey" not in bad.stderr
    assert support.snapshots(bk.storage, "bad") == []


def test_two_backup_hosts_each_get_a_copy(topo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """One run with two --to targets sends to both backup hosts and reports each."""
    topology, key_file, key = topo
    one = BackupHost(topology, "bk1", 1, tmp_path, key)
    two = BackupHost(topology, "bk2", 2, tmp_path, key)
    client = topology.host("cl", 20)
    done = client_backup(topology, client, tmp_path, "laptop", key_file, [one, two])
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [r["ok"] for r in report] == [True, True]
    for host in (one, two):
        snaps = support.snapshots(host.storage, "laptop")
        assert len(snaps) == 1
        assert (snaps[0] / "hostname").read_text() == "laptop\n"


def test_client_behind_nat_is_reached_through_the_reverse_tunnel(topo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """With --reverse the one-shot sshd listens only on the client's loopback,
    unreachable from the backup host, and the worker still pulls it through
    the tunnel's `ssh -R`."""
    topology, key_file, key = topo
    bk = BackupHost(topology, "bk", 1, tmp_path, key)
    client = topology.host("nat", 30)
    done = client_backup(topology, client, tmp_path, "natted", key_file, [bk], "--reverse")
    assert done.returncode == 0, done.stderr + bk.worker.text()[-2000:]
    snaps = support.snapshots(bk.storage, "natted")
    assert len(snaps) == 1
    meta = json.loads((bk.storage / ".bakgrab" / "meta" / f"{snaps[0].name}.json").read_text())
    assert meta["client"]["address"] == "127.0.0.1"


def test_a_set_up_that_fails_half_way_leaves_no_namespace_of_its_own(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A topology whose set-up fails says what ip said, and its close deletes
    every namespace it made, by the names it recorded, and none it did not
    make: another one of the same name pattern made before stays (issue 13)."""
    need_root()
    tag = secrets.token_hex(3)
    foreign = f"bkg{tag}-c1"
    ip("netns", "add", foreign)
    try:
        monkeypatch.setattr(secrets, "token_hex", lambda n: tag)
        topology = Topology()
        assert topology.switch in namespaces()
        topology.host("c0", 10)
        with pytest.raises(RuntimeError, match=r"ip -n bkg\w+-c9 addr add 198\.18\.0\.300/24 "
                                               r"dev eth0 exited \d+: .*300"):
            topology.host("c9", 300)
        with pytest.raises(RuntimeError, match=r"ip netns add bkg\w+-c1 exited \d+: .*exists"):
            topology.host("c1", 11)
        assert {f"bkg{tag}-sw", f"bkg{tag}-c0", f"bkg{tag}-c9"} <= namespaces()
        topology.close()
        assert {ns for ns in namespaces() if ns.startswith(f"bkg{tag}-")} == {foreign}
    finally:
        subprocess.run(["ip", "netns", "del", foreign], check=False, timeout=30)

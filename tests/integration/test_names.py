"""A name belongs to one client credential (issue 11, attacks 3 and 10).

A real redis-server and a real ``bakgrab worker`` with the production
default ``enrol = "registered"`` (no retries, so a refused or failed job ends
at once) serve the module; clients are real ``bakgrab backup`` / ``bakgrab
restore`` processes, each with its own state dir (its own key), or
hand-made task messages sent with Celery's ``send_task`` as anyone who can
write to the broker can. Every refusal is checked for what it must not do:
write anything (the storage listing is compared), change a registration,
record a failure, or connect anywhere (a listening socket sees no
connection); and the worker keeps serving.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bakgrab.client import keys
from bakgrab.tasks import GRAB, sealed
from bakgrab.tasks.request import sign
from tests import support

pytestmark = pytest.mark.integration

REFUSED = "not signed by the client registered for this name"


@dataclasses.dataclass
class Ctx:
    base: Path
    storage: Path
    url: str
    worker: support.Proc
    app: Celery
    recipient: Any

    def listing(self) -> dict[str, tuple[object, ...]]:
        """Every path in the storage, with its metadata and the content of
        the files (issue 13: a chmod or a same-content rewrite counts too)."""
        return support.tree_state(self.storage)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ctx]:
    base = tmp_path_factory.mktemp("names")
    redis_proc, url = support.start_redis(base / "redis")
    storage = base / "storage"
    worker = None
    app = Celery(broker=url, backend=url)
    try:
        worker = support.start_worker(storage, url, base / "worker.log",
                                      env=support.worker_env(enrol="registered",
                                                             max_retries="0"))
        private = sealed.load_or_create_private(storage / ".bakgrab" / "request.key")
        yield Ctx(base, storage, url, worker, app, private.public_key())
    finally:
        app.close()
        if worker is not None:
            worker.stop()
        redis_proc.stop()


def client_env(ctx: Ctx, label: str) -> dict[str, str]:
    """A client of its own: its own state dir, hence its own key."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BAKGRAB_")}
    env.update(XDG_STATE_HOME=str(ctx.base / f"client-{label}"), BAKGRAB_CONFIG=os.devnull)
    return env


def identity(env: dict[str, str]) -> Ed25519PrivateKey:
    return keys.identity(Path(env["XDG_STATE_HOME"]) / "bakgrab")[1]


def source(ctx: Ctx, label: str) -> Path:
    src = ctx.base / f"src-{label}"
    src.mkdir(exist_ok=True)
    (src / "file").write_text(f"the data of {label}\n")
    return src


def backup(ctx: Ctx, name: str, env: dict[str, str], *args: str
           ) -> subprocess.CompletedProcess[str]:
    return support.run_backup(ctx.url, name, source(ctx, name), *args, env=env, timeout=90)


def restore(ctx: Ctx, name: str, env: dict[str, str], into: Path
            ) -> subprocess.CompletedProcess[str]:
    into.mkdir(mode=0o700)
    return subprocess.run([support.BAKGRAB, "restore", "--broker", ctx.url, "--name", name,
                           "--into", str(into), "file"], capture_output=True, text=True,
                          timeout=90, env=env)


@dataclasses.dataclass
class Listener:
    """A listening socket that records whether anyone connected."""

    sock: socket.socket

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def connections(self) -> int:
        count = 0
        self.sock.setblocking(False)
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return count
            conn.close()
            count += 1


@pytest.fixture
def listener() -> Iterator[Listener]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield Listener(sock)
    finally:
        sock.close()


def request(ctx: Ctx, name: str, key: Ed25519PrivateKey, port: int,
            address: str = "127.0.0.1", task_id: str | None = None,
            host_key: str | None = None) -> tuple[str, dict[str, Any]]:
    """A task id and fields signed with ``key`` as a client signs them."""
    task_id = task_id or str(uuid.uuid4())
    fields = {"v": 1, "name": name, "address": address, "port": port, "user": "nobody",
              "key": sealed.seal(ctx.recipient, keys.one_time_key().private.encode()),
              "host_key": host_key or keys.public_line(key), "excludes": []}
    return task_id, sign(fields, GRAB, task_id, key)


def send(ctx: Ctx, task_id: str, fields: dict[str, Any]) -> BaseException:
    """Send a hand-made grab; the error it ended with."""
    result = ctx.app.send_task(GRAB, task_id=task_id, kwargs=fields, queue="bakgrab",
                               argsrepr="()", kwargsrepr="<hand-made>")
    value = result.get(timeout=60, propagate=False)
    assert result.state == "FAILURE", (result.state, value)
    assert isinstance(value, BaseException)
    return value


def registered(ctx: Ctx, name: str, env: dict[str, str], *args: str) -> str:
    key = support.client_key(env)
    support.register(ctx.storage, name, key, *args)
    return key


def pin(ctx: Ctx, name: str) -> bytes:
    return (ctx.storage / ".bakgrab" / "pins" / f"{name}.pub").read_bytes()


def test_another_client_cannot_take_over_a_registered_name(ctx: Ctx, tmp_path: Path) -> None:
    """The victim, registered, backs up and restores. A second client (its own
    key) asking for a backup or a restore of the victim's name is refused
    with the same message an unregistered name gets, nothing is written, the
    victim's registration and snapshots are unchanged and the attacker's
    staging dir stays empty; the victim still backs up afterwards."""
    victim = client_env(ctx, "victim")
    registered(ctx, "victim", victim)
    done = backup(ctx, "victim", victim)
    assert done.returncode == 0, done.stderr + ctx.worker.text()[-3000:]
    assert restore(ctx, "victim", victim, tmp_path / "mine").returncode == 0
    assert (tmp_path / "mine" / "file").read_text() == "the data of victim\n"

    attacker = client_env(ctx, "attacker")
    before = ctx.listing()
    pinned = pin(ctx, "victim")
    taken = backup(ctx, "victim", attacker)
    assert taken.returncode == 4, taken.stderr
    assert REFUSED in taken.stderr
    stolen = restore(ctx, "victim", attacker, tmp_path / "stolen")
    assert stolen.returncode == 4, stolen.stderr
    assert REFUSED in stolen.stderr
    assert list((tmp_path / "stolen").iterdir()) == []
    unregistered = backup(ctx, "nobody-registered-this", attacker)
    assert unregistered.returncode == 4
    # no probing: the same answer whether the name is registered or not
    assert (taken.stderr.replace("victim", "N")
            == unregistered.stderr.replace("nobody-registered-this", "N"))
    assert ctx.listing() == before
    assert pin(ctx, "victim") == pinned
    assert not (ctx.storage / ".bakgrab" / "failures" / "victim").exists()

    again = backup(ctx, "victim", victim)
    assert again.returncode == 0, again.stderr
    assert len(support.snapshots(ctx.storage, "victim")) == 2
    assert ctx.worker.alive()


def test_unregistered_name_is_refused_by_default(ctx: Ctx) -> None:
    """With enrol = "registered" (the default), the first request of a name
    nobody registered is refused: no pin, no snapshot, nothing written."""
    env = client_env(ctx, "newcomer")
    before = ctx.listing()
    done = backup(ctx, "newcomer", env)
    assert done.returncode == 4, done.stderr
    assert REFUSED in done.stderr and "bakgrab trust newcomer --key" in done.stderr
    assert ctx.listing() == before
    assert not (ctx.storage / ".bakgrab" / "pins" / "newcomer.pub").exists()


def test_forged_and_replayed_requests_are_refused(ctx: Ctx, listener: Listener) -> None:
    """Hand-made messages for a registered name: unsigned, signed by another
    key (announcing the victim's key or its own), signed by the victim but
    stale, changed after signing (address, port, the sealed key), or a
    victim's signed message replayed under another task id: each is refused
    before any connection (the listener sees none) and writes nothing."""
    victim = client_env(ctx, "forged")
    victim_line = registered(ctx, "forged", victim)
    real = identity(victim)
    other = Ed25519PrivateKey.generate()
    port = listener.port
    before = ctx.listing()

    attempts: dict[str, tuple[str, dict[str, Any]]] = {}
    task_id, fields = request(ctx, "forged", real, port)
    fields["sig"] = "A" * 86 + "=="
    attempts["unsigned"] = (task_id, fields)
    attempts["other key, victim's key announced"] = request(ctx, "forged", other, port,
                                                             host_key=victim_line)
    attempts["other key"] = request(ctx, "forged", other, port)
    task_id, fields = request(ctx, "forged", real, port)
    fields["port"] = port + 1 if port < 65535 else port - 1
    attempts["port changed after signing"] = (task_id, fields)
    task_id, fields = request(ctx, "forged", real, port, address="127.0.0.2")
    fields["address"] = "127.0.0.1"
    attempts["address changed after signing"] = (task_id, fields)
    task_id, fields = request(ctx, "forged", real, port)
    fields["key"] = request(ctx, "forged", real, port)[1]["key"]
    attempts["sealed key swapped"] = (task_id, fields)
    _, fields = request(ctx, "forged", real, port)
    attempts["replayed under another id"] = (str(uuid.uuid4()), fields)
    for what, (task_id, fields) in attempts.items():
        error = send(ctx, task_id, fields)
        assert type(error).__name__ == "RequestRefused", (what, repr(error))
        assert REFUSED in str(error), what

    stale_id, stale = request(ctx, "forged", real, port)
    stale = sign({k: v for k, v in stale.items() if k not in ("ts", "sig")}, GRAB, stale_id,
                 real, now=time.time() - 3600)
    error = send(ctx, stale_id, stale)
    assert type(error).__name__ == "InvalidRequest" and str(error).startswith("ts:"), error

    assert listener.connections() == 0
    assert ctx.listing() == before
    assert ctx.worker.alive()


def test_operator_re_key_works_and_the_old_key_is_refused(ctx: Ctx) -> None:
    """A reinstalled client (new key) is refused until the operator re-keys
    the name with `bakgrab trust NAME --key NEW`; then it backs up, and the
    old key is refused; the snapshots made before are kept."""
    env = client_env(ctx, "rekey")
    old_key = registered(ctx, "rekey", env)
    assert backup(ctx, "rekey", env).returncode == 0
    old_state = ctx.base / "rekey-old-state"
    shutil.copytree(Path(env["XDG_STATE_HOME"]), old_state)
    shutil.rmtree(env["XDG_STATE_HOME"])  # reinstalled: a new key
    refused = backup(ctx, "rekey", env)
    assert refused.returncode == 4 and REFUSED in refused.stderr
    new_key = support.client_key(env)
    assert new_key != old_key
    out = support.register(ctx.storage, "rekey", new_key)
    assert "registered" in out and "was SHA256:" in out
    done = backup(ctx, "rekey", env)
    assert done.returncode == 0, done.stderr
    assert len(support.snapshots(ctx.storage, "rekey")) == 2
    old = dict(env, XDG_STATE_HOME=str(old_state))
    stale_client = backup(ctx, "rekey", old)
    assert stale_client.returncode == 4 and REFUSED in stale_client.stderr
    assert pin(ctx, "rekey").decode().split()[:2] == new_key.split()
    assert len(support.snapshots(ctx.storage, "rekey")) == 2


def test_address_outside_the_registered_network_is_never_connected(
        ctx: Ctx, listener: Listener) -> None:
    """A name registered `--from 198.18.0.0/24`: a request (signed by its own
    client) whose address is outside is refused before any connection, the
    listener at that address sees none, nothing is written; a real backup
    from 127.0.0.1 is refused too. Re-registered `--from 127.0.0.0/8`, the
    same client backs up."""
    env = client_env(ctx, "netbound")
    key = registered(ctx, "netbound", env, "--from", "198.18.0.0/24")
    before = ctx.listing()
    task_id, fields = request(ctx, "netbound", identity(env), listener.port)
    error = send(ctx, task_id, fields)
    assert type(error).__name__ == "InvalidRequest", repr(error)
    assert str(error).startswith("address:") and "did not connect" in str(error)
    done = backup(ctx, "netbound", env)
    assert done.returncode == 4 and "198.18.0.0/24" in done.stderr, done.stderr
    assert listener.connections() == 0
    assert ctx.listing() == before

    support.register(ctx.storage, "netbound", key, "--from", "127.0.0.0/8")
    done = backup(ctx, "netbound", env)
    assert done.returncode == 0, done.stderr


def test_closed_and_open_ports_give_one_error(ctx: Ctx, listener: Listener) -> None:
    """A client pointing the worker at a closed port and at an open port that
    is no sshd (it accepts and hangs up) gets the very same error text: the
    worker is no port scanner (attack 10)."""
    env = client_env(ctx, "scanner")
    registered(ctx, "scanner", env)
    closed = support.free_port()
    errors = []
    for port in (closed, listener.port):
        task_id, fields = request(ctx, "scanner", identity(env), port)
        errors.append(send(ctx, task_id, fields))
    assert listener.connections() >= 1  # the open port was connected to
    assert [type(e).__name__ for e in errors] == ["TransferInterrupted"] * 2
    assert str(errors[0]) == str(errors[1]), errors
    assert "refused" not in str(errors[0]).lower()


def test_first_use_enrolment_pins_only_after_a_successful_grab(
        tmp_path: Path, redis_url: str, storage: Path) -> None:
    """With the opt-in enrol = "first-use", a name's first grab that fails
    (the worker cannot reach the client) registers nothing; the first that
    succeeds registers its client's key; another client is refused then."""
    worker = support.start_worker(storage, redis_url, tmp_path / "worker.log",
                                  env=support.worker_env(enrol="first-use", max_retries="0"))
    try:
        src = tmp_path / "src"
        src.mkdir()
        (src / "f").write_text("first use\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("BAKGRAB_")}
        env.update(XDG_STATE_HOME=str(tmp_path / "client"), BAKGRAB_CONFIG=os.devnull)
        # the worker is told 127.0.0.2, where nothing listens
        failed = support.run_backup(redis_url, "fresh", src, "--address", "127.0.0.2",
                                    "--listen", "127.0.0.1", env=env, timeout=90)
        assert failed.returncode == 9, failed.stderr
        assert not (storage / ".bakgrab" / "pins" / "fresh.pub").exists()
        done = support.run_backup(redis_url, "fresh", src, env=env, timeout=90)
        assert done.returncode == 0, done.stderr + worker.text()[-3000:]
        key = support.client_key(env)
        assert (storage / ".bakgrab" / "pins" / "fresh.pub").read_text() == key + "\n"
        other = dict(env, XDG_STATE_HOME=str(tmp_path / "other"))
        refused = support.run_backup(redis_url, "fresh", src, env=other, timeout=90)
        assert refused.returncode == 4 and REFUSED in refused.stderr
        assert (storage / ".bakgrab" / "pins" / "fresh.pub").read_text() == key + "\n"
    finally:
        worker.stop()

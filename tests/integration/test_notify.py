"""The backup host tells someone (issue 17): webhooks, mail, pings, beat and /metrics.

Real processes throughout: redis-server, ``bakgrab worker``, ``bakgrab
scheduler`` (Celery beat), real backups (one-shot sshd, rsync), a real HTTP
server (stdlib, in a thread, its handler's exceptions re-raised by the test)
receiving webhooks and pings, and a real SMTP server (aiosmtpd, STARTTLS with
a test CA, AUTH required) receiving mail.
"""

from __future__ import annotations

import base64
import collections
import datetime
import email
import email.policy
import ipaddress
import json
import os
import re
import secrets
import ssl
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bakgrab.worker import notify
from tests import support
from tests.conftest import need_root
from tests.integration.test_flower import unreachable_backup

pytestmark = pytest.mark.integration

QUEUE = "bakgrab"
INTERNAL = notify.internal_queue(QUEUE)


# -- a webhook receiver -----------------------------------------------------------

@dataclass
class Hit:
    method: str
    path: str
    body: bytes

    def json(self) -> dict[str, Any]:
        return json.loads(self.body)  # type: ignore[no-any-return]


class Sink(ThreadingHTTPServer):
    """Records every request; answers 503 to the first ``failing`` POSTs."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.hits: list[Hit] = []
        self.errors: list[BaseException] = []
        self.failing = 0
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def events(self, path: str) -> list[dict[str, Any]]:
        with self.lock:
            return [h.json() for h in self.hits if h.path == path and h.method == "POST"
                    and self.answered(h)]

    def answered(self, hit: Hit) -> bool:
        return not hit.path.endswith("#refused")

    def paths(self, prefix: str) -> list[str]:
        with self.lock:
            return [h.path for h in self.hits if h.path.startswith(prefix)]

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        self.errors.append(sys.exc_info()[1] or RuntimeError("unknown"))


class Handler(BaseHTTPRequestHandler):
    server: Sink

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def answer(self, method: str) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            with self.server.lock:
                refuse = method == "POST" and self.server.failing > 0
                if refuse:
                    self.server.failing -= 1
                self.server.hits.append(Hit(method, self.path + ("#refused" if refuse else ""),
                                            body))
            self.send_response(503 if refuse else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()
        except BaseException as e:
            self.server.errors.append(e)
            raise

    def do_POST(self) -> None:  # noqa: N802 -- http.server's naming
        self.answer("POST")

    def do_GET(self) -> None:  # noqa: N802
        self.answer("GET")


@pytest.fixture
def sink() -> Iterator[Sink]:
    server = Sink()
    thread = threading.Thread(target=server.serve_forever, name="webhook-sink", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    if server.errors:
        raise server.errors[0]


# -- an SMTP relay --------------------------------------------------------------------

@dataclass
class Relay:
    port: int
    ca: Path
    user: str
    password: str
    mails: list[bytes] = field(default_factory=list)
    logins: list[tuple[str, bool]] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)


def make_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (it is its own CA)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bakgrab test relay")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=2))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "relay.crt", directory / "relay.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Relay]:
    cert, key = make_cert(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    found = Relay(support.free_port(), cert, "bakgrab", "pw-" + secrets.token_hex(12))

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
            try:
                found.mails.append(envelope.original_content or envelope.content)
            except BaseException as e:
                found.errors.append(e)
                raise
            return "250 OK"

    def authenticate(server: Any, session: Any, envelope: Any, mechanism: str,
                     data: Any) -> AuthResult:
        ok = (isinstance(data, LoginPassword) and data.login.decode() == found.user
              and data.password.decode() == found.password)
        found.logins.append((mechanism, ok))
        return AuthResult(success=ok)

    controller = Controller(Handler(), hostname="127.0.0.1", port=found.port,
                            tls_context=context, require_starttls=True,
                            authenticator=authenticate, auth_required=True,
                            auth_require_tls=True)
    controller.start()
    try:
        yield found
    finally:
        controller.stop()
    if found.errors:
        raise found.errors[0]


# -- helpers ----------------------------------------------------------------------

def source_tree(base: Path) -> Path:
    src = base / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "hostname").write_text("alpha\n")
    (src / "data.bin").write_bytes(secrets.token_bytes(4096))
    return src


def everything_in_redis(url: str) -> bytes:
    """Every key and value in the broker, as one blob (queues, results, hashes)."""
    r = redis.Redis.from_url(url)
    out = []
    for key in r.scan_iter(count=1000):
        kind = r.type(key)
        out.append(key)
        if kind == b"string":
            out.append(r.get(key) or b"")
        elif kind == b"list":
            out.extend(r.lrange(key, 0, -1))
        elif kind == b"hash":
            for k, v in r.hgetall(key).items():
                out.extend((k, v))
        elif kind == b"set":
            out.extend(r.smembers(key))
        elif kind == b"zset":
            out.extend(r.zrange(key, 0, -1))
    return b"\n".join(out)


def argv_of(pid: int) -> bytes:
    blobs = []
    for p in {pid} | support.descendants(pid):
        try:
            blobs.append(Path(f"/proc/{p}/cmdline").read_bytes())
        except OSError:
            continue
    return b"\n".join(blobs)


def scrape(port: int) -> dict[str, float]:
    """{'metric{labels}': value} of a real HTTP scrape of /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            out[series] = float(value)
    return out


def conditions(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["event"], e["condition"]) for e in events]


# -- the tests --------------------------------------------------------------------

def test_a_failure_is_told_once_by_webhook_mail_and_ping_then_its_recovery(
        tmp_path: Path, redis_url: str, storage: Path, sink: Sink, relay: Relay) -> None:
    """Two failed grabs of a name make one ``failed`` notice (webhook and
    mail), its next success one ``recovered``; the name's ping URL gets
    /start for every accepted grab (not for another client's refused one),
    /fail for each failure and the bare URL for the success. The payload has the documented fields; the mail came through
    STARTTLS with the relay's login; and the SMTP password (from a 0600
    file) and the client's one-time key appear in no payload, mail, log,
    argv or broker key."""
    password_file = tmp_path / "smtp.password"
    password_file.write_text(relay.password + "\n")
    password_file.chmod(0o600)
    env = support.worker_env(
        max_retries="0", notify_backoff="0.2", notify_ping=f"alpha={sink.url}/ping/alpha",
        smtp_host="127.0.0.1", smtp_port=str(relay.port), smtp_ca_file=str(relay.ca),
        smtp_user=relay.user, smtp_password_file=str(password_file),
        smtp_from="backup@example.com")
    worker = support.start_worker(storage, redis_url, tmp_path / "worker.log",
                                  "--notify", f"{sink.url}/hook",
                                  "--notify", "mailto:ops@example.com", env=env)
    try:
        src = source_tree(tmp_path)
        for _ in range(2):
            failed = unreachable_backup(redis_url, "alpha", src)
            assert failed.returncode == 9, failed.stderr
        support.wait_for(lambda: len(sink.events("/hook")) >= 1, 30, "the failure notice")
        ok = support.run_backup(redis_url, "alpha", src)
        assert ok.returncode == 0, ok.stderr
        support.wait_for(lambda: sink.paths("/ping/alpha").count("/ping/alpha") >= 1
                         and len(sink.events("/hook")) >= 2 and len(relay.mails) >= 2,
                         30, "the recovery notice, mail and success ping")
        # another client's request for the name, now registered: refused,
        # and it neither pings /start nor counts as a failure (issue 11)
        intruder = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "intruder")}
        forged = support.run_backup(redis_url, "alpha", src, env=intruder)
        assert forged.returncode == 4, forged.stderr
        time.sleep(3)  # anything more would have been queued by now
        events = sink.events("/hook")
        assert conditions(events) == [("failed", "failed"), ("recovered", "failed")], events
        failure, recovery = events
        assert set(failure) >= {"event", "name", "snapshot", "reason", "exit_code", "time",
                                "host", "schema"}
        assert failure["name"] == "alpha" and failure["exit_code"] == 9
        assert failure["snapshot"] is None and "ssh" in failure["reason"].lower()
        datetime.datetime.fromisoformat(failure["time"])
        assert recovery["exit_code"] == 0
        assert [recovery["snapshot"]] == [p.name for p in support.snapshots(storage, "alpha")]
        assert collections.Counter(sink.paths("/ping/alpha")) == {
            "/ping/alpha/start": 3, "/ping/alpha/fail": 2, "/ping/alpha": 1}
        # mail: two, through TLS with the right login, with the notice inside
        assert relay.logins and all(ok for _, ok in relay.logins)
        mails = [email.message_from_bytes(m, policy=email.policy.default) for m in relay.mails]
        assert sorted(str(m["Subject"]) for m in mails) == ["bakgrab: alpha: failed",
                                                            "bakgrab: alpha: recovered"]
        assert {(m["From"], m["To"]) for m in mails} == {("backup@example.com",
                                                          "ops@example.com")}
        bodies = {str(m["Subject"]): m.get_content().replace("\r\n", "\n")  # type: ignore[attr-defined]
                  for m in mails}
        assert bodies["bakgrab: alpha: failed"].startswith("the last grab of alpha failed")
        recovered = bodies["bakgrab: alpha: recovered"]
        assert json.loads(recovered[recovered.index("{"):]) == recovery
        # no secret anywhere
        blobs = {"webhooks": b"\n".join(h.body for h in sink.hits),
                 "mails": b"\n".join(relay.mails), "worker log": worker.log.read_bytes(),
                 "argv": argv_of(worker.pid), "broker": everything_in_redis(redis_url)}
        for where, blob in blobs.items():
            assert relay.password.encode() not in blob, where
            for marker in support.KEY_MARKERS:
                assert marker.encode() not in blob, where
        assert b"bakgrab.notify" in worker.log.read_bytes()  # the deliveries ran as tasks
    finally:
        worker.stop()


def test_a_target_that_is_down_gets_the_notice_later_and_never_holds_a_grab(
        tmp_path: Path, redis_url: str, storage: Path, sink: Sink) -> None:
    """A webhook that answers 503 twice gets the same notice on the third
    attempt (retried with backoff), while a target that refuses connections
    is given up after notify_retries; the grabs meanwhile end as they would
    without notices (exit 9, then exit 0 with a snapshot), and the dead
    target's URL path (its token) is never logged."""
    sink.failing = 2
    dead = f"http://127.0.0.1:{support.free_port()}/hook/TOKEN-{secrets.token_hex(8)}"
    env = support.worker_env(max_retries="0", notify_backoff="0.3", notify_retries="3",
                             notify=f"{sink.url}/hook,{dead}")
    worker = support.start_worker(storage, redis_url, tmp_path / "worker.log", env=env)
    try:
        src = source_tree(tmp_path)
        started = time.monotonic()
        failed = unreachable_backup(redis_url, "alpha", src)
        assert failed.returncode == 9, failed.stderr
        # The grab ended while its notice is still being retried. The next
        # grab starts once that notice is through: notices of one name are
        # separate tasks, and a recovery sent while the failure's notice
        # waits out its backoff arrives first (seen once under pytest-xdist;
        # an open problem of the notifier, not of this test's subject).
        support.wait_for(lambda: len(sink.events("/hook")) >= 1, 60,
                         "the failure's notice, on its third attempt")
        ok = support.run_backup(redis_url, "alpha", src)
        assert ok.returncode == 0, ok.stderr
        assert time.monotonic() - started < 90
        assert len(support.snapshots(storage, "alpha")) == 1
        support.wait_for(lambda: len(sink.events("/hook")) >= 2, 60, "both notices")
        support.wait_for(lambda: worker.text().count("given up after 4 attempt(s)") >= 2,
                         60, "the dead target given up for both notices")
        with sink.lock:
            posts = [h for h in sink.hits if h.path.startswith("/hook")]
        refused = [h for h in posts if h.path.endswith("#refused")]
        assert len(refused) == 2
        first = [h for h in posts if h.json()["event"] == "failed"]
        assert len(first) == 3 and len({h.body for h in first}) == 1, first
        assert conditions(sink.events("/hook")) == [("failed", "failed"),
                                                    ("recovered", "failed")]
        assert dead.rsplit("/", 1)[1] not in worker.text()
        assert "notice to http://127.0.0.1:" in worker.text()
    finally:
        worker.stop()


def test_beat_finds_a_stale_name_without_any_client_and_metrics_show_it(
        tmp_path: Path, redis_url: str, storage: Path, sink: Sink) -> None:
    """After one real grab, `bakgrab scheduler` (Celery beat) triggers stale
    checks; once the name's success is older than stale_after the worker
    sends one ``stale`` notice, with no client action, and no second one on
    later checks; /metrics, scraped over HTTP, flips bakgrab_stale from 0
    to 1; a second scheduler for the storage is refused (exit 7); the next
    grab sends the recovery and /metrics shows the name fresh again."""
    stale_after = "6s"
    env = support.worker_env(notify=f"{sink.url}/hook", stale_after=stale_after)
    worker = support.start_worker(storage, redis_url, tmp_path / "worker.log", env=env)
    scheduler = None
    try:
        src = source_tree(tmp_path)
        ok = support.run_backup(redis_url, "alpha", src)
        assert ok.returncode == 0, ok.stderr
        port = support.free_port()
        argv = [support.BAKGRAB, "scheduler", "--storage", str(storage), "--broker", redis_url,
                "--stale-check-every", "1s", "--stale-after", stale_after,
                "--metrics-listen", f"127.0.0.1:{port}"]
        scheduler = support.Proc(argv, tmp_path / "scheduler.log", env=env)
        support.wait_for(lambda: support.port_open(port) or not scheduler.alive(), 30,
                         "the scheduler's /metrics")
        assert scheduler.alive(), scheduler.text()
        fresh = scrape(port)
        assert fresh['bakgrab_stale{name="alpha"}'] == 0
        assert fresh['bakgrab_last_success_bytes{name="alpha"}'] == 4096 + len("alpha\n")
        assert sink.events("/hook") == []
        support.wait_for(lambda: sink.events("/hook"), 30, "the stale notice")
        stale = scrape(port)
        assert stale['bakgrab_stale{name="alpha"}'] == 1
        assert (stale['bakgrab_last_success_timestamp_seconds{name="alpha"}']
                == fresh['bakgrab_last_success_timestamp_seconds{name="alpha"}'])
        checks = worker.text().count(notify.STALE_CHECK)
        support.wait_for(lambda: worker.text().count(notify.STALE_CHECK) >= checks + 6, 30,
                         "more stale checks")
        [event] = sink.events("/hook")
        assert (event["event"], event["name"]) == ("stale", "alpha")
        assert "stale_after = 6s" in event["reason"]
        second = subprocess.run(argv[:-2], capture_output=True, text=True, timeout=60, env=env)
        assert second.returncode == 7, second.stderr
        assert "another scheduler" in second.stderr
        assert scheduler.alive()
        again = support.run_backup(redis_url, "alpha", src)
        assert again.returncode == 0, again.stderr
        support.wait_for(lambda: len(sink.events("/hook")) >= 2, 30, "the recovery")
        assert conditions(sink.events("/hook")) == [("stale", "stale"), ("recovered", "stale")]
        assert scrape(port)['bakgrab_stale{name="alpha"}'] == 0
    finally:
        if scheduler is not None:
            scheduler.stop()
        worker.stop()


def test_damage_found_by_verify_is_told_once_by_the_scheduled_check(
        tmp_path: Path, redis_url: str, storage: Path, sink: Sink) -> None:
    """A stored file changed behind bakgrab's back, found by a real `bakgrab
    verify` (exit 14), is told once as ``damaged`` by the beat-driven check,
    naming the snapshot; later checks send nothing more; /metrics shows the
    bad file and the verify's time (status's own metrics, issue 15)."""
    port = support.free_port()
    env = support.worker_env(notify=f"{sink.url}/hook", stale_check_every="1s",
                             metrics_listen=f"127.0.0.1:{port}")
    worker = support.start_worker(storage, redis_url, tmp_path / "worker.log", "--beat",
                                  env=env)
    try:
        ok = support.run_backup(redis_url, "alpha", source_tree(tmp_path))
        assert ok.returncode == 0, ok.stderr
        [snap] = support.snapshots(storage, "alpha")
        stored = snap / "data.bin"
        data = bytearray(stored.read_bytes())
        data[100] ^= 0xFF
        with open(stored, "r+b") as f:  # same inode, same size: only a re-read can tell
            f.write(data)
        verify = subprocess.run([support.BAKGRAB, "verify", "--storage", str(storage)],
                                capture_output=True, text=True, timeout=120, env=env)
        assert verify.returncode == 14, verify.stdout + verify.stderr
        support.wait_for(lambda: sink.events("/hook"), 30, "the damage notice")
        checks = worker.text().count(notify.STALE_CHECK)
        support.wait_for(lambda: worker.text().count(notify.STALE_CHECK) >= checks + 4, 30,
                         "more checks")
        [event] = sink.events("/hook")
        assert (event["event"], event["name"], event["snapshot"]) == ("damaged", "alpha",
                                                                      snap.name)
        assert f"{snap.name} (1 file(s))" in event["reason"]
        metrics = scrape(port)
        assert metrics['bakgrab_damaged_files{name="alpha"}'] == 1
        assert metrics['bakgrab_last_verify_timestamp_seconds{name="alpha"}'] > time.time() - 300
    finally:
        worker.stop()


def test_worker_beat_embedded_tells_of_a_name_that_never_succeeded(
        tmp_path: Path, redis_url: str, storage: Path, sink: Sink) -> None:
    """`bakgrab worker --beat` runs the schedule itself: a name whose only
    grab failed is told as failed, then as stale by the next check; a
    standalone scheduler is refused while it runs."""
    port = support.free_port()
    env = support.worker_env(notify=f"{sink.url}/hook", max_retries="0",
                             stale_check_every="1s", metrics_listen=f"127.0.0.1:{port}")
    worker = support.start_worker(storage, redis_url, tmp_path / "worker.log", "--beat",
                                  env=env)
    try:
        failed = unreachable_backup(redis_url, "beta", source_tree(tmp_path))
        assert failed.returncode == 9, failed.stderr
        support.wait_for(lambda: len(sink.events("/hook")) >= 2, 30, "failed and stale")
        assert sorted(conditions(sink.events("/hook"))) == [("failed", "failed"),
                                                            ("stale", "stale")]
        assert {e["name"] for e in sink.events("/hook")} == {"beta"}
        metrics = scrape(port)
        assert metrics['bakgrab_stale{name="beta"}'] == 1
        assert metrics['bakgrab_failures_total{name="beta"}'] == 1
        assert not any("bakgrab_last_success_timestamp" in k for k in metrics)
        second = subprocess.run([support.BAKGRAB, "scheduler", "--storage", str(storage),
                                 "--broker", redis_url], capture_output=True, text=True,
                                timeout=60, env=env)
        assert second.returncode == 7, second.stderr
    finally:
        worker.stop()


def test_no_space_is_told_once_and_its_recovery(
        tmp_path: Path, redis_url: str, storage: Path, sink: Sink) -> None:
    """A worker whose cleanup cannot free min_free_abs fails each grab with
    exit 6: one ``no_space`` notice for two grabs, the worker's message as
    the reason; a worker with room then grabs, and ``recovered`` follows."""
    env = support.worker_env(notify=f"{sink.url}/hook", max_retries="0",
                             min_free_abs="1000T")
    worker = support.start_worker(storage, redis_url, tmp_path / "worker.log", env=env)
    src = source_tree(tmp_path)
    try:
        for _ in range(2):
            refused = support.run_backup(redis_url, "alpha", src)
            assert refused.returncode == 6, refused.stderr
        support.wait_for(lambda: sink.events("/hook"), 30, "the no-space notice")
    finally:
        worker.stop()
    worker = support.start_worker(storage, redis_url, tmp_path / "worker2.log",
                                  env=env | {"BAKGRAB_MIN_FREE_ABS": "1M"})
    try:
        ok = support.run_backup(redis_url, "alpha", src)
        assert ok.returncode == 0, ok.stderr
        support.wait_for(lambda: len(sink.events("/hook")) >= 2, 30, "the recovery")
        time.sleep(2)
        events = sink.events("/hook")
        assert conditions(events) == [("no_space", "no_space"), ("recovered", "no_space")]
        assert events[0]["exit_code"] == 6 and "min_keep" in events[0]["reason"]
    finally:
        worker.stop()


def test_a_redelivered_job_that_failed_for_good_is_dropped(
        tmp_path: Path, redis_url: str, storage: Path, sink: Sink) -> None:
    """A worker stopped between a job's final failure and its ack: the broker
    delivers the job again (Redis restores unacked messages). The job is
    dropped, not run: no second failure record, no ``failed`` notice (its
    client has its outcome and is gone), and the message is acked; a real
    grab after it still recovers the name. (A CI run caught the false notice
    when the worker's stop fell into that window.)"""
    from tests.integration.test_faults import finish, start_client
    from tests.integration.test_outcomes import message_id, publish_request_key, redeliver

    env = support.worker_env(notify=f"{sink.url}/hook", max_retries="0",
                             min_free_abs="1000T")
    src = source_tree(tmp_path)
    publish_request_key(redis_url, storage)
    client = start_client(redis_url, "alpha", src)
    r = redis.Redis.from_url(redis_url)
    try:
        raw = bytes(support.wait_for(lambda: r.lindex("bakgrab", 0), 30, "the job queued"))
        worker = support.start_worker(storage, redis_url, tmp_path / "worker.log", env=env)
        try:
            code, _, err = finish(client)
            assert code == 6, err
            support.wait_for(lambda: sink.events("/hook"), 30, "the no-space notice")
        finally:
            worker.stop()
    finally:
        client.kill()
        client.wait()
    failures = storage / ".bakgrab" / "failures" / "alpha"
    assert len(failures.read_text().splitlines()) == 1
    worker = support.start_worker(storage, redis_url, tmp_path / "worker2.log",
                                  env=env | {"BAKGRAB_MIN_FREE_ABS": "1M"})
    try:
        redeliver(redis_url, raw)
        dropped = f"job {message_id(raw)} of alpha already failed for good"
        support.wait_for(lambda: dropped in worker.text(), 30, "the redelivery dropped")
        support.wait_for(lambda: r.llen("bakgrab") == 0 and not r.hlen("unacked"), 30,
                         "the redelivery acked")
        assert len(failures.read_text().splitlines()) == 1
        assert support.snapshots(storage, "alpha") == []
        ok = support.run_backup(redis_url, "alpha", src)
        assert ok.returncode == 0, ok.stderr
        support.wait_for(lambda: len(sink.events("/hook")) >= 2, 30, "the recovery")
        time.sleep(2)
        assert conditions(sink.events("/hook")) == [("no_space", "no_space"),
                                                    ("recovered", "no_space")]
    finally:
        worker.stop()


@pytest.mark.root
def test_a_partial_snapshot_is_told_once_and_a_complete_one_ends_it(
        tmp_path: Path, shared_tmp: Path, redis_url: str, storage: Path, sink: Sink) -> None:
    """A client that cannot read one of its files (rsync exit 23) makes
    partial snapshots: one ``partial`` notice for two of them, naming the
    snapshot, exit code 1; the name's ping URL gets the success ping each
    time (the snapshot is published); once the file is readable the next,
    complete snapshot sends ``recovered``."""
    need_root()
    env = support.worker_env(notify=f"{sink.url}/hook",
                             notify_ping=f"part={sink.url}/ping/part")
    worker = support.start_worker(storage, redis_url, tmp_path / "worker.log", env=env)
    name = "bkn" + secrets.token_hex(3)
    try:
        with support.throwaway_user(name, shared_tmp / "home") as user:
            src, client_env = support.unreadable_tree(shared_tmp, user)
            for _ in range(2):
                done = support.run_backup(redis_url, "part", src, env=client_env, user=name)
                assert done.returncode == 1, done.stderr
            support.wait_for(lambda: sink.events("/hook"), 30, "the partial notice")
            os.chmod(src / "root-only", 0o644)
            done = support.run_backup(redis_url, "part", src, env=client_env, user=name)
            assert done.returncode == 0, done.stderr
            support.wait_for(lambda: len(sink.events("/hook")) >= 2
                             and len(sink.paths("/ping/part")) >= 6, 30, "the recovery")
            time.sleep(2)
        events = sink.events("/hook")
        assert conditions(events) == [("partial", "partial"), ("recovered", "partial")]
        snaps = [p.name for p in support.snapshots(storage, "part")]
        assert events[0]["snapshot"] == snaps[0] and events[0]["exit_code"] == 1
        assert events[1]["snapshot"] == snaps[2] and events[1]["exit_code"] == 0
        assert collections.Counter(sink.paths("/ping/part")) == {"/ping/part/start": 3,
                                                                 "/ping/part": 3}
    finally:
        worker.stop()


def test_the_worker_tells_when_it_comes_back_after_a_crash(
        tmp_path: Path, redis_url: str, storage: Path, sink: Sink) -> None:
    """A worker killed with SIGKILL leaves its marker; the next start sends
    one ``worker_restarted`` notice; a clean stop and start sends none."""
    env = support.worker_env(notify=f"{sink.url}/hook")
    first = support.start_worker(storage, redis_url, tmp_path / "w1.log", env=env)
    first.signal(9)
    first.stop()
    second = support.start_worker(storage, redis_url, tmp_path / "w2.log", env=env)
    try:
        support.wait_for(lambda: sink.events("/hook"), 30, "the restart notice")
        [event] = sink.events("/hook")
        assert event["event"] == "worker_restarted" and event["name"] is None
        assert str(first.pid) in event["reason"]
        # acked before the stop: a delivery cut short is redelivered (at least once)
        support.wait_for(lambda: re.search(r"bakgrab\.notify\[.*\] succeeded", second.text()),
                         30, "the delivery acked")
    finally:
        second.stop()
    third = support.start_worker(storage, redis_url, tmp_path / "w3.log", env=env)
    try:
        time.sleep(3)
        assert len(sink.events("/hook")) == 1
    finally:
        third.stop()


def forged(task: str, kwargs: dict[str, Any], queue: str) -> bytes:
    """A protocol-2 message as a client would hand-craft it (no MAC)."""
    task_id = str(uuid.uuid4())
    body = [[], kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    return json.dumps({
        "body": base64.b64encode(json.dumps(body).encode()).decode(),
        "content-encoding": "utf-8", "content-type": "application/json",
        "headers": {"lang": "py", "task": task, "id": task_id, "shadow": None, "eta": None,
                    "expires": None, "group": None, "retries": 0, "timelimit": [None, None],
                    "root_id": task_id, "parent_id": None, "argsrepr": "()",
                    "kwargsrepr": "{}", "origin": "gen1@client"},
        "properties": {"correlation_id": task_id, "reply_to": str(uuid.uuid4()),
                       "delivery_mode": 2, "priority": 0, "body_encoding": "base64",
                       "delivery_info": {"exchange": "", "routing_key": queue},
                       "delivery_tag": str(uuid.uuid4())}}).encode()


def test_a_forged_notify_from_a_client_credential_is_not_run(
        tmp_path: Path, redis_url: str, storage: Path, sink: Sink) -> None:
    """With the deploy's client ACL (deploy/backup-host/acl.sh), a client
    cannot write the internal queue at all (NOPERM); a bakgrab.notify it
    pushes onto the client queue, naming a real target, is dropped by the
    worker; so is an unsigned one on the internal queue (pushed with the
    worker's own credential); a notice the worker itself sends still
    arrives (the target works)."""
    rules = subprocess.run(
        ["bash", "-c", f'source "{support.REPO}/deploy/backup-host/acl.sh"; '
                       f'acl_client_rules {QUEUE}'],
        capture_output=True, text=True, check=True, timeout=30).stdout
    password = secrets.token_hex(16)
    admin = redis.Redis.from_url(redis_url)
    admin.execute_command("ACL", "SETUSER", "client-alpha", "on", f">{password}",
                          *rules.split())
    env = support.worker_env(notify=f"{sink.url}/hook")
    worker = support.start_worker(storage, redis_url, tmp_path / "worker.log", env=env)
    try:
        target = notify.Target("webhook", f"{sink.url}/hook").id
        kwargs = {"target": target, "event": notify.notice("failed", "alpha",
                                                           reason="FORGED")}
        client = redis.Redis.from_url(redis_url.replace("redis://",
                                                        f"redis://client-alpha:{password}@"))
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.lpush(INTERNAL, forged(notify.NOTIFY, kwargs, INTERNAL))
        client.lpush(QUEUE, forged(notify.NOTIFY, kwargs, QUEUE))
        admin.lpush(INTERNAL, forged(notify.NOTIFY, kwargs, INTERNAL))
        support.wait_for(lambda: worker.text().count("dropped a message") >= 2, 30,
                         "both forged messages dropped")
        assert "is not run for clients" in worker.text()
        assert "not made by this worker" in worker.text()
        assert admin.llen(QUEUE) == 0 and admin.llen(INTERNAL) == 0
        # a real notice still goes through: a crash-restart of this worker
        worker.signal(9)
        worker.stop()
        worker = support.start_worker(storage, redis_url, tmp_path / "worker2.log", env=env)
        support.wait_for(lambda: sink.events("/hook"), 30, "the worker's own notice")
        time.sleep(2)
        assert [e["event"] for e in sink.events("/hook")] == ["worker_restarted"]
        assert "FORGED" not in json.dumps(sink.events("/hook"))
    finally:
        worker.stop()

"""The client's wait for its job on a real redis-server (bakgrab.client.broker, issue 19).

The client reads its job's states without Celery, so what Celery's result
consumer did for it is held here, with the worker's side played by hand
(``PUBLISH``/``SET`` of the states Celery's backend stores): progress in
order, a result stored while the client was cut off read after it comes
back, a broker that stops answering noticed by a ping, and given up on.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from bakgrab.client import broker
from bakgrab.tasks.errors import ClientSetupError, NoSpace
from tests import support

pytestmark = pytest.mark.integration


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[support.Proc, str]]:
    proc, url = support.start_redis(tmp_path / "redis")
    try:
        yield proc, url
    finally:
        proc.stop()


def meta(status: str, result: Any) -> str:
    return json.dumps({"status": status, "result": result, "traceback": None,
                       "children": [], "date_done": None, "task_id": "t"})


def test_progress_then_the_result(server: tuple[support.Proc, str]) -> None:
    """States published after the job was sent reach on_state in order; the
    final one ends the wait with its value; the job was queued after the
    subscription (the worker skips a job nobody waits for)."""
    _, url = server
    r = redis.Redis.from_url(url)
    task_id = str(uuid.uuid4())
    key = broker.RESULT_PREFIX + task_id
    seen: list[Any] = []
    with broker.Broker(url, "test") as link, \
            link.sending("bakgrab.grab", task_id, {"v": 1}, "q", "{}") as watch:
        assert r.pubsub_numsub(key) == [(key.encode(), 1)]
        assert json.loads(r.lindex("q", 0))["headers"]["id"] == task_id
        for i in range(3):
            r.publish(key, meta("PROGRESS", {"bytes": i}))
        r.publish(key, meta("SUCCESS", {"snapshot": "s"}))
        assert watch.wait(30, lambda m: seen.append(m["result"])) == {"snapshot": "s"}
    assert seen == [{"bytes": 0}, {"bytes": 1}, {"bytes": 2}]
    assert r.pubsub_numsub(key) == [(key.encode(), 0)]


def test_a_failure_stored_before_the_wait_is_read(server: tuple[support.Proc, str]) -> None:
    """A final state already in the result key (the job ended before we
    listened) ends the wait: here the worker's NoSpace, rebuilt."""
    _, url = server
    task_id = str(uuid.uuid4())
    r = redis.Redis.from_url(url)
    with broker.Broker(url, "test") as link, \
            link.sending("bakgrab.grab", task_id, {"v": 1}, "q", "{}") as watch:
        r.set(broker.RESULT_PREFIX + task_id, meta("FAILURE", {
            "exc_type": "NoSpace", "exc_module": "bakgrab.tasks.errors",
            "exc_message": ["storage full"]}))
        with pytest.raises(NoSpace, match="storage full"):
            watch.wait(30, lambda m: None)


def test_a_result_stored_while_redis_was_down_is_read_when_it_is_back(tmp_path: Path) -> None:
    """Redis restarted mid-wait, after a progress state (its published state
    lost with the old process): the client reconnects, subscribes again and
    reads the key."""
    port = support.free_port()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(tmp_path)]
    first = support.Proc(argv, tmp_path / "redis1.log")
    second = None
    url = f"redis://127.0.0.1:{port}/0"
    task_id = str(uuid.uuid4())
    outcome: list[Any] = []
    seen: list[Any] = []
    try:
        support.wait_for(lambda: support.port_open(port), 10, "redis")
        with broker.Broker(url, "test") as link, \
                link.sending("bakgrab.grab", task_id, {"v": 1}, "q", "{}") as watch:
            waiter = threading.Thread(target=lambda: outcome.append(
                capture(lambda: watch.wait(60, seen.append))), daemon=True)
            waiter.start()
            redis.Redis.from_url(url).publish(broker.RESULT_PREFIX + task_id,
                                              meta("PROGRESS", {"bytes": 1}))
            support.wait_for(lambda: seen, 10, "the progress state")
            first.stop()
            time.sleep(1)
            second = support.Proc(argv, tmp_path / "redis2.log")
            support.wait_for(lambda: support.port_open(port), 10, "redis again")
            redis.Redis.from_url(url).set(broker.RESULT_PREFIX + task_id,
                                          meta("SUCCESS", {"snapshot": "after"}))
            waiter.join(30)
            assert not waiter.is_alive(), "the wait did not end"
        assert outcome == [{"snapshot": "after"}]
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_a_quiet_healthy_broker_is_kept(server: tuple[support.Proc, str],
                                        monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture) -> None:
    """Long silences (a grab of hours sends few states) are bridged by pings
    that are answered: the connection is never taken for lost."""
    _, url = server
    monkeypatch.setattr(broker, "PING_EVERY", 0.3)
    monkeypatch.setattr(broker, "PONG_WITHIN", 0.5)
    task_id = str(uuid.uuid4())
    r = redis.Redis.from_url(url)
    pings_before = ping_calls(r)
    with broker.Broker(url, "test") as link, \
            link.sending("bakgrab.grab", task_id, {"v": 1}, "q", "{}") as watch:
        timer = threading.Timer(3.0, r.publish, (broker.RESULT_PREFIX + task_id,
                                                 meta("SUCCESS", {"snapshot": "late"})))
        timer.start()
        try:
            assert watch.wait(30, lambda m: None, poll=0.1) == {"snapshot": "late"}
        finally:
            timer.cancel()
    assert "lost the broker connection" not in caplog.text
    assert ping_calls(r) - pings_before >= 3


def ping_calls(r: redis.Redis) -> int:
    stats = r.info("commandstats").get("cmdstat_ping", {})
    return int(stats.get("calls", 0)) if isinstance(stats, dict) else 0


def capture(fn: Any) -> Any:
    """``fn()``, or the exception it raised (a thread's outcome, for its test)."""
    try:
        return fn()
    except BaseException as e:
        return e


def test_a_broker_that_stops_answering_is_given_up(server: tuple[support.Proc, str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A frozen Redis (its socket open, as behind a stuck tunnel) is noticed by
    the ping after a silence and, not coming back, given up on with exit 10's
    ClientSetupError, within ping + pong + reconnect windows (shortened here)."""
    proc, url = server
    monkeypatch.setattr(broker, "PING_EVERY", 1.0)
    monkeypatch.setattr(broker, "PONG_WITHIN", 1.0)
    monkeypatch.setattr(broker, "RECONNECT_FOR", 2.0)
    monkeypatch.setattr(broker, "COMMAND_TIMEOUT", 1.0)
    with broker.Broker(url, "test") as link, \
            link.sending("bakgrab.grab", str(uuid.uuid4()), {"v": 1}, "q", "{}") as watch:
        proc.signal(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(ClientSetupError, match="lost the connection to the broker"):
                watch.wait(60, lambda m: None)
            took = time.monotonic() - t0
        finally:
            proc.signal(signal.SIGCONT)
    assert 2.0 <= took < 15, took


def test_password_user_and_database_of_the_url(tmp_path: Path) -> None:
    """``redis://:PASSWORD@HOST:PORT/DB`` authenticates and selects the
    database; a wrong password is a ClientSetupError that does not show it;
    URL options are refused, not ignored."""
    proc, url = support.start_redis(tmp_path / "redis", ["--requirepass", "s3cret-pw"])
    try:
        port = url.rsplit(":", 1)[1].split("/")[0]
        redis.Redis(port=int(port), password="s3cret-pw", db=3).set("k", "in db 3")
        with broker.Broker(f"redis://:s3cret-pw@127.0.0.1:{port}/3", "shown") as link:
            assert link.get("k") == b"in db 3"
        with broker.Broker(f"redis://default:s3cret-pw@127.0.0.1:{port}/0", "shown") as link:
            assert link.get("k") is None
        for bad in (f"redis://:wrong-pw@127.0.0.1:{port}/0",
                    f"redis://:s3cret-pw@127.0.0.1:{port}/0?ssl_cert_reqs=none",
                    f"redis://:s3cret-pw@127.0.0.1:{port}/x"):
            with broker.Broker(bad, "shown") as link, \
                    pytest.raises(ClientSetupError) as caught:
                link.get("k")
            assert "pw" not in str(caught.value), caught.value
            assert "broker shown" in str(caught.value) or "the broker shown" in str(caught.value)
    finally:
        proc.stop()


@pytest.mark.parametrize("reply", [
    b"$999999999999\r\n",                   # a bulk larger than the client reads
    b"*100000000\r\n" + b":1\r\n" * 1000,   # an array without end
    b"+" + b"x" * (1 << 20),                # a line without end
    b"?what\r\n",                            # not RESP
    b"$12x\r\n",                              # not a length
    b":" + b"9" * 30 + b"\r\n",               # not a number the client reads
])
def test_a_hostile_broker_is_cut_off(reply: bytes) -> None:
    """A peer that answers GET with an endless or malformed reply is a lost
    connection (ClientSetupError), read within bounds, not buffered."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(1024)
                with contextlib.suppress(OSError):
                    conn.sendall(reply)
                    time.sleep(2)

        server_thread = threading.Thread(target=serve, daemon=True)
        server_thread.start()
        with broker.Broker(f"redis://127.0.0.1:{port}/0", "hostile") as link, \
                pytest.raises(ClientSetupError, match="cannot reach the broker hostile"):
            link.get("k")
        server_thread.join(10)


def test_rediss_checks_the_brokers_certificate(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """``rediss://`` speaks TLS to a real TLS redis-server: with its CA among
    the trusted ones (here by SSL_CERT_FILE) it works; without, the client
    refuses the certificate (ClientSetupError), sending nothing."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp_path, capture_output=True, check=True,
                       timeout=60)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=bakgrab test CA")
    openssl("req", *ec, "-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=127.0.0.1")
    (tmp_path / "ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "srv.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "srv.crt", "-days", "2", "-extfile", "ext")
    port = support.free_port()
    proc = support.Proc(["redis-server", "--port", "0", "--tls-port", str(port), "--bind",
                         "127.0.0.1", "--tls-cert-file", str(tmp_path / "srv.crt"),
                         "--tls-key-file", str(tmp_path / "srv.key"), "--tls-ca-cert-file",
                         str(tmp_path / "ca.crt"), "--tls-auth-clients", "no", "--save", "",
                         "--appendonly", "no", "--dir", str(tmp_path)], tmp_path / "redis.log")
    try:
        support.wait_for(lambda: support.port_open(port), 10, "redis-server with TLS")
        url = f"rediss://127.0.0.1:{port}/0"
        with broker.Broker(url, "tls") as link, pytest.raises(ClientSetupError,
                                                             match="CERTIFICATE_VERIFY_FAILED"):
            link.get("k")
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.crt"))
        with broker.Broker(url, "tls") as link:
            assert link.get("k") is None
            link.connection().call("SET", "k", "v")
            assert link.get("k") == b"v"
    finally:
        proc.stop()

"""Notification targets, states, payloads and the internal queue's admission (issue 17)."""

from __future__ import annotations

import base64
import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from bakgrab.tasks import GRAB, config
from bakgrab.tasks.errors import ConfigError
from bakgrab.worker import metrics, notify, transport
from bakgrab.worker.storage import Storage

KEY = b"k" * 32
POLICY = transport.Policy(max_message_bytes=1 << 20, mac_key=KEY,
                          internal_queue="bakgrab@internal",
                          internal_tasks=notify.INTERNAL_TASKS)


def settings(**values: Any) -> config.Settings:
    return config.load(values, os.devnull, environ={})


def test_targets_are_checked_and_shown_without_their_secret_parts() -> None:
    """Webhooks and mail parse; a URL's path, query and password never show
    (a webhook URL often holds its token)."""
    s = settings(notify="https://u:pw@hooks.example.com:8443/T0KEN?x=1, mailto:ops@example.com",
                 smtp_host="relay.example.com")
    hook, mail = notify.targets(s)
    assert (hook.kind, mail.kind, mail.address) == ("webhook", "mail", "ops@example.com")
    assert hook.shown == "https://hooks.example.com:8443/…"
    assert "T0KEN" not in repr(hook) and "pw" not in hook.shown
    assert hook.id != mail.id and len(hook.id) == 20


@pytest.mark.parametrize(("value", "error"), [
    ("ftp://x/y", "use https://"),
    ("mailto:a@b,mailto:", "one address"),
    ("http:///nohost", "with a host"),
])
def test_bad_targets_are_refused(value: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        notify.targets(settings(notify=value, smtp_host="relay"))


def test_mail_needs_a_relay() -> None:
    with pytest.raises(ConfigError, match="smtp_host"):
        notify.targets(settings(notify="mailto:ops@example.com"))


def test_config_file_takes_a_list_and_a_ping_table(tmp_path: Path) -> None:
    """``notify`` as a TOML list, ``notify_ping`` as a table: the same
    settings as the comma-separated environment form."""
    path = tmp_path / "bakgrab.toml"
    path.write_text('[bakgrab]\nnotify = ["https://a.example/h", "http://b.example/h"]\n'
                    '[bakgrab.notify_ping]\nweb1 = "https://hc.example/abc"\n')
    from_file = config.load({}, path, environ={})
    from_env = config.load({}, os.devnull, environ={
        "BAKGRAB_NOTIFY": "https://a.example/h,http://b.example/h",
        "BAKGRAB_NOTIFY_PING": "web1=https://hc.example/abc"})
    assert (from_file.notify, from_file.notify_ping) == (from_env.notify, from_env.notify_ping)
    assert notify.pings(from_file)["web1"].address == "https://hc.example/abc"
    path.write_text('notify = [1]\n')
    with pytest.raises(ConfigError, match="notify"):
        config.load({}, path, environ={})


def test_the_smtp_password_is_not_in_the_settings_repr() -> None:
    assert "s3cret" not in repr(settings(smtp_password="s3cret"))


def test_password_file_must_be_private(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    path.write_text("s3cret\n")
    path.chmod(0o640)
    with pytest.raises(ConfigError, match="0600") as caught:
        notify.smtp_password(settings(smtp_password_file=str(path)))
    assert "s3cret" not in str(caught.value)
    path.chmod(0o600)
    assert notify.smtp_password(settings(smtp_password_file=str(path))) == "s3cret"


def test_states_change_once_per_change(tmp_path: Path) -> None:
    """Setting a condition that is already on reports nothing; turning it off
    reports the recovery; other conditions are kept."""
    storage = Storage(tmp_path)
    storage.state.mkdir()
    states = notify.States(storage)
    assert states.change("web1", {"failed": True}) == [("failed", True)]
    assert states.change("web1", {"failed": True}) == []
    assert states.change("web1", {"stale": True}) == [("stale", True)]
    assert states.change("web1", {"failed": False, "partial": False}) == [("failed", False)]
    assert states.read("web1") == {"failed": False, "partial": False, "stale": True}
    assert states.change("db", {"failed": False}) == []


def test_notice_payload_schema() -> None:
    event = notify.notice("failed", "web1", reason="x" * 1000, exit_code=9, now=0)
    assert set(event) == {"schema", "event", "condition", "name", "snapshot", "reason",
                          "exit_code", "time", "host", "summary"}
    assert event["time"] == "1970-01-01T00:00:00+00:00"
    assert len(event["reason"]) == notify.MAX_REASON
    recovered = notify.notice("recovered", "web1", condition="stale", reason="ok")
    assert recovered["summary"] == "web1 recovered (stale is over): ok"


def envelope(task: str, queue: str, *, kwargs: dict[str, Any], signed: bool) -> bytes:
    task_id = str(uuid.uuid4())
    body = [[], kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    headers: dict[str, Any] = {"lang": "py", "task": task, "id": task_id, "retries": 0,
                               "eta": None}
    if signed:
        headers[transport.MAC_HEADER] = transport.mac(KEY, task, task_id, 0, None, [], kwargs)
    return json.dumps({
        "body": base64.b64encode(json.dumps(body).encode()).decode(),
        "content-encoding": "utf-8", "content-type": "application/json", "headers": headers,
        "properties": {"body_encoding": "base64", "delivery_tag": "x"}}).encode()


def test_notify_runs_only_from_the_internal_queue_with_the_workers_mac() -> None:
    """On the client queue bakgrab.notify is refused even when signed; on the
    internal queue it needs the MAC, and a grab is refused there."""
    kwargs = {"target": "0" * 20, "event": {"event": "failed"}}
    for queue, task, signed, reason in [
        ("bakgrab", notify.NOTIFY, True, "not run for clients"),
        ("bakgrab@internal", notify.NOTIFY, False, "not made by this worker"),
        ("bakgrab@internal", GRAB, True, "does not send itself"),
    ]:
        with pytest.raises(transport.Refused, match=reason):
            transport.admit(envelope(task, queue, kwargs=kwargs, signed=signed), queue, POLICY)
    admitted = transport.admit(envelope(notify.NOTIFY, "bakgrab@internal", kwargs=kwargs,
                                        signed=True), "bakgrab@internal", POLICY)
    assert admitted["headers"]["task"] == notify.NOTIFY


@pytest.mark.parametrize("text", ["0.0.0.0:9464", "192.0.2.1:9464", "localhost:9464",
                                  "127.0.0.1", "127.0.0.1:99999"])
def test_metrics_listen_only_on_loopback(text: str) -> None:
    with pytest.raises(ConfigError, match="loopback"):
        metrics.listen_address(text)
    assert metrics.listen_address("[::1]:9464") == ("::1", 9464)


class Recorder:
    """Stands in for the Celery app: records what the notifier would queue."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def send_task(self, name: str, kwargs: dict[str, Any], queue: str) -> None:
        assert (name, queue) == (notify.NOTIFY, "bakgrab@internal")
        self.sent.append(kwargs)


class Grab:
    name = "bakgrab.grab"


def test_handlers_tell_outcomes_but_not_refused_requests(tmp_path: Path) -> None:
    """A refused request (InvalidRequest) sends nothing, not even a ping (the
    /start ping waits for grab_accepted, sent after the name's checks); a
    final failure sends the notice and /fail, NoSpace its own condition; a
    success the recovery of both; the queued message names the target by id."""
    from bakgrab.tasks.errors import NoSpace, RequestRefused, TransferInterrupted

    s = settings(storage=str(tmp_path), notify="https://hooks.example.com/T0KEN",
                 notify_ping="web1=https://hc.example/p")
    Storage(tmp_path).state.mkdir()
    app = Recorder()
    notifier = notify.Notifier(app, s)  # type: ignore[arg-type]
    fields = {"name": "web1", "key": "SEALED-KEY"}
    notifier.on_failure(sender=Grab(), exception=RequestRefused("no"), kwargs=fields)
    assert app.sent == []
    notifier.on_accepted(sender="web1", task_id="t1")  # what grab() sends once checked
    notifier.on_failure(sender=Grab(), exception=TransferInterrupted("down", 255), kwargs=fields)
    notifier.on_failure(sender=Grab(), exception=NoSpace("full"), kwargs=fields)
    notifier.on_success(sender=Grab(), result={"name": "web1", "snapshot": "web1.x",
                                               "partial": False})
    hook, ping = notify.targets(s)[0], notify.pings(s)["web1"]
    told = [(m["event"]["event"], m["event"]["condition"]) for m in app.sent
            if m["target"] == hook.id]
    assert told == [("failed", "failed"), ("no_space", "no_space"),
                    ("recovered", "failed"), ("recovered", "no_space")]
    assert [m["event"]["event"] for m in app.sent if m["target"] == ping.id] == [
        "start", "fail", "fail", "success"]
    assert "T0KEN" not in json.dumps(app.sent) and "SEALED-KEY" not in json.dumps(app.sent)


def test_a_new_name_is_not_stale_while_its_first_grab_runs(tmp_path: Path) -> None:
    """No snapshot, no failure and a young in-progress dir: the first grab
    runs; an old one, or one after a failure, is stale."""
    from bakgrab.worker import schedule, status

    storage = Storage(tmp_path).prepare()
    storage.inprogress("new").mkdir()
    first = status.NameStatus(name="new", stale=True, in_progress=True)
    assert schedule.first_grab_under_way(storage, first, 3600)
    assert not schedule.first_grab_under_way(storage, first, 0.0)
    failed = status.NameStatus(name="new", stale=True, in_progress=True, failures=1)
    assert not schedule.first_grab_under_way(storage, failed, 3600)
    os.utime(storage.inprogress("new"), (1, 1))
    assert not schedule.first_grab_under_way(storage, first, 3600)

"""Notices from the backup host: webhooks, mail and ping URLs (issue 17).

The worker learns each grab's outcome from Celery's signals (``task_success``,
``task_failure``) and that a grab was accepted from
:data:`bakgrab.worker.grab.grab_accepted` (only then a ``/start`` ping: a
request that fails its name's checks pings nothing), connected by :func:`install`, and the
stale check (:mod:`bakgrab.worker.schedule`) tells it which names went stale.
Each change of a name's state becomes a notice, delivered to every target by
its own ``bakgrab.notify`` task, so Flower shows each delivery, its retries
and its outcome. Invariants:

* **Once per change of state.** A name's conditions (``failed``,
  ``partial``, ``no_space``, ``stale``, ``damaged``) live under
  ``STORAGE/.bakgrab/notify-state/NAME.json``, changed under a flock: a
  notice goes out when a condition turns on, a ``recovered`` notice when it
  turns off, and nothing while it stays. Pings (healthchecks.io: ``/start``,
  success, ``/fail``) go out on every grab, as that convention expects.
* **Never in a grab's way.** Handlers only publish tasks, and swallow (log)
  every error; delivery runs later as its own task, with retries and
  exponential backoff, and its failure fails nothing else.
* **Only the backup host sends them.** Notifications travel on the internal
  queue ``QUEUE@internal`` (``@`` is never part of a configured queue name, so
  no client ACL names it, and clients may not write elsewhere), and the
  worker's transport admits a task there only with the worker's MAC
  (:mod:`bakgrab.worker.transport`); on the client queue ``bakgrab.notify``
  is refused like any other foreign task. A message names its target by an
  id, never a URL: even a forged one could reach only configured targets.
* **No secret leaves.** A payload holds the name, snapshot, event, a
  bakgrab error's message (never a secret, :mod:`bakgrab.tasks.errors`) and
  an exit code; logs and task results show a target as ``scheme://host/…``
  or ``mailto:ADDR``; the SMTP password is read from a 0600 file or the
  environment (then removed from it, so no child inherits it) and goes only
  to the relay, inside TLS unless ``smtp_security = "none"``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import email.message
import email.utils
import fcntl
import hashlib
import json
import logging
import os
import random
import re
import smtplib
import socket
import ssl
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from celery import Celery, Task
from celery.signals import (
    before_task_publish,
    celeryd_after_setup,
    task_failure,
    task_success,
    worker_ready,
    worker_shutdown,
)

from bakgrab.tasks import GRAB
from bakgrab.tasks.config import Settings
from bakgrab.tasks.errors import BakgrabError, ConfigError, InvalidRequest, NoSpace, exit_code_for
from bakgrab.tasks.request import check_name
from bakgrab.worker import transport
from bakgrab.worker.grab import grab_accepted
from bakgrab.worker.storage import Storage, write_atomic

log = logging.getLogger(__name__)

NOTIFY = "bakgrab.notify"
"""Task delivering one notice to one target (internal queue only)."""
STALE_CHECK = "bakgrab.stale_check"
PRUNE = "bakgrab.scheduled_prune"
VERIFY = "bakgrab.scheduled_verify"
"""A share of the stored files read and checked (issue 15)."""
"""The keep rules applied to every name, on the scheduler's clock (issue 16)."""
"""Task looking for stale names, sent by Celery beat (internal queue only)."""
INTERNAL_TASKS = frozenset({NOTIFY, STALE_CHECK, PRUNE, VERIFY})
SCHEMA = 1
"""Version of the webhook payload (docs/monitoring.md)."""
STATE_DIR = "notify-state"
CONDITIONS = ("failed", "partial", "no_space", "stale", "damaged")
"""A name's conditions; each turning on is a notice, turning off a recovery."""
MAX_REASON = 300
ADDRESS_RE = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9.-]+")
HOST = socket.gethostname()


def internal_queue(queue: str) -> str:
    """The backup host's own queue beside ``queue`` (no client may write it)."""
    return f"{queue}@internal"


class DeliveryFailed(BakgrabError):
    """A notice could not be delivered to a target (retried with backoff)."""

    transient = True


# -- targets ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Target:
    """Where notices go: ``webhook`` (URL), ``mail`` (address) or ``ping`` (URL of a name)."""

    kind: str
    address: str = dataclasses.field(repr=False)
    name: str | None = None

    @property
    def id(self) -> str:
        """What a task message carries instead of the URL (it may hold a token)."""
        text = f"{self.kind}\0{self.address}\0{self.name or ''}"
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    @property
    def shown(self) -> str:
        """A form safe for logs and Flower: no path, query or password."""
        if self.kind == "mail":
            return f"mailto:{self.address}"
        url = urllib.parse.urlsplit(self.address)
        host = url.hostname or "?"
        port = f":{url.port}" if url.port else ""
        where = f"{url.scheme}://{host}{port}/…"
        return f"ping {self.name} {where}" if self.kind == "ping" else where


def _check_url(text: str, what: str) -> str:
    url = urllib.parse.urlsplit(text)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError(f"{what}: an http:// or https:// URL with a host")
    return text


def targets(settings: Settings) -> list[Target]:
    """The ``notify`` targets, checked; ConfigError names a bad one by position."""
    out = []
    for i, text in enumerate(t.strip() for t in settings.notify.split(",")):
        if not text:
            continue
        what = f"notify target {i + 1}"
        if text.startswith("mailto:"):
            address = text.removeprefix("mailto:")
            if not ADDRESS_RE.fullmatch(address):
                raise ConfigError(f"{what}: mailto: takes one address (mailto:ops@example.com)")
            if not settings.smtp_host:
                raise ConfigError(f"{what}: mail needs smtp_host (the SMTP relay)")
            out.append(Target("mail", address))
        elif text.startswith(("http://", "https://")):
            out.append(Target("webhook", _check_url(text, what)))
        else:
            raise ConfigError(f"{what}: use https://..., http://... or mailto:ADDR")
    return out


def pings(settings: Settings) -> dict[str, Target]:
    """The ``notify_ping`` URLs by name."""
    out = {}
    for pair in (p.strip() for p in settings.notify_ping.split(",")):
        if not pair:
            continue
        name, sep, url = pair.partition("=")
        try:
            name = check_name(name.strip())
        except InvalidRequest:
            raise ConfigError(f"notify_ping: {name.strip()[:64]!r} is not a backup name") from None
        if not sep:
            raise ConfigError("notify_ping: NAME=URL pairs, comma-separated")
        out[name] = Target("ping", _check_url(url.strip(), f"notify_ping.{name}"), name)
    return out


# -- notices ------------------------------------------------------------------------

SUMMARIES = {
    "failed": "the last grab of {name} failed for good: {reason}",
    "partial": "the last grab of {name} made a partial snapshot {snapshot}: {reason}",
    "no_space": "the storage has no room for {name}: {reason}",
    "stale": "{name} has no successful snapshot within stale_after: {reason}",
    "damaged": "bakgrab verify found damaged files of {name}: {reason}",
    "recovered": "{name} recovered ({condition} is over): {reason}",
    "worker_restarted": "the worker on {host} is back after an unclean stop: {reason}",
}


def notice(event: str, name: str | None = None, *, condition: str | None = None,
           snapshot: str | None = None, reason: str = "", exit_code: int | None = None,
           now: float | None = None) -> dict[str, Any]:
    """The payload of a notice (the webhook's JSON, the mail's body)."""
    when = datetime.datetime.fromtimestamp(time.time() if now is None else now,
                                           datetime.UTC)
    reason = reason[:MAX_REASON]
    data = {"schema": SCHEMA, "event": event, "condition": condition or event,
            "name": name, "snapshot": snapshot, "reason": reason, "exit_code": exit_code,
            "time": when.isoformat(timespec="seconds"), "host": HOST}
    data["summary"] = SUMMARIES.get(event, "{event} {name}: {reason}").format(**data)
    return data


class States:
    """The per-name conditions under ``STORAGE/.bakgrab/notify-state``."""

    def __init__(self, storage: Storage) -> None:
        self.dir = storage.state / STATE_DIR

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.dir.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def read(self, name: str) -> dict[str, bool]:
        try:
            data = json.loads((self.dir / f"{name}.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return {k: v for k, v in data.items() if k in CONDITIONS and isinstance(v, bool)} \
            if isinstance(data, dict) else {}

    def change(self, name: str, conditions: Mapping[str, bool]) -> list[tuple[str, bool]]:
        """Set ``conditions`` of ``name``; the ones that changed, in CONDITIONS order."""
        with self.locked():
            old = self.read(name)
            changed = changes(old, conditions)
            if changed:
                write_atomic(self.dir / f"{name}.json",
                             json.dumps({**old, **dict(conditions)}, sort_keys=True))
            return changed


def changes(old: Mapping[str, bool], new: Mapping[str, bool]) -> list[tuple[str, bool]]:
    """The conditions whose value differs (a missing one is off)."""
    return [(c, new[c]) for c in CONDITIONS if c in new and bool(old.get(c)) != new[c]]


# -- delivery ---------------------------------------------------------------------

class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A webhook or ping is sent where it was configured, nowhere else."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


OPENER = urllib.request.build_opener(_NoRedirect)


def http_send(target: Target, url: str, data: bytes | None, timeout: float) -> None:
    """POST ``data`` (JSON) or GET ``url``; DeliveryFailed unless 2xx."""
    # the scheme is http or https: targets() and pings() refuse any other
    request = urllib.request.Request(  # noqa: S310
        url, data=data, method="POST" if data is not None else "GET",
        headers={"Content-Type": "application/json", "User-Agent": "bakgrab"})
    try:
        with OPENER.open(request, timeout=timeout) as response:
            response.read(65536)
            code = response.status
    except urllib.error.HTTPError as e:
        code = e.code
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise DeliveryFailed(f"{target.shown}: {type(reason).__name__}") from None
    if not 200 <= code < 300:
        raise DeliveryFailed(f"{target.shown}: HTTP {code}")


def smtp_password(settings: Settings) -> str:
    """The relay password: ``smtp_password_file`` (0600, owned by this user) or the setting."""
    if not settings.smtp_password_file:
        return settings.smtp_password
    path = Path(settings.smtp_password_file)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(f"smtp_password_file {path}: {e.strerror}") from None
    with os.fdopen(fd) as f:
        info = os.fstat(f.fileno())
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO) or info.st_uid != os.geteuid():
            raise ConfigError(f"smtp_password_file {path}: must be mode 0600 and owned by "
                              "the worker's user (chmod 600)")
        return f.read().strip()


def mail_send(settings: Settings, target: Target, event: Mapping[str, Any]) -> None:
    message = email.message.EmailMessage()
    sender = settings.smtp_from or f"bakgrab@{HOST}"
    message["From"], message["To"] = sender, target.address
    message["Subject"] = f"bakgrab: {event.get('name') or HOST}: {event.get('event')}"
    message["Date"] = email.utils.formatdate()
    message["Message-ID"] = email.utils.make_msgid("bakgrab")
    message.set_content(f"{event.get('summary', '')}\n\n{json.dumps(event, indent=2)}\n")
    context = ssl.create_default_context(cafile=settings.smtp_ca_file or None)
    timeout = settings.notify_timeout
    try:
        smtp: smtplib.SMTP
        if settings.smtp_security == "tls":
            smtp = smtplib.SMTP_SSL(settings.smtp_host, settings.smtp_port, timeout=timeout,
                                    context=context)
        else:
            smtp = smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=timeout)
        with smtp:
            if settings.smtp_security == "starttls":
                smtp.starttls(context=context)
            if settings.smtp_user:
                smtp.login(settings.smtp_user, smtp_password(settings))
            smtp.send_message(message)
    except smtplib.SMTPAuthenticationError as e:
        # a refused login will not pass on retry, but the relay may be fixed meanwhile
        raise DeliveryFailed(f"{target.shown}: the relay refused the login ({e.smtp_code})") \
            from None
    except smtplib.SMTPResponseException as e:
        raise DeliveryFailed(f"{target.shown}: the relay said {e.smtp_code}") from None
    except (smtplib.SMTPException, OSError) as e:
        raise DeliveryFailed(f"{target.shown}: {type(e).__name__}") from None


def deliver(settings: Settings, target: Target, event: Mapping[str, Any]) -> None:
    """Send one notice; DeliveryFailed (or ConfigError) if it did not arrive."""
    timeout = settings.notify_timeout
    if target.kind == "webhook":
        http_send(target, target.address, json.dumps(event).encode(), timeout)
    elif target.kind == "mail":
        mail_send(settings, target, event)
    else:
        suffix = {"start": "/start", "fail": "/fail"}.get(str(event.get("event")), "")
        http_send(target, target.address.rstrip("/") + suffix, None, timeout)


def backoff(retries: int, settings: Settings) -> float:
    base = min(settings.notify_backoff * (2**retries), settings.retry_backoff_max)
    return base / 2 + random.uniform(0, base / 2)  # noqa: S311 -- jitter, not crypto


# -- the worker side ----------------------------------------------------------------

class Notifier:
    """What a worker process needs to turn outcomes into notify tasks."""

    def __init__(self, app: Celery, settings: Settings) -> None:
        self.app, self.settings = app, settings
        self.storage = Storage(settings.storage)
        self.states = States(self.storage)
        self.targets = targets(settings)
        self.pings = pings(settings)
        self.by_id = {t.id: t for t in [*self.targets, *self.pings.values()]}
        self.queue = internal_queue(settings.queue)

    def send(self, target: Target, event: dict[str, Any]) -> None:
        try:
            self.app.send_task(NOTIFY, kwargs={"target": target.id, "event": event},
                               queue=self.queue)
        except Exception as e:  # never in a grab's way
            log.warning("could not queue a notice for %s: %s", target.shown, type(e).__name__)

    def announce(self, name: str | None, changed: list[tuple[str, bool]],
                 **fields: Any) -> None:
        """One notice per changed condition, to every target."""
        for condition, on in changed:
            event = notice(condition if on else "recovered", name, condition=condition,
                           **fields)
            log.info("notice: %s", event["summary"])
            for target in self.targets:
                self.send(target, event)

    def ping(self, name: str, kind: str) -> None:
        target = self.pings.get(name)
        if target is not None:
            self.send(target, notice(kind, name))

    def outcome(self, name: str, conditions: Mapping[str, bool], **fields: Any) -> None:
        try:
            self.announce(name, self.states.change(name, conditions), **fields)
        except Exception:
            log.warning("could not record the notice state of %s", name, exc_info=True)

    # -- Celery signal receivers (in the pool process that ran the grab) --
    def on_accepted(self, sender: str | None = None, **_: Any) -> None:
        """A grab passed its name's checks (worker.grab.grab_accepted): only then
        the /start ping, so a forged request cannot start anybody's check."""
        with contextlib.suppress(InvalidRequest):
            self.ping(check_name(sender), "start")

    def on_success(self, sender: Task | None = None, result: Any = None, **_: Any) -> None:
        if getattr(sender, "name", None) != GRAB or not isinstance(result, dict):
            return
        try:
            name = check_name(result.get("name"))
        except InvalidRequest:
            return
        partial = bool(result.get("partial"))
        warnings = result.get("warnings") or []
        reason = "; ".join(str(w) for w in warnings[:3]) if partial else "a snapshot completed"
        self.outcome(name, {"failed": False, "no_space": False, "stale": False,
                            "partial": partial},
                     snapshot=result.get("snapshot"), reason=reason,
                     exit_code=1 if partial else 0)
        self.ping(name, "success")  # a partial snapshot is published: a warning, not a failure

    def on_failure(self, sender: Task | None = None, exception: BaseException | None = None,
                   kwargs: Any = None, **_: Any) -> None:
        if (getattr(sender, "name", None) != GRAB or exception is None
                or isinstance(exception, InvalidRequest) or not isinstance(kwargs, dict)):
            return  # a refused request is nobody's outcome (issue 11)
        try:
            name = check_name(kwargs.get("name"))
        except InvalidRequest:
            return
        reason = (exception.message if isinstance(exception, BakgrabError)
                  else f"{type(exception).__name__} (see the worker's log)")
        condition = "no_space" if isinstance(exception, NoSpace) else "failed"
        self.outcome(name, {condition: True}, reason=reason,
                     exit_code=exit_code_for(exception))
        self.ping(name, "fail")

    # -- the worker's own life (main process) --
    def marker(self) -> Path:
        host = re.sub(r"[^A-Za-z0-9_.-]", "_", HOST)
        return self.states.dir / f".worker.{host}.{self.settings.queue}.pid"

    def on_ready(self, **_: Any) -> None:
        """A marker left by a worker that did not stop cleanly: notice it."""
        try:
            self.states.dir.mkdir(mode=0o700, exist_ok=True)
            path = self.marker()
            try:
                old = int(path.read_text().split()[0])
            except (FileNotFoundError, ValueError, IndexError):
                old = None
            if old is not None and old != os.getpid() and not _alive(old):
                reason = (f"worker pid {old} stopped without a clean shutdown (crash, kill or "
                          "power loss); interrupted grabs resume from their in-progress dirs")
                self.announce(None, [("worker_restarted", True)], reason=reason)
            write_atomic(path, f"{os.getpid()}\n")
        except Exception:
            log.warning("could not check for an unclean stop", exc_info=True)

    def on_shutdown(self, **_: Any) -> None:
        with contextlib.suppress(OSError, ValueError):
            path = self.marker()
            if int(path.read_text().split()[0]) == os.getpid():
                path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def signer(policy: transport.Policy) -> transport.Policy:
    """The policy whose MAC signs the internal tasks a process publishes."""
    return dataclasses.replace(policy, tasks=INTERNAL_TASKS)


def register(app: Celery, notifier: Notifier) -> None:
    """Define the internal tasks (notify, stale check, scheduled prune) on ``app``."""
    settings = notifier.settings
    app.conf.task_routes = {task: {"queue": notifier.queue} for task in INTERNAL_TASKS}

    @app.task(name=NOTIFY, bind=True, acks_late=True, max_retries=settings.notify_retries)
    def notify_task(self: Task, *args: Any, **fields: Any) -> str:
        target = notifier.by_id.get(str(fields.get("target")))
        event = fields.get("event")
        if args or target is None or not isinstance(event, dict):
            # e.g. queued before a restart that changed `notify`
            log.warning("notice %s: no such target (notify changed?); dropped", self.request.id)
            return "no such target"
        try:
            deliver(settings, target, event)
        except (DeliveryFailed, ConfigError) as e:
            if self.request.retries >= settings.notify_retries:
                log.warning("notice to %s given up after %d attempt(s): %s", target.shown,
                            self.request.retries + 1, e)
                raise
            delay = backoff(self.request.retries, settings)
            log.warning("notice to %s failed (%s); retry %d/%d in %.0fs", target.shown, e,
                        self.request.retries + 1, settings.notify_retries, delay)
            raise self.retry(exc=e, countdown=delay) from None
        return f"{event.get('event')} {event.get('name') or ''} delivered to {target.shown}"

    @app.task(name=STALE_CHECK, acks_late=True)
    def stale_check_task(*args: Any, **fields: Any) -> str:
        from bakgrab.worker.schedule import check_stale

        return check_stale(notifier)

    @app.task(name=PRUNE, acks_late=True)
    def prune_task(*args: Any, **fields: Any) -> str:
        from bakgrab.worker.schedule import scheduled_prune

        return scheduled_prune(notifier)

    @app.task(name=VERIFY, acks_late=True)
    def verify_task(*args: Any, **fields: Any) -> dict[str, Any]:
        from bakgrab.worker.schedule import scheduled_verify

        return scheduled_verify(notifier)


def install(app: Celery, settings: Settings) -> Notifier:
    """Wire notices and the internal queue into a worker's ``app`` (from
    :func:`bakgrab.worker.task.serve`, after its transport and tasks are set)."""
    os.environ.pop("BAKGRAB_SMTP_PASSWORD", None)  # held in settings; no child inherits it
    notifier = Notifier(app, settings)
    register(app, notifier)
    cls = app.conf.broker_transport
    base: transport.Policy = cls.policy
    policy = dataclasses.replace(base, internal_queue=notifier.queue,
                                 internal_tasks=INTERNAL_TASKS)
    app.conf.broker_transport = transport.transport_for(policy)
    before_task_publish.connect(transport.sign_publish(signer(policy)), weak=False)

    def add_queue(sender: Any = None, instance: Any = None, **_: Any) -> None:
        instance.app.amqp.queues.select_add(notifier.queue)

    celeryd_after_setup.connect(add_queue, weak=False)
    grab_accepted.connect(notifier.on_accepted, weak=False)
    task_success.connect(notifier.on_success, weak=False)
    task_failure.connect(notifier.on_failure, weak=False)
    worker_ready.connect(notifier.on_ready, weak=False)
    worker_shutdown.connect(notifier.on_shutdown, weak=False)
    if settings.beat == "on":
        from bakgrab.worker.schedule import embed

        embed(app, settings)
    return notifier

"""The client's link to the broker: RESP2 over a socket of its own, no
Celery, kombu or redis-py (issue 19).

A job is three things on the broker, and the client does them by hand
instead of through Celery and kombu (their imports, and redis-py's with its
asyncio, were about 150 ms of the client's start-up; they opened five
connections, each with redis-py's four-command handshake, so about 30 round
trips before a job was in flight, each one of the tunnel's):

* ``GET bakgrab:request-key:QUEUE``: the backup host's request key;
* ``SUBSCRIBE celery-task-meta-ID`` on a second connection, confirmed, then
  ``LPUSH QUEUE`` of the task message (Celery's protocol 2, as ``send_task``
  builds it: the worker admits and rebuilds every message,
  :mod:`bakgrab.worker.transport`), then ``GET`` of the result key: subscribed
  first, so that the worker, which skips a job nobody waits for, sees us
  waiting, and no state is missed;
* the states the worker stores and publishes on that channel (Celery's result
  meta: ``PROGRESS`` with its info, ``SUCCESS``, ``FAILURE`` with the error's
  type, module and args, ``REVOKED``), until a final one.

Nothing precedes the first command but ``AUTH`` when the URL has a password
(and ``SELECT`` for a database other than 0). Invariants:

* a lost connection is tried again for :data:`RECONNECT_FOR` seconds (a Redis
  restart, a tunnel's hiccup), subscribing again and reading the result key,
  so that a result stored meanwhile is not missed; then ClientSetupError;
* a silent connection is pinged every :data:`PING_EVERY` seconds and counts as
  lost when nothing came back within :data:`PONG_WITHIN` (a frozen tunnel
  keeps its socket open);
* a reply is read within :data:`MAX_REPLY` bytes and :data:`MAX_ITEMS` items:
  a broker that streams without end is cut off, not buffered;
* an error from the backup host is rebuilt only as a class of
  :mod:`bakgrab.tasks.errors` (a result is the backup host's word: no other
  module or class it names is looked up); any other becomes a plain
  BakgrabError.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import select
import socket
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from bakgrab.tasks import errors
from bakgrab.tasks.errors import BakgrabError, ClientSetupError, JobTimeout

log = logging.getLogger(__name__)

RESULT_PREFIX = "celery-task-meta-"
"""Celery's Redis result backend: the key, and the channel, of a task's state."""
FINAL = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
PING_EVERY = 25.0
"""Seconds of silence on the result channel before the client pings."""
PONG_WITHIN = 10.0
"""Seconds a ping may go unanswered before the connection counts as lost."""
RECONNECT_FOR = 60.0
"""Seconds a lost connection is tried again before the client gives up."""
COMMAND_TIMEOUT = 10.0
"""Seconds one command (GET, LPUSH, SUBSCRIBE) may take."""

MAX_LINE = 64 * 1024
MAX_REPLY = 64 * 1024 * 1024
"""Bytes of one reply the client reads at most (a result is a few KiB)."""
MAX_ITEMS = 16
"""Items of one array reply, and nesting: a pub/sub message has 3."""

LOST = (OSError,)
"""What a broken connection raises: the socket's errors, ConnectionError
and TimeoutError among them."""


def task_message(task: str, task_id: str, kwargs: dict[str, Any], queue: str,
                 kwargsrepr: str) -> bytes:
    """The item ``send_task`` would LPUSH for ``task`` (Celery's protocol 2, JSON,
    kombu's Redis envelope): no positional args, no links, retries 0."""
    body = json.dumps([[], kwargs, {"callbacks": None, "errbacks": None, "chain": None,
                                    "chord": None}])
    return json.dumps({
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py", "task": task, "id": task_id, "shadow": None, "eta": None,
            "expires": None, "group": None, "group_index": None, "retries": 0,
            "timelimit": [None, None], "root_id": task_id, "parent_id": None,
            "argsrepr": "()", "kwargsrepr": kwargsrepr,
            "origin": f"{os.getpid()}@{socket.gethostname()}", "ignore_result": False,
            "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {},
        },
        "properties": {
            "correlation_id": task_id, "reply_to": None, "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0,
            "body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
        },
    }).encode()


def outcome(meta: dict[str, Any]) -> dict[str, Any]:
    """The value of a final state: a SUCCESS's result, or its error raised."""
    status, value = meta.get("status"), meta.get("result")
    if status == "SUCCESS":
        if not isinstance(value, dict):
            raise BakgrabError(
                f"the worker returned an unexpected result: {type(value).__name__}")
        return value
    if status == "REVOKED" or (isinstance(value, dict)
                               and value.get("exc_type") == "TaskRevokedError"):
        raise BakgrabError("the job was revoked on the backup host (e.g. from Flower)")
    raise rebuilt_error(value)


def rebuilt_error(value: Any) -> BakgrabError:
    """The error a FAILURE names: its class, if one of bakgrab's, with its args."""
    if not isinstance(value, dict):
        return BakgrabError("the job failed, and the backup host said nothing about why")
    kind, module, args = value.get("exc_type"), value.get("exc_module"), value.get("exc_message")
    args = list(args) if isinstance(args, list | tuple) else [args]
    cls = getattr(errors, kind, None) if isinstance(kind, str) else None
    if module == errors.__name__ and isinstance(cls, type) and issubclass(cls, BakgrabError):
        return cls(*args)
    shown = args[0] if len(args) == 1 else tuple(args)
    name = kind if isinstance(kind, str) and kind.isidentifier() else "an error"
    return BakgrabError(f"the job failed: {name[:100]}: {str(shown)[:1000]}")


class ReplyError(Exception):
    """The broker answered a command with an error (``-ERR``, ``-NOPERM``...)."""


class Connection:
    """One RESP2 connection to Redis: commands out, replies in, nothing else.

    ``redis://[USER[:PASSWORD]@]HOST[:PORT][/DB]``, and ``rediss://`` for TLS
    (the system's CAs, the host name checked). URL options (``?...``) are not
    taken: refused, not ignored. Blocking reads time out after ``timeout``
    seconds (TimeoutError); a closed connection raises ConnectionError."""

    def __init__(self, url: str, timeout: float) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("redis", "rediss") or parts.query or parts.fragment:
            raise ValueError("the client takes redis://[USER[:PASSWORD]@]HOST[:PORT][/DB] or "
                             "rediss://... URLs, without ?options")
        db = parts.path.strip("/") or "0"
        if not db.isdigit():
            raise ValueError(f"the database number {db[:20]!r} is not a number")
        host = parts.hostname or "127.0.0.1"
        sock = socket.create_connection((host, parts.port or 6379), timeout=timeout)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if parts.scheme == "rediss":
                import ssl

                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self._buf = bytearray()
        try:
            if parts.password is not None:
                password = urllib.parse.unquote(parts.password)
                user = urllib.parse.unquote(parts.username or "")
                self.call("AUTH", *([user] if user else []), password)
            if db != "0":
                self.call("SELECT", db)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, *commands: tuple[str | bytes, ...]) -> None:
        """Send ``commands`` in one write (pipelined: their replies come in order)."""
        out = bytearray()
        for args in commands:
            out += b"*%d\r\n" % len(args)
            for arg in args:
                data = arg.encode() if isinstance(arg, str) else arg
                out += b"$%d\r\n%s\r\n" % (len(data), data)
        self.sock.sendall(out)

    def call(self, *args: str | bytes) -> Any:
        self.send(args)
        return self.reply()

    def readable(self, timeout: float) -> bool:
        """Whether a reply can be read now, waiting at most ``timeout`` seconds."""
        if self._buf or getattr(self.sock, "pending", lambda: 0)():
            return True
        return bool(select.select([self.sock], [], [], timeout)[0])

    def reply(self, depth: int = 0) -> Any:
        """One reply: bytes, int, str (a status), None, a list; ReplyError for an error."""
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode(errors="replace")
        if kind == b"-":
            raise ReplyError(rest.decode(errors="replace")[:500])
        if kind == b":":
            return number(rest)
        if kind == b"$":
            n = number(rest)
            return None if n < 0 else self._exactly(n + 2)[:-2]
        if kind == b"*":
            n = number(rest)
            if n > MAX_ITEMS or depth > 2:
                raise ConnectionError("a Redis reply with more items than the client reads")
            return None if n < 0 else [self.reply(depth + 1) for _ in range(n)]
        raise ConnectionError(f"not a Redis reply: {bytes(line[:40])!r}")

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the broker closed the connection")
        self._buf += data

    def _line(self) -> bytes:
        while (end := self._buf.find(b"\r\n")) < 0:
            if len(self._buf) > MAX_LINE:
                raise ConnectionError("a Redis reply line too long")
            self._fill()
        line = bytes(self._buf[:end])
        del self._buf[:end + 2]
        return line

    def _exactly(self, n: int) -> bytes:
        if n > MAX_REPLY:
            raise ConnectionError(f"a Redis reply of {n} bytes, more than {MAX_REPLY}")
        while len(self._buf) < n:
            self._fill()
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data


def number(text: bytes) -> int:
    """The integer of a reply's line; ConnectionError if it is not one."""
    if not text.lstrip(b"-").isdigit() or len(text) > 20:
        raise ConnectionError(f"not a Redis reply: {bytes(text[:40])!r}")
    return int(text)


class Broker:
    """One backup host's broker, as this client uses it for one job."""

    def __init__(self, url: str, shown: str) -> None:
        self.url = url
        self.shown = shown
        """The URL without its password, for messages."""
        self._conn: Connection | None = None

    def connection(self) -> Connection:
        """The command connection, (re)opened when needed."""
        if self._conn is None:
            self._conn = self.connect()
        return self._conn

    def connect(self) -> Connection:
        try:
            return Connection(self.url, COMMAND_TIMEOUT)
        except ValueError as e:
            raise ClientSetupError(f"broker {self.shown}: {e}") from None

    def drop(self) -> None:
        """Forget the command connection (it broke: the next command reconnects)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self) -> None:
        self.drop()

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, key: str) -> bytes | None:
        """One GET; ClientSetupError if the broker cannot be reached."""
        try:
            value = self.connection().call("GET", key)
        except (*LOST, ReplyError) as e:
            self.drop()
            raise ClientSetupError(f"cannot reach the broker {self.shown}: {said(e)}") from None
        return value if isinstance(value, bytes) else None

    @contextlib.contextmanager
    def sending(self, task: str, task_id: str, kwargs: dict[str, Any], queue: str,
                kwargsrepr: str) -> Iterator[Watch]:
        """Subscribe to the job's result, send the job, and yield its Watch;
        unsubscribed on the way out (the worker cancels a job nobody waits for)."""
        watch = Watch(self, task_id)
        try:
            watch.subscribe()
            self.connection().call("LPUSH", queue,
                                   task_message(task, task_id, kwargs, queue, kwargsrepr))
        except (*LOST, ReplyError) as e:
            watch.close()
            self.drop()
            raise ClientSetupError(
                f"cannot send the job to the broker {self.shown}: {said(e)}") from None
        except BaseException:
            watch.close()
            raise
        try:
            yield watch
        finally:
            watch.close()


def said(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if isinstance(e, OSError) else str(e)


class Watch:
    """The result channel of one job, subscribed."""

    def __init__(self, broker: Broker, task_id: str) -> None:
        self.broker = broker
        self.key = RESULT_PREFIX + task_id
        self._sub: Connection | None = None
        self._unread = False
        """Subscribed since the result key was last read."""

    def subscribe(self) -> None:
        """A connection of its own, subscribed to the result channel (confirmed)."""
        self.close()
        self._sub = self.broker.connect()
        confirmed = self._sub.call("SUBSCRIBE", self.key)
        if not (isinstance(confirmed, list) and confirmed[:1] == [b"subscribe"]):
            raise ConnectionError(f"SUBSCRIBE answered {str(confirmed)[:100]}")
        self._unread = True

    def close(self) -> None:
        if self._sub is not None:
            self._sub.close()
            self._sub = None

    def stored(self) -> dict[str, Any] | None:
        """The state the result key holds now, if any."""
        try:
            return decode(self.broker.connection().call("GET", self.key))
        except LOST:
            self.broker.drop()
            raise

    def wait(self, timeout: float, on_state: Callable[[dict[str, Any]], None],
             check: Callable[[], None] = lambda: None, poll: float = 1.0) -> dict[str, Any]:
        """The job's final value, raising its error; ``on_state`` sees every
        state before it (progress). JobTimeout past ``timeout`` seconds;
        ``check`` is called at least every ``poll`` seconds (a run's stop)."""
        deadline = time.monotonic() + timeout
        lost_since: float | None = None
        while True:
            try:
                if self._sub is None:
                    self.subscribe()
                if self._unread:
                    # once after each subscription: a state stored before it
                    # is read here, one published after it comes on the channel
                    meta = self.stored()
                    self._unread = False
                    if lost_since is not None:
                        log.info("the broker connection is back")
                        lost_since = None
                    if meta is not None:
                        if meta.get("status") in FINAL:
                            return outcome(meta)
                        on_state(meta)
                meta = self._next_final(deadline, timeout, on_state, check, poll)
                return outcome(meta)
            except ReplyError as e:  # e.g. NOPERM: no retry makes it work
                raise ClientSetupError(f"the broker {self.broker.shown} refused: {e}") from None
            except LOST as e:
                self.close()
                now = time.monotonic()
                if lost_since is None:
                    lost_since = now
                    log.warning("lost the broker connection while waiting (%s: %s); "
                                "trying again for %.0fs", type(e).__name__, e, RECONNECT_FOR)
                if now - lost_since >= RECONNECT_FOR:
                    raise ClientSetupError(
                        "lost the connection to the broker while waiting for the job (a dead "
                        "tunnel or Redis gone?); the job may still run on the backup host: "
                        f"see Flower or `bakgrab list` there ({type(e).__name__}: "
                        f"{str(e)[:200]})") from None
                if now >= deadline:
                    raise JobTimeout(f"the job did not finish within {timeout:.0f}s") from None
                check()
                time.sleep(min(1.0, 0.1 + (now - lost_since) / 4))

    def _next_final(self, deadline: float, timeout: float,
                    on_state: Callable[[dict[str, Any]], None],
                    check: Callable[[], None], poll: float) -> dict[str, Any]:
        """Read the channel until a final state; pings a silent connection."""
        sub = self._sub
        assert sub is not None
        heard = time.monotonic()
        pinged: float | None = None
        while True:
            check()
            now = time.monotonic()
            if now >= deadline:
                raise JobTimeout(f"the job did not finish within {timeout:.0f}s")
            if pinged is not None and now - pinged >= PONG_WITHIN:
                raise ConnectionError(f"no answer to a ping within {PONG_WITHIN:.0f}s")
            if pinged is None and now - heard >= PING_EVERY:
                sub.send(("PING",))
                pinged = now
            if not sub.readable(min(poll, max(0.0, deadline - now))):
                continue
            message = sub.reply()
            heard, pinged = time.monotonic(), None
            # a pong, or a message: [b"message", channel, data]
            if not (isinstance(message, list) and len(message) == 3
                    and message[0] == b"message"):
                continue
            meta = decode(message[2])
            if meta is None:
                continue
            if meta.get("status") in FINAL:
                return meta
            on_state(meta)


def decode(raw: Any) -> dict[str, Any] | None:
    """A result meta from the key or the channel; None if it is not one."""
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except (ValueError, TypeError, RecursionError):
        log.warning("the broker holds a result that is not JSON: ignored")
        return None
    return meta if isinstance(meta, dict) else None

"""``bakgrab backup``: ask a backup host for a backup and wait for it.

Steps: make a one-time key in memory; start the one-shot sshd for the
allowed peers; open the tunnel to the broker (if asked); send
``bakgrab.grab`` by name (:mod:`bakgrab.client.broker`), signed with the
client's identity key under a task id of our choosing (issue 11), with the
key redacted from every display; wait for
the final state, showing progress on a terminal; tear everything down, in
every case (errors, Ctrl-C, SIGTERM): a queued job is revoked (where the
broker lets the client use Celery's remote control: the shipped ACL does
not), sshd and the tunnel are killed, files removed.

With several backup hosts (``--to``) each job runs in a thread of its own;
signals reach only the main thread, which stops every job (:class:`Stop`)
and waits, bounded by ``TEARDOWN``, until each has torn down as a single
job does (issue 13). Job threads call :func:`cancel_point` wherever they wait.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import fcntl
import ipaddress
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bakgrab.client import keys
from bakgrab.client.sshd import OneShotServer, ServerConfig, login_user, parse_allow
from bakgrab.client.tunnel import Tunnel, broker_endpoint, redact_url
from bakgrab.tasks import GRAB, caps, request_key_name, sealed
from bakgrab.tasks.config import Settings, default_state_dir
from bakgrab.tasks.errors import ClientSetupError, JobTimeout
from bakgrab.tasks.request import GrabRequest, check_excludes, check_name, redacted, sign
from bakgrab.tasks.result import GrabResult, human_bytes

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    from bakgrab.client.broker import Broker, Watch

# Celery, kombu and redis-py are not imported on a job's way (only to revoke
# an interrupted job): the client speaks RESP to the broker by itself
# (bakgrab.client.broker, issue 19), and imports even that only once the
# one-shot sshd listens.
# tests/integration/test_fixed_cost.py holds this.

log = logging.getLogger(__name__)


@dataclasses.dataclass
class BackupOptions:
    name: str
    source: Path
    excludes: list[str] = dataclasses.field(default_factory=list)
    address: str | None = None
    listen: str | None = None
    port: int = 0
    allow_from: str | None = None
    tunnel: str | None = None
    ssh_options: Sequence[str] = ()
    reverse: bool = False
    """Offer the one-shot sshd on the backup host's loopback through the tunnel
    (``ssh -R``) instead of connecting back to this host (clients behind NAT)."""
    verify: bool = False
    """Ask the worker to re-read what the pull wrote before publishing (issue 15)."""


def read_excludes(path: Path) -> list[str]:
    """Exclude patterns from a file: one per line, blank lines and # comments skipped."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ClientSetupError(f"--exclude-from {path}: {e.strerror}") from None
    return [ln for ln in (raw.rstrip() for raw in lines) if ln and not ln.startswith("#")]


def resolve(host: str) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror as e:
        raise ClientSetupError(f"cannot resolve {host}: {e.strerror}") from None
    return sorted({str(info[4][0]) for info in infos})


def is_loopback(host: str) -> bool:
    try:
        return all(ipaddress.ip_address(a).is_loopback for a in resolve(host))
    except ValueError:
        return False


def local_address_towards(host: str) -> str:
    """The local IP the kernel would use to reach ``host`` (no packet is sent)."""
    addr = resolve(host)[0]
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((addr, 9))
        return str(s.getsockname()[0])


def plan_addresses(opts: BackupOptions, settings: Settings) -> tuple[str, str, str]:
    """(address the worker connects to, address to listen on, allowed peers).

    Defaults: the backup host is the tunnel's host, or the broker's host; the
    peer allowed is that host; the address announced is our address towards it.
    """
    if opts.reverse:
        if not opts.tunnel:
            raise ClientSetupError("--reverse needs --tunnel: the sshd is offered through it")
        # The worker reaches us at its own loopback; our sshd sees the tunnel's
        # ssh, a local process, as the peer.
        return "127.0.0.1", "127.0.0.1", opts.allow_from or "127.0.0.1,::1"
    backup_host = (Tunnel(opts.tunnel, settings.broker).host if opts.tunnel
                   else broker_endpoint(settings.broker)[0])
    loop = is_loopback(backup_host)
    address = opts.address or ("127.0.0.1" if loop else local_address_towards(backup_host))
    allow = opts.allow_from or ",".join(
        ["127.0.0.1", "::1"] if loop else resolve(backup_host))
    if opts.listen:
        listen = opts.listen
    else:
        try:
            ipaddress.ip_address(address)
            listen = address
        except ValueError:
            listen = "0.0.0.0"
    return address, listen, allow


Reporter = Callable[[dict[str, Any]], None]


def terminal_progress(stream: Any = sys.stderr) -> Reporter | None:
    """A progress line on a terminal; None when not on one (cron stays quiet)."""
    if not stream.isatty():
        return None

    def show(info: dict[str, Any]) -> None:
        phase = info.get("phase", "")
        if phase == "pulling" and "bytes" in info:
            line = (f"{info.get('name', '')}: {human_bytes(info['bytes'])} "
                    f"{info.get('percent', 0)}% {info.get('rate', '')} "
                    f"files {info.get('files_done', 0)}/{info.get('files_total', 0)} "
                    f"ETA {info.get('eta', '')}")
        else:
            line = f"{info.get('name', '')}: {phase}"
        stream.write("\r\x1b[K" + line)
        stream.flush()

    return show


def check_privileges(mode: str) -> None:
    """rsync >= 3.4; and say what an unprivileged client will miss."""
    version = caps.rsync_version()
    if version < caps.MIN_RSYNC:
        raise ClientSetupError(
            f"rsync {'.'.join(map(str, version))} is too old: bakgrab needs >= "
            f"{'.'.join(map(str, caps.MIN_RSYNC))} (security fixes); upgrade rsync")
    if os.geteuid() != 0 and mode == "ro" and caps.missing_ambient(caps.CLIENT_CAPS):
        log.warning("running without root and without CAP_DAC_READ_SEARCH: files this user "
                    "cannot read will be missing (a partial snapshot); %s",
                    caps.how_to_grant(caps.CLIENT_CAPS))


@dataclasses.dataclass
class Session:
    """What the one-shot side offers the backup host for one job."""

    address: str
    port: int
    user: str
    key: str
    """The one-time private key, sealed to the backup host's request key."""
    host_key: str


def submit(opts: BackupOptions, settings: Settings, task: str, mode: str,
           fields: Callable[[Session], dict[str, Any]],
           progress: Reporter | None = None) -> dict[str, Any]:
    """Serve ``opts.source`` through a one-shot sshd in ``mode`` (``ro`` for a
    backup, ``wo`` for a restore), send ``task`` with ``fields(session)`` and
    wait for its result; everything is torn down on the way out."""
    check_privileges(mode)
    address, listen, allow = plan_addresses(opts, settings)
    state_dir = Path(settings.state_dir) if settings.state_dir else default_state_dir()
    host_key_path, identity = keys.identity(state_dir)
    host_public = keys.public_line(identity)
    key = keys.one_time_key()

    with contextlib.ExitStack() as stack:
        server = stack.enter_context(OneShotServer(ServerConfig(
            source=opts.source, public_key=key.public, allow=parse_allow(allow),
            host_key=host_key_path, listen=listen, port=opts.port,
            # One session per attempt: the first, each retry, and as many again
            # for redeliveries after a worker died or was stopped.
            max_connections=2 * (settings.max_retries + 1), lifetime=settings.job_timeout,
            mode=mode,
        )))
        broker = settings.broker
        if opts.tunnel:
            cancel_point()
            tunnel = stack.enter_context(Tunnel(
                opts.tunnel, settings.broker, settings.server_alive_interval, opts.ssh_options,
                settings.connect_timeout, reverse_port=server.port if opts.reverse else 0,
                check=cancel_point))
            broker = tunnel.url
        port = tunnel.remote_port if opts.reverse else server.port
        backup_host = opts.tunnel or "{}:{}".format(*broker_endpoint(settings.broker))
        link = stack.enter_context(open_broker(broker))
        recipient = request_public_key(settings, link, state_dir, backup_host)
        if not opts.tunnel:
            port = server.port
        # The task id is ours, so that the signature binds it (issue 11): the
        # worker refuses the fields under any other id or task name.
        task_id = str(uuid.uuid4())
        wire = sign(fields(Session(address=address, port=port, user=login_user(),
                                   key=sealed.seal(recipient, key.private.encode()),
                                   host_key=host_public)), task, task_id, identity)
        cancel_point()  # stopped meanwhile: send nothing
        watch = stack.enter_context(link.sending(task, task_id, wire, settings.queue,
                                                 redacted(wire)))
        log.info("sent %s for %s (task %s); backup host connects to %s:%d",
                 task, wire.get("name"), task_id, address, port)
        del wire
        done = False

        def revoke_unless_done() -> None:
            if not done:
                revoke(settings, broker, task_id)

        # (registered after the watch: it runs first, while we still wait)
        stack.callback(revoke_unless_done)
        try:
            outcome = wait(watch, settings.job_timeout, progress)
        except (JobTimeout, KeyboardInterrupt, SystemExit):
            raise  # not final: the revoke above runs
        except BaseException:
            done = True  # the job failed: it is final, nothing to revoke
            raise
        done = True
        if progress is not None:
            sys.stderr.write("\r\x1b[K")
        return outcome


def open_broker(url: str) -> Broker:
    """The broker at ``url`` (imported here: after the sshd listens)."""
    from bakgrab.client.broker import Broker

    return Broker(url, redact_url(url))


def revoke(settings: Settings, broker: str, task_id: str) -> None:
    """Ask the workers to drop a job we no longer wait for (Celery's remote
    control, imported only on this path). The shipped ACL denies clients the
    remote control: there the worker skips the job when nobody waits for it."""
    with contextlib.suppress(Exception):
        from bakgrab.tasks.app import make_app

        make_app(settings, broker=broker).control.revoke(task_id)
        log.warning("revoked task %s", task_id)


def backup(opts: BackupOptions, settings: Settings,
           progress: Reporter | None = None) -> GrabResult:
    """Run one backup end to end; raises a BakgrabError on failure."""
    name = check_name(opts.name)
    excludes = tuple(check_excludes(opts.excludes))

    def fields(s: Session) -> dict[str, Any]:
        return GrabRequest(name=name, address=s.address, port=s.port, user=s.user, key=s.key,
                           host_key=s.host_key, excludes=excludes,
                           verify=opts.verify).to_wire()

    return GrabResult.from_dict(submit(opts, settings, GRAB, "ro", fields, progress))


def request_public_key(settings: Settings, link: Broker, state_dir: Path,
                       backup_host: str) -> X25519PublicKey:
    """The backup host's request key: configured, or read from the broker (the
    tunnel authenticates the backup host) and pinned on first use."""
    if settings.request_public_key:
        try:
            return sealed.load_public(settings.request_public_key)
        except ValueError as e:
            raise ClientSetupError(f"request_public_key: {e}") from None
    raw = link.get(request_key_name(settings.queue))
    if raw is None:
        raise ClientSetupError(
            f"the backup host published no request key for queue {settings.queue!r}: is "
            "`bakgrab worker` running there for that queue?")
    text = raw.decode(errors="replace")
    try:
        public = sealed.load_public(text)
    except ValueError as e:
        raise ClientSetupError(f"the broker's request key: {e}") from None
    pins_file = state_dir / "request-keys.json"
    ident = f"{backup_host}/{settings.queue}"
    # Jobs to several backup hosts pin at once (--to): one at a time, by flock.
    with open(state_dir / "request-keys.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            pins = json.loads(pins_file.read_text())
        except (OSError, ValueError):
            pins = {}
        if ident not in pins:
            pins[ident] = text
            tmp = pins_file.with_name(f".{pins_file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(pins, indent=1))
            tmp.rename(pins_file)
    if pins[ident] != text:
        raise ClientSetupError(
            f"the request key of {ident} differs from the one pinned in {pins_file}; "
            "refusing to send the key to it. If the backup host's key changed "
            "legitimately, remove that entry (or set request_public_key).")
    return public


def wait(watch: Watch, timeout: float, progress: Reporter | None) -> dict[str, Any]:
    """The job's final result, raising its error; JobTimeout past ``timeout``."""

    def on_state(meta: dict[str, Any]) -> None:
        if progress is not None and meta.get("status") == "PROGRESS":
            info = meta.get("result")
            if isinstance(info, dict):
                progress(info)

    # A job of a multi-target run looks for the run's stop every STOP_POLL
    # (signals reach only the main thread; issue 13).
    return watch.wait(timeout, on_state, check=cancel_point, poll=STOP_POLL)


@dataclasses.dataclass(frozen=True)
class Target:
    """One backup host of a multi-host run: its tunnel, broker and queue."""

    label: str
    tunnel: str | None = None
    broker: str | None = None
    queue: str | None = None


def parse_to(spec: str) -> Target:
    """``tunnel=USER@HOST[:PORT],broker=URL,queue=Q`` (any subset) to a Target."""
    fields: dict[str, str] = {}
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in ("tunnel", "broker", "queue") or not value.strip():
            raise ClientSetupError(
                f"--to {spec!r}: expected tunnel=USER@HOST[:PORT],broker=URL,queue=Q")
        fields[key.strip()] = value.strip()
    label = fields.get("tunnel") or redact_url(fields.get("broker", "")) or fields["queue"]
    return Target(label=label, **fields)


STOP_POLL = 1.0
"""Seconds a job of a multi-target run waits for its result between two
looks at the run's stop."""
TEARDOWN = 30.0
"""Seconds a stopped multi-target run waits for its jobs to tear down (each
needs about a second; a job stuck in a broker call may need its timeout)."""


class Stop:
    """The stop of a multi-target run (issue 13). Signals reach only the main
    thread; it sets this, and each job thread, at its next :func:`cancel_point`,
    raises what a single-target run would have got (KeyboardInterrupt, or
    SystemExit with the same code), so it unwinds the same way: revoke, sshd,
    tunnel, files."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._code: object = None
        self._interrupt = False

    def set(self, reason: BaseException) -> None:
        self._interrupt = isinstance(reason, KeyboardInterrupt)
        self._code = reason.code if isinstance(reason, SystemExit) else None
        self._event.set()

    def check(self) -> None:
        if self._event.is_set():
            # A new exception per thread: one instance raised in several
            # threads would share (and garble) its traceback.
            raise KeyboardInterrupt() if self._interrupt else SystemExit(self._code)


_stop: contextvars.ContextVar[Stop | None] = contextvars.ContextVar("bakgrab_stop", default=None)
"""The Stop of the multi-target run this thread's job belongs to, if any."""


def cancel_point() -> None:
    """Raise if this thread's job belongs to a multi-target run being stopped."""
    stop = _stop.get()
    if stop is not None:
        stop.check()


def backup_many(opts: BackupOptions, settings: Settings, targets: Sequence[Target],
                ) -> list[tuple[Target, GrabResult | BaseException]]:
    """Back up to every target at once; each outcome, in the targets' order.

    A signal (Ctrl-C, SIGTERM) stops every job and is raised again once each
    has torn down (at most TEARDOWN seconds)."""
    if opts.port and len(targets) > 1:
        raise ClientSetupError("--port cannot be shared by several --to targets")
    outcomes: dict[int, GrabResult | BaseException] = {}
    stop = Stop()
    # Each job says it ended with an Event, not by Thread.join(): a join
    # interrupted by a signal marks a live thread as ended in Python 3.11
    # (the bpo-45274 fix), and the teardown would not wait for it.
    ended = [threading.Event() for _ in targets]

    def one(i: int, target: Target) -> None:
        _stop.set(stop)
        try:
            o = dataclasses.replace(opts, tunnel=target.tunnel or opts.tunnel)
            s = settings.replace(broker=target.broker or settings.broker,
                                 queue=target.queue or settings.queue)
            outcomes[i] = backup(o, s, None)
        except BaseException as e:  # reported per target by the caller
            outcomes[i] = e
            stopped = isinstance(e, KeyboardInterrupt | SystemExit)  # the run's stop: no news
            log.debug("job to %s ended with %s", target.label, type(e).__name__,
                      exc_info=None if stopped else e)
        finally:
            ended[i].set()

    # Daemon threads: the interpreter never waits for a job at exit; the
    # teardown below is what waits, and it is bounded.
    threads = [threading.Thread(target=one, args=(i, t), name=f"to-{i}", daemon=True)
               for i, t in enumerate(targets)]
    try:
        for t in threads:
            t.start()
        for end in ended:
            end.wait()
    except (KeyboardInterrupt, SystemExit) as e:
        stop.set(e)
        wait_bounded([end for t, end in zip(threads, ended, strict=True) if t.ident is not None],
                     TEARDOWN)
        raise
    return [(t, outcomes[i]) for i, t in enumerate(targets)]


def wait_bounded(ended: Sequence[threading.Event], timeout: float) -> None:
    """Wait until every job has ended, at most ``timeout`` seconds in all; a
    further signal meanwhile does not cut the wait short (the teardown it
    would skip is what leaves sshd and sockets behind)."""
    deadline = time.monotonic() + timeout
    for end in ended:
        while not end.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("a job did not tear down within %.0fs", timeout)
                return
            with contextlib.suppress(KeyboardInterrupt, SystemExit):
                end.wait(left)

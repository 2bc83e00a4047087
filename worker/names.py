"""Names belong to one client: registrations and the check of every request (issue 11).

A name's **registration** is its pin file (``Storage.pin(NAME)``): the
client's identity key (its one-shot sshd's ed25519 host key) on the first
line, and optionally a ``from NET[,NET...]`` line, the addresses the worker
may connect to for that name. Only an operator action writes it (``bakgrab
trust NAME --key ... [--from ...]``, ``deploy/backup-host/add-client.sh
--key``), with one exception the operator opts into: with ``enrol =
"first-use"`` a name that has no registration is registered to the key of
its first grab *that succeeded* (:func:`enrol_after_pull`); nothing a
request says ever changes an existing registration.

:func:`check_request` runs before anything else touches the storage for the
name (after the stateless field checks and the task id check). In order:

1. the registered key of the name, or (first-use enrolment, grabs only, no
   registration) the key the request itself announces;
2. the request's ``host_key`` is that key and ``sig`` is its signature over
   :func:`bakgrab.tasks.request.signed_message` (task name, task id, every
   field: the sealed key, address, port, excludes, ``ts``...);
3. the address lies in the registered networks, if the registration has any
   (attack 10: the worker connects only where the client may be);
4. freshness, by the record of accepted task ids
   (``.bakgrab/accepted/TASK_ID.json``: the digest of the signed message):

   * a task id never accepted is accepted only when ``ts`` is within
     ``request_window`` of the worker's clock; its record is then written
     (exclusively: two workers racing on one id agree on one message);
   * a task id accepted before is accepted again only with the very same
     signed message (same digest): that is a redelivery. Celery redelivers
     the unacked message after a worker died (``visibility_timeout`` later,
     long after any window), and the worker's own retries (``task.retry``,
     a SIGTERM re-queue) re-send the same id with the same kwargs: all of
     them must pass, and they do. A replay of a captured message is the same
     job for the same registered client, never a new one: a grab is
     idempotent by its task id (``jobs/``), and the job still goes only to
     the registered key's sshd. Redeliveries pass while ``ts`` is younger
     than ``job_timeout + request_window`` (past that no client waits for
     the job and its one-time key has expired); records older than that are
     swept;
   * the same task id with any other message is refused.

Every refusal is a :class:`RequestRefused` (an :class:`InvalidRequest`, exit
code 4) whose message is the same whether the name is registered or not, and
names no key (no probing); a refusal writes nothing (no failure record
either: the task body records none for an InvalidRequest). Only the checks
after the signature verified (address, time) say what was wrong: the sender
then is the name's own client.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import ipaddress
import json
import logging
import os
import time
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_ssh_public_key

from bakgrab.tasks import GRAB
from bakgrab.tasks.config import Settings
from bakgrab.tasks.errors import InvalidRequest, RequestRefused
from bakgrab.tasks.request import (
    check_public_key,
    fingerprint,
    signature_bytes,
    signed_message,
)
from bakgrab.worker.storage import Storage, write_atomic

log = logging.getLogger(__name__)

IpNet = ipaddress.IPv4Network | ipaddress.IPv6Network



def refused(name: str) -> RequestRefused:
    """The one answer to a request that fails the check before its signature is
    known good: it does not tell whether the name exists or what is registered."""
    return RequestRefused(
        f"request for {name} refused: not signed by the client registered for this name, "
        "or not fresh. The backup host's operator registers a client (or "
        f"re-keys it) with `bakgrab trust {name} --key KEY`, KEY being what `bakgrab key` "
        "prints on the client; check the client's clock too")


class SignedRequest(Protocol):
    """What the check reads of a grab or restore request."""

    @property
    def name(self) -> str: ...
    @property
    def address(self) -> str: ...
    @property
    def host_key(self) -> str: ...
    @property
    def ts(self) -> int: ...
    @property
    def sig(self) -> str: ...
    @property
    def signed(self) -> bytes: ...


@dataclasses.dataclass(frozen=True)
class Registration:
    """The key a name belongs to, and where its client may be."""

    key: str
    networks: tuple[IpNet, ...] = ()

    def text(self) -> str:
        lines = [self.key]
        if self.networks:
            lines.append("from " + ",".join(str(n) for n in self.networks))
        return "\n".join(lines) + "\n"

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.key)

    def allows(self, address: str) -> bool:
        """Whether the worker may connect to ``address`` (an IP; host names only
        when no network is registered: a name could resolve anywhere)."""
        if not self.networks:
            return True
        try:
            addr = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        return any(addr.version == net.version and addr in net for net in self.networks)


def parse_networks(text: str) -> tuple[IpNet, ...]:
    """``NET[,NET...]`` (addresses or CIDR networks) to networks; ValueError if bad."""
    nets = []
    for part in text.split(","):
        part = part.strip()
        if part:
            nets.append(ipaddress.ip_network(part, strict=False))
    if not nets:
        raise ValueError("give at least one address or network")
    return tuple(nets)


def parse(text: str) -> Registration:
    """A registration from its file; ValueError if it is not one."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ValueError("empty")
    try:
        key = check_public_key(lines[0])
    except InvalidRequest as e:
        raise ValueError(str(e)) from None
    networks: tuple[IpNet, ...] = ()
    for line in lines[1:]:
        word, _, rest = line.partition(" ")
        if word != "from" or networks:
            raise ValueError(f"unexpected line {line[:40]!r}")
        networks = parse_networks(rest)
    return Registration(key, networks)


def read(storage: Storage, name: str) -> Registration | None:
    """The registration of ``name``, None if it has none. A file that is not a
    registration refuses every request (logged for the operator)."""
    path = storage.pin(name)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return parse(text)
    except ValueError as e:
        log.error("%s: not a registration (%s); every request for %s is refused until "
                  "`bakgrab trust %s --key ...`", path, e, name, name)
        return Registration("", ())


def write(storage: Storage, name: str, registration: Registration) -> None:
    """Register ``name`` (operator actions only; replaces what was there)."""
    write_atomic(storage.pin(name), registration.text(), mode=0o644)


def accepted_dir(storage: Storage) -> Path:
    """Where accepted task ids are recorded (made by the first record)."""
    return storage.state / "accepted"


def check_request(storage: Storage, settings: Settings, task: str, task_id: str,
                  request: SignedRequest, now: float | None = None) -> Registration | None:
    """Refuse ``request`` unless it is the name's own client's, fresh or a
    redelivery (see the module docstring). The registration it was checked
    against, or None for a grab that may enrol the name after it succeeds."""
    now = time.time() if now is None else now
    registration = read(storage, request.name)
    if registration is None and not (settings.enrol == "first-use" and task == GRAB):
        log.warning("refused %s %s for %s: the name is not registered", task, task_id,
                    request.name)
        raise refused(request.name)
    key = registration.key if registration is not None else request.host_key
    if request.host_key != key or not verified(key, task, task_id, request):
        log.warning("refused %s %s for %s: not signed by the registered key", task, task_id,
                    request.name)
        raise refused(request.name)
    # From here the sender is the name's own client: it may be told details.
    if registration is not None and not registration.allows(request.address):
        log.warning("refused %s %s for %s: address %s is outside its registration", task,
                    task_id, request.name, request.address)
        raise InvalidRequest(
            f"address: {request.name} is registered to connect only to "
            f"{', '.join(str(n) for n in registration.networks)}; {request.address} is "
            "outside it, so the backup host did not connect (`bakgrab trust NAME --key ... "
            "--from NET` on the backup host changes it)")
    check_fresh(storage, settings, task, task_id, request, now)
    if registration is None:
        check_enrolments(storage, settings, request.name, key)
    return registration


def names_of(storage: Storage, key: str) -> list[str]:
    """The names registered to ``key``."""
    found = []
    with contextlib.suppress(FileNotFoundError), os.scandir(storage.pin("x").parent) as it:
        for entry in it:
            if entry.name.endswith(".pub") and not entry.name.startswith("."):
                name = entry.name[:-len(".pub")]
                registration = read(storage, name)
                if registration is not None and registration.key == key:
                    found.append(name)
    return sorted(found)


def check_enrolments(storage: Storage, settings: Settings, name: str, key: str) -> None:
    """First-use enrolment gives one client key at most ``max_names_per_client``
    names (issue 11: names per credential), so a client cannot claim a
    fleet's worth of names for itself."""
    owned = names_of(storage, key)
    if name not in owned and len(owned) >= settings.max_names_per_client:
        log.warning("refused the first grab of %s: its key already has %d names (%s)", name,
                    len(owned), ", ".join(owned[:10]))
        raise InvalidRequest(
            f"name: this client already has {len(owned)} name(s) on this backup host, "
            f"max_names_per_client={settings.max_names_per_client}; the operator registers "
            "more with `bakgrab trust NAME --key ...`")


def verified(key: str, task: str, task_id: str, request: SignedRequest) -> bool:
    try:
        public = load_ssh_public_key(key.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        return False
    if not isinstance(public, Ed25519PublicKey):
        return False
    try:
        public.verify(signature_bytes(request.sig),
                      signed_message(task, task_id, request.signed))
    except InvalidSignature:
        return False
    return True


def check_fresh(storage: Storage, settings: Settings, task: str, task_id: str,
                request: SignedRequest, now: float) -> None:
    """A first delivery within the window, or a redelivery of the same message."""
    digest = hashlib.sha256(signed_message(task, task_id, request.signed)).hexdigest()
    base = accepted_dir(storage)
    horizon = settings.job_timeout + settings.request_window
    sweep(base, horizon)
    record = base / f"{task_id}.json"
    known = read_record(record)
    if known is None:
        if abs(now - request.ts) > settings.request_window:
            log.warning("refused %s %s for %s: signed %+.0fs from now, outside "
                        "request_window=%ds", task, task_id, request.name, request.ts - now,
                        settings.request_window)
            raise InvalidRequest(
                f"ts: the request was signed {abs(now - request.ts):.0f}s "
                f"{'before' if request.ts < now else 'after'} the backup host's clock; at "
                f"most {settings.request_window}s are accepted: check both clocks (NTP)")
        known = create_record(record, digest, request.name)
    if known != digest:
        raise refused(request.name)
    if now - request.ts > horizon:
        raise InvalidRequest(
            f"ts: a redelivery of a job signed {now - request.ts:.0f}s ago, more than "
            f"job_timeout + request_window ({horizon}s): no client waits for it any more")


def read_record(path: Path) -> str | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return ""  # unreadable: matches no message
    digest = data.get("digest") if isinstance(data, dict) else None
    return digest if isinstance(digest, str) else ""


def create_record(path: Path, digest: str, name: str) -> str:
    """Write the record unless one exists; the digest the record holds."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    path.parent.mkdir(mode=0o700, exist_ok=True)
    write_atomic(tmp, json.dumps({"digest": digest, "name": name}))
    try:
        os.link(tmp, path)  # fails if another delivery recorded this id first
    except FileExistsError:
        return read_record(path) or ""
    finally:
        tmp.unlink(missing_ok=True)
    return digest


def sweep(base: Path, horizon: float) -> None:
    """Forget task ids no redelivery can come for any more (records older
    than ``horizon`` seconds by this host's clock)."""
    now = time.time()
    if not base.is_dir():
        return
    with os.scandir(base) as it:
        for entry in it:
            with contextlib.suppress(OSError):
                if now - entry.stat(follow_symlinks=False).st_mtime > horizon:
                    os.unlink(entry.path)


def enrol_after_pull(storage: Storage, name: str, key: str) -> None:
    """First-use enrolment: register ``name`` to ``key`` now that its first
    grab succeeded, unless a registration appeared meanwhile (then that one
    holds and this grab is refused before its snapshot is published)."""
    path = storage.pin(name)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write_atomic(tmp, Registration(key).text(), mode=0o644)
    try:
        os.link(tmp, path)
    except FileExistsError:
        current = read(storage, name)
        if current is None or current.key != key:
            raise refused(name) from None
        return
    finally:
        tmp.unlink(missing_ok=True)
    log.info("enrolled %s on first use: key %s", name, fingerprint(key))

"""The grab request: its fields, their validation and their redacted form.

Anyone who can reach the broker can send a task, so every field is hostile
until :func:`validate` has passed it. Validation is strict (unknown fields
are refused, sizes are bounded) and its messages name the field but never
echo a key. :func:`redacted` is the only form of a request that may be
shown: it is what ``argsrepr``/``kwargsrepr`` carry to events, logs and
Flower.

Every request is signed (issue 11): ``sig`` is the client's ed25519
signature, made with its persistent identity key (the one-shot sshd's host
key), over :func:`signed_message`: a context string, the task name, the task
id and :func:`canonical` (sorted-key JSON) of every other field, ``ts`` (the
client's clock, Unix seconds) and the sealed ``key`` included, so no field
can be swapped or moved to another task. Validation here is stateless: it
checks the fields' shapes and keeps the signed bytes; the worker checks the
signature against the key registered for the name
(:mod:`bakgrab.worker.names`).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import ipaddress
import json
import re
import time
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from bakgrab.tasks import sealed
from bakgrab.tasks.errors import InvalidRequest

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
USER_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")
HOST_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
PUBKEY_RE = re.compile(r"ssh-ed25519 [A-Za-z0-9+/]{68}")

MAX_EXCLUDES = 4096
MAX_EXCLUDE_LEN = 4096
MAX_KEY_LEN = 4096
MAX_LIST_BYTES = 256 << 10
"""Most bytes the excludes (or a restore's paths) take in a request, as JSON:
the largest valid request then fits the worker's max_message_bytes (issue 11)."""
REQUEST_VERSION = 1
REDACTED = "<redacted>"

FIELDS = ("v", "name", "address", "port", "user", "key", "host_key", "excludes", "ts", "sig")
OPTIONAL_FIELDS = ("verify",)
"""Grab fields a request may leave out (sent only when set, so a worker that
predates one refuses only the requests that ask for it)."""
SIGNATURE_CONTEXT = b"bakgrab-request-signature-v1\0"
"""Prefix of every signed message: a signature made for anything else never fits."""
SIG_RE = re.compile(r"[A-Za-z0-9+/]{86}==")
"""Base64 of a 64-byte ed25519 signature."""
MAX_TS = 1 << 40


@dataclasses.dataclass(frozen=True)
class GrabRequest:
    """A validated request to pull one backup of ``name``."""

    name: str
    address: str
    port: int
    user: str
    key: str = dataclasses.field(repr=False)
    host_key: str
    excludes: tuple[str, ...] = ()
    ts: int = 0
    """The client's clock when it signed (Unix seconds)."""
    sig: str = ""
    """The client's signature (base64); see :func:`signed_message`."""
    signed: bytes = dataclasses.field(default=b"", repr=False, compare=False)
    """:func:`canonical` of the fields as received (the sealed key in it)."""
    verify: bool = False
    """Re-read what the pull wrote before publishing (``backup --verify``, issue 15)."""

    def to_wire(self) -> dict[str, Any]:
        """The task kwargs (holds the key: never log this)."""
        extra: dict[str, Any] = {"verify": True} if self.verify else {}
        return {**extra,
            "v": REQUEST_VERSION,
            "name": self.name,
            "address": self.address,
            "port": self.port,
            "user": self.user,
            "key": self.key,
            "host_key": self.host_key,
            "excludes": list(self.excludes),
            "ts": self.ts,
            "sig": self.sig,
        }

    @property
    def host_key_fingerprint(self) -> str:
        return fingerprint(self.host_key)


def fingerprint(public_key: str) -> str:
    """OpenSSH-style ``SHA256:...`` fingerprint of a one-line public key."""
    blob = base64.b64decode(public_key.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def canonical(fields: Mapping[str, Any]) -> bytes:
    """The signed form of request fields: every field but ``sig``, as JSON with
    sorted keys and no spaces (what a JSON round trip through the broker keeps)."""
    body = {k: v for k, v in fields.items() if k != "sig"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def signed_message(task: str, task_id: str, body: bytes) -> bytes:
    """What a request's signature is over: the context, the task name, the task
    id (neither holds a NUL) and :func:`canonical` of its fields."""
    return SIGNATURE_CONTEXT + task.encode() + b"\0" + task_id.encode() + b"\0" + body


def sign(fields: Mapping[str, Any], task: str, task_id: str, identity: Ed25519PrivateKey,
         now: float | None = None) -> dict[str, Any]:
    """``fields`` with ``ts`` set to now and ``sig`` to the client's signature
    of them for ``task`` under ``task_id`` (which the client must send with)."""
    out = dict(fields)
    out["ts"] = int(time.time() if now is None else now)
    out.pop("sig", None)
    signature = identity.sign(signed_message(task, task_id, canonical(out)))
    out["sig"] = base64.b64encode(signature).decode("ascii")
    return out


def check_ts(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < MAX_TS:
        raise InvalidRequest("ts: the signing time, an integer of Unix seconds")
    return value


def check_sig(value: Any) -> str:
    if not isinstance(value, str) or not SIG_RE.fullmatch(value):
        raise InvalidRequest("sig: an ed25519 signature in base64 (bakgrab >= 0.2 clients "
                             "sign every request)")
    return value


def signature_bytes(sig: str) -> bytes:
    """The raw signature of a checked ``sig`` field."""
    try:
        return base64.b64decode(sig, validate=True)
    except binascii.Error:  # pragma: no cover -- SIG_RE admits only valid base64
        return b""


def redacted(fields: Mapping[str, Any]) -> str:
    """A printable form of request fields with the key replaced; safe to show."""
    shown = {}
    for k in ("name", "address", "port", "user"):
        if k in fields:
            shown[k] = fields[k]
    if "key" in fields:
        shown["key"] = REDACTED
    host_key = fields.get("host_key")
    if isinstance(host_key, str) and PUBKEY_RE.fullmatch(host_key):
        shown["host_key"] = fingerprint(host_key)
    excludes = fields.get("excludes")
    if isinstance(excludes, list | tuple):
        shown["excludes"] = f"<{len(excludes)} patterns>"
    if isinstance(fields.get("snapshot"), str):
        shown["snapshot"] = fields["snapshot"][:100]
    paths = fields.get("paths")
    if isinstance(paths, list | tuple):
        shown["paths"] = f"<{len(paths)} paths>"
    return repr(shown)


def check_envelope(fields: Any, names: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    """A mapping with exactly the fields ``names`` (and maybe ``optional``
    ones) and version 1."""
    if not isinstance(fields, Mapping):
        raise InvalidRequest("request: expected a mapping of fields")
    unknown = [k for k in fields if k not in names and k not in optional]
    if unknown:
        # never echo the names: a hostile one could carry anything, a key too
        raise InvalidRequest(f"request: {len(unknown)} unknown field(s); the fields are "
                             f"{', '.join(names)}")
    missing = [k for k in names if k not in fields]
    if missing:
        raise InvalidRequest(f"request: missing field(s) {', '.join(missing)}")
    version = fields["v"]
    if isinstance(version, bool) or not isinstance(version, int) or version != REQUEST_VERSION:
        raise InvalidRequest(f"request: version must be {REQUEST_VERSION}; upgrade bakgrab")


def validate(fields: Any, request_key: X25519PrivateKey | None = None) -> GrabRequest:
    """A :class:`GrabRequest` from untrusted task kwargs, or InvalidRequest.

    With ``request_key`` (the worker always passes it), the ``key`` field must
    be sealed to it (:mod:`bakgrab.tasks.sealed`) and is opened here, in the task body;
    without, ``key`` is the plain private key (tests, local tools)."""
    check_envelope(fields, FIELDS, OPTIONAL_FIELDS)
    verify = fields.get("verify", False)
    if not isinstance(verify, bool):
        raise InvalidRequest("verify: true or false")
    request = GrabRequest(
        name=check_name(fields["name"]),
        address=check_address(fields["address"]),
        port=check_port(fields["port"]),
        user=check_user(fields["user"]),
        key=check_key(fields["key"], request_key),
        host_key=check_public_key(fields["host_key"]),
        excludes=check_excludes(fields["excludes"]),
        ts=check_ts(fields["ts"]),
        sig=check_sig(fields["sig"]),
        verify=verify,
    )
    # every field passed its check: all are JSON text, integers and lists of text
    return dataclasses.replace(request, signed=canonical(fields))


def check_name(value: Any) -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise InvalidRequest(
            "name: 1-64 characters, letters, digits and _.- only, starting with a letter or digit"
        )
    return value


def check_port(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise InvalidRequest("port: an integer from 1 to 65535")
    return value


def check_user(value: Any) -> str:
    if not isinstance(value, str) or not USER_RE.fullmatch(value):
        raise InvalidRequest("user: a login name of letters, digits and _.- (at most 32)")
    return value


def check_address(value: Any) -> str:
    """An IP address or a DNS host name; nothing ssh could read as an option."""
    if not isinstance(value, str) or not 0 < len(value) <= 253 or "%" in value:
        raise InvalidRequest("address: an IP address (no zone id) or host name")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    labels = value.rstrip(".").split(".")
    if not all(HOST_LABEL_RE.fullmatch(label) for label in labels) or labels[-1].isdigit():
        raise InvalidRequest("address: an IP address or host name")
    return value


def check_key(value: Any, request_key: X25519PrivateKey | None) -> str:
    """The one-time key of a request: opened when sealed (always, on a worker)."""
    return check_private_key(open_sealed(value, request_key) if request_key is not None
                             else value)


def open_sealed(value: Any, request_key: X25519PrivateKey) -> str:
    """The plain one-time key from its sealed form, or InvalidRequest."""
    if not sealed.looks_sealed(value):
        raise InvalidRequest(
            "key: must be sealed to this backup host's request key (bakgrab >= 0.1 "
            "clients do this; a plain key is refused so that it never sits in the broker)")
    try:
        return sealed.unseal(request_key, value).decode("ascii")
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest(
            "key: not sealed to this backup host's request key; the client may have pinned "
            "another backup host's key") from None


def check_private_key(value: Any) -> str:
    """An unencrypted OpenSSH ed25519 private key (the one-time key)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    if not isinstance(value, str) or not 0 < len(value) <= MAX_KEY_LEN:
        raise InvalidRequest("key: an OpenSSH ed25519 private key")
    from cryptography.exceptions import UnsupportedAlgorithm

    try:
        key = load_ssh_private_key(value.encode("ascii"), password=None)
    except (ValueError, TypeError, UnicodeEncodeError, UnsupportedAlgorithm):
        raise InvalidRequest("key: not an unencrypted OpenSSH private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InvalidRequest("key: must be an ed25519 key")
    return value if value.endswith("\n") else value + "\n"


def check_public_key(value: Any) -> str:
    """A one-line ``ssh-ed25519 AAAA...`` public key (the client's sshd host key)."""
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    if not isinstance(value, str):
        raise InvalidRequest("host_key: an ssh-ed25519 public key line")
    parts = value.strip().split()
    line = " ".join(parts[:2])
    if not PUBKEY_RE.fullmatch(line):
        raise InvalidRequest("host_key: an ssh-ed25519 public key line")
    try:
        load_ssh_public_key(line.encode("ascii"))
    except ValueError:
        raise InvalidRequest("host_key: not a valid ssh-ed25519 public key") from None
    return line


def check_excludes(value: Any) -> tuple[str, ...]:
    """A bounded list of single-line exclude patterns."""
    if not isinstance(value, list | tuple):
        raise InvalidRequest("excludes: a list of patterns")
    if len(value) > MAX_EXCLUDES:
        raise InvalidRequest(f"excludes: at most {MAX_EXCLUDES} patterns")
    out = []
    for i, pattern in enumerate(value):
        if not isinstance(pattern, str) or not 0 < len(pattern) <= MAX_EXCLUDE_LEN:
            raise InvalidRequest(f"excludes[{i}]: a pattern of 1-{MAX_EXCLUDE_LEN} characters")
        if any(c in pattern for c in "\n\r\0"):
            raise InvalidRequest(f"excludes[{i}]: a pattern must be a single line")
        if not pattern.strip():
            raise InvalidRequest(f"excludes[{i}]: a pattern must not be blank")
        out.append(pattern)
    check_list_bytes("excludes", out)
    return tuple(out)


def check_list_bytes(field: str, items: list[str]) -> None:
    """At most MAX_LIST_BYTES of ``items`` as they travel (JSON, escaped)."""
    if sum(len(json.dumps(item)) + 2 for item in items) > MAX_LIST_BYTES:
        raise InvalidRequest(f"{field}: at most {MAX_LIST_BYTES >> 10} KiB in all")


RESTORE_FIELDS = ("v", "name", "snapshot", "paths", "address", "port", "user", "key",
                  "host_key", "ts", "sig")
MAX_PATHS = 1024
MAX_PATH_LEN = 4096
SNAPSHOT_ID_RE = re.compile(r"latest|[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\.\d{4}-\d{2}-\d{2}\.\d{1,12}")


@dataclasses.dataclass(frozen=True)
class RestoreRequest:
    """A validated request to push ``paths`` of a snapshot of ``name`` back to
    the client's staging directory."""

    name: str
    snapshot: str
    paths: tuple[str, ...]
    address: str
    port: int
    user: str
    key: str = dataclasses.field(repr=False)
    host_key: str
    ts: int = 0
    sig: str = ""
    signed: bytes = dataclasses.field(default=b"", repr=False, compare=False)

    def to_wire(self) -> dict[str, Any]:
        return {"v": REQUEST_VERSION, "name": self.name, "snapshot": self.snapshot,
                "paths": list(self.paths), "address": self.address, "port": self.port,
                "user": self.user, "key": self.key, "host_key": self.host_key,
                "ts": self.ts, "sig": self.sig}

    @property
    def host_key_fingerprint(self) -> str:
        return fingerprint(self.host_key)


def validate_restore(fields: Any, request_key: X25519PrivateKey | None = None) -> RestoreRequest:
    """A :class:`RestoreRequest` from untrusted task kwargs, or InvalidRequest."""
    check_envelope(fields, RESTORE_FIELDS)
    snapshot = fields["snapshot"]
    if not isinstance(snapshot, str) or not SNAPSHOT_ID_RE.fullmatch(snapshot):
        raise InvalidRequest("snapshot: 'latest' or a snapshot name NAME.YYYY-mm-dd.UNIXTIME")
    name = check_name(fields["name"])
    if snapshot != "latest" and snapshot.rsplit(".", 2)[0] != name:
        raise InvalidRequest("snapshot: must be a snapshot of the requested name")
    request = RestoreRequest(
        name=name,
        snapshot=snapshot,
        paths=check_paths(fields["paths"]),
        address=check_address(fields["address"]),
        port=check_port(fields["port"]),
        user=check_user(fields["user"]),
        key=check_key(fields["key"], request_key),
        host_key=check_public_key(fields["host_key"]),
        ts=check_ts(fields["ts"]),
        sig=check_sig(fields["sig"]),
    )
    return dataclasses.replace(request, signed=canonical(fields))


def check_paths(value: Any) -> tuple[str, ...]:
    """Paths inside a snapshot: relative, normalised, no '..', single-line."""
    if not isinstance(value, list | tuple) or not 0 < len(value) <= MAX_PATHS:
        raise InvalidRequest(f"paths: a list of 1 to {MAX_PATHS} paths")
    out = []
    for i, path in enumerate(value):
        if not isinstance(path, str) or not 0 < len(path) <= MAX_PATH_LEN:
            raise InvalidRequest(f"paths[{i}]: a path of 1-{MAX_PATH_LEN} characters")
        if any(c in path for c in "\n\r\0"):
            raise InvalidRequest(f"paths[{i}]: a path must be a single line")
        parts = [p for p in path.strip("/").split("/") if p not in ("", ".")]
        if ".." in parts:
            raise InvalidRequest(f"paths[{i}]: '..' is not allowed")
        out.append("/".join(parts) or ".")
    check_list_bytes("paths", list(value))
    return tuple(out)

"""Keys of the backed-up side: the one-time login key and the sshd host key.

* The one-time ed25519 key pair is made in memory for one job; its private
  half is only ever held in this process and sent (redacted from every
  display) to the worker. It is never written to the client's disk.
* The one-shot sshd's host key is persistent, kept 0600 in the client's
  state dir (0700). It is also the client's identity (issue 11): every
  request is signed with it, and the backup host's operator registers its
  public half for the name (``bakgrab key`` prints it; ``bakgrab trust NAME
  --key ...`` registers it). Losing it means asking the operator to re-key.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bakgrab.tasks import keyfile
from bakgrab.tasks.errors import ClientSetupError


@dataclasses.dataclass(frozen=True)
class KeyPair:
    private: str = dataclasses.field(repr=False)
    """OpenSSH private key text (a secret)."""
    public: str
    """``ssh-ed25519 AAAA...`` line."""


def _pair(key: Ed25519PrivateKey, comment: str) -> KeyPair:
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()
    return KeyPair(private, f"{public} {comment}".strip())


def one_time_key() -> KeyPair:
    """A fresh ed25519 key pair that lives only in memory."""
    return _pair(Ed25519PrivateKey.generate(), "bakgrab-one-time")


HOST_KEY_FILE = "ssh_host_ed25519_key"


def host_key(state_dir: Path) -> tuple[Path, str]:
    """Path and public line of the persistent sshd host key, made on first use."""
    path, key = identity(state_dir)
    return path, public_line(key)


def public_line(key: Ed25519PrivateKey) -> str:
    """The ``ssh-ed25519 AAAA...`` line of ``key`` (what an operator registers)."""
    return _pair(key, "").public


def identity(state_dir: Path) -> tuple[Path, Ed25519PrivateKey]:
    """The persistent host key (the client's identity), made on first use."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = state_dir / HOST_KEY_FILE
    if not path.exists():
        pair = _pair(Ed25519PrivateKey.generate(), "")
        # when several jobs start at once (--to), the first key made wins and
        # every one of them serves and announces that one
        keyfile.create_once(path, pair.private.encode())
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, Ed25519PrivateKey):
        # The client's identity: a new one would need a new registration on
        # every backup host, so say what to do instead of making one (issue 13).
        raise ClientSetupError(
            f"{path}: not an unencrypted OpenSSH ed25519 private key (damaged?). It is this "
            "client's identity: restore it from a backup, or move it away and let bakgrab make "
            "a new one, then register the new key (`bakgrab key`) on every backup host with "
            "`bakgrab trust NAME --key ...`")
    return path, key

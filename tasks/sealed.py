"""The one-time key travels sealed to the backup host's request key.

Anything that stores or shows task arguments (Redis queues and the unacked
hash, persistence files, ``celery inspect``, Flower's worker pages, logs,
tracebacks) can then only ever hold ciphertext: only the worker's task body,
holding the request private key, opens it.

Construction (a sealed box): a fresh X25519 key pair per message, ECDH with
the recipient's public key, HKDF-SHA256 over both public keys, then
ChaCha20-Poly1305. A key is used for one message only, so the nonce is fixed.
Wire form: ``bakgrab-sealed-v1:`` + base64(ephemeral public key + ciphertext).
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from bakgrab.tasks import keyfile

PREFIX = "bakgrab-sealed-v1:"
INFO = b"bakgrab sealed one-time key v1"
NONCE = b"\0" * 12
MAX_SEALED = 8192
RAW = serialization.Encoding.Raw


def _derive(shared: bytes, eph_pub: bytes, recipient_pub: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=eph_pub + recipient_pub, info=INFO).derive(shared)


def public_text(key: X25519PublicKey) -> str:
    return base64.b64encode(key.public_bytes(RAW, serialization.PublicFormat.Raw)).decode()


def load_public(text: str) -> X25519PublicKey:
    """A request public key from its base64 text; ValueError if it is not one."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
        return X25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError):
        raise ValueError("not a bakgrab request public key (base64 of 32 bytes)") from None


def seal(recipient: X25519PublicKey, plaintext: bytes) -> str:
    eph = X25519PrivateKey.generate()
    eph_pub = eph.public_key().public_bytes(RAW, serialization.PublicFormat.Raw)
    rec_pub = recipient.public_bytes(RAW, serialization.PublicFormat.Raw)
    key = _derive(eph.exchange(recipient), eph_pub, rec_pub)
    box = ChaCha20Poly1305(key).encrypt(NONCE, plaintext, PREFIX.encode())
    return PREFIX + base64.b64encode(eph_pub + box).decode()


def looks_sealed(text: object) -> bool:
    return (isinstance(text, str) and text.startswith(PREFIX)
            and len(text) <= MAX_SEALED)


def unseal(private: X25519PrivateKey, text: str) -> bytes:
    """The plaintext; ValueError if ``text`` was not sealed to this key."""
    if not looks_sealed(text):
        raise ValueError("not a sealed key")
    try:
        raw = base64.b64decode(text[len(PREFIX):], validate=True)
    except binascii.Error:
        raise ValueError("not a sealed key") from None
    if len(raw) < 32 + 16:
        raise ValueError("not a sealed key")
    eph_pub, box = raw[:32], raw[32:]
    rec_pub = private.public_key().public_bytes(RAW, serialization.PublicFormat.Raw)
    key = _derive(private.exchange(X25519PublicKey.from_public_bytes(eph_pub)), eph_pub, rec_pub)
    try:
        return ChaCha20Poly1305(key).decrypt(NONCE, box, PREFIX.encode())
    except InvalidTag:
        raise ValueError("the key was not sealed to this backup host's request key") from None


def load_or_create_private(path: Path) -> X25519PrivateKey:
    """The request private key kept at ``path`` (0600), made on first use."""
    if not path.exists():
        raw = X25519PrivateKey.generate().private_bytes(
            RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())
        keyfile.create_once(path, raw)
    data = path.read_bytes()
    if len(data) != 32:
        raise ValueError(f"{path} is not a bakgrab request key")
    return X25519PrivateKey.from_private_bytes(data)

"""bakgrab.tasks.sealed: the one-time key travels sealed to the backup host's request key.

Only the holder of the request private key opens a box; anything else (another
key, a changed or cut box, garbage) is a ValueError, and validate() turns every
such failure into an InvalidRequest that never quotes the key.
"""

from __future__ import annotations

import base64
import contextlib
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from bakgrab.tasks.errors import InvalidRequest
from bakgrab.tasks.request import MAX_KEY_LEN, redacted, validate, validate_restore
from bakgrab.tasks.sealed import (
    MAX_SEALED,
    PREFIX,
    load_or_create_private,
    load_public,
    looks_sealed,
    public_text,
    seal,
    unseal,
)

HYP = settings(database=None, deadline=None, max_examples=100)

RECIPIENT = X25519PrivateKey.generate()
OTHER = X25519PrivateKey.generate()


def raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def openssh_key_pair() -> tuple[str, str]:
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption()).decode()
    public = key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()
    return private, public


PRIVATE, PUBLIC = openssh_key_pair()
B64_32 = base64.b64encode(b"\1" * 32).decode()
"""Base64 of 32 bytes: a valid public key text, to spoil in small ways."""


def box_bytes(text: str) -> bytes:
    """The raw box of a sealed text: ephemeral public key + ciphertext + tag."""
    assert text.startswith(PREFIX)
    return base64.b64decode(text[len(PREFIX):], validate=True)


def as_text(box: bytes) -> str:
    return PREFIX + base64.b64encode(box).decode()


# -- seal / unseal ---------------------------------------------------------------


@pytest.mark.parametrize(
    "plaintext",
    [b"", b"x", b"\0\xff" * 7, PRIVATE.encode(), os.urandom(MAX_KEY_LEN)],
    ids=["empty", "one byte", "binary", "openssh key", "max key length"],
)
def test_round_trip(plaintext: bytes) -> None:
    """What is sealed to a public key is opened by its private key, unchanged."""
    text = seal(RECIPIENT.public_key(), plaintext)
    assert text.startswith(PREFIX)
    assert looks_sealed(text)
    assert unseal(RECIPIENT, text) == plaintext


def test_seal_is_randomised_and_hides_the_plaintext() -> None:
    """Each seal uses a fresh ephemeral key: the same key sealed twice gives two
    different texts, and neither holds the plaintext or its base64."""
    first = seal(RECIPIENT.public_key(), PRIVATE.encode())
    second = seal(RECIPIENT.public_key(), PRIVATE.encode())
    assert first != second
    assert box_bytes(first)[:32] != box_bytes(second)[:32]
    for text in (first, second):
        assert PRIVATE.encode() not in box_bytes(text)
        for line in PRIVATE.splitlines()[1:-1]:
            assert line not in text
        assert "b3BlbnNzaC1rZXktdjE" not in text  # base64 of "openssh-key-v1"


def test_box_layout() -> None:
    """The box is the ephemeral public key (32 bytes), then the ciphertext, as
    long as the plaintext, then a 16-byte tag."""
    for size in (0, 1, 100):
        assert len(box_bytes(seal(RECIPIENT.public_key(), b"k" * size))) == 32 + size + 16


def test_sealed_to_another_key_is_refused() -> None:
    """A box sealed to another recipient does not open, and says why."""
    text = seal(OTHER.public_key(), PRIVATE.encode())
    with pytest.raises(ValueError, match="not sealed to this"):
        unseal(RECIPIENT, text)
    assert unseal(OTHER, text) == PRIVATE.encode()


@pytest.mark.parametrize("bit", [0x01, 0x80])
def test_any_flipped_byte_of_the_box_is_refused(bit: int) -> None:
    """Flipping a bit of any byte of the box (ephemeral key, ciphertext or
    tag) makes it refuse to open."""
    box = box_bytes(seal(RECIPIENT.public_key(), b"one-time key \x00\xff" * 4))
    for i in range(len(box)):
        tampered = box[:i] + bytes([box[i] ^ bit]) + box[i + 1:]
        with pytest.raises(ValueError):
            unseal(RECIPIENT, as_text(tampered))


def test_any_flipped_character_of_the_text_is_refused_or_harmless() -> None:
    """Flipping a bit of any character of the sealed text (prefix included)
    either makes it refuse to open, or (base64's unused trailing bits, which
    Python's decoder ignores) leaves the very same box: a changed text never
    opens to a different plaintext."""
    plaintext = PRIVATE.encode()
    text = seal(RECIPIENT.public_key(), plaintext)
    opened_anyway = []
    for i in range(len(text)):
        for bit in (0x01, 0x02, 0x20, 0x40):
            tampered = text[:i] + chr(ord(text[i]) ^ bit) + text[i + 1:]
            try:
                got = unseal(RECIPIENT, tampered)
            except ValueError:
                continue
            assert got == plaintext
            assert box_bytes(tampered) == box_bytes(text)
            opened_anyway.append(i)
    assert all(i >= len(text) - 3 for i in opened_anyway)  # only the last base64 chars


def test_truncated_box_is_refused() -> None:
    """A box cut at any length does not open, whether cut as bytes or as text."""
    text = seal(RECIPIENT.public_key(), b"a one-time key")
    box = box_bytes(text)
    for n in range(len(box)):
        with pytest.raises(ValueError):
            unseal(RECIPIENT, as_text(box[:n]))
    for n in range(len(text)):
        with pytest.raises(ValueError):
            unseal(RECIPIENT, text[:n])


def test_extended_box_is_refused() -> None:
    """Bytes added after the tag make the box refuse to open."""
    box = box_bytes(seal(RECIPIENT.public_key(), b"a one-time key"))
    for extra in (b"\0", b"x" * 3, b"y" * 16):
        with pytest.raises(ValueError):
            unseal(RECIPIENT, as_text(box + extra))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "garbage",
        PREFIX,
        PREFIX + "!!!!",
        PREFIX + "not base64 at all",
        PREFIX + " " + base64.b64encode(b"\0" * 64).decode(),
        PREFIX + base64.b64encode(b"\0" * 64).decode() + "\n",
        PREFIX + base64.b64encode(b"\0" * 47).decode(),
        PREFIX + base64.b64encode(b"\0" * 64).decode(),  # a low-order ephemeral key
        PREFIX + base64.b64encode(os.urandom(200)).decode(),
        PREFIX.upper() + base64.b64encode(os.urandom(64)).decode(),
        "bakgrab-sealed-v2:" + base64.b64encode(os.urandom(64)).decode(),
        PREFIX + "A" * (MAX_SEALED - len(PREFIX) + 4),
    ],
)
def test_garbage_is_refused(text: str) -> None:
    """Anything that is not a box sealed to this key is a ValueError."""
    with pytest.raises(ValueError):
        unseal(RECIPIENT, text)


@pytest.mark.parametrize("value", [None, 5, b"bakgrab-sealed-v1:AAAA", ["x"]])
def test_non_text_is_refused(value: Any) -> None:
    """A value that is not text is a ValueError too, not a TypeError."""
    with pytest.raises(ValueError):
        unseal(RECIPIENT, value)


@HYP
@given(st.text(max_size=300) | st.binary(max_size=300).map(lambda b: as_text(b)))
def test_unseal_raises_only_value_error(text: str) -> None:
    """Whatever the text, unseal() opens it or raises ValueError, nothing else."""
    with contextlib.suppress(ValueError):
        unseal(RECIPIENT, text)


# -- looks_sealed ----------------------------------------------------------------


def test_looks_sealed_bounds() -> None:
    """A text looks sealed if it starts with the prefix and is at most
    MAX_SEALED characters long: the bound is inclusive."""
    fill = MAX_SEALED - len(PREFIX)
    assert looks_sealed(PREFIX)
    assert looks_sealed(PREFIX + "A" * fill)
    assert len(PREFIX + "A" * fill) == MAX_SEALED
    assert not looks_sealed(PREFIX + "A" * (fill + 1))
    assert not looks_sealed(PREFIX + "A" * (10 * MAX_SEALED))


@pytest.mark.parametrize(
    "value",
    ["", PREFIX[:-1], " " + PREFIX + "AAAA", PREFIX.upper() + "AAAA", "bakgrab-sealed-v2:AAAA",
     PRIVATE, PREFIX.encode() + b"AAAA", None, 1, [PREFIX], {PREFIX: 1}],
)
def test_looks_sealed_refuses_other_values(value: Any) -> None:
    """Other text, bytes and non-text values do not look sealed."""
    assert looks_sealed(value) is False


def test_the_largest_acceptable_key_fits_in_a_box() -> None:
    """A key of MAX_KEY_LEN characters (the most check_private_key accepts)
    still makes a box within MAX_SEALED."""
    text = seal(RECIPIENT.public_key(), b"k" * MAX_KEY_LEN)
    assert len(text) <= MAX_SEALED
    assert looks_sealed(text)


# -- public keys -----------------------------------------------------------------


def test_public_text_round_trips() -> None:
    """public_text() is base64 of the 32 raw bytes, and load_public() reads it
    back, also with the whitespace of a file or an environment variable."""
    text = public_text(RECIPIENT.public_key())
    assert base64.b64decode(text) == raw_public(RECIPIENT)
    for shown in (text, text + "\n", f"  {text}\t\n"):
        loaded = load_public(shown)
        assert loaded.public_bytes(Encoding.Raw, PublicFormat.Raw) == raw_public(RECIPIENT)
        assert unseal(RECIPIENT, seal(loaded, b"k")) == b"k"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "garbage",
        "not base64!",
        base64.b64encode(b"\1" * 31).decode(),
        base64.b64encode(b"\1" * 33).decode(),
        base64.b64encode(b"\1" * 64).decode(),
        B64_32.rstrip("="),
        B64_32[:20] + " " + B64_32[20:],
        B64_32 + "\0",
        base64.urlsafe_b64encode(b"\xfb" * 32).decode(),
        "é" * 44,
        PUBLIC,
        PREFIX + B64_32,
    ],
    ids=lambda text: "public-key" if text == PUBLIC else None,  # made at import: one id
)
def test_load_public_rejects_garbage(text: str) -> None:
    """Anything but base64 of 32 bytes is a ValueError that says what is expected."""
    load_public(B64_32)  # the unspoilt text is a public key
    with pytest.raises(ValueError, match="request public key"):
        load_public(text)


# -- the request private key file --------------------------------------------------


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """umask 0, so a mode of 0600 comes from the code, not from the umask."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.usefixtures("permissive_umask")
def test_load_or_create_private_makes_a_0600_file(tmp_path: Path) -> None:
    """The first call makes a 0600 file of the 32 raw key bytes, and nothing else."""
    state = tmp_path / "state"
    state.mkdir()
    path = state / "request.key"
    key = load_or_create_private(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_ISREG(path.lstat().st_mode)
    assert path.read_bytes() == key.private_bytes(
        Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    assert sorted(p.name for p in state.iterdir()) == ["request.key"]  # no temp file left


def test_load_or_create_private_reuses_the_file(tmp_path: Path) -> None:
    """Later calls read the same key back and leave the file as it is, so what
    was sealed to the first key opens with the second."""
    path = tmp_path / "request.key"
    first = load_or_create_private(path)
    before = path.stat()
    data = path.read_bytes()
    second = load_or_create_private(path)
    assert raw_public(second) == raw_public(first)
    assert path.read_bytes() == data
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert unseal(second, seal(first.public_key(), b"k")) == b"k"


def test_load_or_create_private_keys_differ_per_file(tmp_path: Path) -> None:
    """Each new file holds a new key."""
    a = load_or_create_private(tmp_path / "a.key")
    b = load_or_create_private(tmp_path / "b.key")
    assert raw_public(a) != raw_public(b)


@pytest.mark.parametrize("content", [b"", b"\0" * 31, b"\0" * 33, b"x" * 64])
def test_load_or_create_private_refuses_a_file_of_the_wrong_size(
    tmp_path: Path, content: bytes
) -> None:
    """A file that is not 32 bytes is refused (ValueError naming it), not replaced."""
    path = tmp_path / "request.key"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="request.key is not a bakgrab request key"):
        load_or_create_private(path)
    assert path.read_bytes() == content


# -- validate() with a request key -------------------------------------------------


def grab_fields(key: Any) -> dict[str, Any]:
    return {"v": 1, "name": "host", "address": "192.0.2.10", "port": 2222, "user": "backup",
            "key": key, "host_key": PUBLIC, "excludes": ["*.tmp"], "ts": 1_900_000_000,
            "sig": "A" * 86 + "=="}


def restore_fields(key: Any) -> dict[str, Any]:
    return {"v": 1, "name": "host", "snapshot": "latest", "paths": ["etc/hosts"],
            "address": "192.0.2.10", "port": 2222, "user": "backup", "key": key,
            "host_key": PUBLIC, "ts": 1_900_000_000, "sig": "A" * 86 + "=="}


VALIDATORS: list[tuple[Callable[..., Any], Callable[[Any], dict[str, Any]]]] = [
    (validate, grab_fields),
    (validate_restore, restore_fields),
]
VALIDATOR_IDS = ["grab", "restore"]


def assert_no_key_text(error: BaseException, *texts: str) -> None:
    """Neither the key nor its sealed form appears in the error's message, repr or args."""
    shown = [str(error), repr(error), repr(error.args)]
    for text in texts:
        pieces = [text.strip(), *(line for line in text.splitlines()
                                  if line and not line.startswith("-----"))]
        if text.startswith(PREFIX):
            body = text[len(PREFIX):]
            pieces += [body[i:i + 16] for i in range(0, len(body) - 15, 16)]
        for piece in pieces:
            for out in shown:
                assert piece not in out
    for out in shown:
        assert "b3BlbnNzaC1rZXktdjE" not in out  # base64 of "openssh-key-v1"


@pytest.mark.parametrize(("check", "make"), VALIDATORS, ids=VALIDATOR_IDS)
def test_sealed_key_is_opened_and_checked(
    check: Callable[..., Any], make: Callable[[Any], dict[str, Any]]
) -> None:
    """With the request key, a real ed25519 OpenSSH key sealed to it is opened:
    the request holds the plain key (with its final newline), never the box."""
    text = seal(RECIPIENT.public_key(), PRIVATE.encode())
    req = check(make(text), request_key=RECIPIENT)
    assert req.key == PRIVATE
    no_newline = seal(RECIPIENT.public_key(), PRIVATE.rstrip("\n").encode())
    assert check(make(no_newline), request_key=RECIPIENT).key == PRIVATE
    assert PRIVATE not in repr(req) and text not in repr(req)


@pytest.mark.parametrize(("check", "make"), VALIDATORS, ids=VALIDATOR_IDS)
def test_plain_key_is_refused_with_a_request_key(
    check: Callable[..., Any], make: Callable[[Any], dict[str, Any]]
) -> None:
    """A plain key (one that would sit in the broker readable) is refused, and
    the refusal says it must be sealed, without quoting it."""
    with pytest.raises(InvalidRequest, match=r"^key: must be sealed") as info:
        check(make(PRIVATE), request_key=RECIPIENT)
    assert info.value.transient is False
    assert_no_key_text(info.value, PRIVATE)
    assert check(make(PRIVATE)).key == PRIVATE  # without a request key it is the plain key


@pytest.mark.parametrize(("check", "make"), VALIDATORS, ids=VALIDATOR_IDS)
def test_key_sealed_to_another_recipient_is_refused(
    check: Callable[..., Any], make: Callable[[Any], dict[str, Any]]
) -> None:
    """A key sealed to another backup host's request key is refused, hinting at
    a pin of the wrong host, without quoting the key or the box."""
    text = seal(OTHER.public_key(), PRIVATE.encode())
    with pytest.raises(InvalidRequest, match=r"^key: not sealed to this") as info:
        check(make(text), request_key=RECIPIENT)
    assert_no_key_text(info.value, PRIVATE, text)


def sealed_garbage() -> dict[str, Any]:
    """Key fields that must all be refused with a request key: garbage, broken
    boxes, and well-sealed boxes of what is not an ed25519 OpenSSH key."""
    box = box_bytes(seal(RECIPIENT.public_key(), PRIVATE.encode()))
    ecdsa = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption()).decode()
    ed_pem = Ed25519PrivateKey.generate().private_bytes(
        Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode()

    def to_recipient(data: bytes) -> str:
        return seal(RECIPIENT.public_key(), data)

    return {
        "garbage": "garbage",
        "empty": "",
        "prefix only": PREFIX,
        "bad base64": PREFIX + "!!!!",
        "short box": as_text(box[:40]),
        "flipped tag": as_text(box[:-1] + bytes([box[-1] ^ 1])),
        "flipped ciphertext": as_text(box[:40] + bytes([box[40] ^ 1]) + box[41:]),
        "too long": PREFIX + "A" * MAX_SEALED,
        "bytes": PREFIX.encode() + base64.b64encode(box),
        "none": None,
        "int": 25519,
        "list": [as_text(box)],
        "sealed garbage": to_recipient(b"not a key at all"),
        "sealed empty": to_recipient(b""),
        "sealed non-ascii": to_recipient(PRIVATE.replace("-----END", "é-----END").encode()),
        "sealed invalid utf-8": to_recipient(b"\xff\xfe" + PRIVATE.encode()),
        "sealed public key": to_recipient(PUBLIC.encode()),
        "sealed ecdsa key": to_recipient(ecdsa.encode()),
        "sealed pkcs8 ed25519": to_recipient(ed_pem.encode()),
        "sealed truncated key": to_recipient(PRIVATE[: len(PRIVATE) // 2].encode()),
        "sealed too long key": to_recipient((PRIVATE + "A" * MAX_KEY_LEN).encode()),
        "sealed twice": to_recipient(seal(RECIPIENT.public_key(), PRIVATE.encode()).encode()),
    }


@pytest.mark.parametrize(("check", "make"), VALIDATORS, ids=VALIDATOR_IDS)
def test_garbage_key_is_refused_with_a_request_key(
    check: Callable[..., Any], make: Callable[[Any], dict[str, Any]]
) -> None:
    """Garbage, broken boxes and boxes of anything but an unencrypted ed25519
    OpenSSH key are InvalidRequest about the key field, quoting neither the
    key nor the box."""
    for what, key in sealed_garbage().items():
        with pytest.raises(InvalidRequest, match=r"^key: ") as info:
            check(make(key), request_key=RECIPIENT)
        assert info.value.transient is False, what
        assert info.value.__cause__ is None, what
        if isinstance(key, str) and key:
            assert_no_key_text(info.value, key, PRIVATE)


def test_redacted_hides_a_sealed_key() -> None:
    """redacted() shows <redacted> for a sealed key, not the box."""
    text = seal(RECIPIENT.public_key(), PRIVATE.encode())
    shown = redacted(grab_fields(text))
    assert "'key': '<redacted>'" in shown
    assert text not in shown and text[len(PREFIX):][:16] not in shown


@HYP
@given(st.binary(max_size=600) | st.text(max_size=600).map(str.encode))
def test_validate_with_request_key_raises_only_invalid_request(plaintext: bytes) -> None:
    """Whatever is sealed in the key field, validate() returns a request or
    raises InvalidRequest: nothing else escapes to the worker."""
    try:
        validate(grab_fields(seal(RECIPIENT.public_key(), plaintext)), request_key=RECIPIENT)
    except InvalidRequest as e:
        assert str(e).startswith("key: ")


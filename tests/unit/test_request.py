"""bakgrab.tasks.request: hostile task kwargs are refused, valid ones survive the wire."""

from __future__ import annotations

import ast
import base64
import contextlib
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_ssh_private_key,
)
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from bakgrab.tasks import request
from bakgrab.tasks.errors import InvalidRequest
from bakgrab.tasks.request import FIELDS, GrabRequest, redacted, validate

HYP = settings(
    database=None,
    deadline=None,
    max_examples=150,
    suppress_health_check=[HealthCheck.too_slow],
)


def openssh_private(key: Any) -> str:
    return key.private_bytes(Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption()).decode()


def openssh_public(key: Any, comment: str = "") -> str:
    line = key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()
    return f"{line} {comment}" if comment else line


def key_pair() -> tuple[str, str]:
    key = Ed25519PrivateKey.generate()
    return openssh_private(key), openssh_public(key)


KEYS = [key_pair() for _ in range(4)]
"""A pool of real ed25519 key pairs: generating one per example would be slow."""

PRIVATE, PUBLIC = KEYS[0]
TS = 1_900_000_000
SIG = "A" * 86 + "=="
"""Well-formed ts and sig: validate() checks their shape; the signature is the
worker's to verify (tests/unit/test_names.py)."""


def secret_fragments(key: str) -> list[str]:
    """The parts of a private key that must never be shown: every base64 line."""
    return [line for line in key.splitlines() if line and not line.startswith("-----")]


def assert_no_key(text: str, key: str) -> None:
    assert key.strip() not in text
    for fragment in secret_fragments(key):
        assert fragment not in text
    assert "b3BlbnNzaC1rZXktdjE" not in text  # base64 of "openssh-key-v1"


def fields(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "v": 1,
        "name": "host.example.com",
        "address": "192.0.2.10",
        "port": 2222,
        "user": "backup",
        "key": PRIVATE,
        "host_key": PUBLIC,
        "excludes": ["*.tmp", "/proc"],
        "ts": TS,
        "sig": SIG,
    }
    base.update(changes)
    return base


def ssh_blob(*parts: bytes) -> bytes:
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


def armored(blob: bytes) -> str:
    b64 = base64.b64encode(blob).decode()
    lines = [b64[i : i + 70] for i in range(0, len(b64), 70)]
    return "\n".join(
        ["-----BEGIN OPENSSH PRIVATE KEY-----", *lines, "-----END OPENSSH PRIVATE KEY-----", ""]
    )


def crafted_private_key(key_type: bytes, cipher: bytes = b"none", kdf: bytes = b"none") -> str:
    """An openssh-key-v1 container with the given key type, cipher and KDF names,
    well-formed enough for a parser to reach those names."""
    body = ssh_blob(b"x" * 32)
    public = ssh_blob(key_type) + body
    private = struct.pack(">II", 7, 7) + ssh_blob(key_type) + body + ssh_blob(b"comment")
    private += bytes(range(1, (8 - len(private) % 8) % 8 + 1))
    kdf_options = ssh_blob(b"saltsaltsaltsalt") + struct.pack(">I", 16) if kdf != b"none" else b""
    blob = (
        b"openssh-key-v1\0"
        + ssh_blob(cipher, kdf, kdf_options)
        + struct.pack(">I", 1)
        + ssh_blob(public, private)
    )
    return armored(blob)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def refused_keys(
    tmp_path_factory: pytest.TempPathFactory, rsa_key: rsa.RSAPrivateKey
) -> dict[str, Any]:
    """Private keys that must all be refused, each a real key of its kind."""
    ecdsa_key = ec.generate_private_key(ec.SECP256R1())
    ed = Ed25519PrivateKey.generate()
    keys: dict[str, Any] = {
        "rsa": openssh_private(rsa_key),
        "ecdsa": openssh_private(ecdsa_key),
        "ed25519 pkcs8 pem": ed.private_bytes(
            Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()
        ).decode(),
        "truncated": PRIVATE[: len(PRIVATE) // 2],
        "public key": PUBLIC,
        "garbage": "not a key at all",
        "empty": "",
        "too long": PRIVATE + "A" * 4096,
        "non-ascii": PRIVATE.replace("-----END", "é-----END"),
        "bytes": PRIVATE.encode(),
        "none": None,
        "int": 25519,
        "list": [PRIVATE],
    }
    if shutil.which("ssh-keygen"):
        path = tmp_path_factory.mktemp("enc") / "id"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "passphrase", "-C", "", "-f", str(path)],
            check=True,
        )
        keys["encrypted ed25519"] = path.read_text()
    return keys


# -- a valid request -----------------------------------------------------------


def test_valid_request_gives_typed_fields() -> None:
    """A complete, valid request becomes a GrabRequest holding its values."""
    req = validate(fields())
    assert req == GrabRequest(
        name="host.example.com",
        address="192.0.2.10",
        port=2222,
        user="backup",
        key=PRIVATE,
        host_key=PUBLIC,
        excludes=("*.tmp", "/proc"),
        ts=TS,
        sig=SIG,
    )
    assert req.signed == request.canonical(fields())


def test_key_gets_a_final_newline() -> None:
    """A key sent without its last newline is stored with one (ssh needs it)."""
    req = validate(fields(key=PRIVATE.rstrip("\n")))
    assert req.key == PRIVATE
    assert req.key.endswith("-----END OPENSSH PRIVATE KEY-----\n")


def test_host_key_comment_is_dropped() -> None:
    """The host key line keeps only type and base64, whatever comment follows."""
    req = validate(fields(host_key=f"  {PUBLIC} root@client extra words \n"))
    assert req.host_key == PUBLIC


def test_ipv6_address_is_normalised() -> None:
    """An IPv6 address is stored in its compressed form."""
    assert validate(fields(address="2001:0db8:0000::0001")).address == "2001:db8::1"


def test_repr_of_request_hides_key() -> None:
    """repr() of a GrabRequest (what a log or traceback shows) has no key in it."""
    assert_no_key(repr(validate(fields())), PRIVATE)


# -- field by field ------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "0", "A1", "host.example.com", "a_b-c.d", "x" * 64, "a."])
def test_valid_names(name: str) -> None:
    """Names of 1-64 letters, digits and _.- starting with a letter or digit pass."""
    assert validate(fields(name=name)).name == name


@pytest.mark.parametrize(
    "name",
    ["", "-a", ".a", "_a", ".bakgrab", "x" * 65, "a b", "a/b", "../x", "a\n", "é", "a;b",
     "a\x00", "a*", 5, None, ["a"]],
)
def test_invalid_names(name: Any) -> None:
    """Anything else as a name is refused, naming the field."""
    with pytest.raises(InvalidRequest, match=r"^name: "):
        validate(fields(name=name))


@pytest.mark.parametrize("port", [1, 22, 2222, 65535])
def test_valid_ports(port: int) -> None:
    """Ports 1 to 65535 pass as they are."""
    assert validate(fields(port=port)).port == port


@pytest.mark.parametrize("port", [0, 65536, -1, True, False, "22", 22.0, None, [22]])
def test_invalid_ports(port: Any) -> None:
    """Out-of-range ports, booleans and non-integers are refused."""
    with pytest.raises(InvalidRequest, match=r"^port: "):
        validate(fields(port=port))


@pytest.mark.parametrize(
    "address",
    ["10.0.0.1", "::1", "2001:db8::1", "fe80::1", "host", "host.example.com",
     "host.example.com.", "a-b.c", "xn--bcher-kva.example", "h" * 63 + ".example"],
)
def test_valid_addresses(address: str) -> None:
    """IP addresses and DNS host names pass."""
    assert validate(fields(address=address)).address == address


@pytest.mark.parametrize(
    "address",
    ["-oProxyCommand=x", "-host", "host-", "a b", "host;rm", "host;rm -rf /", "", "host..x",
     ".host", "1.2.3", "256.1.1.1", "10.0.0.1/24", "a" * 254, "h_st", "host\n", "[::1]",
     "user@host", "host:22", "$(reboot)", "`id`", "x" * 64 + ".example", None, 1, b"host"],
)
def test_invalid_addresses(address: Any) -> None:
    """Nothing ssh could read as an option, and nothing that is not a host, passes."""
    with pytest.raises(InvalidRequest, match=r"^address: "):
        validate(fields(address=address))


@pytest.mark.parametrize(
    "address",
    ["fe80::1%eth0", "fe80::1%1", "fe80::1%25eth0", "fe80::1%", "fe80::1%a b",
     "fe80::1%x;reboot", "fe80::1%-oProxyCommand=x", "10.0.0.1%eth0", "host%eth0", "%"],
)
def test_ipv6_zone_id_is_refused(address: str) -> None:
    """An address with a zone id ("%...") is refused on purpose, whatever the
    zone id holds (a link-local client is not supported), and the message says so."""
    with pytest.raises(InvalidRequest, match=r"^address: .*\(no zone id\)"):
        validate(fields(address=address))


@pytest.mark.parametrize("user", ["root", "backup", "_svc", "a.b-c", "u" * 32])
def test_valid_users(user: str) -> None:
    """Login names of letters, digits and _.- (up to 32) pass."""
    assert validate(fields(user=user)).user == user


@pytest.mark.parametrize("user", ["", "-oX", "1user", "a b", "u" * 33, "root\n", "r;m", None, 0])
def test_invalid_users(user: Any) -> None:
    """Other login names are refused."""
    with pytest.raises(InvalidRequest, match=r"^user: "):
        validate(fields(user=user))


def test_every_refused_key_kind(refused_keys: dict[str, Any]) -> None:
    """RSA, ECDSA, encrypted, PEM, truncated, garbage and non-string keys are
    all refused, and no refusal quotes the key."""
    assert "encrypted ed25519" in refused_keys or shutil.which("ssh-keygen") is None
    for key in refused_keys.values():
        with pytest.raises(InvalidRequest, match=r"^key: ") as info:
            validate(fields(key=key))
        if isinstance(key, str) and key:
            for text in (str(info.value), repr(info.value), repr(info.value.args)):
                assert_no_key(text, key)


def test_rsa_key_refused_as_not_ed25519(refused_keys: dict[str, Any]) -> None:
    """An RSA key is refused because it is not ed25519, and says so."""
    with pytest.raises(InvalidRequest, match="must be an ed25519 key"):
        validate(fields(key=refused_keys["rsa"]))


@pytest.mark.parametrize(
    ("key_type", "cipher", "kdf"),
    [
        (b"ssh-foo", b"none", b"none"),
        (b"sk-ssh-ed25519@openssh.com", b"none", b"none"),
        (b"ssh-ed25519", b"foo-cipher", b"bcrypt"),
        (b"ssh-ed25519", b"aes256-ctr", b"foo-kdf"),
    ],
)
def test_crafted_key_containers_are_invalid_requests(
    key_type: bytes, cipher: bytes, kdf: bytes
) -> None:
    """A key container naming an unknown or unsupported key type, cipher or KDF is
    an InvalidRequest (permanent), not some other exception."""
    key = crafted_private_key(key_type, cipher, kdf)
    with pytest.raises(UnsupportedAlgorithm):  # what the InvalidRequest stands for
        load_ssh_private_key(key.encode(), password=None)
    with pytest.raises(InvalidRequest, match=r"^key: ") as info:
        validate(fields(key=key))
    assert info.value.transient is False
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert_no_key(str(info.value), key)


def test_other_field_errors_do_not_quote_key() -> None:
    """When another field is wrong, the refusal still says nothing of the key."""
    for bad in ({"name": "-x"}, {"port": 0}, {"address": "a b"}, {"user": ""},
                {"host_key": "x"}, {"excludes": ["a\nb"]}, {"v": 2}, {"extra": PRIVATE}):
        with pytest.raises(InvalidRequest) as info:
            validate(fields(**bad))
        assert_no_key(str(info.value), PRIVATE)


@pytest.mark.parametrize(
    "host_key",
    [
        "ssh-ed25519",
        "ssh-ed25519 AAAA",
        "ssh-rsa " + PUBLIC.split()[1],
        "ssh-ed25519 " + "A" * 68,
        "ssh-ed25519 " + PUBLIC.split()[1] + "A",
        "ssh-ed25519 " + PUBLIC.split()[1][:-1] + "!",
        "",
        PRIVATE,
        None,
        PUBLIC.encode(),
    ],
    # the keys are made at import: ids by position, the same in every
    # process (pytest-xdist's workers must collect the same tests)
    ids=["type-only", "short", "rsa-type", "wrong-blob", "too-long", "bad-char", "empty",
         "private-key", "none", "bytes"],
)
def test_invalid_host_keys(host_key: Any) -> None:
    """Only a one-line ssh-ed25519 public key passes as the host key."""
    with pytest.raises(InvalidRequest, match=r"^host_key: "):
        validate(fields(host_key=host_key))


def test_rsa_host_key_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    """A real RSA public key line is refused as the host key."""
    line = openssh_public(rsa_key)
    with pytest.raises(InvalidRequest, match=r"^host_key: "):
        validate(fields(host_key=line))


@pytest.mark.parametrize(
    "excludes",
    [[], ["*.tmp"], ("a", "b"), ["x" * 4096], ["p"] * 4096, ["+ /x", ". merge", "# c", "!"]],
)
def test_valid_excludes(excludes: Any) -> None:
    """Lists of up to 4096 single-line patterns of up to 4096 characters pass."""
    assert validate(fields(excludes=excludes)).excludes == tuple(excludes)


@pytest.mark.parametrize(
    ("excludes", "where"),
    [
        ("*.tmp", "excludes"),
        (None, "excludes"),
        ({"a": 1}, "excludes"),
        (["p"] * 4097, "excludes"),
        (["ok", ""], r"excludes\[1\]"),
        (["ok", "ok", " \t "], r"excludes\[2\]"),
        (["a\nb"], r"excludes\[0\]"),
        (["a\rb"], r"excludes\[0\]"),
        (["a\x00b"], r"excludes\[0\]"),
        (["x" * 4097], r"excludes\[0\]"),
        ([1], r"excludes\[0\]"),
        ([["nested"]], r"excludes\[0\]"),
    ],
)
def test_invalid_excludes(excludes: Any, where: str) -> None:
    """Non-lists, too many, too long, blank or multi-line patterns are refused,
    naming the pattern's index."""
    with pytest.raises(InvalidRequest, match=rf"^{where}: "):
        validate(fields(excludes=excludes))


def test_unknown_field_refused_without_echoing_its_name() -> None:
    """A field the schema does not know is refused; its name is not echoed (a
    hostile name could carry anything, a key too), the known fields are."""
    key_like = "b3BlbnNzaC1rZXktdjE-BEGIN OPENSSH PRIVATE KEY"
    with pytest.raises(InvalidRequest, match=r"1 unknown field\(s\); the fields are v, name") as info:
        validate({**fields(), key_like: ["--delete"]})
    assert key_like not in str(info.value)


def test_unknown_field_name_is_truncated() -> None:
    """A huge unknown field name is not echoed whole."""
    with pytest.raises(InvalidRequest) as info:
        validate({**fields(), "z" * 10_000: 1})
    assert len(str(info.value)) < 200


@pytest.mark.parametrize("missing", FIELDS)
def test_missing_field_refused_by_name(missing: str) -> None:
    """Every field is required, and a missing one is named."""
    data = fields()
    del data[missing]
    with pytest.raises(InvalidRequest, match=rf"missing field\(s\) {missing}$"):
        validate(data)


@pytest.mark.parametrize("v", [0, 2, "1", None, [1]])
def test_other_versions_refused(v: Any) -> None:
    """A request of another schema version is refused and says to upgrade."""
    with pytest.raises(InvalidRequest, match="version must be 1; upgrade bakgrab"):
        validate(fields(v=v))


@pytest.mark.parametrize("value", [None, [], "name=x", 5, [("name", "x")]])
def test_non_mapping_refused(value: Any) -> None:
    """A request that is not a mapping is refused."""
    with pytest.raises(InvalidRequest, match="expected a mapping"):
        validate(value)


# -- redacted ------------------------------------------------------------------


def test_redacted_shows_fields_but_not_key() -> None:
    """redacted() shows name, address, port, user, the host key's fingerprint
    and the number of excludes, and puts <redacted> for the key."""
    text = redacted(fields())
    assert_no_key(text, PRIVATE)
    shown = ast.literal_eval(text)
    assert shown == {
        "name": "host.example.com",
        "address": "192.0.2.10",
        "port": 2222,
        "user": "backup",
        "key": "<redacted>",
        "host_key": request.fingerprint(PUBLIC),
        "excludes": "<2 patterns>",
    }


def test_redacted_hides_invalid_keys_too(refused_keys: dict[str, Any]) -> None:
    """Whatever the key field holds, redacted() never shows it."""
    for key in refused_keys.values():
        text = redacted(fields(key=key))
        assert "'key': '<redacted>'" in text
        if isinstance(key, str) and key:
            assert_no_key(text, key)


def test_redacted_does_not_show_a_private_key_as_host_key() -> None:
    """A private key sent in the host_key field is not shown either."""
    assert_no_key(redacted(fields(host_key=PRIVATE)), PRIVATE)


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen not installed")
def test_fingerprint_matches_ssh_keygen(tmp_path: Path) -> None:
    """fingerprint() is the SHA256 fingerprint ssh-keygen -l prints."""
    (tmp_path / "k.pub").write_text(PUBLIC + " comment\n")
    out = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", str(tmp_path / "k.pub")],
        check=True, capture_output=True, text=True,
    ).stdout
    assert request.fingerprint(PUBLIC) == out.split()[1]


# -- properties ----------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=8,
)

labels = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,20}[A-Za-z0-9])?", fullmatch=True)
hostnames = st.lists(labels, min_size=1, max_size=4).map(".".join).filter(
    lambda h: not h.rsplit(".", 1)[-1].isdigit()
)
addresses = st.one_of(
    st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str), hostnames
)
patterns = st.text(
    st.characters(blacklist_characters="\n\r\x00", blacklist_categories=["Cs"]),
    min_size=1, max_size=30,
).filter(lambda p: p.strip() != "")


@st.composite
def valid_fields(draw: st.DrawFn) -> dict[str, Any]:
    private, public = draw(st.sampled_from(KEYS))
    return {
        "v": 1,
        "name": draw(st.from_regex(request.NAME_RE, fullmatch=True)),
        "address": draw(addresses),
        "port": draw(st.integers(1, 65535)),
        "user": draw(st.from_regex(request.USER_RE, fullmatch=True)),
        "key": draw(st.sampled_from([private, private.rstrip("\n")])),
        "host_key": draw(st.sampled_from([public, public + " a comment", " " + public + "\n"])),
        "excludes": draw(st.lists(patterns, max_size=5)),
        "ts": draw(st.integers(1, 2**40 - 1)),
        "sig": draw(st.sampled_from([SIG, "+/" * 43 + "=="])),
    }


@st.composite
def mutated_fields(draw: st.DrawFn) -> dict[str, Any]:
    data = draw(valid_fields())
    victim = draw(st.sampled_from(FIELDS))
    data[victim] = draw(st.one_of(json_values, st.text()))
    return data


random_requests = st.one_of(
    json_values,
    st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), json_values, max_size=9),
    mutated_fields(),
)


@HYP
@given(random_requests)
def test_validate_raises_only_invalid_request(data: Any) -> None:
    """Whatever arrives, validate() either returns a request or raises
    InvalidRequest; nothing else escapes to the worker."""
    try:
        req = validate(data)
    except InvalidRequest as e:
        key = data.get("key") if isinstance(data, dict) else None
        if isinstance(key, str) and "PRIVATE KEY" in key:
            assert_no_key(str(e), key)
        return
    assert isinstance(req, GrabRequest)


@HYP
@given(
    st.sampled_from(
        [request.check_name, request.check_port, request.check_user, request.check_address,
         request.check_private_key, request.check_public_key, request.check_excludes]
    ),
    st.one_of(json_values, st.text(), st.binary()),
)
def test_each_check_raises_only_invalid_request(check: Any, value: Any) -> None:
    """Every field check either accepts a value or raises InvalidRequest."""
    with contextlib.suppress(InvalidRequest):
        check(value)


@HYP
@given(valid_fields())
def test_valid_requests_round_trip(data: dict[str, Any]) -> None:
    """A validated request sent on the wire (to_wire) validates to itself."""
    req = validate(data)
    wire = req.to_wire()
    assert set(wire) == set(FIELDS)
    assert validate(wire) == req
    assert wire["excludes"] == list(data["excludes"])
    assert wire["name"] == data["name"] and wire["port"] == data["port"]


@HYP
@given(
    st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=5), json_values, max_size=8),
    st.text(min_size=12, max_size=60).filter(
        lambda k: k.strip() == k and not any(c in k for c in "<'\"\\")
    ),
)
def test_redacted_never_shows_key(data: dict[str, Any], key: str) -> None:
    """redacted() of any fields never contains the key field's text."""
    others = {k: v for k, v in data.items() if k != "key"}
    assume(key not in repr(others))
    text = redacted({**others, "key": key})
    assert key not in text
    assert "'key': '<redacted>'" in text


@pytest.mark.parametrize("ts", [0, -1, 2**40, "1900000000", 1.5, True, None, [1]])
def test_invalid_ts_refused(ts: Any) -> None:
    with pytest.raises(InvalidRequest, match="^ts:"):
        validate(fields(ts=ts))


@pytest.mark.parametrize("sig", ["", "A" * 86, "A" * 88, "A" * 85 + "!==", None, 5,
                                 ["A" * 86 + "=="]])
def test_invalid_sig_refused(sig: Any) -> None:
    with pytest.raises(InvalidRequest, match="^sig:"):
        validate(fields(sig=sig))


@HYP
@given(valid_fields())
def test_signed_bytes_survive_the_broker(data: dict[str, Any]) -> None:
    """What the worker verifies (canonical of the fields as received, after a
    JSON round trip through the broker) is what the client signed."""
    import json

    sent = request.canonical(data)
    received = validate(json.loads(json.dumps(data))).signed
    assert received == sent
    assert b'"sig"' not in sent


def test_verify_is_optional_and_a_boolean() -> None:
    """``verify`` (backup --verify, issue 15) may be left out (False), is sent
    only when set, and must be a boolean."""
    assert validate(fields()).verify is False
    req = validate(fields(verify=True))
    assert req.verify is True and req.to_wire()["verify"] is True
    assert "verify" not in validate(fields()).to_wire()
    for bad in (1, "yes", None, [True]):
        with pytest.raises(InvalidRequest, match="verify: true or false"):
            validate(fields(verify=bad))

"""Hostile task messages sent straight to the broker, as anyone who reaches it can.

A real redis-server and a real ``bakgrab worker`` (debug log, no retries)
serve the whole module. Each hostile request is a valid one (a fresh one-time
key sealed to the worker's request key, a pinned-looking host key, a closed
port) with one or more fields made hostile, sent with Celery's ``send_task``
like any client would. Each must end as a FAILURE with ``InvalidRequest``
whose message names the bad field and echoes no key; and nothing may follow
from it: no file written anywhere (in or around the storage), no pin, no
snapshot, no in-progress dir, no rsync or ssh started (the worker logs every
program it starts as ``run: ...`` at debug level; the last test shows that
line does appear for a real backup), and the worker keeps serving.
"""

from __future__ import annotations

import os
import re
import string
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.result import AsyncResult
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kombu import Connection

from bakgrab.client import keys
from bakgrab.tasks import GRAB, sealed
from bakgrab.tasks.request import FIELDS, validate
from tests import support

pytestmark = pytest.mark.integration

RUN_RE = re.compile(r"run: \S*/(rsync|ssh)\b")
"""The debug line bakgrab.tasks.process logs for every rsync or ssh it starts."""

PREFIX = {"v": "request:", "name": "name:", "address": "address:", "port": "port:",
          "user": "user:", "key": "key:", "host_key": "host_key:", "excludes": "excludes",
          "unknown": "request:", "missing": "request:"}
"""How the refusal of each field begins: it names the field."""


@dataclass
class Ctx:
    base: Path
    storage: Path
    url: str
    worker: support.Proc
    app: Celery
    redis: redis.Redis
    recipient: Any
    host_key: str
    closed_port: int
    pwn: Path
    secrets: list[str] = field(default_factory=list)

    def log_size(self) -> int:
        return self.worker.log.stat().st_size

    def log_since(self, offset: int) -> str:
        with open(self.worker.log, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def listing(self) -> dict[str, tuple[object, ...]]:
        """Every path under the test's base dir (storage, its parent) with its
        metadata and content (issue 13: not names alone); the logs, which
        grow, and Redis's dir are left out."""
        return support.tree_state(self.base, skip=("worker.log", "redis"))

    def valid(self, name: str = "victim") -> tuple[dict[str, Any], str]:
        """A request the worker would accept, and its plain one-time key."""
        pair = keys.one_time_key()
        fields: dict[str, Any] = {"v": 1, "name": name, "address": "127.0.0.1", "port": self.closed_port,
                  "user": "root", "key": sealed.seal(self.recipient, pair.private.encode()),
                  "host_key": self.host_key, "excludes": ["*.tmp", "/cache"],
                  # well-formed but unsigned: each hostile field is refused by its
                  # own check, which runs before the signature's (issue 11)
                  "ts": int(time.time()), "sig": "A" * 86 + "=="}
        self.secrets = [pair.private, fields["key"]]
        return fields, pair.private


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ctx]:
    base = tmp_path_factory.mktemp("hostile")
    redis_proc, url = support.start_redis(base / "redis")
    storage = base / "area" / "storage"
    worker = None
    try:
        # No retries: a request that wrongly got through fails at once
        # instead of running on behind the next test.
        worker = support.start_worker(storage, url, base / "worker.log", "--loglevel", "DEBUG",
                                      env=support.worker_env(max_retries="0"))
        private = sealed.load_or_create_private(storage / ".bakgrab" / "request.key")
        host_key = " ".join(keys.one_time_key().public.split()[:2])
        app = Celery(broker=url, backend=url)
        c = Ctx(base, storage, url, worker, app, redis.Redis.from_url(url),
                private.public_key(), host_key, support.free_port(), base / "pwned")
        # The base request is valid: each refusal below is the hostile field's.
        fields, _ = c.valid()
        assert validate(fields, request_key=private).name == "victim"
        yield c
        app.close()
    finally:
        if worker is not None:
            worker.stop()
        redis_proc.stop()


def chunks(text: str, size: int = 24) -> list[str]:
    return [text[i:i + size] for i in range(0, max(len(text) - size + 1, 1), size)]


def assert_no_key(text: str, secrets: list[str]) -> None:
    for marker in support.KEY_MARKERS:
        assert marker not in text
    for secret in secrets:
        for chunk in chunks(secret):
            assert chunk not in text


def send(ctx: Ctx, fields: Any, **options: Any) -> AsyncResult:
    # kwargsrepr is the sender's choice: a constant keeps Celery's own
    # "received" log line from echoing what the sender chose to send.
    return ctx.app.send_task(GRAB, kwargs=fields, queue="bakgrab", argsrepr="()",
                             kwargsrepr="<hostile>", **options)


def assert_refused(ctx: Ctx, fields: Any, prefixes: tuple[str, ...],
                   secrets: list[str] | None = None, **options: Any) -> str:
    """Send ``fields``; the task fails with InvalidRequest naming one of
    ``prefixes``, echoes no key, and starts or writes nothing."""
    secrets = [*ctx.secrets, *(secrets or [])]
    listing = ctx.listing()
    offset = ctx.log_size()
    result = send(ctx, fields, **options)
    value = result.get(timeout=20, propagate=False)
    assert result.state == "FAILURE", (result.state, value)
    assert type(value).__name__ == "InvalidRequest", repr(value)
    message = str(value)
    assert message.startswith(prefixes), message
    assert_no_key(message, secrets)
    stored = ctx.redis.get(f"celery-task-meta-{result.id}")
    assert isinstance(stored, bytes)
    assert_no_key(stored.decode(errors="replace"), secrets)
    assert ctx.listing() == listing
    assert not ctx.pwn.exists()
    log = ctx.log_since(offset)
    assert not RUN_RE.search(log), log
    assert not [p for p in support.descendants(ctx.worker.pid)
                if support.comm(p) in ("rsync", "ssh")]
    assert ctx.worker.alive()
    return message


def private_key_text(key: Any) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption()).decode()


def encrypted_key(ctx: Ctx) -> bytes:
    """A passphrase-protected ed25519 key, made by ssh-keygen."""
    path = ctx.base / f"enc-{uuid.uuid4().hex}"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "passphrase", "-f", str(path)],
                   check=True, capture_output=True, timeout=30)
    try:
        return path.read_bytes()
    finally:
        path.unlink()
        path.with_name(path.name + ".pub").unlink()


KEY_KINDS: dict[str, Callable[[Ctx, str], Any]] = {
    "plain-unsealed": lambda c, plain: plain,
    "garbage": lambda c, plain: "hello",
    "sealed-to-another-key": lambda c, plain: sealed.seal(
        X25519PrivateKey.generate().public_key(), plain.encode()),
    "100k-string": lambda c, plain: "A" * 100_000,
    "100k-sealed-prefix": lambda c, plain: sealed.PREFIX + "A" * 100_000,
    "sealed-garbage": lambda c, plain: sealed.seal(c.recipient, b"not a key at all"),
    "sealed-ecdsa-key": lambda c, plain: sealed.seal(c.recipient, private_key_text(
        ec.generate_private_key(ec.SECP256R1())).encode()),
    "sealed-encrypted-key": lambda c, plain: sealed.seal(c.recipient, encrypted_key(c)),
    "sealed-bad-base64": lambda c, plain: sealed.PREFIX + "!!!not base64!!!",
    "sealed-truncated": lambda c, plain: sealed.seal(c.recipient, plain.encode())[:-12],
    "sealed-too-short": lambda c, plain: sealed.PREFIX + "AAAA",
    "sealed-non-ascii": lambda c, plain: sealed.seal(c.recipient, "clé privée".encode()),
    "sealed-oversized-key": lambda c, plain: sealed.seal(
        c.recipient, (plain.rstrip("\n") + "\n" + "A" * 5000).encode()),
    "none": lambda c, plain: None,
    "int": lambda c, plain: 1,
    "list": lambda c, plain: [plain],
    "dict": lambda c, plain: {"key": plain},
}


@dataclass(frozen=True)
class KeyKind:
    """A hostile key that needs the worker's request key or the plain key to build."""

    kind: str


@dataclass(frozen=True)
class Tpl:
    """A hostile string naming a path of this run ({base}, {pwn}) or the plain key ({plain})."""

    text: str


def materialize(ctx: Ctx, value: Any, plain: str) -> Any:
    if isinstance(value, KeyKind):
        return KEY_KINDS[value.kind](ctx, plain)
    if isinstance(value, Tpl):
        return value.text.format(base=ctx.base, pwn=ctx.pwn, plain=plain)
    if isinstance(value, list):
        return [materialize(ctx, v, plain) for v in value]
    if isinstance(value, dict):
        return {k: materialize(ctx, v, plain) for k, v in value.items()}
    return value


def apply(ctx: Ctx, mutation: dict[str, Any]) -> tuple[dict[str, Any], str, list[str]]:
    """The valid request changed by ``mutation`` (field -> hostile value, or
    "unknown" -> extra fields, "missing" -> fields to drop); also the plain
    key and the hostile strings that must not be echoed."""
    fields, plain = ctx.valid()
    echoed: list[str] = []
    for name, value in mutation.items():
        if name == "unknown":
            fields.update(materialize(ctx, value, plain))
        elif name == "missing":
            for gone in value:
                fields.pop(gone, None)
        else:
            fields[name] = materialize(ctx, value, plain)
            if name == "key" and isinstance(fields[name], str) and len(fields[name]) >= 16:
                echoed.append(fields[name])
    return fields, plain, echoed


RSA_PUB = ("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQDL0sXb2Nq2Rq0n1s7G3sXb2Nq2Rq0n1s7G3sXb2Nq2Rq0n1"
           "s7G3sXb2Nq2Rq0n1s7G3sXb2Nq2Rq0n1s7G3sXb2Nq2Rq0n1s7G3sXb2Nq2Rq0n1s7G3sXb2Nq2Rq0n1s7G3w==")

CATALOGUE: list[tuple[str, str, Any]] = [
    ("name-dotdot", "name", "../x"),
    ("name-dotdot-deep", "name", "../../pwned"),
    ("name-absolute", "name", Tpl("{base}/abs-name")),
    ("name-etc", "name", "/etc"),
    ("name-slash", "name", "a/b"),
    ("name-hidden", "name", ".hidden"),
    ("name-dot", "name", "."),
    ("name-state-dir", "name", ".bakgrab"),
    ("name-65", "name", "x" * 65),
    ("name-unicode", "name", "ünïcødé"),
    ("name-rtl", "name", "abc\u202egpj"),
    ("name-nul", "name", "a\x00b"),
    ("name-newline", "name", "a\nb"),
    ("name-space", "name", "a b"),
    ("name-dash", "name", "-rf"),
    ("name-shell", "name", Tpl("$(touch {pwn})")),
    ("name-empty", "name", ""),
    ("name-int", "name", 7),
    ("name-none", "name", None),
    ("name-list", "name", ["victim"]),
    ("address-proxycommand", "address", Tpl("-oProxyCommand=touch {pwn}")),
    ("address-space", "address", "a b"),
    ("address-semicolon", "address", "host;id"),
    ("address-brackets", "address", "[::1]"),
    ("address-zone-id", "address", "fe80::1%eth0"),
    ("address-300", "address", "a" * 300),
    ("address-254-labels", "address", "a." * 127),
    ("address-label-64", "address", "x" * 64 + ".example"),
    ("address-leading-dash", "address", "-host"),
    ("address-trailing-dash", "address", "host-"),
    ("address-underscore", "address", "a_b.example"),
    ("address-numeric-tld", "address", "1.2.3.999"),
    ("address-user-at", "address", "root@127.0.0.1"),
    ("address-port", "address", "127.0.0.1:22"),
    ("address-newline", "address", Tpl("127.0.0.1\n-oProxyCommand=touch {pwn}")),
    ("address-empty", "address", ""),
    ("address-int", "address", 2130706433),
    ("address-none", "address", None),
    ("port-0", "port", 0),
    ("port-65536", "port", 65536),
    ("port-negative", "port", -1),
    ("port-string", "port", "22"),
    ("port-float", "port", 22.0),
    ("port-true", "port", True),
    ("port-none", "port", None),
    ("port-list", "port", [22]),
    ("port-huge", "port", 2**70),
    ("user-dash-l", "user", "-l"),
    ("user-option", "user", Tpl("-oProxyCommand=touch {pwn}")),
    ("user-semicolon", "user", "root;id"),
    ("user-dotdot", "user", "../x"),
    ("user-empty", "user", ""),
    ("user-33", "user", "a" * 33),
    ("user-newline", "user", "root\n"),
    ("user-unicode", "user", "rööt"),
    ("user-digit-first", "user", "1root"),
    ("user-at", "user", "root@host"),
    ("user-none", "user", None),
    *[(f"key-{kind}", "key", KeyKind(kind)) for kind in KEY_KINDS],
    ("host-key-private-key", "host_key", Tpl("{plain}")),
    ("host-key-rsa", "host_key", RSA_PUB),
    ("host-key-bad-blob", "host_key", "ssh-ed25519 " + "B" * 68),
    ("host-key-short", "host_key", "ssh-ed25519 AAAA"),
    ("host-key-option-prefix", "host_key", "-oProxyCommand=x ssh-ed25519 " + "A" * 68),
    ("host-key-empty", "host_key", ""),
    ("host-key-100k", "host_key", "A" * 100_000),
    ("host-key-none", "host_key", None),
    ("host-key-list", "host_key", ["ssh-ed25519"]),
    ("excludes-string", "excludes", "*.tmp"),
    ("excludes-dict", "excludes", {"a": 1}),
    ("excludes-none", "excludes", None),
    ("excludes-int", "excludes", 5),
    ("excludes-10k-entries", "excludes", ["x"] * 10_000),
    ("excludes-newline", "excludes", ["ok", "a\n+ /etc/shadow"]),
    ("excludes-carriage-return", "excludes", ["a\rb"]),
    ("excludes-nul", "excludes", ["a\x00b"]),
    ("excludes-10k-pattern", "excludes", ["x" * 10_240]),
    ("excludes-empty-pattern", "excludes", [""]),
    ("excludes-blank-pattern", "excludes", ["   "]),
    ("excludes-int-pattern", "excludes", [5]),
    ("excludes-none-pattern", "excludes", [None]),
    ("excludes-nested", "excludes", [["*.tmp"]]),
    ("excludes-private-key", "excludes", [Tpl("{plain}")]),
    ("unknown-extra", "unknown", {"extra": 1}),
    ("unknown-dunder", "unknown", {"__class__": "os.system"}),
    ("unknown-long-name", "unknown", {"x" * 1000: 1}),
    ("unknown-restore-fields", "unknown", {"snapshot": "latest", "paths": ["/"]}),
    ("unknown-rsync-args", "unknown", {"rsync_args": [Tpl("--rsync-path=touch {pwn}")]}),
    *[(f"missing-{f}", "missing", [f]) for f in FIELDS],
    ("missing-all", "missing", list(FIELDS)),
    ("version-2", "v", 2),
    ("version-0", "v", 0),
    ("version-string", "v", "1"),
    ("version-none", "v", None),
    ("version-list", "v", [1]),
    ("version-false", "v", False),
]


@pytest.mark.parametrize(("target", "value"), [c[1:] for c in CATALOGUE],
                         ids=[c[0] for c in CATALOGUE])
def test_hostile_field_is_refused(ctx: Ctx, target: str, value: Any) -> None:
    """One hostile field in an otherwise valid request: refused with
    InvalidRequest naming that field, no key echoed, nothing started or written."""
    fields, _, echoed = apply(ctx, {target: value})
    name = fields.get("name")
    # An absolute name outside the test's dir (/etc) would make these paths.
    beside = ([Path(name + suffix) for suffix in (".pub", ".lock", ".json", ".exclude")]
              if isinstance(name, str) and name.startswith("/") and "\0" not in name else [])
    existed = [p for p in beside if p.exists()]
    assert_refused(ctx, fields, (PREFIX[target],), echoed)
    assert [p for p in beside if p.exists()] == existed


def test_every_field_hostile_at_once(ctx: Ctx) -> None:
    """A request hostile in every field at once is refused like any other."""
    fields, plain, _ = apply(ctx, {"name": "../../pwned", "address": Tpl("-oProxyCommand=touch {pwn}"),
                                   "port": -1, "user": "root;id", "key": Tpl("{plain}"),
                                   "host_key": Tpl("{plain}"), "excludes": ["a\nb"]})
    assert_refused(ctx, fields, tuple(PREFIX.values()), [plain])


def spliced(bad: str) -> st.SearchStrategy[str]:
    """Any text with at least one character from ``bad`` in it."""
    return st.builds(lambda a, b, c: a + b + c, st.text(max_size=8), st.sampled_from(bad),
                     st.text(max_size=8))


NOT_STR = st.one_of(st.none(), st.booleans(), st.integers(),
                    st.floats(allow_nan=False, allow_infinity=False),
                    st.lists(st.integers(), max_size=3),
                    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
LEADING_BAD = st.builds(lambda a, b: a + b, st.sampled_from("-._/ "), st.text(max_size=20))

NAMES = st.one_of(spliced("/\\\x00\n\r ;$*:@'\"é\u202e"), LEADING_BAD,
                  st.text(alphabet=string.ascii_letters + string.digits, min_size=65, max_size=200),
                  NOT_STR)
ADDRESSES = st.one_of(spliced(" ;/%\x00\n=[]_@'$`*,é"), st.builds(lambda s: "-" + s, st.text()),
                      st.text(alphabet="abc.", min_size=254, max_size=400), NOT_STR)
PORTS = st.one_of(st.integers(max_value=0), st.integers(min_value=65536), st.booleans(),
                  st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=6),
                  st.none(), st.lists(st.integers(1, 65535), max_size=2))
USERS = st.one_of(spliced(" ;/\x00\n@:$é\\*"), LEADING_BAD,
                  st.builds(lambda d, s: d + s, st.sampled_from(string.digits),
                            st.text(alphabet=string.ascii_letters, max_size=5)),
                  st.text(alphabet=string.ascii_lowercase, min_size=33, max_size=80), NOT_STR)
KEYS = st.one_of(st.sampled_from([KeyKind(k) for k in KEY_KINDS]), st.text(max_size=60), NOT_STR)
HOST_KEYS = st.one_of(st.text(max_size=100),
                      st.builds(lambda s: "ssh-ed25519 " + s,
                                st.text(alphabet=string.ascii_letters + "+/", max_size=100)),
                      st.just(Tpl("{plain}")), NOT_STR)
BAD_PATTERNS = st.one_of(spliced("\n\r\x00"), st.just(""), st.text(alphabet=" \t", min_size=1),
                         st.integers(4097, 10_240).map(lambda n: "x" * n), NOT_STR)
EXCLUDES = st.one_of(
    st.builds(lambda good, bad, at: [*good[:at], bad, *good[at:]],
              st.lists(st.text(alphabet=string.ascii_letters + "*/.", min_size=1, max_size=10),
                       max_size=5), BAD_PATTERNS, st.integers(0, 5)),
    st.integers(4097, 10_000).map(lambda n: ["x"] * n),
    st.text(), st.none(), st.integers(), st.dictionaries(st.text(max_size=3), st.text(), max_size=2))
UNKNOWN = st.dictionaries(st.text(min_size=1, max_size=50).filter(lambda k: k not in FIELDS),
                          st.one_of(st.text(max_size=20), NOT_STR), min_size=1, max_size=3)
VERSIONS = st.one_of(st.integers().filter(lambda v: v != 1), st.text(max_size=5), st.none(),
                     st.just(False), st.floats(allow_nan=False, allow_infinity=False)
                     .filter(lambda v: v != 1), st.lists(st.integers(), max_size=2))
HOSTILE = {"v": VERSIONS, "name": NAMES, "address": ADDRESSES, "port": PORTS, "user": USERS,
           "key": KEYS, "host_key": HOST_KEYS, "excludes": EXCLUDES, "unknown": UNKNOWN,
           "missing": st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3, unique=True)}
# Mostly one hostile field (so each field's own check is what refuses it),
# sometimes several at once.
MUTATIONS = st.one_of(
    *[st.fixed_dictionaries({name: values}) for name, values in HOSTILE.items()],
    st.fixed_dictionaries({}, optional=HOSTILE).filter(lambda m: len(m) >= 2))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation=MUTATIONS)
def test_generated_hostile_requests_are_refused(ctx: Ctx, mutation: dict[str, Any]) -> None:
    """Generated malformed, oversized, path-traversing and mistyped fields
    (one or several at once): each request is refused with InvalidRequest
    naming one of its bad fields, echoes no key, starts and writes nothing."""
    fields, _, echoed = apply(ctx, mutation)
    assert_refused(ctx, fields, tuple(PREFIX[k] for k in mutation), echoed)


@pytest.mark.parametrize("task_id", ["../../pwned", "{base}/abs-task-id", "a/b", "..",
                                     "x\ny", "ünï", "x" * 300, "-rf", ".hidden"],
                         ids=["dotdot", "absolute", "slash", "dotdot-only", "newline",
                              "unicode", "300", "dash", "hidden"])
def test_hostile_task_id_is_refused(ctx: Ctx, task_id: str) -> None:
    """A valid request under a hostile task id (it names the job's run dir and
    record) fails with InvalidRequest and writes nothing: no run dir, no pin."""
    fields, _ = ctx.valid(name="hostile-task-id")
    assert_refused(ctx, fields, ("task id:",), task_id=task_id.format(base=ctx.base))


def queue_is_empty(ctx: Ctx) -> bool:
    return ctx.redis.llen("bakgrab") == 0 and ctx.redis.hlen("unacked") == 0


def test_pickle_message_is_refused_unrun(ctx: Ctx) -> None:
    """A pickle-serialized task (which would let the sender run code in the
    worker) is refused before it is deserialized: the worker logs the refusal
    of the content type, the message is dropped, the task never starts (its
    state stays PENDING) and nothing is written or started."""
    fields, _ = ctx.valid(name="pickled")
    sender = Celery(broker=ctx.url, backend=ctx.url)
    sender.conf.accept_content = ["json", "pickle"]
    listing = ctx.listing()
    offset = ctx.log_size()
    try:
        result = sender.send_task(GRAB, kwargs=fields, queue="bakgrab", serializer="pickle",
                                  argsrepr="()", kwargsrepr="<pickled>")
        # dropped by the worker's transport before kombu decodes it (issue 11)
        refusal = "content type is not application/json"
        support.wait_for(lambda: refusal in ctx.log_since(offset), 20, "the pickle refusal")
        support.wait_for(lambda: queue_is_empty(ctx), 10, "the message to be dropped")
        assert result.state == "PENDING"
        assert ctx.redis.get(f"celery-task-meta-{result.id}") is None
        assert not re.search(rf"refused invalid request {result.id}", ctx.log_since(offset))
    finally:
        sender.close()
    assert ctx.listing() == listing
    assert not RUN_RE.search(ctx.log_since(offset))
    assert ctx.worker.alive()


def test_non_mapping_kwargs_never_reach_the_task(ctx: Ctx) -> None:
    """A raw task message whose kwargs are a list (send_task refuses to build
    one; a raw publish does not) is refused by the worker before the task body:
    it is dropped, not redelivered, and nothing is written or started."""
    listing = ctx.listing()
    offset = ctx.log_size()
    task_id = str(uuid.uuid4())
    fields, _ = ctx.valid(name="list-kwargs")
    with Connection(ctx.url) as conn:
        conn.Producer(serializer="json").publish(
            [[], list(fields.items()), {"callbacks": None, "errbacks": None, "chain": None,
                                        "chord": None}],
            exchange="", routing_key="bakgrab",
            headers={"lang": "py", "task": GRAB, "id": task_id, "root_id": task_id,
                     "parent_id": None, "group": None, "retries": 0, "eta": None,
                     "expires": None, "timelimit": [None, None], "argsrepr": "()",
                     "kwargsrepr": "<hostile>", "origin": "hostile"})
    support.wait_for(lambda: "body: kwargs is not a mapping" in ctx.log_since(offset),
                     20, "the worker to refuse the message")
    support.wait_for(lambda: queue_is_empty(ctx), 10, "the message to be dropped")
    assert AsyncResult(task_id, app=ctx.app).state != "SUCCESS"
    assert f"refused invalid request {task_id}" not in ctx.log_since(offset)
    assert ctx.listing() == listing
    assert not RUN_RE.search(ctx.log_since(offset))
    assert ctx.worker.alive()


def test_positional_args_are_an_invalid_request(ctx: Ctx) -> None:
    """A request sent as positional args instead of keyword fields is refused
    as an InvalidRequest like any other malformed request, writing nothing."""
    fields, _ = ctx.valid(name="positional")
    listing = ctx.listing()
    result = ctx.app.send_task(GRAB, args=[fields], queue="bakgrab", argsrepr="(<hostile>,)",
                               kwargsrepr="{}")
    value = result.get(timeout=20, propagate=False)
    assert ctx.listing() == listing
    assert result.state == "FAILURE"
    assert type(value).__name__ == "InvalidRequest", repr(value)
    assert str(value).startswith("request:")


@pytest.mark.parametrize("version", [True, 1.0], ids=["true", "float"])
def test_version_must_be_the_integer_1(ctx: Ctx, version: Any) -> None:
    """A version that only compares equal to 1 (a bool, a float) is refused
    like any other wrong version, before anything is written or started."""
    fields, _ = ctx.valid(name=f"version-{type(version).__name__}")
    fields["v"] = version
    assert_refused(ctx, fields, ("request:",))


def test_worker_still_serves_a_real_backup(ctx: Ctx, tmp_path: Path) -> None:
    """After every hostile request above, the same worker still serves a real
    backup end to end; its debug log shows the rsync it starts (so the absence
    of that line above means something)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("still serving\n")
    offset = ctx.log_size()
    done = support.run_backup(ctx.url, "after-hostile", src, timeout=90)
    assert done.returncode == 0, done.stderr + ctx.log_since(offset)[-3000:]
    snaps = support.snapshots(ctx.storage, "after-hostile")
    assert len(snaps) == 1
    assert (snaps[0] / "f").read_text() == "still serving\n"
    assert RUN_RE.search(ctx.log_since(offset))
    assert ctx.worker.alive()
    assert not os.path.exists(ctx.pwn)

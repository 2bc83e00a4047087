"""bakgrab.client.tunnel: the --tunnel target, the broker endpoint and URLs without secrets."""

from __future__ import annotations

import pytest
import redis

from bakgrab.client.tunnel import broker_endpoint, parse_target, redact_url, with_endpoint
from bakgrab.tasks.errors import ClientSetupError


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("backup.example.com", (None, "backup.example.com", 22)),
        ("ops@backup.example.com", ("ops", "backup.example.com", 22)),
        ("ops@backup:2222", ("ops", "backup", 2222)),
        ("ops@10.0.0.5:65535", ("ops", "10.0.0.5", 65535)),
        ("ops@[2001:db8::1]:2222", ("ops", "2001:db8::1", 2222)),
        ("[::1]", (None, "::1", 22)),
        ("_svc.x-1@h", ("_svc.x-1", "h", 22)),
    ],
)
def test_parse_target(text: str, parts: tuple[str | None, str, int]) -> None:
    """USER@HOST[:PORT] splits into user (optional), host and port (default 22),
    an IPv6 host in brackets."""
    assert parse_target(text) == parts


@pytest.mark.parametrize(
    "text",
    ["", "ops@", "@host", "ops@host:0", "ops@host:65536", "ops@host:123456", "ops@h;rm",
     "ops@h h", "ops@host:", "2001:db8::1", "ops@[2001:db8::1", "o ps@h", "ops@h:22:22",
     "ops@h/x", "-oProxyCommand=x"],
)
def test_parse_target_refuses(text: str) -> None:
    """Malformed targets are a ClientSetupError quoting them."""
    with pytest.raises(ClientSetupError, match="--tunnel"):
        parse_target(text)


@pytest.mark.parametrize(
    ("url", "endpoint"),
    [
        ("redis://127.0.0.1:6379/0", ("127.0.0.1", 6379)),
        ("redis://:s3cret@broker.internal:6380/2", ("broker.internal", 6380)),
        ("redis://user:pw@h/0", ("h", 6379)),
        ("rediss://[2001:db8::7]:7000/0", ("2001:db8::7", 7000)),
        ("redis:///0", ("127.0.0.1", 6379)),
    ],
)
def test_broker_endpoint(url: str, endpoint: tuple[str, int]) -> None:
    """The host and port the tunnel forwards to (defaults 127.0.0.1 and 6379)."""
    assert broker_endpoint(url) == endpoint


@pytest.mark.parametrize("url", ["amqp://guest@h//", "unix:///run/redis.sock", "h:6379"])
def test_broker_endpoint_refuses_other_schemes(url: str) -> None:
    """Only redis:// and rediss:// brokers can be tunnelled."""
    with pytest.raises(ClientSetupError, match="only redis:// URLs"):
        broker_endpoint(url)


def test_broker_endpoint_error_hides_password() -> None:
    """The refusal of a URL does not show its password."""
    with pytest.raises(ClientSetupError) as info:
        broker_endpoint("amqp://guest:hunter2@h//")
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    "url", ["redis://h:99999/0", "redis://h:port/0", "redis://h:-1/0", "rediss://[::1]:70000/0"]
)
def test_broker_endpoint_bad_port(url: str) -> None:
    """A broker URL with an impossible port is a ClientSetupError."""
    with pytest.raises(ClientSetupError, match="port") as info:
        broker_endpoint(url)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_broker_endpoint_bad_port_error_hides_password() -> None:
    """The refusal of a bad port does not show the URL's password."""
    with pytest.raises(ClientSetupError) as info:
        broker_endpoint("redis://:hunter2@h:99999/0")
    assert "hunter2" not in str(info.value)


def test_broker_endpoint_port_zero_is_a_bad_port() -> None:
    """Port 0 is no port to connect to: a ClientSetupError, not the default port."""
    with pytest.raises(ClientSetupError):
        broker_endpoint("redis://h:0/0")


def test_broker_endpoint_malformed_url() -> None:
    """A broker URL urllib cannot split is a ClientSetupError, not a ValueError."""
    with pytest.raises(ClientSetupError):
        broker_endpoint("redis://[::1/0")


@pytest.mark.parametrize(
    ("url", "host", "port", "expected"),
    [
        ("redis://:s3cret@10.0.0.5:6379/2", "127.0.0.1", 40000,
         "redis://:s3cret@127.0.0.1:40000/2"),
        ("redis://user:p%40ss@h:6379/3?health_check_interval=25", "127.0.0.1", 1,
         "redis://user:p%40ss@127.0.0.1:1/3?health_check_interval=25"),
        ("redis://h/0", "127.0.0.1", 5, "redis://127.0.0.1:5/0"),
        ("rediss://:pw@h:6379/0", "::1", 6000, "rediss://:pw@[::1]:6000/0"),
    ],
)
def test_with_endpoint(url: str, host: str, port: int, expected: str) -> None:
    """The broker URL pointed at the tunnel's local end keeps scheme, user,
    password, database and query."""
    assert with_endpoint(url, host, port) == expected


def test_with_endpoint_as_redis_reads_it() -> None:
    """redis-py reads the rewritten URL with the original password and db."""
    url = with_endpoint("redis://:s3%2Fcret@broker:6379/4", "127.0.0.1", 41000)
    kwargs = redis.ConnectionPool.from_url(url).connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["password"], kwargs["db"]) == (
        "127.0.0.1", 41000, "s3/cret", 4
    )


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://user:s3cret@h/0", "redis://user:***@h/0"),
        ("redis://:p@ss@h/0", "redis://:***@h/0"),
        ("rediss://u:x@[::1]:7000/1", "rediss://u:***@[::1]:7000/1"),
        ("redis://h/0", "redis://h/0"),
        ("redis://user@h/0", "redis://user@h/0"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    """redact_url() replaces the password, whatever it holds, and changes
    nothing else."""
    assert redact_url(url) == shown

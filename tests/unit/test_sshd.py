"""bakgrab.client.sshd: who may connect, and the hardened sshd configuration."""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from bakgrab.client.sshd import (
    ServerConfig,
    authenticated,
    parse_allow,
    peer_allowed,
    sshd_config,
)
from bakgrab.tasks.errors import ClientSetupError

SSHD = shutil.which("sshd") or shutil.which("sshd", path="/usr/sbin:/sbin")
GATE = "/usr/bin/python3 -I -m bakgrab.client.gate ro /srv/data /tmp/bakgrab-sshd-x/gate.log"


def test_parse_allow() -> None:
    """A comma list of addresses and networks, blanks ignored; a host address
    is a /32 or /128 network, host bits of a network are dropped."""
    assert parse_allow(" 10.0.0.1, 192.168.0.0/24,,2001:db8::/32 ") == [
        ipaddress.ip_network("10.0.0.1/32"),
        ipaddress.ip_network("192.168.0.0/24"),
        ipaddress.ip_network("2001:db8::/32"),
    ]
    assert parse_allow("10.1.2.3/8") == [ipaddress.ip_network("10.0.0.0/8")]


@pytest.mark.parametrize("text", ["", " , ", "backup.example.com", "10.0.0.256", "10.0.0.1/33",
                                  "10.0.0.1;rm"])
def test_parse_allow_refuses(text: str) -> None:
    """Host names, bad addresses and empty lists are a ClientSetupError."""
    with pytest.raises(ClientSetupError, match="--allow-from"):
        parse_allow(text)


@pytest.mark.parametrize(
    ("peer", "allow", "allowed"),
    [
        ("10.0.0.1", "10.0.0.1", True),
        ("10.0.0.2", "10.0.0.1", False),
        ("::ffff:10.0.0.1", "10.0.0.1", True),
        ("::ffff:10.0.0.2", "10.0.0.1", False),
        ("::ffff:192.168.0.77", "192.168.0.0/24", True),
        ("2001:db8::5", "2001:db8::/64", True),
        ("2001:db9::5", "2001:db8::/64", False),
        ("fe80::1%eth0", "fe80::/64", True),
        ("10.0.0.1", "2001:db8::/32", False),
        ("::1", "127.0.0.1", False),
    ],
)
def test_peer_allowed(peer: str, allow: str, allowed: bool) -> None:
    """A peer is allowed only inside an allowed network; an IPv4-mapped IPv6
    peer (dual-stack socket) is judged by its IPv4 address."""
    assert peer_allowed(peer, parse_allow(allow)) is allowed


@pytest.mark.parametrize("peer", ["::ffff:10.0.0.1", "10.0.0.1"])
def test_ipv4_mapped_allow_entry(peer: str) -> None:
    """An allow entry written as an IPv4-mapped address admits that IPv4 peer."""
    assert peer_allowed(peer, parse_allow("::ffff:10.0.0.1"))


@pytest.mark.parametrize(
    ("entry", "network"),
    [
        ("::ffff:10.0.0.1", "10.0.0.1/32"),
        ("::ffff:10.0.0.1/128", "10.0.0.1/32"),
        ("::ffff:10.0.0.0/120", "10.0.0.0/24"),
        ("::ffff:10.1.2.3/104", "10.0.0.0/8"),
        ("::FFFF:0A00:0001", "10.0.0.1/32"),
    ],
)
def test_ipv4_mapped_allow_entry_becomes_the_ipv4_network(entry: str, network: str) -> None:
    """An IPv4-mapped entry (with or without a prefix) is parsed to the IPv4
    network it maps, so it is compared the way peers are."""
    assert parse_allow(entry) == [ipaddress.ip_network(network)]
    inside, outside = ipaddress.ip_network(network)[0], ipaddress.ip_address("192.0.2.1")
    assert peer_allowed(f"::ffff:{inside}", parse_allow(entry))
    assert not peer_allowed(str(outside), parse_allow(entry))


def test_plain_ipv6_allow_entry_stays_ipv6() -> None:
    """Only IPv4-mapped entries are turned into IPv4."""
    assert parse_allow("2001:db8::/64, ::1") == [
        ipaddress.ip_network("2001:db8::/64"), ipaddress.ip_network("::1/128")]


@pytest.fixture
def server_config(tmp_path: Path) -> ServerConfig:
    key = Ed25519PrivateKey.generate()
    host_key = tmp_path / "host_key"
    host_key.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption()))
    host_key.chmod(0o600)
    return ServerConfig(source=tmp_path, public_key="ssh-ed25519 AAAA", allow=parse_allow(
        "127.0.0.1"), host_key=host_key, listen="127.0.0.1")


HARDENED = {
    "authenticationmethods": "publickey",
    "pubkeyauthentication": "yes",
    "passwordauthentication": "no",
    "kbdinteractiveauthentication": "no",
    "hostbasedauthentication": "no",
    "permitemptypasswords": "no",
    "disableforwarding": "yes",
    "allowtcpforwarding": "no",
    "allowstreamlocalforwarding": "no",
    "allowagentforwarding": "no",
    "x11forwarding": "no",
    "permittunnel": "no",
    "permittty": "no",
    "permituserrc": "no",
    "permituserenvironment": "no",
    "gatewayports": "no",
    "usepam": "no",
    "usedns": "no",
    "maxauthtries": "2",
    "maxsessions": "1",
    "logingracetime": "30",
    "authorizedkeyscommand": "none",
    "pidfile": "none",
}


def parse_config(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            out[key.lower()] = value
    return out


def test_sshd_config_text(server_config: ServerConfig, tmp_path: Path) -> None:
    """The generated config holds every hardening option, the one user, the
    host key, the authorized_keys in the private workdir and the gate as
    ForceCommand; no option appears twice (sshd takes the first)."""
    text = sshd_config(server_config, tmp_path / "work", "backupuser", GATE)
    keys = [line.split(" ", 1)[0].lower() for line in text.splitlines() if line.strip()]
    assert len(keys) == len(set(keys))
    got = parse_config(text)
    for key, value in HARDENED.items():
        assert got[key] == value, key
    assert got["allowusers"] == "backupuser"
    assert got["hostkey"] == str(server_config.host_key)
    assert got["authorizedkeysfile"] == str(tmp_path / "work" / "authorized_keys")
    assert got["forcecommand"] == GATE
    assert "subsystem" not in got


@pytest.mark.skipif(SSHD is None, reason="sshd not installed")
def test_sshd_accepts_config_and_applies_it(server_config: ServerConfig, tmp_path: Path) -> None:
    """sshd itself parses the generated config (sshd -T) and reports the
    hardened values as in effect for a connection of the backup user."""
    assert SSHD is not None
    config = tmp_path / "sshd_config"
    config.write_text(sshd_config(server_config, tmp_path, "backupuser", GATE))
    done = subprocess.run(
        [SSHD, "-T", "-f", str(config), "-C", "user=backupuser,host=h,addr=127.0.0.1"],
        capture_output=True, text=True, timeout=30,
    )
    if "privilege separation" in done.stderr.lower():
        pytest.skip(f"sshd -T cannot run here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    effective = parse_config(done.stdout)
    for key, value in HARDENED.items():
        if key in effective:  # sshd -T omits a few options it has no value for
            assert effective[key] == value, key
    for key in ("passwordauthentication", "disableforwarding", "permittty", "forcecommand",
                "authenticationmethods", "permituserenvironment", "maxauthtries"):
        assert key in effective, key
    assert effective["forcecommand"] == GATE
    assert effective["allowusers"] == "backupuser"


# What `sshd -i -e` (OpenSSH 9.2, LogLevel VERBOSE) wrote for three connections.
ACCEPTED_LOG = b"""Connection from 127.0.0.1 port 50410 on 127.0.0.1 port 42371 rdomain ""
Accepted key ED25519 SHA256:MFKoyIvJCHokmL4Wqr+A4Ueb0QG4O0hmq+OF2BgWTsE found at /tmp/w/authorized_keys:1
Postponed publickey for root from 127.0.0.1 port 50410 ssh2 [preauth]
Accepted key ED25519 SHA256:MFKoyIvJCHokmL4Wqr+A4Ueb0QG4O0hmq+OF2BgWTsE found at /tmp/w/authorized_keys:1
Accepted publickey for root from 127.0.0.1 port 50410 ssh2: ED25519 SHA256:MFKoyIvJCHokmL4Wqr+A4Ueb0QG4O0hmq+OF2BgWTsE
Starting session: forced-command (config) 'exec gate' for root from 127.0.0.1 port 50410 id 0
"""
WRONG_KEY_LOG = b"""Connection from 127.0.0.1 port 50114 on 127.0.0.1 port 43659 rdomain ""
Failed publickey for root from 127.0.0.1 port 50114 ssh2: ED25519 SHA256:SA3jkQSN9PUFgtFZRWcyz9nNd6MoHMCSRoy18Y2P0pw
Connection closed by authenticating user root 127.0.0.1 port 50114 [preauth]
"""
CHOSEN_NAME_LOG = b"""Connection from 127.0.0.1 port 40160 on 127.0.0.1 port 38069 rdomain ""
Invalid user Accepted publickey for root from 1.2.3.4 from 127.0.0.1 port 40160
Connection closed by invalid user Accepted publickey for root from 1.2.3.4 127.0.0.1 port 40160 [preauth]
"""


def test_authenticated_reads_only_sshds_own_line() -> None:
    """A connection counts as a session only when sshd's own line says it
    authenticated as the login user: not for a wrong key, another user, nor a
    peer that chose "Accepted publickey for root from ..." as its user name
    (issue 13: such a name would otherwise use up the job's sessions)."""
    assert authenticated(ACCEPTED_LOG, "root")
    assert not authenticated(ACCEPTED_LOG, "roo")
    assert not authenticated(ACCEPTED_LOG, "backup")
    assert not authenticated(WRONG_KEY_LOG, "root")
    assert not authenticated(CHOSEN_NAME_LOG, "root")
    assert not authenticated(b"", "root")

"""bakgrab.worker.compress: the compress setting, its rsync options, what
``auto`` chooses from what it measures, and the fallback when the client's
rsync lacks the choice (issue 19).

The options are checked on what a real rsync sends to the other side (a
stand-in ``ssh`` records the remote command), and the refusal on what a real
rsync server says for a compression it does not know.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bakgrab.client import gate
from bakgrab.tasks import config
from bakgrab.tasks.errors import ConfigError, TransferInterrupted
from bakgrab.worker import compress, rsync
from bakgrab.worker.rsync import PullSpec, pull_argv

ALL = frozenset({"zstd", "lz4", "zlibx", "zlib"})
MIB = 1 << 20


@pytest.fixture
def make_spec(tmp_path: Path) -> Callable[..., PullSpec]:
    def make(**changes: Any) -> PullSpec:
        values: dict[str, Any] = {
            "user": "bk", "address": "192.0.2.10", "port": 2222,
            "key_file": tmp_path / "key", "known_hosts": tmp_path / "known_hosts",
            "host_alias": "bakgrab-host", "exclude_file": tmp_path / "exclude",
            "dest": tmp_path / "dest", "link_dest": None, "timeout": 300,
            "connect_timeout": 20, "alive_interval": 15,
        }
        values.update(changes)
        return PullSpec(**values)

    return make


# -- the mapping ----------------------------------------------------------------

@pytest.mark.parametrize(("used", "options"), [
    ("off", []),
    ("any", ["-z"]),
    ("zstd:1", ["-z", "--compress-choice=zstd", "--compress-level=1"]),
    ("zstd:19", ["-z", "--compress-choice=zstd", "--compress-level=19"]),
    ("lz4", ["-z", "--compress-choice=lz4"]),
    ("zlib:6", ["-z", "--compress-choice=zlib", "--compress-level=6"]),
])
def test_rsync_options_of_each_value(used: str, options: list[str]) -> None:
    """Each value maps to exactly these options; ``off`` to none at all."""
    assert compress.rsync_options(used) == options


@pytest.mark.parametrize("bad", ["", "zstd:x", "gzip", "zstd:1 --rsh=x", "auto"])
def test_rsync_options_refuse_what_is_not_a_compression(bad: str) -> None:
    with pytest.raises(ValueError, match="not a compression"):
        compress.rsync_options(bad)


def compress_words(argv: list[str]) -> list[str]:
    return [a for a in argv if a == "-z" or a.startswith("--compress")
            or (a.startswith("-") and not a.startswith("--") and "z" in a)]


def test_off_sends_no_z_in_the_argv(make_spec: Callable[..., PullSpec]) -> None:
    """``compress=off``: no ``-z`` (alone or in a cluster) and no compress
    option; --skip-compress stays (harmless without -z; one argv shape)."""
    argv = pull_argv(make_spec(compress="off"))
    assert compress_words(argv) == []
    assert argv[:2] == ["rsync", "-HaAX"]
    assert len([a for a in argv if a.startswith("--skip-compress=")]) == 1


def test_zstd_1_argv_and_skip_compress_kept(make_spec: Callable[..., PullSpec]) -> None:
    argv = pull_argv(make_spec(compress="zstd:1"))
    assert compress_words(argv) == ["-z", "--compress-choice=zstd", "--compress-level=1"]
    assert len([a for a in argv if a.startswith("--skip-compress=")]) == 1


def test_push_argv_follows_the_spec_too(make_spec: Callable[..., PullSpec],
                                        tmp_path: Path) -> None:
    """A restore keeps plain ``-z`` by default, and maps a spec's value alike."""
    assert compress_words(rsync.push_argv(make_spec(), tmp_path, ["a"])) == ["-z"]
    assert compress_words(rsync.push_argv(make_spec(compress="off"), tmp_path, ["a"])) == []


@pytest.fixture
def fake_ssh(tmp_path: Path) -> tuple[Path, Path]:
    """An ``ssh`` that records its argv (NUL-separated) and exits 255."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "ssh-argv"
    script = bindir / "ssh"
    script.write_text(f"#!/bin/sh\nprintf '%s\\0' \"$@\" > '{log}'\nexit 255\n")
    script.chmod(0o755)
    return bindir, log


def remote_command(spec: PullSpec, fake_ssh: tuple[Path, Path]) -> list[str]:
    """The command a real rsync asks the client's sshd to run for ``spec``."""
    bindir, log = fake_ssh
    spec.exclude_file.write_text("")
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    done = subprocess.run(pull_argv(spec), env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode in (12, 255), done.stderr
    got = log.read_bytes().decode().split("\0")[:-1]
    return got[got.index("rsync"):]


def short_letters(word: str) -> str:
    """The option letters of rsync's short cluster (before its ``e.`` blob)."""
    return word[1:].split("e.", 1)[0]


@pytest.mark.parametrize(("value", "sent", "compressed"), [
    ("off", [], False),
    ("zstd:1", ["--compress-level=1", "--compress-choice=zstd"], False),
    ("lz4", ["--compress-choice=lz4"], False),
    ("zlib:6", ["--compress-level=6", "--old-compress"], True),
    ("any", [], True),
])
def test_what_a_real_rsync_asks_the_client_to_run(
        make_spec: Callable[..., PullSpec], fake_ssh: tuple[Path, Path],
        value: str, sent: list[str], compressed: bool) -> None:
    """Run by a real rsync: ``off`` asks the client's rsync for no compression
    at all (no ``z`` in the cluster, no compress option); an explicit choice
    travels as rsync's own options; and the gate lets each through to rrsync
    (rrsync's own check is exercised by the integration test)."""
    remote = remote_command(make_spec(compress=value), fake_ssh)
    cluster = next(w for w in remote[3:] if w.startswith("-") and not w.startswith("--"))
    assert ("z" in short_letters(cluster)) is compressed, cluster
    assert [w for w in remote if w.startswith(("--compress", "--old-compress",
                                               "--new-compress"))] == sent
    assert any(w.startswith("--skip-compress=") for w in remote)
    assert gate.check("ro", " ".join(remote)) is None


# -- the client's rsync lacking the choice --------------------------------------------

@pytest.fixture
def renaming_rsh(tmp_path: Path) -> Path:
    """An rsh that runs the server side locally (a real rsync), with the
    chosen compression renamed to one no rsync knows: what a client whose
    rsync was built without it receives, as far as its option check goes."""
    script = tmp_path / "rsh"
    script.write_text("#!/bin/sh\nshift\nexec sh -c \"$(echo \"$*\" | "
                      "sed 's/--compress-choice=zstd/--compress-choice=nosuch/')\"\n")
    script.chmod(0o755)
    return script


def test_real_refusal_is_compress_refused(tmp_path: Path, renaming_rsh: Path) -> None:
    """A real rsync sender refusing the compression ends the pull before any
    data with "unknown compress name"; classify says CompressRefused (which the
    grab answers with plain -z), not the "unreachable" of a dead connection."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x\n")
    done = subprocess.run(
        ["rsync", "-a", "-z", "--compress-choice=zstd", "--compress-level=1",
         f"--rsh={renaming_rsh}", f"h:{src}/", f"{tmp_path / 'dst'}/"],
        capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    assert "unknown compress name: nosuch" in done.stderr
    assert compress.refused(done.stderr) == "unknown compress name: nosuch"
    with pytest.raises(rsync.CompressRefused, match="unknown compress name: nosuch") as e:
        rsync.classify(done.returncode, done.stderr)
    assert e.value.said == "unknown compress name: nosuch"
    # and plain -z through the same sender works: the fallback's argv
    again = subprocess.run(["rsync", "-a", "-z", f"--rsh={renaming_rsh}", f"h:{src}/",
                            f"{tmp_path / 'dst'}/"], capture_output=True, text=True, timeout=30)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "dst" / "f").read_text() == "x\n"


def test_refusal_words_after_data_are_some_files() -> None:
    """The words on a line after data flowed (a file named so) are no refusal:
    the connection loss stays transient."""
    tail = ('rsync: [sender] read errors mapping "/unknown compress name: zstd": x (5)\n'
            "rsync error: error in rsync protocol data stream (code 12)")
    with pytest.raises(TransferInterrupted):
        rsync.classify(12, tail)


def test_fall_back_records_why() -> None:
    first = compress.Choice("auto", "zstd:3", "not measured")
    after = first.fall_back("unknown compress name: zstd")
    assert after.used == "any"
    assert "refused zstd:3 (unknown compress name: zstd)" in after.fallback
    assert after.to_dict()["fallback"] == after.fallback


# -- auto -----------------------------------------------------------------------------

def prev(wire: float, data: float, **extra: Any) -> dict[str, Any]:
    return {"wire_rate": wire, "data_rate": data, "used": "zstd:3", "from": "h.1",
            "client_refused": False, **extra}


@pytest.mark.parametrize(("link", "previous", "used"), [
    ("loopback", None, "off"),
    ("this-host", prev(1 * MIB, 2 * MIB), "off"),
    ("on-link", None, "zstd:3"),
    ("routed", None, "zstd:3"),
    ("unknown", None, "zstd:3"),
    ("on-link", prev(160 * MIB, 250 * MIB), "off"),
    ("on-link", prev(100 * MIB, 100 * MIB), "zstd:1"),  # gigabit, uncompressed
    ("on-link", prev(5 * MIB, 7 * MIB), "zstd:1"),
    ("routed", prev(1.5 * MIB, 200 * MIB), "zstd:1"),  # text, CPU-bound: not the link
    ("routed", prev(2.4 * MIB, 3.5 * MIB), "zstd:3"),  # 20 Mbit/s
    ("routed", prev(2.4 * MIB, 40 * MIB), "zstd:3"),  # compressible, slow link
    ("routed", prev(0, 0, client_refused=True), "any"),
])
def test_auto_chooses_from_the_link(link: str, previous: dict[str, Any] | None,
                                    used: str) -> None:
    """off on this host; zstd:3 (rsync's -z level) on a link not measured
    yet; then off, zstd:1 or zstd:3 as the previous grab's rates say; plain -z
    once the client's rsync refused an explicit choice."""
    choice = compress.choose("auto", link=link, cpus=2, previous=previous, available=ALL)
    assert choice.used == used, choice.why
    assert choice.setting == "auto" and choice.why
    assert choice.measured["link"] == link and choice.measured["cpus"] == 2


def test_a_fixed_setting_is_used_as_it_is() -> None:
    choice = compress.choose("zlib:6", link="loopback", cpus=2, previous=None, available=ALL)
    assert (choice.used, choice.why) == ("zlib:6", "set by the operator")


def test_auto_without_zstd_on_this_host_negotiates() -> None:
    choice = compress.choose("auto", link="routed", cpus=1, previous=None,
                             available=frozenset({"zlib"}))
    assert choice.used == "any" and "lacks zstd" in choice.why


@pytest.mark.parametrize("meta", [
    None, {}, {"compress": "x"}, {"compress": {"link": []}},
    {"compress": {"link": {"wire_rate": "fast", "data_rate": 1}}},
    {"compress": {"link": {"wire_rate": True, "data_rate": 1}}},
    {"compress": {"link": {"wire_rate": -1, "data_rate": 1}}},
])
def test_previous_link_ignores_what_is_malformed(meta: dict[str, Any] | None) -> None:
    assert compress.previous_link(meta) is None


def test_record_measures_and_carries_forward() -> None:
    """A grab that moved enough data records its own rates (read back by the
    next grab); one that moved too little carries the previous ones forward."""
    choice = compress.Choice("auto", "zstd:3", "not measured", {"link": "routed"})
    big = compress.record(choice, {"transferred_size": 64 * MIB, "bytes_received": 32 * MIB},
                          8.0, None)
    assert big["link"] == {"wire_rate": 4 * MIB, "data_rate": 8 * MIB, "used": "zstd:3"}
    meta = {"snapshot": "h.2024-01-01.1", "compress": json.loads(json.dumps(big))}
    seen = compress.previous_link(meta)
    assert seen is not None and seen["from"] == "h.2024-01-01.1"
    assert seen["wire_rate"] == 4 * MIB
    small = compress.record(choice, {"transferred_size": 1000, "bytes_received": 900}, 2.0, seen)
    assert small["link"]["from"] == "h.2024-01-01.1" and small["link"]["wire_rate"] == 4 * MIB
    assert compress.record(choice, {}, 1.0, None).get("link") is None


def test_record_of_a_fallback_sticks() -> None:
    choice = compress.Choice("auto", "zstd:3", "x").fall_back("unknown compress name: zstd")
    rec = compress.record(choice, {}, 1.0, None)
    seen = compress.previous_link({"snapshot": "h.1", "compress": rec})
    assert seen is not None and seen["client_refused"] is True
    again = compress.choose("auto", link="routed", cpus=2, previous=seen, available=ALL)
    assert again.used == "any"


def test_link_kind_of_loopback_and_own_addresses() -> None:
    """Loopback by address; this host's own other address as ``ip route get``
    says (type local)."""
    assert compress.link_kind("127.0.0.1") == "loopback"
    assert compress.link_kind("::1") == "loopback"
    assert compress.link_kind("localhost") == "loopback"
    if shutil.which("ip") is None:
        pytest.skip("no ip(8) here")
    addrs = json.loads(subprocess.run(["ip", "-j", "addr"], capture_output=True,
                                      check=True, timeout=10).stdout)
    own = [a["local"] for link in addrs for a in link.get("addr_info", [])
           if a.get("family") == "inet" and not a["local"].startswith("127.")]
    if not own:
        pytest.skip("this host has no non-loopback IPv4 address")
    assert compress.link_kind(own[0]) == "this-host"


def test_link_kind_of_a_host_name_that_does_not_resolve() -> None:
    assert compress.link_kind("no-such-host.invalid") == "unknown"


# -- the setting --------------------------------------------------------------------

@pytest.mark.parametrize("value", ["auto", "off", "zstd:1", "zstd:19", "lz4", "zlib:1",
                                   "zlib:9"])
def test_setting_accepts(value: str) -> None:
    assert config.load(environ={"BAKGRAB_COMPRESS": value},
                       config_file=os.devnull).compress == value


@pytest.mark.parametrize("value", ["zstd", "zstd:0", "zstd:20", "zlib:10", "gzip", "on",
                                   "zstd:1 ", "lz4:1", "-z"])
def test_setting_refuses(value: str) -> None:
    with pytest.raises(ConfigError, match="compress"):
        config.load(environ={"BAKGRAB_COMPRESS": value}, config_file=os.devnull)


def test_default_is_auto() -> None:
    assert config.load(environ={}, config_file=os.devnull).compress == "auto"


def test_worker_list_is_rsyncs_own(tmp_path: Path) -> None:
    """The worker's list is what ``rsync --version`` prints (less ``none``);
    a fixed setting it lacks stops the worker at start, naming the list."""
    real = compress.worker_list()
    out = subprocess.run(["rsync", "--version"], capture_output=True, text=True,
                         timeout=10).stdout
    assert real and all(name in out for name in real) and "none" not in real
    fake = tmp_path / "rsync"
    fake.write_text("#!/bin/sh\nprintf 'rsync  version 3.4.1\\nCompress list:\\n"
                    "    zlibx zlib none\\n'\n")
    fake.chmod(0o755)
    assert compress.worker_list(str(fake)) == {"zlibx", "zlib"}
    with pytest.raises(ConfigError, match="lacks zstd .*zlib zlibx"):
        compress.check_available("zstd:1", rsync=str(fake))
    compress.check_available("zlib:6", rsync=str(fake))
    compress.check_available("off", rsync=str(fake))


# -- ssh's cipher, chosen the same way ---------------------------------------------

@pytest.mark.parametrize(("link", "aes", "ciphers"), [
    ("loopback", True, compress.AES_GCM_FIRST),
    ("this-host", True, compress.AES_GCM_FIRST),
    ("loopback", False, ""),
    ("on-link", True, ""),
    ("routed", True, ""),
])
def test_cipher_preference_only_where_both_ends_are_this_cpu(link: str, aes: bool,
                                                             ciphers: str) -> None:
    """AES-GCM first only for a client on this host with AES instructions:
    elsewhere the client's CPU encrypts and may lack them."""
    choice = compress.choose("auto", link=link, cpus=2, previous=None, available=ALL,
                             aes_cpu=aes)
    assert choice.ciphers == ciphers
    assert choice.to_dict().get("ssh_ciphers", "") == ciphers
    fixed = compress.choose("zstd:1", link=link, cpus=2, previous=None, available=ALL,
                            aes_cpu=aes)
    assert fixed.ciphers == ciphers


def test_ssh_command_offers_the_preference_only_when_set(
        make_spec: Callable[..., PullSpec]) -> None:
    plain = rsync.ssh_command(make_spec())
    assert not [a for a in plain if a.startswith("Ciphers=")]
    chosen = rsync.ssh_command(make_spec(ciphers=compress.AES_GCM_FIRST))
    assert chosen[chosen.index(f"Ciphers={compress.AES_GCM_FIRST}") - 1] == "-o"


def test_every_preferred_cipher_is_one_this_ssh_knows() -> None:
    """ssh -Q cipher lists each one (a name it did not know would fail every pull)."""
    known = subprocess.run(["ssh", "-Q", "cipher"], capture_output=True, text=True,
                           check=True, timeout=10).stdout.split()
    assert set(compress.AES_GCM_FIRST.split(",")) <= set(known)


def test_cpu_has_aes_reads_the_cpu_flags() -> None:
    text = Path("/proc/cpuinfo").read_text()
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith(("flags", "Features"))), [])
    assert compress.cpu_has_aes() is ("aes" in flags)

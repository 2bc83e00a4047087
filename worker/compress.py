"""Which compression one pull uses on the wire (issue 19).

The ``compress`` setting names it: ``off`` (no ``-z``), ``zstd:LEVEL``,
``lz4``, ``zlib:LEVEL``, or ``auto``, which :func:`choose` turns into one of
those for each grab from what the worker measures:

* the client's address: loopback or one of this host's own addresses (``ip
  route get`` says ``local``) means nothing crosses a wire, so ``off``;
* the previous grab of the name: its rates (bytes on the wire and file data
  per second of the pull, recorded in the snapshot's metadata by
  :func:`record`, and carried forward by grabs too small to measure). The
  wire's rate is a lower bound of the link's (compressible data leaves the
  link idle), so: 150 MiB/s or more on the wire, a link faster than zstd
  compresses on one core: ``off``; 4 MiB/s or more on the wire, or data at
  64 MiB/s or more (the CPU, not the link, set the pace): ``zstd:1``;
  slower: ``zstd:3``;
* with no measurement yet: ``zstd:3``, what rsync's own ``-z`` negotiates
  between two rsyncs >= 3.2, safe for the slow link the original design
  compressed for; the first grab measures the link for the next;
* the CPUs of this host are recorded beside the choice (each grab's rsync
  decompresses here; the client compresses);
* ssh's cipher, chosen the same way: for a client on this host, whose CPU is
  this host's, AES-GCM first when the CPU has AES instructions (measured
  here over loopback: 336-356 MB/s against 209 MB/s for ssh's default
  chacha20-poly1305); for any other client ssh's own order, since the
  client's CPU (which encrypts) may lack them, where chacha20 is faster.

Invariants: the options come from validated values only (the setting's
syntax is checked in :mod:`bakgrab.tasks.config`); a choice is one the
worker's own rsync lists in ``rsync --version`` (the worker refuses to start
otherwise, :func:`check_available`). What the client's rsync lacks shows only
when the pull fails (rsync's sender exits with "unknown compress name", an
old rrsync refuses the option): the grab then runs once more, at once, with
plain ``-z`` (``any``: rsync's own negotiation, which every rsync that
compresses at all accepts), records that fallback, and later ``auto`` grabs
of the name start from ``any``. The client's numbers (its byte counts, its
pace) steer the choice for its own name only, between settings that all
work.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import json
import logging
import os
import re
import shutil
import socket
from collections.abc import Mapping
from typing import Any

from bakgrab.tasks.errors import ConfigError, ProgramFailed

log = logging.getLogger(__name__)

ANY = "any"
"""Plain ``-z``: rsync negotiates the algorithm and its default level (zstd
level 3 between two rsyncs >= 3.2; zlib with an older peer)."""
OFF = "off"
UNMEASURED = "zstd:3"
"""``auto`` for a link not measured yet: the level rsync's own ``-z`` uses."""
FAST = "zstd:1"
"""``auto`` for a measured link at or above :data:`SLOW_WIRE`."""
SLOW = "zstd:3"
"""``auto`` below :data:`SLOW_WIRE`: each byte saved is worth more CPU."""

OFF_WIRE = 150 << 20
"""Bytes on the wire a second at or above which ``auto`` turns compression
off: on this project's 2-core benchmark host zstd:1 took CPU time at some
380 MB/s for both ends together, and the sender has its own work besides, so
a link that carried this much gains little from it (and over loopback, where
both ends share the CPUs, compression only costs; docs/benchmarks.md)."""
SLOW_WIRE = 4 << 20
"""Bytes on the wire a second (32 Mbit/s) below which ``auto`` uses
:data:`SLOW` (unless the data moved at :data:`CPU_BOUND_DATA`): zstd:3
sends about 8 % fewer bytes than zstd:1 on the benchmark's tree, which
matters where the wire is the bottleneck."""
CPU_BOUND_DATA = 64 << 20
"""Bytes of file data a second at or above which the link was not what
limited the pull, whatever the wire's rate: the cheapest level then."""
MIN_MEASURED = 16 << 20
"""File data a grab must move for its rates to count (an incremental grab that
moves little spends its time on the file list, not on the wire)."""
MIN_SECONDS = 0.5

REFUSED_RE = re.compile(
    r"unknown compress name: \S+"
    r"|--?(?:compress-choice|zc|compress-level|zl|old-compress|new-compress)\b"
    r".*(?:unknown option|disabled|not supported|refused)"
    r"|(?:unknown option|disabled|not supported|refused).*"
    r"--?(?:compress-choice|zc|compress-level|zl|old-compress|new-compress)\b")
"""What an rsync (or rrsync) that lacks the chosen compression says."""


@dataclasses.dataclass(frozen=True)
class Choice:
    """The compression of one pull, why it was chosen, and from what."""

    setting: str
    """The ``compress`` setting it came from (``auto`` or a fixed value)."""
    used: str
    """``off``, ``zstd:N``, ``lz4``, ``zlib:N`` or ``any`` (plain ``-z``)."""
    why: str
    measured: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    fallback: str = ""
    """Set when the client's rsync refused the first choice: what it said."""
    ciphers: str = ""
    """ssh's cipher preference for the pull (empty: ssh's own)."""

    def fall_back(self, said: str) -> Choice:
        """The choice after the client's rsync refused this one."""
        return dataclasses.replace(
            self, used=ANY, fallback=f"the client's rsync refused {self.used} ({said}); "
                                     "ran again with -z, rsync's own negotiation")

    def to_dict(self) -> dict[str, Any]:
        out = {"setting": self.setting, "used": self.used, "why": self.why,
               "measured": dict(self.measured)}
        if self.fallback:
            out["fallback"] = self.fallback
        if self.ciphers:
            out["ssh_ciphers"] = self.ciphers
        return out


def rsync_options(used: str) -> list[str]:
    """rsync's options for ``used``; ``off`` gives none at all (no ``-z``)."""
    if used == OFF:
        return []
    if used == ANY:
        return ["-z"]
    algo, _, level = used.partition(":")
    if algo not in ("zstd", "lz4", "zlib") or (level and not level.isdigit()):
        raise ValueError(f"not a compression: {used!r}")
    options = ["-z", f"--compress-choice={algo}"]
    if level:
        options.append(f"--compress-level={int(level)}")
    return options


@functools.lru_cache(maxsize=4)
def worker_list(rsync: str = "rsync") -> frozenset[str]:
    """The compressions the worker's rsync lists (``rsync --version``)."""
    from bakgrab.tasks import process

    out = process.run([shutil.which(rsync) or rsync, "--version"], timeout=10).stdout.decode()
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == "Compress list:" and i + 1 < len(lines):
            return frozenset(lines[i + 1].split()) - {"none"}
    return frozenset()  # rsync < 3.2: only its own zlib, through plain -z


def check_available(setting: str, rsync: str = "rsync") -> None:
    """Refuse a fixed ``setting`` the worker's own rsync lacks (worker start).

    The list is read here in every case: the prefork pool's processes inherit
    it, so no grab pays for ``rsync --version`` (about 40 ms here)."""
    have = worker_list(rsync)
    if setting in ("auto", OFF):
        return
    algo = setting.partition(":")[0]
    if algo not in have:
        listed = " ".join(sorted(have)) or "none"
        raise ConfigError(f"compress {setting!r}: this host's rsync lacks {algo} (its compress "
                          f"list: {listed}); use auto, off or one of those")


def link_kind(address: str) -> str:
    """Where the client is: ``loopback``, ``this-host`` (one of this host's
    own addresses), ``on-link`` (no gateway between), ``routed`` or
    ``unknown``."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        try:  # a host name: what ssh will connect to in a moment
            info = socket.getaddrinfo(address, None, type=socket.SOCK_STREAM)
            ip = ipaddress.ip_address(info[0][4][0])
        except (OSError, ValueError, IndexError):
            return "unknown"
    if ip.is_loopback or (isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped
                          and ip.ipv4_mapped.is_loopback):
        return "loopback"
    ip_cmd = shutil.which("ip") or ("/usr/sbin/ip" if os.path.exists("/usr/sbin/ip") else "")
    if not ip_cmd:
        return "unknown"
    from bakgrab.tasks import process

    try:
        done = process.run([ip_cmd, "-j", "route", "get", str(ip)], timeout=5, check=False)
        routes = json.loads(done.stdout or b"[]")
        route = routes[0] if routes and isinstance(routes[0], dict) else {}
    except (OSError, ValueError, ProgramFailed):
        return "unknown"
    if route.get("type") == "local":
        return "this-host"
    if not route:
        return "unknown"
    return "routed" if route.get("gateway") else "on-link"


def previous_link(meta: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The link measurement the previous grab's metadata holds (its own, or
    the one it carried forward), or None; anything malformed counts as none."""
    if not meta:
        return None
    link = meta.get("compress", {})
    link = link.get("link") if isinstance(link, dict) else None
    if not isinstance(link, dict):
        return None
    rates = {k: link.get(k) for k in ("wire_rate", "data_rate")}
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and v >= 0
               for v in rates.values()):
        return None
    return {**rates, "used": str(link.get("used", "")),
            "client_refused": bool(link.get("client_refused", False)),
            "from": str(link.get("from", meta.get("snapshot", "")))}


AES_GCM_FIRST = ("aes128-gcm@openssh.com,aes256-gcm@openssh.com,"
                 "chacha20-poly1305@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr")
"""ssh's ciphers, AES-GCM first (every one of them in OpenSSH's default list)."""


def ssh_ciphers(link: str, aes_cpu: bool) -> str:
    """ssh's cipher preference for a client at ``link``: see the module docstring."""
    return AES_GCM_FIRST if link in ("loopback", "this-host") and aes_cpu else ""


@functools.lru_cache(maxsize=1)
def cpu_has_aes() -> bool:
    """Whether this host's CPU has AES instructions (x86 ``aes``, arm ``aes``)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return "aes" in line.split(":", 1)[1].split()
    except OSError:
        pass
    return False


def choose(setting: str, *, link: str, cpus: int, previous: Mapping[str, Any] | None,
           available: frozenset[str], aes_cpu: bool = False) -> Choice:
    """The compression for one grab (pure: every measurement is an argument),
    and ssh's cipher preference with it."""
    choice = _choose(setting, link=link, cpus=cpus, previous=previous, available=available)
    return dataclasses.replace(choice, ciphers=ssh_ciphers(link, aes_cpu))


def _choose(setting: str, *, link: str, cpus: int, previous: Mapping[str, Any] | None,
            available: frozenset[str]) -> Choice:
    measured: dict[str, Any] = {"link": link, "cpus": cpus}
    if previous:
        measured["previous"] = dict(previous)
    if setting != "auto":
        return Choice(setting, setting, "set by the operator", measured)
    if link in ("loopback", "this-host"):
        return Choice(setting, OFF, f"the client is this host ({link}): nothing crosses a "
                                    "wire, compressing would only cost CPU", measured)
    if previous and previous.get("client_refused"):
        return Choice(setting, ANY, "the client's rsync refused an explicit choice before: "
                                    "rsync's own negotiation (-z)", measured)
    if previous is None:
        used, why = UNMEASURED, ("link not measured yet: rsync's own -z level, for a slow link; "
                                 "this grab measures it for the next")
    else:
        wire, data = previous["wire_rate"], previous["data_rate"]
        rates = (f"the previous grab moved {wire / (1 << 20):.1f} MiB/s on the wire, "
                 f"{data / (1 << 20):.1f} MiB/s of data")
        if wire >= OFF_WIRE:
            used, why = OFF, f"{rates}: a link faster than compression pays on"
        elif wire >= SLOW_WIRE or data >= CPU_BOUND_DATA:
            used, why = FAST, f"{rates}: a fast link, or the CPU set the pace: the cheapest level"
        else:
            used, why = SLOW, f"{rates}: a slow link, where fewer bytes pay for more CPU"
    algo = used.partition(":")[0]
    if used != OFF and algo not in available:
        return Choice(setting, ANY, f"{why}; this host's rsync lacks {algo}: rsync's own "
                                    "negotiation (-z)", measured)
    return Choice(setting, used, why, measured)


def decide(setting: str, address: str, previous_meta: Mapping[str, Any] | None) -> Choice:
    """:func:`choose` with this host's measurements of ``address``."""
    link = link_kind(address)
    choice = choose(setting, link=link, cpus=os.cpu_count() or 1,
                    previous=previous_link(previous_meta), available=worker_list(),
                    aes_cpu=cpu_has_aes())
    log.info("compression %s (%s): %s", choice.used, setting, choice.why)
    return choice


def refused(stderr_tail: str) -> str | None:
    """What the client's rsync said when it lacks the chosen compression."""
    m = REFUSED_RE.search(stderr_tail)
    return m.group(0)[:200] if m else None


def record(choice: Choice, stats: Mapping[str, int], seconds: float,
           previous: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``compress`` entry of the snapshot's metadata and the grab's result:
    the choice, and the link as this grab measured it (or as the previous
    one did, when this grab moved too little data to say)."""
    out = choice.to_dict()
    out["seconds"] = round(seconds, 3)
    data = stats.get("transferred_size", 0)
    if data >= MIN_MEASURED and seconds >= MIN_SECONDS:
        # (no "from": the snapshot whose metadata this is)
        out["link"] = {"wire_rate": round(stats.get("bytes_received", 0) / seconds),
                       "data_rate": round(data / seconds), "used": choice.used}
    elif previous:
        out["link"] = {k: previous[k] for k in ("wire_rate", "data_rate", "used", "from")
                       if k in previous}
    if "link" in out and (choice.fallback or (previous and previous.get("client_refused"))):
        out["link"]["client_refused"] = True
    elif choice.fallback:
        out["link"] = {"wire_rate": 0, "data_rate": 0, "used": choice.used,
                       "client_refused": True}
    return out

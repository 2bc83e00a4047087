"""A client host behind a slow link, for scenario 8 (issue 19).

A network namespace of the benchmark's own, wired to this host by a veth
pair with addresses from 198.18.0.0/15 (``.1`` here, ``.2`` there, a /30),
each side's sending limited by tc's token bucket filter (``tbf``: the kernels
this runs on may lack ``netem``; tbf alone limits the rate, which is what the
scenario needs). The client side (its sshd, ``bakgrab backup`` and its
one-shot sshd) runs inside; the backup host's side (the worker, the bare
rsyncs' receivers) stays here and reaches it on-link. Everything is made in
:meth:`SlowLink.__init__` and removed by :meth:`SlowLink.stop`, also when
the set-up fails half-way.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Sequence


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


class SlowLink:
    """A veth link to a client namespace, limited to ``mbit`` each way."""

    def __init__(self, mbit: int = 20) -> None:
        self.mbit = mbit
        tag = secrets.token_hex(3)
        self.ns = f"bkgb{tag}"
        self.dev = f"bkgb{tag}h"
        third = int(tag[:2], 16) % 256
        fourth = (int(tag[2:4], 16) % 64) * 4
        self.here = f"198.18.{third}.{fourth + 1}"
        self.there = f"198.18.{third}.{fourth + 2}"
        ip("netns", "add", self.ns)
        try:
            ip("link", "add", self.dev, "type", "veth", "peer", "name", "eth0", "netns", self.ns)
            ip("addr", "add", f"{self.here}/30", "dev", self.dev)
            ip("link", "set", self.dev, "up")
            ip("-n", self.ns, "addr", "add", f"{self.there}/30", "dev", "eth0")
            ip("-n", self.ns, "link", "set", "eth0", "up")
            ip("-n", self.ns, "link", "set", "lo", "up")
            shape = ["root", "tbf", "rate", f"{mbit}mbit", "burst", "64kb", "latency", "200ms"]
            subprocess.run(["tc", "qdisc", "add", "dev", self.dev, *shape], check=True,
                           capture_output=True, timeout=20)
            subprocess.run(["ip", "netns", "exec", self.ns, "tc", "qdisc", "add", "dev", "eth0",
                            *shape], check=True, capture_output=True, timeout=20)
        except BaseException:
            self.stop()
            raise

    @staticmethod
    def available() -> str | None:
        """Why the link cannot be made here, or None."""
        if os.geteuid() != 0:
            return "not root (network namespaces and tc need it)"
        for prog in ("ip", "tc"):
            if shutil.which(prog) is None:
                return f"{prog} is not installed (iproute2)"
        return None

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run on the client's side of the link."""
        return ["ip", "netns", "exec", self.ns, *argv]

    def describe(self) -> dict[str, object]:
        return {"rate_mbit": self.mbit, "qdisc": "tbf burst 64kb latency 200ms, both ways",
                "client": self.there, "backup_host": self.here}

    def stop(self) -> None:
        subprocess.run(["ip", "link", "del", self.dev], capture_output=True, timeout=20)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, timeout=20)

"""A grab that crawls is stopped: the worker, not the client, decides how long
a slot may be held (issue 11, attack 5).

rsync's own ``--timeout`` ends a transfer only after total silence, so a
hostile sender that trickles a few bytes a second keeps a worker slot busy
for as long as it likes. :class:`RateWatch` samples the rsync process
group every few seconds: the bytes its processes read (``rchar`` in
``/proc/PID/io``: the stream from ssh and the basis files) and the CPU time
they used. When, over the last ``window`` seconds, the group read less than
``min_rate`` bytes a second *and* used less than a tenth of that time on the
CPU, it kills the group and the grab fails as interrupted (retried within
``max_retries``, so bounded). The CPU term keeps a legitimate pull alive
while rsync works through a large unchanged tree, linking files without
reading any (that is CPU and metadata work, not network wait).
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import threading
import time

CPU_SHARE = 0.1
"""The share of the window a crawling group may spend on the CPU and still
count as stalled: a working rsync (linking, hashing) uses far more."""


def group_usage(pgid: int) -> tuple[int, float]:
    """Bytes read and CPU seconds of every live process in group ``pgid``."""
    ticks = os.sysconf("SC_CLK_TCK")
    read = 0
    cpu = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:
                continue
            cpu += (int(fields[11]) + int(fields[12])) / ticks
            with open(f"/proc/{entry}/io") as f:
                for line in f:
                    if line.startswith("rchar:"):
                        read += int(line.split()[1])
                        break
        except (OSError, ValueError, IndexError):
            continue
    return read, cpu


class RateWatch:
    """Watch one rsync process group; :attr:`stalled` once it was stopped."""

    def __init__(self, pgid: int, min_rate: int, window: float, every: float = 5.0) -> None:
        self.pgid = pgid
        self.min_rate = min_rate
        self.window = window
        self.every = min(every, window / 4)
        self.stalled: str | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rate-watch", daemon=True)

    def __enter__(self) -> RateWatch:
        if self.min_rate > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join(self.every + 5)

    def _run(self) -> None:
        samples: collections.deque[tuple[float, int, float]] = collections.deque()
        while not self._done.wait(self.every):
            now = time.monotonic()
            read, cpu = group_usage(self.pgid)
            samples.append((now, read, cpu))
            while len(samples) > 1 and now - samples[1][0] >= self.window:
                samples.popleft()
            then, read0, cpu0 = samples[0]
            span = now - then
            if span < self.window:
                continue
            rate = (read - read0) / span
            if rate < self.min_rate and cpu - cpu0 < CPU_SHARE * span:
                self.stalled = (f"the transfer ran below min_rate={self.min_rate} B/s for "
                                f"{span:.0f}s ({rate:.0f} B/s) and was stopped")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pgid, signal.SIGKILL)
                return

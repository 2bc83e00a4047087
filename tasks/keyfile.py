"""Private key files: written once, 0600, the first writer wins.

Several processes or threads may make the same key at once (jobs starting
together, workers starting together); each writes a private temp file and
links it into place, so exactly one key exists and all of them read it back.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path


def create_once(path: Path, data: bytes) -> None:
    """Make ``path`` holding ``data`` (0600) unless it exists already."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.{threading.get_ident()}")
    tmp.unlink(missing_ok=True)  # a leftover of a crash would keep its old mode
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()

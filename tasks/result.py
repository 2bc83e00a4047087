"""The grab result: what the worker returns and the client prints.

The result is a plain JSON-able dict (Celery stores it in the result
backend). It never holds request fields beyond the name, and never a key.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class GrabResult:
    """Outcome of one successful (possibly partial) grab."""

    name: str
    snapshot: str
    bytes_transferred: int = 0
    files: int = 0
    files_transferred: int = 0
    total_size: int = 0
    duration: float = 0.0
    rsync_exit: int = 0
    partial: bool = False
    warnings: list[str] = dataclasses.field(default_factory=list)
    removed: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    attempts: int = 1
    compress: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The pull's compression, why it was chosen, and the link it measured (issue 19)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GrabResult:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def summary(self) -> str:
        """One line for a terminal or a cron mail."""
        state = "partial snapshot" if self.partial else "snapshot"
        line = (
            f"{self.name}: {state} {self.snapshot}: {self.files} files, "
            f"{human_bytes(self.bytes_transferred)} transferred of {human_bytes(self.total_size)}"
            f" in {self.duration:.1f}s"
        )
        if self.warnings:
            line += f" ({len(self.warnings)} warning{'s' if len(self.warnings) > 1 else ''}: "
            line += "; ".join(self.warnings[:3]) + ")"
        return line


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")

"""The benchmark's data: a deterministic tree and the changes made to it.

Everything here is a function of the seed (and the run number for changes):
the same seed gives the same names, sizes, contents, modes and times.

The tree has eight top-level directories of about equal size (scenario 6
gives one to each of eight clients), a few hundred directories below them,
a realistic mix of sizes (many small config and source files, fewer
documents and compressed media, a few large disk-image-like files of up to a
few tens of MB), hard links and relative symlinks (some dangling).
"""

from __future__ import annotations

import bisect
import dataclasses
import os
import random
from pathlib import Path
from typing import Any

PARTS = ("etc", "home", "opt", "root", "srv", "usr", "var", "data")
BASE_TIME = 1_700_000_000
"""Files' times lie before this; changes made by the benchmark after it."""
MIB = 1 << 20

# (weight, smallest, largest, content, extensions); sizes are log-uniform.
CATEGORIES: tuple[tuple[float, int, int, str, tuple[str, ...]], ...] = (
    (0.50, 64, 4096, "text", ("conf", "cfg", "ini", "yaml", "json", "txt", "sh", "service")),
    (0.30, 4096, 32768, "text", ("py", "c", "h", "js", "md", "html", "css", "xml")),
    (0.15, 32768, 98304, "mixed", ("db", "bin", "so", "pyc", "doc", "sqlite", "o")),
    (0.05, 16384, 524288, "random", ("jpg", "png", "gz", "zip", "mp3", "xz", "pdf", "webp")),
)
LARGE_EXT = ("img", "qcow2", "tar", "vdi")


@dataclasses.dataclass(frozen=True)
class TreeSpec:
    files: int = 20_000
    """Names in the tree: regular files, hard links and symlinks."""
    seed: int = 1
    scale: float = 1.0
    """Multiplies the size of every file except the large ones."""
    large_mb: float = 40.0
    """Size of the largest of the large files, in MiB."""
    hardlinks: bool = True
    """Whether 0.5% of the names are extra hard links (off: what a btrfs
    snapshot costs without giving them their own inode first, issue 14)."""

    @property
    def n_symlinks(self) -> int:
        return self.files // 100

    @property
    def n_hardlinks(self) -> int:
        return self.files // 200 if self.hardlinks else 0

    @property
    def n_large(self) -> int:
        return max(1, self.files // 5000)

    @property
    def n_dirs(self) -> int:
        return max(2 * len(PARTS), self.files // 60)


class Content:
    """Byte makers seeded from one generator: text, mixed and random data."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        letters = "etaoinshrdlucmfwypvbgkjqxz"
        weights = [12, 9, 8, 7.5, 7, 6.7, 6.3, 6, 6, 4.3, 4, 2.8, 2.4, 2.4, 2.2, 2, 2, 1,
                   1.5, 2, 0.8, 0.2, 0.15, 0.1, 0.2, 0.07]
        self.words = ["".join(rng.choices(letters, weights, k=rng.randint(2, 10)))
                      for _ in range(3000)]
        lines = []
        size = 0
        while size < 2 * MIB:
            n = rng.randint(2, 12)
            line = " ".join(rng.choices(self.words, k=n))
            if rng.random() < 0.3:
                line = f"{rng.choice(self.words)} = {line}"
            lines.append(line)
            size += len(line) + 1
        pool = ("\n".join(lines) + "\n").encode()
        self.pool = pool + pool  # slices may wrap around

    def word(self) -> str:
        return self.rng.choice(self.words)

    def text(self, size: int, header: str = "") -> bytes:
        head = header.encode()[:size]
        start = self.rng.randrange(len(self.pool) // 2)
        return head + self.pool[start:start + size - len(head)]

    def random(self, size: int) -> bytes:
        return self.rng.randbytes(size)

    def mixed(self, size: int, block: int = 4096, zeros: float = 0.1,
              rand: float = 0.45) -> bytes:
        out = bytearray()
        while len(out) < size:
            n = min(block, size - len(out))
            x = self.rng.random()
            if x < zeros:
                out += bytes(n)
            elif x < zeros + rand:
                out += self.rng.randbytes(n)
            else:
                out += self.text(n)
        return bytes(out)

    def make(self, kind: str, size: int, header: str) -> bytes:
        if kind == "text":
            return self.text(size, header)
        if kind == "mixed":
            return self.mixed(size)
        if kind == "image":
            return self.mixed(size, block=MIB, zeros=0.25, rand=0.45)
        return self.random(size)


def log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    if hi <= lo:
        return max(1, lo)
    return max(1, int(lo * (hi / lo) ** rng.random()))


def pick_category(rng: random.Random) -> tuple[float, int, int, str, tuple[str, ...]]:
    x = rng.random()
    acc = 0.0
    for cat in CATEGORIES:
        acc += cat[0]
        if x < acc:
            return cat
    return CATEGORIES[-1]


def file_size(rng: random.Random, cat: tuple[float, int, int, str, tuple[str, ...]],
              scale: float) -> int:
    return log_uniform(rng, max(1, int(cat[1] * scale)), max(1, int(cat[2] * scale)))


def old_time(rng: random.Random) -> int:
    return BASE_TIME - rng.randrange(60, 3 * 365 * 86400)


def write_file(path: Path, data: bytes, mode: int, mtime: int) -> None:
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)
    os.utime(path, (mtime, mtime))


def unique(names: set[str], name: str) -> str:
    base, k = name, 1
    while name in names:
        k += 1
        stem, dot, ext = base.partition(".")
        name = f"{stem}-{k}{dot}{ext}"
    names.add(name)
    return name


def generate(root: Path, spec: TreeSpec) -> dict[str, Any]:
    """Make the tree under ``root`` (which must not exist); a summary of it."""
    rng = random.Random(f"bakgrab-bench:{spec.seed}")  # noqa: S311 -- reproducible data
    content = Content(rng)
    root.mkdir(parents=True)
    os.chmod(root, 0o755)  # noqa: S103 -- a tree like any other
    names: dict[Path, set[str]] = {}
    dirs: list[list[Path]] = []
    for top in PARTS:
        d = root / top
        d.mkdir()
        names[d] = set()
        dirs.append([d])
    for i in range(spec.n_dirs - len(PARTS)):
        part = i % len(PARTS)
        parent = rng.choice(dirs[part])
        d = parent / unique(names[parent], content.word())
        d.mkdir(mode=0o700 if rng.random() < 0.05 else 0o755)
        names[d] = set()
        dirs[part].append(d)
    # Some directories hold many files, most hold few.
    cum = []
    for part_dirs in dirs:
        acc, c = 0.0, []
        for _ in part_dirs:
            acc += rng.paretovariate(1.1)
            c.append(acc)
        cum.append(c)

    def pick_dir(part: int) -> Path:
        c = cum[part]
        return dirs[part][bisect.bisect_left(c, rng.random() * c[-1])]

    regular = spec.files - spec.n_symlinks - spec.n_hardlinks
    files: list[list[Path]] = [[] for _ in PARTS]
    total = 0
    for i in range(regular):
        part = i % len(PARTS)
        d = pick_dir(part)
        if i < spec.n_large:
            # The large files: disk-image-like, between a quarter and all of large_mb.
            size = log_uniform(rng, int(spec.large_mb * MIB / 4), int(spec.large_mb * MIB))
            kind, ext, mode = "image", rng.choice(LARGE_EXT), 0o600
        else:
            cat = pick_category(rng)
            size = file_size(rng, cat, spec.scale)
            kind, ext = cat[3], rng.choice(cat[4])
            mode = 0o755 if ext == "sh" else (0o600 if rng.random() < 0.1 else 0o644)
        path = d / unique(names[d], f"{content.word()}.{ext}")
        write_file(path, content.make(kind, size, f"# {path.relative_to(root)}\n"), mode,
                   old_time(rng))
        if i >= spec.n_large:
            files[part].append(path)
        total += size
    for i in range(spec.n_hardlinks):
        part = i % len(PARTS)
        target = rng.choice(files[part])
        d = pick_dir(part)
        os.link(target, d / unique(names[d], f"hl-{target.name}"))
    dangling = 0
    for i in range(spec.n_symlinks):
        part = i % len(PARTS)
        d = pick_dir(part)
        link = d / unique(names[d], f"ln-{content.word()}")
        if rng.random() < 0.1:
            os.symlink(f"../missing-{content.word()}", link)
            dangling += 1
        else:
            os.symlink(os.path.relpath(rng.choice(files[part]), d), link)
        os.utime(link, (BASE_TIME - 1, BASE_TIME - 1), follow_symlinks=False)
    # Directory times last: creating entries changed them.
    for part_dirs in dirs:
        for d in sorted(part_dirs, key=lambda p: len(p.parts), reverse=True):
            t = old_time(rng)
            os.utime(d, (t, t))
    return {
        "files": spec.files, "regular_files": regular, "hard_links": spec.n_hardlinks,
        "symlinks": spec.n_symlinks, "dangling_symlinks": dangling,
        "directories": spec.n_dirs, "large_files": spec.n_large, "bytes": total,
        "seed": spec.seed, "scale": spec.scale, "large_mb": spec.large_mb,
    }


def regular_files(root: Path) -> list[Path]:
    """Every regular file under ``root``, in a stable order."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in sorted(filenames):
            p = Path(dirpath) / fn
            if not p.is_symlink():
                out.append(p)
    return out


def largest_file(root: Path) -> Path:
    return max(regular_files(root), key=lambda p: (p.stat().st_size, str(p)))


def change_file(rng: random.Random, path: Path, content: Content, mtime: int) -> None:
    """Rewrite a small part of ``path`` the way an edit or an update would."""
    st = path.stat()
    with open(path, "r+b") as f:
        if path.suffix[1:] in CATEGORIES[0][4] + CATEGORIES[1][4]:
            # an edited text file: a line rewritten and one appended
            if st.st_size > 0:
                f.seek(rng.randrange(st.st_size))
                f.write(content.text(min(40, st.st_size)))
            f.seek(0, os.SEEK_END)
            f.write(f"{content.word()} = {content.word()} {rng.randrange(10**6)}\n".encode())
        else:
            n = min(512, max(1, st.st_size))
            f.seek(rng.randrange(max(1, st.st_size - n + 1)))
            f.write(content.random(n))
    os.utime(path, (mtime, mtime))


def mutate(root: Path, spec: TreeSpec, run: int, *, change: float = 0.01, add: float = 0.001,
           delete: float = 0.001) -> dict[str, int]:
    """Scenario 3: change ``change`` of the files, add ``add``, delete ``delete``
    (fractions of the tree's regular files; the large files are left alone)."""
    rng = random.Random(f"bakgrab-bench:{spec.seed}:mutate:{run}")  # noqa: S311
    content = Content(random.Random(f"bakgrab-bench:{spec.seed}:content:{run}"))  # noqa: S311
    content.rng = rng
    limit = max(int(CATEGORIES[-1][2] * spec.scale), 1) + 1
    files = [p for p in regular_files(root) if p.stat().st_size <= limit]
    n = len(files)
    n_change, n_add, n_del = (max(1, round(x * n)) for x in (change, add, delete))
    chosen = rng.sample(files, min(n, n_change + n_del))
    when = BASE_TIME + 1000 * (run + 1)
    changed_bytes = 0
    for k, path in enumerate(chosen[:n_change]):
        change_file(rng, path, content, when + k)
        changed_bytes += path.stat().st_size
    for path in chosen[n_change:]:
        path.unlink()
    dirs = sorted({p.parent for p in files})
    added_bytes = 0
    for k in range(n_add):
        d = rng.choice(dirs)
        cat = pick_category(rng)
        size = file_size(rng, cat, spec.scale)
        path = d / f"new-{run}-{k}-{content.word()}.{rng.choice(cat[4])}"
        write_file(path, content.make(cat[3], size, f"# {path.name}\n"), 0o644, when + k)
        added_bytes += size
    return {"changed": n_change, "added": n_add, "deleted": len(chosen) - n_change,
            "changed_bytes": changed_bytes, "added_bytes": added_bytes}


def change_large(root: Path, spec: TreeSpec, run: int, size: int = 4096) -> dict[str, Any]:
    """Scenario 4: overwrite ``size`` bytes in the middle of the largest file."""
    rng = random.Random(f"bakgrab-bench:{spec.seed}:large:{run}")  # noqa: S311
    path = largest_file(root)
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2 + rng.randrange(-size, size))
        f.write(rng.randbytes(size))
    when = BASE_TIME + 10**6 + run
    os.utime(path, (when, when))
    return {"file": str(path.relative_to(root)), "file_size": st.st_size, "changed_bytes": size}

"""bakgrab.client.gate: only a read-only rsync pull gets through to rrsync -ro."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bakgrab.client.gate import check
from bakgrab.worker.rsync import PullSpec, exclude_rules, pull_argv

PULL = (
    "rsync --server --sender -lHogDtpAXrSze.iLsfxCIvu --timeout=300 "
    "--skip-compress=gz/bz2/t\\\\\\[gb\\\\\\]z/tbz2 --numeric-ids . /"
)
"""A pull command as the worker's rsync sends it (rsync escapes brackets)."""

WRITE = "rsync --server -vlogDtpre.iLsfxCIvu . /"
"""What a push (a write into the client) asks for."""

needs_rrsync = pytest.mark.skipif(
    not (shutil.which("rrsync") and shutil.which("ionice") and shutil.which("rsync")),
    reason="rsync, rrsync and ionice needed",
)


def test_real_pull_passes() -> None:
    """The pull command the worker's rsync sends is let through in ro mode."""
    assert check("ro", PULL) is None
    assert check("ro", "rsync --server --sender -vlogDtpre.iLsfxCIvu . /") is None


@pytest.mark.parametrize(
    ("command", "why"),
    [
        ("", "no command"),
        (WRITE, "only a read-only rsync pull is allowed"),
        ("rsync --server -vlogDtpre.iLsfxCIvu --sender . /", "only a read-only"),
        ("scp -f /etc/shadow", "only a read-only"),
        ("internal-sftp", "only a read-only"),
        ("/usr/bin/rsync --server --sender -e.iLsfxCIvu . /", "only a read-only"),
        (" rsync --server --sender -e.iLsfxCIvu . /", "only a read-only"),
        ("rsync  --server --sender -e.iLsfxCIvu . /", "only a read-only"),
        ("rsync --daemon --server .", "only a read-only"),
        ("rsync --server --sender --open-noatime -e.iLsfxCIvu . /", "--open-noatime"),
        ("rsync --server --sender --open-noatime=1 -e.iLsfxCIvu . /", "--open-noatime"),
    ],
)
def test_refused_commands(command: str, why: str) -> None:
    """Shells, writes, other programs, odd spellings and --open-noatime are refused."""
    reason = check("ro", command)
    assert reason is not None and why in reason


@pytest.mark.parametrize("meta", list(";&|`$<>(){}\n\r\x00'\"!#~"))
def test_shell_metacharacters_refused(meta: str) -> None:
    """Any shell metacharacter anywhere refuses the command."""
    assert check("ro", f"rsync --server --sender -e.iLsfxCIvu . /{meta}x") == (
        "shell metacharacters in the command"
    )


def test_wo_mode_is_the_mirror() -> None:
    """In wo mode a write passes and a read is refused."""
    assert check("wo", WRITE) is None
    assert check("wo", PULL) == "reading is not allowed"
    assert check("wo", "cat /etc/passwd") == "only rsync"


# -- the gate as sshd runs it ----------------------------------------------------------


def tree_state(root: Path) -> dict[str, tuple[int, int, int, str]]:
    """Every entry under root: mode, size, mtime and a hash of its bytes."""
    state = {}
    for path in sorted([root, *root.rglob("*")]):
        st = os.lstat(path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        state[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return state


@pytest.fixture
def source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "file").write_text("precious\n")
    (src / "sub" / "other").write_bytes(os.urandom(1000))
    return src


def run_gate(
    source: Path, log: Path, command: str, mode: str = "ro"
) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "SSH_ORIGINAL_COMMAND": command}
    return subprocess.run(
        [sys.executable, "-I", "-m", "bakgrab.client.gate", mode, str(source), str(log)],
        env=env, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )


def hostile(src: Path) -> list[str]:
    return [
        "",
        f"rm -rf {src}",
        f"sh -c 'touch {src}/pwned'",
        WRITE,
        f"rsync --server --sender -vlogDtpre.iLsfxCIvu . /; rm -rf {src}",
        f"rsync --server --sender -vlogDtpre.iLsfxCIvu . /$(touch {src}/pwned)",
        f"rsync --server --sender -vlogDtpre.iLsfxCIvu . /`touch {src}/pwned`",
        f"rsync --server --sender -vlogDtpre.iLsfxCIvu . / > {src}/file",
        f"rsync --server --sender . /\nrm -rf {src}",
        "rsync --server --sender --open-noatime -vlogDtpre.iLsfxCIvu . /",
        f"/usr/bin/rsync --server -vlogDtpre.iLsfxCIvu . {src}",
    ]


def test_gate_process_refuses_hostile_commands(source: Path, tmp_path: Path) -> None:
    """Run as sshd runs it, the gate exits 1 for each hostile command, logs the
    refusal with the reason and the command, tells the peer, and nothing in the
    source directory changes."""
    log = tmp_path / "logs" / "gate.log"
    log.parent.mkdir()
    before = tree_state(source)
    commands = hostile(source)
    for command in commands:
        done = run_gate(source, log, command)
        assert done.returncode == 1, command
        assert done.stderr.startswith("bakgrab gate: refused: "), command
        line = log.read_text().splitlines()[-1]
        assert line.endswith(f" refused: {check('ro', command)}: {command[:500]!r}")
        assert tree_state(source) == before
    assert len(log.read_text().splitlines()) == len(commands)
    assert not (source / "pwned").exists()


def test_gate_usage_error(source: Path, tmp_path: Path) -> None:
    """A gate started with the wrong arguments refuses everything (exit 2)."""
    done = subprocess.run([sys.executable, "-I", "-m", "bakgrab.client.gate", "rw", str(source)],
                          env={"SSH_ORIGINAL_COMMAND": PULL, "PATH": os.environ["PATH"]},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "usage" in done.stderr


@needs_rrsync
def test_rrsync_refuses_what_the_gate_lets_through(source: Path, tmp_path: Path) -> None:
    """A pull asking the sender to delete what it sent passes the gate's check,
    but rrsync -ro refuses it, and the source file stays."""
    command = "rsync --server --sender --remove-source-files -vlogDtpre.iLsfxCIvu . /"
    assert check("ro", command) is None
    log = tmp_path / "logs" / "gate.log"
    log.parent.mkdir()
    before = tree_state(source)
    done = run_gate(source, log, command)
    assert done.returncode != 0
    assert "--remove-source-files" in done.stderr
    assert tree_state(source) == before


@needs_rrsync
def test_a_real_pull_through_the_gate(source: Path, tmp_path: Path) -> None:
    """The worker's pull argv, with a stand-in ssh that runs the gate as sshd's
    ForceCommand would, copies the client's tree through rrsync -ro: hard links
    kept, excludes applied, the source untouched."""
    os.link(source / "file", source / "file.link")
    (source / "junk.tmp").write_text("excluded")
    logs = tmp_path / "logs"
    logs.mkdir()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "ssh").write_text(
        "#!/bin/sh\n"
        "# drop ssh's options up to '-l USER HOST'; what follows is the remote command\n"
        "while [ $# -gt 0 ]; do case \"$1\" in -l) shift 3; break;; *) shift;; esac; done\n"
        f'SSH_ORIGINAL_COMMAND="$*" exec {sys.executable} -I -m bakgrab.client.gate ro '
        f"{source} {logs / 'gate.log'}\n"
    )
    (bindir / "ssh").chmod(0o755)
    run = tmp_path / "run"
    run.mkdir()
    spec = PullSpec(
        user="bk", address="192.0.2.1", port=22, key_file=run / "key",
        known_hosts=run / "known_hosts", host_alias="client", exclude_file=run / "exclude",
        dest=tmp_path / "dest", link_dest=None, timeout=30, connect_timeout=5, alive_interval=5,
    )
    spec.exclude_file.write_text(exclude_rules(["*.tmp"]))
    before = tree_state(source)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    done = subprocess.run(pull_argv(spec), env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    dest = spec.dest
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*")) == [
        "file", "file.link", "sub", "sub/other"
    ]
    assert (dest / "file").read_text() == "precious\n"
    assert (dest / "sub" / "other").read_bytes() == (source / "sub" / "other").read_bytes()
    assert os.stat(dest / "file").st_ino == os.stat(dest / "file.link").st_ino
    assert tree_state(source) == before
    assert not (logs / "gate.log").exists() or "refused" not in (logs / "gate.log").read_text()


# -- restores: the receiver made unprivileged for a staging dir that is not private ------

PUSH = "rsync --server -lHogDtpAXrRSze.iLsfxCIvu --super --numeric-ids --timeout=300 . /"
"""A restore push as the worker's rsync sends it (rsync -HaAXz --relative)."""


def test_write_modes_refuse_reads() -> None:
    """Both restore modes let a push through and refuse a pull."""
    for mode in ("wo", "wp"):
        assert check(mode, PUSH) is None
        assert check(mode, PULL) == "reading is not allowed"


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (PUSH, "rsync --server --fake-super -lHogDtpAXrRSze.iLsfxCIvu --numeric-ids "
               "--timeout=300 . /"),
        ("rsync --server -logDtpre.iLsfxCIvu --super=1 --no-super --fake-super --super . /a\\ b",
         "rsync --server --fake-super -logDtpre.iLsfxCIvu . /a\\ b"),
        # rrsync takes this "." as --partial-dir's value: the --super after it is
        # still an option, and goes too
        ("rsync --server -logDtpre.iLsfxCIvu --partial-dir . --super . /",
         "rsync --server --fake-super -logDtpre.iLsfxCIvu --partial-dir . . /"),
    ],
)
def test_open_staging_forces_fake_super(command: str, expected: str) -> None:
    """In "wo" mode every super-user option of the peer goes, wherever it is,
    and --fake-super comes first, where no option can take it as its value."""
    from bakgrab.client.gate import unprivileged

    assert unprivileged(command) == expected


def test_open_staging_without_a_dot_is_refused() -> None:
    from bakgrab.client.gate import unprivileged

    assert unprivileged("rsync --server -logDtpre.iLsfxCIvu --super") is None


def test_staging_parent_must_be_private(tmp_path: Path) -> None:
    """rsync may write only into a dir whose parent is the gate user's, 0700."""
    from bakgrab.client.gate import check_staging

    wrap = tmp_path / "wrap"
    (wrap / "r").mkdir(parents=True)
    wrap.chmod(0o700)
    assert check_staging(str(wrap / "r")) is None
    wrap.chmod(0o750)
    assert check_staging(str(wrap / "r")) == (
        "the staging dir's parent is not private (0700, the gate's user's)")
    wrap.chmod(0o700)
    os.symlink(wrap / "r", wrap / "link")
    assert check_staging(str(wrap / "link")) == "the staging dir is not a directory"
    assert check_staging(str(wrap / "missing")) == "the staging dir is not a directory"


@needs_rrsync
def test_gate_process_rewrites_what_rrsync_gets(tmp_path: Path) -> None:
    """Run as sshd runs it in "wo" mode, with a stand-in for rrsync that
    prints what it was given: SSH_ORIGINAL_COMMAND carries --fake-super and no
    --super; in "wp" mode it is passed on as the peer sent it."""
    wrap = tmp_path / "wrap"
    (wrap / "r").mkdir(parents=True)
    wrap.chmod(0o700)
    fake = tmp_path / "rrsync"
    fake.write_text("#!/bin/sh\necho \"$* | $SSH_ORIGINAL_COMMAND\"\n")
    fake.chmod(0o755)
    log = tmp_path / "gate.log"
    unprivileged_push = ("rsync --server --fake-super -lHogDtpAXrRSze.iLsfxCIvu --numeric-ids "
                         "--timeout=300 . /")
    for mode, seen in (("wo", unprivileged_push), ("wp", PUSH)):
        done = subprocess.run(
            [sys.executable, "-I", "-m", "bakgrab.client.gate", mode, str(wrap / "r"), str(log),
             shutil.which("ionice") or "ionice", str(fake)],
            env={"PATH": os.environ["PATH"], "SSH_ORIGINAL_COMMAND": PUSH},
            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr
        assert done.stdout == f"-wo -no-del -no-lock {wrap / 'r'} | {seen}\n"


@needs_rrsync
@pytest.mark.parametrize("command", [
    PUSH,
    "rsync --server -logDtpre.iLsfxCIvu --partial-dir . --super . /",
    "rsync --server -logDtpre.iLsfxCIvu --no-super --fake-super --super=1 . /",
])
def test_real_rrsync_hands_rsync_only_fake_super(tmp_path: Path, command: str) -> None:
    """What the real rrsync, behind a "wo" gate, finally runs rsync with (its
    own log of the argv): --fake-super is the only super-user option, whatever
    the peer asked for; behind a "wp" gate the peer's own options reach rsync."""
    import ast

    wrap = tmp_path / "wrap"
    (wrap / "r").mkdir(parents=True)
    wrap.chmod(0o700)
    home = tmp_path / "home"  # sshd's cwd for the gate: rrsync's log is relative to it
    home.mkdir()
    for mode in ("wo", "wp"):
        rrsync_log = home / "rrsync.log"  # rrsync appends the argv only if it exists
        rrsync_log.write_text("")
        subprocess.run(
            [sys.executable, "-I", "-m", "bakgrab.client.gate", mode, str(wrap / "r"),
             str(tmp_path / "gate.log")],
            env={"PATH": os.environ["PATH"], "SSH_ORIGINAL_COMMAND": command}, cwd=home,
            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        line = rrsync_log.read_text()
        if mode == "wp" and "--no-super" in command:
            assert line == ""  # rrsync knows no --no-super: refused, rsync never ran
            continue
        assert line, "rrsync did not run rsync"
        argv = ast.literal_eval(line[line.index("("):].strip())
        options = argv[:argv.index("--")]
        am_root = [o.split("=")[0] for o in options
                   if o.split("=")[0] in ("--super", "--no-super", "--fake-super")]
        if mode == "wo":
            assert am_root == ["--fake-super"], argv
        else:
            assert "--super" in am_root, argv

"""The fixed cost of a job (issue 19): what the client's path may not do.

* No Celery, kombu, redis, billiard or amqp module is imported on the way of
  ``bakgrab backup`` (the console script's group, the client's command, the
  one-shot sshd with its ``sshd -t``) up to the sshd listening: together
  they are about half of the client's start-up, and they are imported once
  they are needed, to reach the broker.
* The client's job commands end without the interpreter's finalization
  (:func:`bakgrab.tasks.cli.quick_exit`), and what an orderly exit does that
  matters still happens: atexit handlers run, buffered output is written,
  the exit code is kept.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import support

pytestmark = pytest.mark.integration

HEAVY = ("celery", "kombu", "redis", "billiard", "amqp")

UP_TO_LISTENING = """
import sys
from bakgrab.client import sshd

enter = sshd.OneShotServer.__enter__

def listening(self):
    server = enter(self)
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r})
    print("LISTENING on", server.port, "imported:", ",".join(heavy) or "-", flush=True)
    return server

sshd.OneShotServer.__enter__ = listening
sys.argv = ["bakgrab", *sys.argv[1:]]
from bakgrab.tasks.cli import main
main()
"""


def test_no_celery_import_before_the_sshd_listens(tmp_path: Path) -> None:
    """The real client, up to its one-shot sshd listening, has imported none
    of Celery, kombu, redis, billiard or amqp; it then goes on to the broker
    (here a closed port: exit 10, ClientSetupError, "cannot reach the broker")."""
    source = tmp_path / "src"
    source.mkdir()
    broker = f"redis://127.0.0.1:{support.free_port()}/0"
    done = subprocess.run(
        [sys.executable, "-c", UP_TO_LISTENING.format(heavy=HEAVY), "backup", "--broker", broker,
         "--name", "fixed", "--source", str(source)],
        capture_output=True, text=True, timeout=60, env=dict(os.environ))
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("LISTENING")]
    assert lines, f"the sshd never listened: {done.stdout!r} {done.stderr!r}"
    assert lines[0].endswith("imported: -"), lines[0]
    assert done.returncode == 10, done.stderr
    assert "cannot reach the broker" in done.stderr


QUICK = """
import atexit, sys, threading
from bakgrab.tasks import cli

class Finalized:
    def __del__(self):
        sys.stderr.write("finalized\\n")

kept = Finalized()
atexit.register(lambda: sys.stderr.write("atexit ran\\n"))
sys.stdout.write("buffered, no newline")
if sys.argv[1] == "thread":
    threading.Thread(target=threading.Event().wait, args=(2,)).start()
cli.quick_exit(int(sys.argv[2]))
sys.stderr.write("returned\\n")
sys.exit(int(sys.argv[2]))
"""


def quick(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", QUICK, *args], capture_output=True, text=True,
                          timeout=60)


def test_quick_exit_keeps_code_output_and_atexit() -> None:
    """quick_exit ends the process at once with its code, after the atexit
    handlers ran and stdout was flushed; no object is finalized."""
    done = quick("plain", "3")
    assert done.returncode == 3
    assert done.stdout == "buffered, no newline"
    assert done.stderr == "atexit ran\n"


def test_quick_exit_waits_for_a_running_thread_like_an_orderly_exit() -> None:
    """With a non-daemon thread still running, quick_exit leaves the exit to
    the interpreter, which waits for the thread as it always did."""
    done = quick("thread", "4")
    assert done.returncode == 4
    assert done.stdout == "buffered, no newline"
    assert done.stderr.splitlines() == ["returned", "atexit ran", "finalized"]


def test_backup_exits_quickly(tmp_path: Path, redis_url: str, worker: support.Proc) -> None:
    """``bakgrab backup`` of an empty tree ends by quick_exit (its result
    printed in full, exit 0) rather than by the interpreter's finalization:
    an object that only finalization would destroy tells."""
    source = tmp_path / "empty"
    source.mkdir()
    code = ("import sys\n"
            "class Finalized:\n"
            "    def __del__(self):\n"
            "        sys.stderr.write('finalized\\n')\n"
            "kept = Finalized()\n"
            "sys.argv = ['bakgrab', *sys.argv[1:]]\n"
            "from bakgrab.tasks.cli import main\n"
            "main()\n")
    done = subprocess.run(
        [sys.executable, "-c", code, "backup", "--broker", redis_url, "--name", "quick",
         "--source", str(source), "--json"],
        capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    assert '"snapshot": "quick.' in done.stdout and done.stdout.rstrip().endswith("}")
    assert "finalized" not in done.stderr


def test_the_request_key_costs_one_command_on_the_broker(tmp_path: Path) -> None:
    """Reading the backup host's request key sends the broker one GET and
    nothing before it (no HELLO, CLIENT MAINT_NOTIFICATIONS, CLIENT SETINFO
    handshake: 4 round trips over a tunnel), counted by a real redis-server."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from bakgrab.client.backup import request_public_key
    from bakgrab.tasks import request_key_name, sealed
    from bakgrab.tasks.config import Settings

    redis_proc, url = support.start_redis(tmp_path / "redis")
    try:
        settings = Settings()
        public = sealed.public_text(X25519PrivateKey.generate().public_key())
        port = url.rsplit(":", 1)[1].split("/")[0]

        def cli(*args: str) -> str:
            return subprocess.run(["redis-cli", "-p", port, *args], capture_output=True,
                                  text=True, timeout=10, check=True).stdout

        cli("SET", request_key_name(settings.queue), public)
        cli("CONFIG", "RESETSTAT")
        (tmp_path / "state").mkdir()
        key = request_public_key(settings, url, tmp_path / "state", "127.0.0.1")
        assert sealed.public_text(key) == public
        stats = [line.split(":")[0] for line in cli("INFO", "commandstats").splitlines()
                 if line.startswith("cmdstat_")]
        assert sorted(stats) == ["cmdstat_config|resetstat", "cmdstat_get"], stats
        errors = [line for line in cli("INFO", "errorstats").splitlines()
                  if line.startswith("errorstat_")]
        assert errors == [], errors
    finally:
        redis_proc.stop()

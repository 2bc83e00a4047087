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

import json
import os
import signal
import subprocess
import sys
import time
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


def test_the_client_reaches_the_broker_in_four_commands(tmp_path: Path) -> None:
    """``bakgrab backup`` up to waiting for its job sends the broker four
    commands on two connections, counted by a real redis-server: GET of the
    request key, SUBSCRIBE to the result, LPUSH of the job, GET of the result;
    nothing before them (no HELLO, CLIENT MAINT_NOTIFICATIONS, CLIENT SETINFO,
    PING), none of kombu's queue declaration (MULTI, LLEN, SADD), no error.
    Stopped, it leaves the result channel (the worker skips a job nobody waits for)."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from bakgrab.tasks import request_key_name, sealed
    from bakgrab.tasks.config import Settings

    redis_proc, url = support.start_redis(tmp_path / "redis")
    source = tmp_path / "src"
    source.mkdir()
    client = None
    try:
        settings = Settings()
        public = sealed.public_text(X25519PrivateKey.generate().public_key())
        port = url.rsplit(":", 1)[1].split("/")[0]
        ours = {"cmdstat_config|resetstat", "cmdstat_info", "cmdstat_pubsub|numsub"}

        def cli(*args: str) -> str:
            return subprocess.run(["redis-cli", "-p", port, *args], capture_output=True,
                                  text=True, timeout=10, check=True).stdout

        def calls() -> dict[str, int]:
            found = {}
            for line in cli("INFO", "commandstats").splitlines():
                name, _, rest = line.partition(":")
                if name.startswith("cmdstat_") and name not in ours:
                    found[name] = int(rest.split(",")[0].removeprefix("calls="))
            return found

        cli("SET", request_key_name(settings.queue), public)
        cli("CONFIG", "RESETSTAT")
        client = subprocess.Popen(
            [support.BAKGRAB, "backup", "--broker", url, "--name", "few", "--source",
             str(source)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        support.wait_for(lambda: calls().get("cmdstat_get", 0) == 2, 30,
                         "the client to send its job and read its result key")
        time.sleep(0.5)  # anything more the client would send comes now
        assert calls() == {"cmdstat_get": 2, "cmdstat_subscribe": 1, "cmdstat_lpush": 1}
        errors = [line for line in cli("INFO", "errorstats").splitlines()
                  if line.startswith("errorstat_")]
        assert errors == [], errors
        [item] = [line for line in cli("LRANGE", settings.queue, "0", "-1").splitlines()
                  if line]
        task_id = json.loads(item)["headers"]["id"]
        channel = f"celery-task-meta-{task_id}"
        assert cli("PUBSUB", "NUMSUB", channel).split() == [channel, "1"]
        client.terminate()
        _, err = client.communicate(timeout=60)
        assert client.returncode == 128 + signal.SIGTERM, err
        assert cli("PUBSUB", "NUMSUB", channel).split() == [channel, "0"]
    finally:
        if client is not None and client.poll() is None:
            client.kill()
            client.wait()
        redis_proc.stop()

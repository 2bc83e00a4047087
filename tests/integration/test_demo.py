"""deploy/demo.sh as a new user runs it, a second time (issue 13): it says
nothing about installing (the editable install is current: no pip run, no
setuptools notice), backs up twice, explains the list's "0 B alone", says how
to remove what it made, and leaves no process of its own behind."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests import support

pytestmark = [pytest.mark.integration, pytest.mark.root]

DEMO = support.REPO / "deploy" / "demo.sh"


def processes_naming(text: str) -> list[str]:
    """Command lines of live processes that contain ``text``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if text.encode() in cmdline and support.alive(int(entry)):
                found.append(cmdline.decode(errors="replace"))
    return found


def test_the_demo_runs_quietly_explains_and_cleans_up(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BAKGRAB_", "XDG_"))}
    # what the first run of the demo does; on a current .venv it builds nothing
    subprocess.run(["bash", str(support.REPO / "deploy" / "install-deps.sh")], check=True,
                   capture_output=True, timeout=900, env=env)
    demo = tmp_path / "demo"
    done = subprocess.run(["bash", str(DEMO)], capture_output=True, text=True, timeout=300,
                          env={**env, "BAKGRAB_DEMO_DIR": str(demo)})
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    for noise in ("Editable installation", "BuildBackendWarning", "setuptools", "pip",
                  "first run: installing"):
        assert noise not in out, (noise, out)
    assert re.findall(r"^demo: snapshot demo\.\S+: ", done.stdout, re.M).__len__() == 2, out
    assert re.search(r"^  demo\.\S+  .*complete  0 B alone$", done.stdout, re.M), out
    assert '"0 B alone": each of its files is unchanged in the second' in done.stdout
    assert f"To remove everything the demo made: rm -rf {demo}\n" in done.stdout
    assert len(support.snapshots(demo / "storage", "demo")) == 2
    assert processes_naming(str(demo)) == []

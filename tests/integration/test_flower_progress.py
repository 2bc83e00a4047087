"""Flower's task view shows a running grab's numbers (issue 17, part 5).

A real worker pulls a tree slowly (``--bwlimit``) while a real ``bakgrab
flower`` watches; the test reads the running task through Flower's API and in
headless Chromium (its task page), then lets the grab finish.
"""

from __future__ import annotations

import base64
import re
import secrets
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests import support
from tests.integration.test_flower import (
    PASSWORD,
    USER,
    flower_tasks,
    start_flower,
    wait_for_states,
)
from tests.integration.test_flower_browser import ARTIFACTS, browser  # noqa: F401 -- fixture

pytestmark = pytest.mark.integration

SCREENSHOT = ARTIFACTS / "flower-progress.png"
PROGRESS_RE = re.compile(
    r"pulling: [1-9]\d?% · [\d.]+ (KiB|MiB) · [\d.]+[kMG]B/s · ETA \d+:\d\d:\d\d")
"""A reading of a grab under way: past 0%, some bytes, a rate and an ETA."""


def test_task_view_shows_bytes_percent_rate_and_eta_of_a_running_grab(
        tmp_path: Path, redis_url: str, storage: Path, browser: WebDriver) -> None:  # noqa: F811
    """While the grab runs, Flower's API and its task page show it as PROGRESS
    with one line of numbers (percent, bytes, rate, ETA); once it succeeds the
    result is the real one. The page is saved as tests/artifacts/flower-progress.png."""
    worker = support.start_worker(storage, redis_url, tmp_path / "worker.log",
                                  "--bwlimit", "96K")
    flower, base = start_flower(redis_url, tmp_path / "flower.log")
    client = None
    try:
        src = tmp_path / "src"
        src.mkdir()
        (src / "big.bin").write_bytes(secrets.token_bytes(2 << 20))
        client = support.Proc([support.BAKGRAB, "backup", "--broker", redis_url,
                               "--name", "web-01", "--source", str(src)],
                              tmp_path / "client.log")

        def running() -> tuple[str, str] | None:
            for tid, task in flower_tasks(base).items():
                result = task.get("result")
                if (task.get("name") == "bakgrab.grab" and task.get("state") == "PROGRESS"
                        and isinstance(result, str) and PROGRESS_RE.search(result)):
                    return tid, result
            return None

        tid, line = support.wait_for(running, 60, "a PROGRESS line in Flower", 0.5)
        assert client.alive()

        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        browser.execute_cdp_cmd("Network.enable", {})
        browser.execute_cdp_cmd("Network.setExtraHTTPHeaders",
                                {"headers": {"Authorization": f"Basic {token}"}})
        browser.set_window_size(1400, 1000)  # the Result row in the picture
        browser.get(f"{base}/task/{tid}")

        def shown() -> str | bool:
            text = browser.find_element(By.TAG_NAME, "body").text
            if PROGRESS_RE.search(text) and "PROGRESS" in text:
                return text
            browser.refresh()  # the page is drawn once; a later reading is on the next load
            return False

        text = WebDriverWait(browser, 30, poll_frequency=0.5).until(lambda _: shown())
        assert "bakgrab.grab" in text
        ARTIFACTS.mkdir(exist_ok=True)
        assert browser.save_screenshot(str(SCREENSHOT))
        assert SCREENSHOT.stat().st_size > 10_000

        assert client.popen.wait(120) == 0, client.text()
        final = wait_for_states(base, {tid: "SUCCESS"}, timeout=60)[tid]
        assert "ETA" not in str(final.get("result")) and "web-01" in str(final.get("result"))
        assert not client.alive()
    finally:
        if client is not None:
            client.stop()
        flower.stop()
        worker.stop()

"""Flower's tasks page in headless Debian Chromium, as an operator sees it.

Needs the Debian packages chromium and chromium-driver (deploy/install-deps.sh
--test installs them) and selenium (the test extra). Selenium is given the
system chromedriver and chromium, so it never fetches a driver or a browser.
"""

from __future__ import annotations

import base64
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests import support
from tests.integration.test_flower import (
    PASSWORD,
    USER,
    failed_task_ids,
    start_flower,
    task_ids,
    unreachable_backup,
    wait_for_states,
)

pytestmark = pytest.mark.integration

ARTIFACTS = support.REPO / "tests" / "artifacts"
SCREENSHOT = ARTIFACTS / "flower-tasks.png"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--disable-dev-shm-usage", "--window-size=1920,640")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    """Headless Chromium driven through the system chromedriver, with a fresh profile."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not chromedriver:
        pytest.fail("needs Debian's chromium and chromium-driver: "
                    "bash deploy/install-deps.sh --test")
    profile = Path(tempfile.mkdtemp(prefix="bakgrab-chromium-", dir=tmp_path))
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    service = Service(executable_path=chromedriver, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def test_tasks_page_shows_the_grabs_with_their_final_states(
    tmp_path: Path, redis_url: str, storage: Path, worker: support.Proc, browser: WebDriver
) -> None:
    """Signed in with basic auth, Flower's tasks page lists the successful
    grab's row as SUCCESS and the failed grab's row as FAILURE, both under the
    task name bakgrab.grab with a Retries column; no row shows a key. The page
    is saved as tests/artifacts/flower-tasks.png."""
    flower, base = start_flower(redis_url, tmp_path / "flower.log")
    try:
        src = tmp_path / "src"
        src.mkdir()
        (src / "file").write_text("shown in flower\n")
        done = support.run_backup(redis_url, "web-01", src)
        assert done.returncode == 0, done.stderr
        [ok] = task_ids(storage, "web-01")
        assert unreachable_backup(redis_url, "db-01", src).returncode == 9
        [failed] = failed_task_ids(storage, "db-01")
        wait_for_states(base, {ok: "SUCCESS", failed: "FAILURE"}, timeout=90)

        # The credentials go in a header for every request of the page (its
        # table loads by XHR), never in a URL or an argv.
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        browser.execute_cdp_cmd("Network.enable", {})
        browser.execute_cdp_cmd("Network.setExtraHTTPHeaders",
                                {"headers": {"Authorization": f"Basic {token}"}})
        browser.get(base + "/tasks")

        def rows() -> dict[str, str] | Literal[False]:
            found = {}
            for row in browser.find_elements(By.CSS_SELECTOR, "#tasks-table tbody tr"):
                text = row.text
                for tid in (ok, failed):
                    if tid in text:
                        found[tid] = text
            return found if len(found) == 2 else False

        shown = WebDriverWait(browser, 30, poll_frequency=0.5).until(lambda _: rows())
        # DataTables draws the visible header in a copy of the table's head.
        headers = [th.text.lower() for th in browser.find_elements(By.CSS_SELECTOR, "thead th")
                   if th.text]
        assert headers[:4] == ["name", "state", "runtime", "retries"]
        assert "bakgrab.grab" in shown[ok] and "SUCCESS" in shown[ok]
        assert "'name': 'web-01'" in shown[ok]
        assert "bakgrab.grab" in shown[failed] and "FAILURE" in shown[failed]
        assert "'name': 'db-01'" in shown[failed]
        page = browser.page_source
        for marker in support.KEY_MARKERS:
            assert marker not in page
        ARTIFACTS.mkdir(exist_ok=True)
        assert browser.save_screenshot(str(SCREENSHOT))
        assert SCREENSHOT.stat().st_size > 10_000
        assert PASSWORD not in flower.text()
    finally:
        flower.stop()

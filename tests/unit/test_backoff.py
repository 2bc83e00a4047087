"""The worker's retry delay (``bakgrab.worker.task.backoff``): it grows, is
capped and is jittered as ``retry_backoff``'s documentation says (issue 13)."""

from __future__ import annotations

import dataclasses
import random
import re

import pytest

from bakgrab.tasks.config import Settings
from bakgrab.worker.task import backoff

SAMPLES = 400


def delays(retries: int, settings: Settings) -> list[float]:
    random.seed(retries)
    return [backoff(retries, settings) for _ in range(SAMPLES)]


@pytest.mark.parametrize(("backoff_s", "cap"), [(30.0, 900.0), (0.5, 2.0), (1.0, 1000.0)])
def test_retry_n_waits_between_half_and_all_of_its_exponential_step(
    backoff_s: float, cap: float
) -> None:
    """Retry N (1-based) waits between half and all of
    min(retry_backoff * 2^(N-1), retry_backoff_max)."""
    settings = dataclasses.replace(Settings(), retry_backoff=backoff_s, retry_backoff_max=cap)
    for retries in range(12):
        step = min(backoff_s * 2**retries, cap)
        got = delays(retries, settings)
        assert min(got) >= step / 2 and max(got) <= step, (retries, min(got), max(got))


def test_delays_grow_until_the_cap_then_stay_under_it() -> None:
    """The lower bound doubles each retry; past the cap no delay exceeds it and
    none falls below half of it."""
    settings = Settings()  # 30 s, capped at 900 s
    lows = [min(delays(r, settings)) for r in range(10)]
    highs = [max(delays(r, settings)) for r in range(10)]
    assert lows[0] >= 15 and highs[0] <= 30  # the first retry: 15 to 30 s
    for r in range(1, 5):  # 60, 120, 240, 480: below the cap, doubling
        assert lows[r] >= 2 * lows[r - 1] * 0.9 and highs[r] <= 30 * 2**r
    for r in range(5, 10):  # 960 and beyond: capped at 900
        assert lows[r] >= 450 and highs[r] <= 900


def test_delays_are_jittered_across_their_range() -> None:
    """Two workers retrying at once do not wait the same time: the delays of one
    retry spread over the upper half of its step."""
    got = delays(3, Settings())  # step 240 s
    assert len({round(d, 3) for d in got}) > SAMPLES * 0.9
    assert min(got) < 120 + 0.1 * 120 and max(got) > 240 - 0.1 * 120


def test_retry_backoff_documents_what_backoff_does() -> None:
    """The setting's documentation (tasks/config.py, and so the shipped example
    config) says the first retry waits between half and all of retry_backoff."""
    import inspect

    source = inspect.getsource(Settings)
    doc = re.search(r"retry_backoff: float = [\d.]+\n\s+\"\"\"(.+?)\"\"\"", source, re.S)
    assert doc is not None
    text = " ".join(doc.group(1).split())
    assert "between half and all of" in text, text
    assert "retry_backoff_max" in text, text

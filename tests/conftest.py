"""Shared test set-up.

Every node keeps its audit log and the memory of what it released on disk, and checks each
release against everything it released before on the same data. Tests are independent
analyses, so each test gets its own state folder (IAPTNET_STATE_DIR) and fresh node runtimes;
tests of the memory itself (across runs and restarts, in tests/test_attacks.py) say so explicitly.
"""

from __future__ import annotations

import pytest
from hypothesis import settings

# Property tests draw the same examples on every run, so CI never turns red on a new random
# draw; `pytest --hypothesis-profile=explore` searches afresh (and keeps what it finds).
settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore")
settings.load_profile("repeatable")


@pytest.fixture(autouse=True)
def _own_node_state(tmp_path_factory, monkeypatch):
    from iaptnet.node import runtime

    monkeypatch.setenv("IAPTNET_STATE_DIR", str(tmp_path_factory.mktemp("node-state")))
    runtime._RUNTIMES.clear()
    runtime._STATES.clear()
    yield
    runtime._RUNTIMES.clear()
    runtime._STATES.clear()


@pytest.fixture(scope="session")
def report_run(tmp_path_factory):
    """The --out folder of one `iaptnet run` of every kind (tests/reportcase.py), shared by
    the report's tests and its browser tests."""
    from reportcase import run_every_kind

    return run_every_kind(tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium (Debian's package) driven by Playwright; a missing browser fails the
    test (CI installs it), it is never skipped."""
    from pathlib import Path

    from reportcase import CHROMIUM, CHROMIUM_ARGS

    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is not installed: apt-get install chromium (.ci/run does), then run the tests again.")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()

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

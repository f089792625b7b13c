"""The hub's ServerApp, adapted (flwr 1.42.0 exactly; see flower/pins.py): replies are pulled
with short retries and a deadline, not flwr's 1 s, 2 s, 4 s... backoff for up to two hours."""

from __future__ import annotations

import functools

from .pins import INSTALLED as _INSTALLED
from .pins import check_flwr, stock_timing


def install_serverapp_adaptations(max_time: float) -> None:
    """In the hub's ServerApp process: pull replies with short retries, and not for ever.

    A reply becomes visible to the ServerApp before the node has finished uploading its
    objects; flwr's `HttpGrid.pull_messages` then waits 1 s, 2 s, 4 s... (up to 10 s between
    tries, for up to 2 hours). Here it retries every 20-250 ms and gives up after `max_time`
    seconds (the study's node timeout), so a node that dies mid-upload fails the round in time.
    """
    import flwr.superlink.grid.http_grid as http_grid

    if stock_timing() or "grid_pull_objects" in _INSTALLED:
        return
    check_flwr()
    _INSTALLED["grid_pull_objects"] = http_grid.pull_objects
    http_grid.pull_objects = functools.partial(
        http_grid.pull_objects, initial_backoff=0.02, backoff_cap=0.25, max_time=max_time
    )

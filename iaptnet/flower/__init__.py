"""Everything specific to Flower, the deployment engine (flwr 1.42.0, pinned exactly).

- `pins.py`: the release iaptnet is written for and every private part of it touched, checked.
- `supernode.py`: the node daemon's SuperNode adapted (app allow-list, warm worker, sleeps).
- `serverapp.py`: the hub's ServerApp adapted (reply pulls with a deadline).
- `superlink.py`: the hub's SuperLink adapted (each middleware only on the paths it acts on).
- `control.py`: the hub's Control API spoken from the analyst's process (submit, follow, stop).
- `frame.py`: a task or reply framed as one Flower record, its arrays inside as bytes.
- `bundle.py`: the iaptnet release as a Flower app bundle (FAB), and its hash.

The roles' processes that use them stay with their role: the node daemon (node/daemon.py),
the hub (coordinator/hub.py, coordinator/serverapp.py) and the flower engine
(coordinator/engines/flower.py). Why each adaptation exists: docs/developer/flower.md.
"""

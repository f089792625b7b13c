"""Running studies on the in-process engine: a network file's nodes as ClientApps here."""

from __future__ import annotations

import os
from pathlib import Path

from .network import load_network, name_services
from .studies import check_min_nodes, load_study


def usable_cores() -> int:
    """The cores this process may run on (its affinity, not the machine's count): the
    command line's number of worker processes for the nodes."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def run_inprocess(
    study_paths: list[str | Path],
    network_path: str | Path,
    *,
    progress=None,
    announce=None,
    out=None,
    workers: int = 1,
) -> list[dict]:
    """Every study's results. The files are read and checked before the engine (Flower,
    numpy, pandas) is imported, so a mistake in one is reported at once. With `out` (the
    run's --out folder), the GLM studies keep a checkpoint there after every round, and a run
    started again continues from it (coordinator/checkpoint.py). With `workers` of 2 or more
    the nodes answer in that many worker processes (the command line's default: one per
    core); with 1, or in a daemonic process, in this process's threads, where a caller can
    look at their state."""
    network = load_network(network_path)
    studies = [load_study(p, network.schema_paths, list(network.services)) for p in study_paths]
    check_min_nodes(studies, len(network.nodes), f"the network {network.path} has {len(network.nodes)} node(s)")
    from .checkpoint import FileCheckpoints

    checkpoints = FileCheckpoints(out) if out else None
    import multiprocessing

    from ..protocol.errors import IaptnetError
    from .engines.inprocess import InProcessGrid
    from .engines.node_processes import NodeProcessGrid
    from .runner import run_batch

    # A daemonic process (a multiprocessing pool's worker) may not start processes: there the
    # nodes answer in threads, with the same results.
    if workers >= 2 and len(network.nodes) >= 2 and not multiprocessing.current_process().daemon:
        grid = NodeProcessGrid(network.nodes, workers)
    else:
        grid = InProcessGrid(network.nodes)
    try:
        results = run_batch(
            grid, studies, engine="inprocess", progress=progress, announce=announce, checkpoints=checkpoints
        )
    except IaptnetError:
        # A study that cannot be fitted fails the same way again: its checkpoint would only
        # be left behind in --out (an in-process run is never lost to a hub).
        if checkpoints:
            checkpoints.discard()
        raise
    finally:
        if isinstance(grid, NodeProcessGrid):
            grid.close()
    column = next((c for s in studies for c in s.spec.levels), None)
    return name_services(results, network.services, column)

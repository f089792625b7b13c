"""Running studies on the in-process engine: a network file's nodes as ClientApps here."""

from __future__ import annotations

from pathlib import Path

from .engines.inprocess import InProcessGrid
from .network import load_network
from .runner import run_batch
from .session import ProgressFn
from .studies import load_study


def run_inprocess(
    study_paths: list[str | Path], network_path: str | Path, *, progress: ProgressFn | None = None, announce=None
) -> list[dict]:
    network = load_network(network_path)
    studies = [load_study(p, network.schema_paths) for p in study_paths]
    grid = InProcessGrid(network.nodes)
    return run_batch(grid, studies, engine="inprocess", progress=progress, announce=announce)

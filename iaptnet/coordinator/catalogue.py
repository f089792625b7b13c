"""The study catalogue shipped with iaptnet: the source study's findings as study files."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def catalogue_paths() -> list[Path]:
    """The catalogue's study TOMLs, in finding order (d1 ... d6)."""
    folder = resources.files("iaptnet") / "catalogue"
    return sorted(Path(str(p)) for p in folder.iterdir() if p.name.endswith(".toml"))

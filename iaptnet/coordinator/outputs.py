"""Where a run's files go: results folders named safely from study names, checked before
anything runs, and written whole or not at all.

Kept free of numpy, pandas and Flower, so the command line can check an --out folder and the
study names in well under a second, before importing the engines.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from ..protocol.errors import SpecError

MAX_FILENAME = 100


def safe_filename(name: str) -> str:
    """A study name as one plain file name. Names come from study files (or a hub's reply),
    so `../x`, `/abs`, `a/b`, control characters or a leading dot must not choose where
    results go: anything but letters, digits, `_ - .` becomes `_`, as does a leading dot."""
    text = re.sub(r"[^A-Za-z0-9_.-]", "_", str(name).strip())[:MAX_FILENAME]
    return re.sub(r"^\.", "_", text) or "_"


def results_paths(out: Path, names: list, sources: list | None = None) -> list[Path]:
    """Each study's `out/<safe name>/results.json`, checked before anything is written (or
    run): SpecError if two studies would share a folder (compared case-blind, as some file
    systems do) or a folder resolves outside `out` (a symlink)."""
    root = Path(out).resolve()
    paths, seen = [], {}
    for i, name in enumerate(names):
        folder = safe_filename(name)
        source = str(sources[i]) if sources else f"study '{folder}'"
        if folder.casefold() in seen:
            raise SpecError(
                f"{source}: field 'name' gives the results folder '{folder}', as {seen[folder.casefold()]} "
                "does; give each study a name that differs in its letters or digits."
            )
        seen[folder.casefold()] = source
        path = root / folder / "results.json"
        if not path.resolve().is_relative_to(root):
            raise SpecError(
                f"{Path(out) / folder}: leads outside the --out folder {out} (a link?); "
                "results are written only inside it."
            )
        paths.append(path)
    return paths


def check_out_folder(out: Path) -> None:
    """Before a run: `out` is a folder, or one can be made there. Finding out when the results
    are written would lose a run that may have taken an hour of rounds."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SpecError(f"{out}: --out names a file, not a folder for the results.")
    existing = next(p for p in [out.absolute(), *out.absolute().parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise SpecError(f"{out}: --out cannot be made, because {existing} is not a folder this user may write in.")


def write_json_atomic(path: Path, data) -> None:
    """Write to a temporary file beside the target, then rename: never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, allow_nan=True)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

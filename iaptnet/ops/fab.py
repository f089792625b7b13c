"""The iaptnet release as a Flower app bundle (FAB), and its hash.

The FAB is built from exactly the installed `iaptnet` package's `.py` and `.toml` files plus the
project's `pyproject.toml` (which holds the `[tool.flwr.app]` tables), staged in a clean folder
so that nothing else on the machine (caches, virtual environments, data) can change it. Flower
builds FABs deterministically (sorted files, fixed dates), so the same release gives the same
sha256 on the analyst's machine, at the hub and at every node: that hash is what a Trust
approves with `iaptnet node approve-app`.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import tomllib
from functools import cache
from pathlib import Path

from ..protocol.errors import SpecError

APP_DIR_NAME = "iaptnet-app"
SUFFIXES = (".py", ".toml")


def package_dir() -> Path:
    import iaptnet

    return Path(iaptnet.__file__).resolve().parent


def project_file() -> Path:
    """The release's pyproject.toml (beside the package in a source tree or editable install)."""
    path = package_dir().parent / "pyproject.toml"
    try:
        data = tomllib.loads(path.read_text())
    except (FileNotFoundError, tomllib.TOMLDecodeError):
        raise SpecError(
            f"{path}: the installed iaptnet has no readable pyproject.toml beside it; the app bundle "
            "is built from the release's source tree, so install iaptnet from its source "
            "(pip install -e /path/to/iaptnet-release)."
        ) from None
    if data.get("project", {}).get("name") != "iaptnet" or "app" not in data.get("tool", {}).get("flwr", {}):
        raise SpecError(f"{path}: is not iaptnet's pyproject.toml with a [tool.flwr.app] table.")
    return path


def release_files() -> dict[str, Path]:
    """Relative path -> file, for every source file of the installed package, sorted."""
    root = package_dir()
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix in SUFFIXES and "__pycache__" not in path.parts and not path.is_symlink():
            files[(Path("iaptnet") / path.relative_to(root)).as_posix()] = path
    return files


def stage_release(dest: Path) -> Path:
    """Copy the release's app files into `dest/iaptnet-app`; return that folder."""
    app = Path(dest) / APP_DIR_NAME
    if app.exists():
        shutil.rmtree(app)
    app.mkdir(parents=True)
    shutil.copyfile(project_file(), app / "pyproject.toml")
    for rel, src in release_files().items():
        target = app / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
    return app


@cache
def release_fab() -> tuple[bytes, str]:
    """(FAB bytes, sha256 hex) of the installed release; computed once per process."""
    from ..node.flower_adapt import build_fab_from_dir

    with tempfile.TemporaryDirectory(prefix="iaptnet-fab-") as tmp:
        data = build_fab_from_dir(stage_release(Path(tmp)))
    return data, hashlib.sha256(data).hexdigest()


def release_hash() -> str:
    return release_fab()[1]

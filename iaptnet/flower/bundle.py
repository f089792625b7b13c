"""The iaptnet release as a Flower app bundle (FAB), and its hash.

The FAB holds exactly the installed `iaptnet` package's `.py` and `.toml` files and a
`pyproject.toml` written here (the app's name, the release's version, and the `[tool.flwr.app]`
tables: which ServerApp and ClientApp, and the run config's defaults). Nothing is read from a
source tree, so a node installed from a wheel builds the same bundle as a checkout. Flower
builds FABs deterministically (sorted files, fixed dates), so the same release gives the same
sha256 on the analyst's machine, at the hub and at every node: that hash is what a Trust
approves with `iaptnet node approve-app`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from functools import cache
from pathlib import Path

APP_DIR_NAME = "iaptnet-app"
SUFFIXES = (".py", ".toml")

#: The Flower app: its components and the run config's defaults (set per run by the flower engine).
SERVERAPP = "iaptnet.coordinator.serverapp:app"
CLIENTAPP = "iaptnet.node.app:app"
RUN_CONFIG = {
    "studies": "",  # base64 JSON of the studies and their schemas, set by `iaptnet run --engine flower`
    "node-timeout": 300.0,
    "poll-interval": 0.25,
    "resume": "",  # base64 JSON of the checkpoints a run continues from (coordinator/checkpoint.py)
}


def package_dir() -> Path:
    import iaptnet

    return Path(iaptnet.__file__).resolve().parent


def project_text() -> str:
    """The bundle's pyproject.toml: what Flower needs to run the app, nothing else."""
    from .. import __version__
    from .pins import FLWR_VERSION

    def value(v) -> str:
        return json.dumps(v)  # a JSON string or number is a TOML basic string or float

    lines = [
        "# Written by iaptnet/flower/bundle.py: the Flower app of this iaptnet release.",
        "[project]",
        'name = "iaptnet"',
        f"version = {value(__version__)}",
        f"dependencies = [{value('flwr==' + FLWR_VERSION)}]",
        "",
        "[tool.flwr.app]",
        'publisher = "iaptnet"',
        "",
        "[tool.flwr.app.components]",
        f"serverapp = {value(SERVERAPP)}",
        f"clientapp = {value(CLIENTAPP)}",
        "",
        "[tool.flwr.app.config]",
        *(f"{key} = {value(v)}" for key, v in RUN_CONFIG.items()),
        "",
    ]
    return "\n".join(lines)


def release_files() -> dict[str, Path]:
    """Relative path -> file, for every source file of the installed package, sorted."""
    root = package_dir()
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix in SUFFIXES and "__pycache__" not in path.parts and not path.is_symlink():
            files[(Path("iaptnet") / path.relative_to(root)).as_posix()] = path
    return files


def stage_release(dest: Path) -> Path:
    """Write the release's app files into `dest/iaptnet-app`; return that folder."""
    app = Path(dest) / APP_DIR_NAME
    if app.exists():
        shutil.rmtree(app)
    app.mkdir(parents=True)
    (app / "pyproject.toml").write_text(project_text())
    for rel, src in release_files().items():
        target = app / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
    return app


def build_fab_from_dir(app_dir: Path) -> bytes:
    """The FAB bytes `flwr build` would make of `app_dir` (deterministic)."""
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(Path(app_dir))


@cache
def release_fab() -> tuple[bytes, str]:
    """(FAB bytes, sha256 hex) of the installed release; computed once per process."""
    with tempfile.TemporaryDirectory(prefix="iaptnet-fab-") as tmp:
        data = build_fab_from_dir(stage_release(Path(tmp)))
    return data, hashlib.sha256(data).hexdigest()


def release_hash() -> str:
    return release_fab()[1]

"""Checkpoints of a run's GLM Newton state, so that a run lost mid-way (a hub restart, a
machine that went down) continues from its last completed round when it is run again.

After every round of a GLM batch, `fit_models` hands its whole state to `save`: each model's
coefficients and Newton bookkeeping (previous step, deviance, halvings, iterations, which
columns are active and why others were dropped, the covariance once converged), the nodes of
the cohort (who contributes, who left and why, each one's data version) and the pooled
centring and scaling. A run given that state again (`load`) prepares the studies on the nodes
as usual, checks that nothing it rests on changed (the same contributing nodes with the same
data versions, the same design columns), and goes on from the saved round: the rounds after
it are the same computations on the same sums, so the result is the one an uninterrupted run
gives, bit for bit.

Where the state lives: in the run's `--out` folder, `.checkpoint/<batch hash>.json`
(`FileCheckpoints`), written atomically after every round and removed once the run has
succeeded. On the deployment engine the ServerApp at the hub sends it to the analyst's machine
as events of its log stream (`EmittedCheckpoints`), and a run submitted again sends it back in
the run config. Only the coordinator keeps it: no node holds any of it, and it holds nothing a
node did not release to the study.

Kept free of numpy and Flower (the command line imports it before the engines).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

#: The folder of a run's --out that holds its checkpoints.
FOLDER = ".checkpoint"
VERSION = 2  # 2: a model's state holds its last step and whether its middle term is due


class Checkpoints:
    """No checkpoints (the default): nothing is loaded, saving does nothing."""

    def load(self, key: str) -> dict | None:
        return None

    def save(self, key: str, state: dict) -> None:
        return None

    def done(self, key: str) -> None:
        return None


class FileCheckpoints(Checkpoints):
    """Checkpoints in `<out>/.checkpoint/<key>.json`, written whole or not at all."""

    def __init__(self, out: str | Path):
        self.folder = Path(out) / FOLDER

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def load(self, key: str) -> dict | None:
        try:
            data = json.loads(self.path(key).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("version") != VERSION or data.get("key") != key:
            return None
        return data

    def save(self, key: str, state: dict) -> None:
        """A checkpoint that cannot be written (a full disk) does not stop the run: it only
        means a lost run starts again from the beginning; the results' own write says so."""
        from .outputs import write_json_atomic

        try:
            write_json_atomic(self.path(key), {**state, "version": VERSION, "key": key})
        except OSError:
            self.path(key).unlink(missing_ok=True)

    def discard(self) -> None:
        """After a run that ended in an error (not a lost run): no checkpoint, and no --out
        folder left behind that the run made and filled with nothing else."""
        if self.folder.is_dir():
            for path in self.folder.glob("*.json"):
                path.unlink(missing_ok=True)
            for folder in (self.folder, self.folder.parent):
                try:
                    folder.rmdir()  # only if empty
                except OSError:
                    break

    def done(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)
        try:
            self.folder.rmdir()  # only if empty
        except OSError:
            pass


class EmittedCheckpoints(Checkpoints):
    """The hub's side: states given with the run (`resume`), states sent on through `emit`."""

    def __init__(self, resume: dict[str, dict], emit: Callable[[str, dict], None]):
        self.resume = resume
        self.emit = emit

    def load(self, key: str) -> dict | None:
        data = self.resume.get(key)
        if not isinstance(data, dict) or data.get("version") != VERSION or data.get("key") != key:
            return None
        return data

    def save(self, key: str, state: dict) -> None:
        self.emit(key, {**state, "version": VERSION, "key": key})


def glm_batch_key(entries: list[tuple[str, str]]) -> str | None:
    """The key of a run's GLM batch from its studies' (kind, hash), in order (the batch hash
    run_glm_batch gives its session), or None without GLM studies."""
    from ..protocol.kinds.glm import batch_hash

    hashes = [h for kind, h in entries if kind == "glm"]
    return batch_hash(hashes) if hashes else None


class BatchCheckpoint:
    """One GLM batch's checkpoint in a store, as `fit_models` uses it. `note(text)`, when
    given, hears whether a saved state was taken up (a progress line for the analyst)."""

    def __init__(self, store: Checkpoints, key: str, note: Callable[[str], None] | None = None):
        self.store = store
        self.key = key
        self.note = note

    def load(self) -> dict | None:
        return self.store.load(self.key)

    def save(self, state: dict) -> None:
        self.store.save(self.key, state)

    def resumed(self, round_no: int) -> None:
        if self.note:
            self.note(f"continuing from the checkpoint of round {round_no}: the nodes prepared the studies again")

    def not_applied(self, why: str) -> None:
        if self.note:
            self.note(f"the checkpoint does not apply ({why}); the studies start from the beginning")

"""The span of everything a node has released on a data version, and how far it can single out
one row: the leverage rule applied to all releases together.

Every exact statistic a node releases is a sum over rows of a product of released columns: a
model's X'y pairs its design columns with the outcome, X'X pairs them with each other, a
table's summaries pair cell indicators with a variable. Whoever combines such sums across
models, studies and kinds can make every row's contribution cancel but one: with a cohort
whose ages are 87, 88, 89 and one person's 93, the one-term models `phq9 ~ age`,
`phq9 ~ I(age ** 2)` and `phq9 ~ I(age ** 3)` give (a-87)(a-88)(a-89) = 120 at 93 and 0 at
every other age, so a combination of their X'y is 120 times that person's phq9. Each model
alone sets no one apart (its own leverage is low); their columns together span a vector that
is zero on every row but one.

So the node keeps an orthonormal basis Q of the span of every column it has released on a data
version (each column zero outside the rows it was released on: a cohort's indicator, level
indicators, numeric design columns, offsets, prior weights, summarised variables) and every
row's leverage in that span, h_i = |Q_i|². No combination of the released columns can weigh
row i more than h_i of a unit vector concentrated on it. A release whose new columns would lift
some row's leverage above the policy's `max_leverage` is refused: the per-model leverage rule
(node/design.py) is the same rule for one model's columns, this is it for all of them.

Like a privacy budget, the span only grows: a node that has answered many different designs on
few rows refuses more, and a new extract (a new data version) starts anew. Columns already in
the span (the same covariates on the same cohort) cost nothing.

Kept on disk beside the release memory (`span/<data version>/`): one `.npy` block of new basis
columns per release, named by `index.jsonl` after it is written and synced (a torn last line is
ignored; any other unreadable entry stops the node: MemoryDamaged).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
from pathlib import Path

import numpy as np

from .release_memory import Footprint, MemoryDamaged

#: A column whose part outside the span is below this share of its norm is in the span
#: (float64 rounding of a projection over many rows; a real difference, even one row's, is
#: far larger unless the column is tiny there, which the transform whitelist forbids).
IN_SPAN = 1e-9


class ReleasedSpan:
    """The span of the columns released on one data version of n rows."""

    def __init__(self, folder: Path | None, n: int):
        self.folder, self.n = folder, n
        self.blocks: list[np.ndarray] = []  # orthonormal columns, n x k each
        self.leverage = np.zeros(n)
        self.digests: set[str] = set()
        self._offset = 0
        # The new directions of the last audit, by the digests of the columns it was given: the
        # release that passed is remembered with the same columns, so its QR is not done twice.
        self._pending: dict[tuple[str, ...], np.ndarray | None] = {}
        self.reload()

    # -- the audit
    def audit(self, footprints: list[Footprint]) -> float:
        """The largest leverage of a row once these footprints' columns join the span (the
        current largest when they add nothing); NaN when a column is not finite (refuse)."""
        self._pending = {}  # (one task at a time: an earlier, refused task's are dropped)
        digests, V = _columns(footprints, self.n, self.digests)
        if V is None:
            return float(self.leverage.max()) if self.n else 0.0
        if not np.all(np.isfinite(V)):
            return math.nan
        block = self._new_directions(V)
        self._pending[tuple(digests)] = block
        if block is None:
            return float(self.leverage.max())
        return float(np.max(self.leverage + np.einsum("ij,ij->i", block, block)))

    def remember(self, footprints: list[Footprint]) -> None:
        """Join the footprints' columns to the span (after the release passed and was sent)."""
        digests, V = _columns(footprints, self.n, self.digests)
        if not digests:
            return
        key = tuple(digests)
        if key in self._pending:  # audited with these very columns
            block = self._pending.pop(key)
        elif V is not None and np.all(np.isfinite(V)):
            block = self._new_directions(V)
        else:  # (the audit refuses a column that is not finite: it is never remembered)
            raise ValueError("a released column is not finite")
        self._write(digests, block)
        self._add(digests, block)

    def _new_directions(self, V: np.ndarray) -> np.ndarray | None:
        """Orthonormal columns spanning what V adds to the span (None: nothing)."""
        norms = np.linalg.norm(V, axis=0)
        W = V.copy()
        for _ in range(2):  # Gram-Schmidt against the span, twice (re-orthogonalisation)
            for Q in self.blocks:
                W -= Q @ (Q.T @ W)
        import scipy.linalg

        q, r, _ = scipy.linalg.qr(W, mode="economic", pivoting=True)
        residual = np.abs(np.diag(r))
        keep = residual > IN_SPAN * float(norms.max())
        if not keep.any():
            return None
        q = q[:, keep]
        if not self.blocks:  # (LAPACK's q is orthonormal to rounding: nothing to project out)
            return q
        for Q in self.blocks:  # once more against the span, for q's own rounding
            q -= Q @ (Q.T @ q)
        q, _ = np.linalg.qr(q)
        return q

    # -- on disk
    def reload(self) -> None:
        if self.folder is None:
            return
        path = self.folder / "index.jsonl"
        if not path.exists():
            return
        with open(path, "rb") as fh:
            fh.seek(self._offset)
            data = fh.read()
        complete = data.rfind(b"\n") + 1
        for line in data[:complete].splitlines():
            try:
                entry = json.loads(line)
                block = None
                if entry.get("block"):
                    block = np.load(self.folder / entry["block"], allow_pickle=False)
                    if block.shape[0] != self.n:
                        raise ValueError("a block of another size")
                self._add(list(entry["digests"]), block)
            except (ValueError, KeyError, TypeError, OSError):
                raise MemoryDamaged(
                    f"this node's record of released columns ({path}) has an entry it cannot "
                    "read; restore the state folder from its backup before answering more "
                    "tasks"
                ) from None
        self._offset += complete

    def _write(self, digests: list[str], block: np.ndarray | None) -> None:
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        name = None
        if block is not None:
            name = f"block-{secrets.token_hex(8)}.npy"
            tmp = self.folder / (name + ".tmp")
            with open(tmp, "wb") as fh:
                np.save(fh, block, allow_pickle=False)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.folder / name)
        path = self.folder / "index.jsonl"
        with open(path, "a") as fh:
            fh.write(json.dumps({"block": name, "digests": digests}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self._offset = path.stat().st_size

    def _add(self, digests: list[str], block: np.ndarray | None) -> None:
        self.digests.update(digests)
        if block is not None:
            self.blocks.append(block)
            self.leverage += np.einsum("ij,ij->i", block, block)


def _columns(footprints: list[Footprint], n: int, known: set[str]) -> tuple[list[str], np.ndarray | None]:
    """The footprints' columns over all n rows (zero outside their rows), each scaled to unit
    norm without overflow, leaving out those released before (by content); with their digests."""
    digests, columns = [], []
    for fp in footprints:
        rows = np.asarray(fp.rows, dtype=bool)
        if rows.shape != (n,) or not rows.any():
            continue
        candidates = [rows.astype(float)]
        for indicator in fp.indicators:
            mask = np.zeros(n, dtype=bool)
            if isinstance(indicator, tuple):
                mask[np.asarray(indicator[1], dtype=np.int64)] = True
            else:
                mask = np.asarray(indicator, dtype=bool) & rows
            candidates.append(mask.astype(float))
        base = rows if fp.column_rows is None else np.asarray(fp.column_rows, dtype=bool)
        for _, values in fp.columns:
            column = np.zeros(n)
            column[base] = np.asarray(values, dtype=float)
            candidates.append(column)
        for column in candidates:
            with np.errstate(over="ignore", invalid="ignore"):
                top = float(np.max(np.abs(column)))
                if top == 0.0:
                    continue
                if math.isfinite(top):
                    column = column / top
                    column = column / np.linalg.norm(column)
            digest = hashlib.sha256(np.ascontiguousarray(column).tobytes()).hexdigest()[:32]
            if digest in known or digest in digests:
                continue
            digests.append(digest)
            columns.append(column)
    if not columns:
        return digests, None
    return digests, np.column_stack(columns)


class SpanMemory:
    """A node's spans, one per data version (in memory when `folder` is None)."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self._versions: dict[str, ReleasedSpan] = {}

    def for_version(self, version: str, n: int) -> ReleasedSpan:
        key = f"{version}:{n}"
        span = self._versions.get(key)
        if span is None:
            folder = None if self.folder is None else self.folder / "span" / version[:32]
            span = ReleasedSpan(folder, n)
            self._versions[key] = span
        else:
            span.reload()
        return span

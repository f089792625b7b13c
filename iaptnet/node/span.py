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

A release on a cohort adds directions that are zero outside the cohort's rows, so each block
of basis columns is kept on its rows only and a new release is projected against the blocks
that share a row with it: a node's first models on a fifth of its rows cost a fifth of the
work.

A release of many columns beside a few directions on more rows goes the other way round: the
few are projected on the many and replaced by what they hold beyond them (the same span in
another basis; `ReleasedSpan._replace_touching`).

Kept on disk beside the release memory (`span/<data version>/`): `.npz` blocks of basis
columns (their rows and their values there), each named by a line of `index.jsonl` after it
is written and synced: `{"block", "digests"}` for a release that adds one block, `{"columns",
"blocks", "drops"}` for one that replaces blocks (a line iaptnet 0.2 cannot read: an older
release stops rather than keep both bases). A torn last line is ignored; any other unreadable
entry stops the node: MemoryDamaged.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import zipfile
from pathlib import Path

import numpy as np

from ..protocol.formula_check import load_array, load_arrays
from .release_memory import Footprint, MemoryDamaged

#: A column whose part outside the span is below this share of its norm is in the span
#: (float64 rounding of a projection over many rows; a real difference, even one row's, is
#: far larger unless the column is tiny there, which the transform whitelist forbids).
IN_SPAN = 1e-9

#: Columns whose part outside the others' span is above this share of their norm are told
#: apart on their Gram matrix (whose rounding, about 1e-16, is far below its square); the
#: others are resolved to IN_SPAN by a pivoted QR of their own remainder.
CLEAR = 1e-5

#: Touching blocks are stacked into one basis for a projection when it has at most this many
#: entries (800 MB of float64); beyond, they are projected one after another.
STACKED_BASIS_LIMIT = 100_000_000


class Block:
    """Orthonormal basis columns of the span that are zero outside `rows` (sorted row numbers):
    a cohort's release adds directions on its own rows only, so they are kept, projected and
    solved on those rows, not on all n. `name` is its file once written."""

    __slots__ = ("rows", "basis", "name")

    def __init__(self, rows: np.ndarray, basis: np.ndarray, name: str | None = None):
        self.rows, self.basis, self.name = rows, basis, name


class Change:
    """What a release does to the span's blocks: blocks added, and blocks they replace (the
    same span in another basis; see ReleasedSpan._replace_touching)."""

    __slots__ = ("added", "dropped")

    def __init__(self, added: list[Block], dropped: list[Block] | None = None):
        self.added, self.dropped = added, dropped or []


class ReleasedSpan:
    """The span of the columns released on one data version of n rows."""

    def __init__(self, folder: Path | None, n: int):
        self.folder, self.n = folder, n
        self.blocks: list[Block] = []  # together, an orthonormal basis of the span
        self.leverage = np.zeros(n)
        self.digests: set[str] = set()
        self._named: dict[str, Block] = {}  # the blocks read or written, by file name
        self._offset = 0
        # The new directions of the last audit, by the digests of the columns it was given: the
        # release that passed is remembered with the same columns, so its QR is not done twice.
        self._pending: dict[tuple[str, ...], Change | None] = {}
        self.reload()

    def basis(self) -> np.ndarray:
        """The span's orthonormal basis over all n rows (n x dimension; for checks)."""
        out = np.zeros((self.n, sum(b.basis.shape[1] for b in self.blocks)))
        j = 0
        for b in self.blocks:
            out[b.rows, j : j + b.basis.shape[1]] = b.basis
            j += b.basis.shape[1]
        return out

    # -- the audit
    def audit(self, footprints: list[Footprint]) -> float:
        """The largest leverage of a row once these footprints' columns join the span (the
        current largest when they add nothing); NaN when a column is not finite (refuse)."""
        lifted = self.lifted(footprints)
        if lifted is None:
            return float(self.leverage.max()) if self.n else 0.0
        leverage = lifted[1]
        if not np.all(np.isfinite(leverage)):
            return math.nan
        return float(max(self.leverage.max(), leverage.max()))

    def lifted(self, footprints: list[Footprint]) -> tuple[np.ndarray, np.ndarray] | None:
        """(rows, their leverages) for the rows whose leverage changes once these footprints'
        columns join the span; None when they add nothing; leverages NaN when a column is not
        finite (refuse). A table asks this to withhold the cells that would lift a row too far
        (node/cell_audit.py); the same columns audited again (the dispatcher's check of the
        release) reuse the work."""
        digests, new = _new_columns(footprints, self.n, self.digests)
        if new is None:
            return None
        key = tuple(digests)
        if key not in self._pending:
            self._pending = {}  # (one task at a time: an earlier, refused task's are dropped)
            rows, V = new
            if not np.all(np.isfinite(V)):
                return rows, np.full(rows.size, math.nan)
            self._pending[key] = self._new_directions(rows, V)
        change = self._pending[key]
        return None if change is None else self._lifted(change)

    def _lifted(self, change: Change) -> tuple[np.ndarray, np.ndarray]:
        """(the rows the change touches, their leverages after it)."""
        rows = _union([b.rows for b in change.added + change.dropped], self.n)
        lifted = self.leverage[rows]  # (a copy: fancy indexing)
        for sign, blocks in ((-1.0, change.dropped), (1.0, change.added)):
            for b in blocks:
                lifted[np.searchsorted(rows, b.rows)] += sign * _row_norms(b.basis)
        return rows, lifted

    def remember(self, footprints: list[Footprint]) -> None:
        """Join the footprints' columns to the span (after the release passed and was sent)."""
        digests = [d for d in _digests(footprints, self.n) if d not in self.digests]
        digests = list(dict.fromkeys(digests))
        if not digests:
            return
        key = tuple(digests)
        if key in self._pending:  # audited with these very columns
            change = self._pending.pop(key)
        else:
            _, new = _new_columns(footprints, self.n, self.digests)
            if new is None or not np.all(np.isfinite(new[1])):
                # (the audit refuses a column that is not finite: it is never remembered)
                raise ValueError("a released column is not finite")
            change = self._new_directions(*new)
        self._write(digests, change)
        self._apply(digests, change)

    def _new_directions(self, rows: np.ndarray, V: np.ndarray) -> Change | None:
        """The blocks that make the span take in V (given on `rows`, zero elsewhere; None:
        it adds nothing). Only the span's blocks that share a row with V can take part of it
        (the blocks are orthogonal to each other), so the work is on those rows alone, in
        whichever direction costs less: V projected on those blocks (few new columns beside a
        large span), or those blocks projected on V (a large release beside a small span on
        more rows: the catalogue's first batch of models, 244 columns on a cohort beside 26
        directions on every row, costs a fifth as much this way)."""
        norms = np.linalg.norm(V, axis=0)
        touching = [b for b in self.blocks if _shares_a_row(b.rows, rows)]
        support = rows
        if touching:
            support = _union([rows, *[b.rows for b in touching]], self.n)
            m, d = V.shape[1], sum(b.basis.shape[1] for b in touching)
            project_v = support.size * m * (d + m)
            project_blocks = rows.size * m * (m + d) + support.size * d * d
            if project_blocks < project_v:
                return self._replace_touching(rows, V, touching, support, norms)
        W = np.zeros((support.size, V.shape[1]))
        W[np.searchsorted(support, rows)] = V
        if touching and support.size * sum(b.basis.shape[1] for b in touching) <= STACKED_BASIS_LIMIT:
            # The touching blocks are orthogonal to each other, so side by side they are one
            # orthonormal basis T, and M - T T'M is the same projection as block after block:
            # two matrix products per pass instead of a gather, two products and a scatter per
            # block.
            T = _stacked(touching, support)

            def project_out(M: np.ndarray) -> None:
                M -= T @ (T.T @ M)

        else:
            places = [np.searchsorted(support, b.rows) for b in touching]

            def project_out(M: np.ndarray) -> None:
                for b, at in zip(touching, places, strict=True):
                    if at.size == M.shape[0]:  # the block is on every row here: no gather
                        M -= b.basis @ (b.basis.T @ M)
                    else:
                        M[at] -= b.basis @ (b.basis.T @ M[at])

        q = _orthonormal_beyond(W, norms, project_out if touching else None)
        return None if q is None else Change([Block(support, q)])

    def _replace_touching(
        self, rows: np.ndarray, V: np.ndarray, touching: list[Block], support: np.ndarray, norms: np.ndarray
    ) -> Change | None:
        """The span with V taken in, as V's own orthonormal basis on its rows and, replacing
        the touching blocks, what they hold beyond it (on their rows and V's). Blocks that do
        not touch V's rows are orthogonal to both (to the touching blocks by the invariant, to
        V's basis by having no row in common), so the blocks stay orthogonal to each other."""
        q_v = _orthonormal_beyond(V, norms)
        if q_v is None:
            return None
        T = _stacked(touching, support)
        at = np.searchsorted(support, rows)

        def project_out(M: np.ndarray) -> None:
            M[at] -= q_v @ (q_v.T @ M[at])

        q_t = _orthonormal_beyond(T, np.ones(T.shape[1]), project_out)  # (unit columns)
        added = [Block(rows, q_v)] + ([] if q_t is None else [Block(support, q_t)])
        return Change(added, touching)

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
                if "columns" in entry:  # a change that replaces blocks
                    added = [self._read_block(name) for name in entry["blocks"]]
                    dropped = [self._named[name] for name in entry["drops"]]
                    change = Change(added, dropped)
                    digests = entry["columns"]
                else:
                    block = self._read_block(entry.get("block"))
                    change = None if block is None else Change([block])
                    digests = entry["digests"]
                self._apply(list(digests), change)
            except (ValueError, KeyError, TypeError, OSError, EOFError, zipfile.BadZipFile):
                raise MemoryDamaged(
                    f"this node's record of released columns ({path}) has an entry it cannot "
                    "read; restore the state folder from its backup before answering more "
                    "tasks"
                ) from None
        self._offset += complete

    def _read_block(self, name: str | None) -> Block | None:
        """A block file: `.npz` of its rows and basis; or, as iaptnet 0.2 wrote it, an `.npy`
        basis over all n rows."""
        if not name:
            return None
        if name.endswith(".npz"):
            stored = load_arrays(self.folder / name)
            rows, basis = stored["rows"].astype(np.int64), stored["basis"]
            if name in self._named or (
                rows.ndim != 1
                or basis.ndim != 2
                or basis.shape[0] != rows.size
                or rows.size
                and (rows.min() < 0 or rows.max() >= self.n or np.any(np.diff(rows) <= 0))
            ):
                raise ValueError("a block of another shape (or read twice)")
            return Block(rows, basis, name)
        basis = load_array(self.folder / name)
        if basis.ndim != 2 or basis.shape[0] != self.n:
            raise ValueError("a block of another size")
        rows = np.flatnonzero(np.any(basis != 0.0, axis=1))
        return Block(rows, basis[rows], name)

    def _write(self, digests: list[str], change: Change | None) -> None:
        """The change's new blocks, each written and synced, then one index line naming them
        (and, for a change that replaces blocks, those blocks: a line iaptnet 0.2 cannot read,
        so it stops rather than keep both bases)."""
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        for block in [] if change is None else change.added:
            block.name = f"block-{secrets.token_hex(8)}.npz"
            tmp = self.folder / (block.name + ".tmp")
            with open(tmp, "wb") as fh:
                np.savez(fh, rows=block.rows, basis=block.basis)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.folder / block.name)
        if change is not None and change.dropped:
            entry = {
                "columns": digests,
                "blocks": [b.name for b in change.added],
                "drops": [b.name for b in change.dropped],
            }
        else:
            entry = {"block": None if change is None else change.added[0].name, "digests": digests}
        path = self.folder / "index.jsonl"
        with open(path, "a") as fh:
            fh.write(json.dumps(entry) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self._offset = path.stat().st_size

    def _apply(self, digests: list[str], change: Change | None) -> None:
        self.digests.update(digests)
        if change is None:
            return
        # Directions an audit found against the span as it was are stale now: the release they
        # were for is worked out again when it is remembered.
        self._pending = {}
        for block in change.dropped:
            self.blocks = [b for b in self.blocks if b is not block]
            self._named.pop(block.name, None)
            self.leverage[block.rows] -= _row_norms(block.basis)
        for block in change.added:
            self.blocks.append(block)
            if block.name is not None:
                self._named[block.name] = block
            self.leverage[block.rows] += _row_norms(block.basis)


def _stacked(blocks: list[Block], support: np.ndarray) -> np.ndarray:
    """The blocks side by side on the support rows (each zero off its own rows)."""
    T = np.zeros((support.size, sum(b.basis.shape[1] for b in blocks)))
    j = 0
    for b in blocks:
        T[np.searchsorted(support, b.rows), j : j + b.basis.shape[1]] = b.basis
        j += b.basis.shape[1]
    return T


def _row_norms(basis: np.ndarray) -> np.ndarray:
    """Each row's squared norm: its leverage in the block's directions."""
    return np.einsum("ij,ij->i", basis, basis)


def _orthonormal_beyond(W: np.ndarray, norms: np.ndarray, project_out=None) -> np.ndarray | None:
    """Orthonormal columns spanning what W's columns (of these norms) hold beyond the span that
    `project_out` removes in place (None: no span), W overwritten; None when nothing.

    Gram-Schmidt against the span, twice where needed (Kahan, Parlett): a column that kept half
    its norm is orthogonal to the span to rounding after one pass; the columns that lost more
    are projected again, and only they (each pass reads every block of the span). Directions
    made from small parts of columns (`_orthonormal`'s `clean` false) are projected once more,
    for their own rounding."""
    if project_out is not None:
        project_out(W)
        again = np.linalg.norm(W, axis=0) < 0.5 * norms
        if again.any():
            part = W[:, again]
            project_out(part)
            W[:, again] = part
    q, clean = _orthonormal(W, float(norms.max()))
    if q is not None and project_out is not None and not clean:
        project_out(q)
        q = _cholesky_qr(q)
    return q


def _orthonormal(W: np.ndarray, scale: float) -> tuple[np.ndarray | None, bool]:
    """Orthonormal columns spanning what W's columns hold beyond IN_SPAN * scale (None: nothing),
    and whether each was at least half of a column (then W's rounding outside its span stays
    rounding in them; a direction made from a small part of a column magnifies it).

    Most columns are told apart on the Gram matrix W'W, by a pivoted Cholesky factorisation,
    and orthonormalised by Cholesky QR done twice: matrix products, several times faster on a
    node's rows than a pivoted QR of W, which the catalogue's first batch of models (some 240
    new columns on 30,000 rows) spent most of its audit in. The Gram matrix resolves only parts
    above CLEAR of a column's size (its rounding is the square of W's); the columns it cannot
    tell from the others, and only those, get the pivoted QR of what they hold beyond them,
    which resolves IN_SPAN."""
    import scipy.linalg

    tol = (CLEAR * scale) ** 2
    U, piv, rank, info = scipy.linalg.lapack.dpstrf(W.T @ W, lower=0, tol=tol)
    if info < 0:
        raise ValueError("the span's Gram matrix could not be factorised")
    piv = piv - 1  # (LAPACK counts from 1)
    parts = []
    rest = W
    clean = True
    if rank:
        R = np.triu(U[:rank, :rank])
        clean = float(np.min(np.abs(np.diag(R)))) >= 0.5 * scale
        Q = _solve_right(W[:, piv[:rank]], R)
        Q = _cholesky_qr(Q)
        parts.append(Q)
        rest = W[:, piv[rank:]]
        for _ in range(2):  # what is left, beyond the columns kept, twice
            rest = rest - Q @ (Q.T @ rest)
    if rest.shape[1]:
        q, r, _ = scipy.linalg.qr(rest, mode="economic", pivoting=True)
        keep = np.abs(np.diag(r)) > IN_SPAN * scale
        if keep.any():
            parts.append(q[:, keep])
            clean = False
    if not parts:
        return None, True
    return (parts[0] if len(parts) == 1 else np.hstack(parts)), clean


def _solve_right(A: np.ndarray, R: np.ndarray) -> np.ndarray:
    """A R^-1 for an upper triangular R (A, rows x k, is overwritten when it is C-ordered: as
    R^-T A' on its Fortran-ordered transpose, BLAS's triangular solve needs no copy)."""
    from scipy.linalg.blas import dtrsm

    At = A.T if A.flags.c_contiguous else np.asfortranarray(A.T)
    return dtrsm(1.0, np.asfortranarray(R), At, side=0, lower=0, trans_a=1, overwrite_b=1).T


def _cholesky_qr(Q: np.ndarray) -> np.ndarray:
    """Q's columns made orthonormal (they are independent and nearly so already): Q R^-1 with
    R the Cholesky factor of Q'Q; a pivoted QR's would be the same span, at several times the
    cost."""
    import scipy.linalg

    try:
        R = scipy.linalg.cholesky(Q.T @ Q, lower=False)
    except np.linalg.LinAlgError:  # (not expected: the columns were chosen independent)
        return np.linalg.qr(Q)[0]
    return _solve_right(Q, R)


def _shares_a_row(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two sorted row-number arrays have a row in common."""
    if a.size == 0 or b.size == 0 or a[-1] < b[0] or b[-1] < a[0]:
        return False
    if a.size > b.size:
        a, b = b, a
    at = np.searchsorted(b, a)
    at[at == b.size] = b.size - 1
    return bool(np.any(b[at] == a))


def _unit(column: np.ndarray) -> np.ndarray:
    """The column scaled to unit norm without overflow (as it is, all zero or not finite)."""
    with np.errstate(over="ignore", invalid="ignore"):
        top = float(np.max(np.abs(column))) if column.size else 0.0
        if top == 0.0 or not math.isfinite(top):
            return column
        column = column / top
        return column / np.linalg.norm(column)


def _candidates(fp: Footprint, n: int):
    """The footprint's columns as (row numbers, values there, each scaled to unit norm)."""
    rows = np.asarray(fp.rows, dtype=bool)
    if rows.shape != (n,) or not rows.any():
        return
    on = np.flatnonzero(rows)
    yield on, np.ones(on.size)
    for indicator in fp.indicators:
        if isinstance(indicator, tuple):
            at = np.asarray(indicator[1], dtype=np.int64)
            if at.size > 1 and not np.all(at[1:] > at[:-1]):  # (row numbers are mostly given sorted)
                at = np.unique(at)
        else:
            at = np.flatnonzero(np.asarray(indicator, dtype=bool) & rows)
        yield at, np.ones(at.size)
    base = on if fp.column_rows is None else np.flatnonzero(np.asarray(fp.column_rows, dtype=bool))
    for _, values in fp.columns:
        yield base, np.asarray(values, dtype=float)
    for cell in fp.cells if fp.span_cells is None else fp.span_cells:  # count cells: judged as if exact
        yield np.asarray(cell, dtype=np.int64), np.ones(len(cell))


def _digest(at: np.ndarray, values: np.ndarray, n: int) -> str:
    """A column's digest: of its n values, zero off its rows (the digest iaptnet 0.2 kept,
    so a state folder's remembered columns still match)."""
    column = np.zeros(n)
    column[at] = values
    return hashlib.sha256(memoryview(column)).hexdigest()[:32]


def _described(fp: Footprint, n: int) -> list[tuple[str | None, np.ndarray, np.ndarray]]:
    """(digest, rows, unit values) of each of the footprint's columns; a column that is all
    zero has no digest. The digests are kept with the footprint: a model's footprint is the
    same object in every round of a run, so only its first round hashes its columns."""
    cached = fp._planned.get(("span", n))
    if cached is not None:
        return cached
    out = []
    for at, values in _candidates(fp, n):
        unit = _unit(values)
        digest = None if not np.any(unit != 0.0) else _digest(at, unit, n)
        out.append((digest, at, unit))
    fp._planned[("span", n)] = [(digest, None, None) for digest, _, _ in out]
    return out


def _digests(footprints: list[Footprint], n: int) -> list[str]:
    return [d for fp in footprints for d, _, _ in _described(fp, n) if d is not None]


def _new_columns(
    footprints: list[Footprint], n: int, known: set[str]
) -> tuple[list[str], tuple[np.ndarray, np.ndarray] | None]:
    """The digests of the footprints' columns not released before (by content), and those
    columns as (sorted rows where any is non-zero, their values there: rows x columns)."""
    digests: list[str] = []
    fresh: list[tuple[np.ndarray, np.ndarray]] = []
    for fp in footprints:
        described = _described(fp, n)
        if all(d is None or d in known or d in digests for d, _, _ in described):
            continue
        if described and described[0][1] is None:  # only the digests were kept: build again
            fp._planned.pop(("span", n), None)
            described = _described(fp, n)
        for digest, at, unit in described:
            if digest is None or digest in known or digest in digests:
                continue
            digests.append(digest)
            fresh.append((at, unit))
    if not fresh:
        return digests, None
    rows = _union([at for at, _ in fresh], n)
    V = np.zeros((rows.size, len(fresh)))
    places: dict[int, np.ndarray] = {}  # the columns of a footprint share one array of rows
    for j, (at, unit) in enumerate(fresh):
        if id(at) not in places:
            places[id(at)] = np.searchsorted(rows, at)
        V[places[id(at)], j] = unit
    return digests, (rows, V)


def _union(row_sets: list[np.ndarray], n: int) -> np.ndarray:
    """The sorted rows in any of the sets (without sorting their concatenation)."""
    if len({id(rows) for rows in row_sets}) == 1:
        return row_sets[0]
    mask = np.zeros(n, dtype=bool)
    for rows in row_sets:
        mask[rows] = True
    return np.flatnonzero(mask)


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

"""The node's memory of what it has released, per version of its data, kept on disk.

Every release is remembered by what it rests on (`Footprint`): its row set, the 0/1 columns
released over it (level indicators, thresholds) and its numeric columns (design columns,
offsets, summarised variables), so that a later release can be judged against all of them
(node/differencing.py). The memory lives in the node's state folder,
`<state>/releases/<data version>/`, and survives restarts: a study run today is checked
against everything the node released on the same data, whoever asked and whenever. A new
extract (a new data version) starts a new memory; the old one is kept.

Layout: `bundles/<random>.npz`, one per release: its new row sets (packed bitmaps) and numeric
columns (values on their base rows); `index.jsonl`, one line per bundle naming its sets (kind
"base" for row sets that join the combination audit, "pair" for sets only compared in pairs)
and columns (with their base set); `salt`, the node's secret for set keys. A bundle is written
and synced before the index line that names it, so a crash leaves at worst an unreferenced
file; a torn last index line (no newline yet) is ignored; any other unreadable line stops the
node answering (fail closed: see MemoryDamaged).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..protocol.errors import IaptnetError
from ..protocol.formula_check import load_array, load_arrays
from . import differencing as dif


class MemoryDamaged(IaptnetError):
    """The release memory on disk cannot be read back: the node answers nothing until its
    operator restores it."""


#: Numeric columns are screened on this many sampled rows before an exact comparison.
SCREEN_ROWS = 256


@dataclass
class Footprint:
    """What one release rests on (kept at the node, never sent).

    `rows`: bool mask over the dataset's rows. `combine`: the row set joins the combination
    audit (cohorts, model rows, groups, cells with exact statistics); otherwise it is only
    compared in pairs (quantile thresholds). `indicators`: 0/1 columns released over the rows
    (bool masks over the dataset, inside `rows`), each also standing for its complement within
    `rows`. `columns`: numeric columns as (name, values on the rows of `rows` in dataset
    order, or of `column_rows` when given: a table's summaries of several variables share the
    rows of their column, with 0 where a variable is not recorded, the same vectors); the name (a design column's, a variable's) only speeds up comparing a column with
    the same column released on other rows."""

    label: str
    rows: np.ndarray
    combine: bool = True
    indicators: list[np.ndarray] = field(default_factory=list)
    columns: list[tuple[str, np.ndarray]] = field(default_factory=list)
    column_rows: np.ndarray | None = None  # the rows `columns` are given on, when not `rows`
    # Count cells shown over the rows (dataset row numbers each): like indicators, each with the
    # rest of the rows, but not compared with each other or with `rows` (their own kind's
    # suppression governs the cells of one table; see node/cell_audit.py).
    cells: list[np.ndarray] = field(default_factory=list)
    # The cells that join the span of released columns (node/span.py), when not all of them:
    # a cell that is the sum of others shown adds nothing to it (node/cell_audit.py).
    span_cells: list[np.ndarray] | None = None
    # (n, t) -> its _Plan; ("span", n) -> the digests of its columns (node/span.py)
    _planned: dict = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class Finding:
    label: str
    what: str  # "combination" | "rows" | "column" | "unproved"
    rows: int | None = None


def _digest(packed: np.ndarray, n: int) -> str:
    return hashlib.sha256(packed.tobytes() + str(n).encode()).hexdigest()[:32]


def _column_digest(base: str, values: np.ndarray) -> str:
    return hashlib.sha256(base.encode() + np.ascontiguousarray(values, dtype=np.float64).tobytes()).hexdigest()[:32]


class VersionMemory:
    """Everything released on one data version of n rows."""

    def __init__(self, folder: Path | None, n: int):
        self.folder, self.n = folder, n
        self.salt = self._salt()
        self.base: dict[str, np.ndarray] = {}  # digest -> packed rows (combination audit)
        self.pairs: dict[str, np.ndarray] = {}  # digest -> packed rows (compared in pairs)
        self.columns: dict[str, tuple[str, str, np.ndarray]] = {}  # digest -> (base digest, name, values)
        self._positions: dict[str, np.ndarray] = {}  # base digest -> dataset rows of the base
        universe = dif.pack(np.ones(n, dtype=bool))
        self.universe = _digest(universe, n)
        self.signatures = dif.Signatures(n)
        self._index = _PairIndex((n + 7) // 8)
        self._add_base(self.universe, universe)
        self._add_pair(self.universe, universe)
        self._offset = 0
        self._legacy_read = False
        self._last_plan = None
        self._sig_cache = None
        self._rank_cache: dict[str, np.ndarray] = {}
        self._pair_cache: dict = {}
        self.reload()

    # -- persistence
    def _salt(self) -> bytes:
        if self.folder is None:
            return secrets.token_bytes(32)
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / "salt"
        try:
            return bytes.fromhex(path.read_text().strip())
        except (FileNotFoundError, ValueError):
            salt = secrets.token_bytes(32)
            _write_new(path, salt.hex() + "\n")
            return bytes.fromhex(path.read_text().strip())

    def reload(self) -> None:
        """Read index lines written since the last read (by this or another process)."""
        if self.folder is None:
            return
        path = self.folder / "index.jsonl"
        if path.exists():
            with open(path, "rb") as fh:
                fh.seek(self._offset)
                data = fh.read()
            complete = data.rfind(b"\n") + 1
            for line in data[:complete].splitlines():
                try:
                    self._read_bundle(json.loads(line))
                except (ValueError, KeyError, TypeError, OSError, EOFError, zipfile.BadZipFile):
                    # Fail closed: a release the node cannot read back is one it could not
                    # audit a later release against.
                    raise MemoryDamaged(
                        f"this node's release memory ({path}) has an entry it cannot read; "
                        "restore the state folder from its backup before answering more tasks"
                    ) from None
            self._offset += complete
        legacy = self.folder.parent.parent / "rowsets" / self.folder.name
        if legacy.is_dir() and not self._legacy_read:
            self._legacy_read = True
            for path in legacy.glob("*.npy"):
                packed = load_array(path)
                if packed.size == (self.n + 7) // 8:
                    digest = _digest(packed, self.n)
                    self._add_base(digest, packed)
                    self._add_pair(digest, packed)

    def _read_bundle(self, entry: dict) -> None:
        bundle = load_arrays(self.folder / "bundles" / entry["bundle"])
        for digest, kind in entry["sets"]:
            if f"q_{digest}" in bundle:  # a small set, kept as its rows
                packed = dif.pack(_mask(bundle[f"q_{digest}"], self.n))
            else:
                packed = bundle[f"s_{digest}"]
            if kind == "base":
                self._add_base(digest, packed)
            self._add_pair(digest, packed)
        for digest, base, name in entry["columns"]:
            self.columns[digest] = (base, name, bundle[f"c_{digest}"])

    def _write_bundle(
        self, sets: list[tuple[str, str, np.ndarray]], columns: list[tuple[str, str, str, np.ndarray]]
    ) -> None:
        """One file per release (its new sets and columns), synced, then one index line."""
        if self.folder is None or not (sets or columns):
            return
        folder = self.folder / "bundles"
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{secrets.token_hex(16)}.npz"
        tmp = folder / f".{name}.tmp"
        with open(tmp, "wb") as fh:
            arrays = {}
            for d, _, p in sets:
                if dif.popcount(p) * 32 < self.n:  # small: its row numbers take less room
                    arrays[f"q_{d}"] = np.flatnonzero(dif.unpack(p, self.n)).astype(np.uint32)
                else:
                    arrays[f"s_{d}"] = p
            np.savez(fh, **arrays, **{f"c_{d}": v for d, _, _, v in columns})
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, folder / name)
        entry = {
            "bundle": name,
            "sets": [[d, k] for d, k, _ in sets],
            "columns": [[d, b, nm] for d, b, nm, _ in columns],
        }
        path = self.folder / "index.jsonl"
        with open(path, "a") as fh:
            fh.write(json.dumps(entry, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self._offset = path.stat().st_size

    # -- in memory
    def _add_base(self, digest: str, packed: np.ndarray) -> None:
        if digest not in self.base:
            self.base[digest] = packed
            self.signatures.add(packed, dif.set_key(packed, self.n, self.salt))

    def _add_pair(self, digest: str, packed: np.ndarray) -> None:
        if digest not in self.pairs:
            self.pairs[digest] = packed
            pop = dif.popcount(packed)
            self._index.add(packed, pop, digest)

    def positions(self, base: str) -> np.ndarray:
        if base not in self._positions:
            packed = self.pairs.get(base)
            if packed is None:
                packed = self.base[base]
            self._positions[base] = np.flatnonzero(dif.unpack(packed, self.n))
        return self._positions[base]

    # -- the audit
    def audit(
        self, footprints: list[Footprint], t: int, rng: np.random.Generator | None = None, vetted: list[Footprint] = ()
    ) -> list[Finding]:
        """Findings (empty when the release is safe) for releasing these footprints now.
        `vetted`: footprints of the same release already audited together (a table's cells
        accepted one by one): they count as released, and are not checked again."""
        if t <= 1:
            return []
        rng = rng or np.random.default_rng(secrets.randbits(64))
        plan = self._plan(footprints, t)
        before = _Plan.of(list(vetted), self.n, t)
        findings: list[Finding] = []
        findings += self._pairs_findings(plan, t, before)
        if findings:
            return findings
        findings += self._combination_findings(plan, t, before)
        if findings:
            return findings
        findings += self._column_findings(plan, t, rng, before)
        return findings

    def _near_remembered(self, packed: np.ndarray, pop: int, t: int) -> str | None:
        """The digest of a remembered set differing from `packed` by 1..t-1 rows, if any."""
        return self._index.near(packed, pop, t)

    def _pairs_findings(self, plan: _Plan, t: int, before: _Plan) -> list[Finding]:
        out = []
        families = {**before.families, **plan.families}
        seen_new: dict[int, list[tuple[np.ndarray, str]]] = {}  # popcount -> new sets
        for _, digest, packed, _ in before.pair_sets:
            seen_new.setdefault(_popcount(digest, packed), []).append((packed, digest))
        checked = set()
        for label, digest, packed, _ in plan.pair_sets:
            if digest in self.pairs or digest in checked:
                continue
            checked.add(digest)
            pop = _popcount(digest, packed)
            near = self._near_remembered(packed, pop, t)
            if near is not None:
                out.append(Finding(label, "complement" if near == self.universe else "rows"))
                continue
            family = families.get(digest)
            others = [
                p
                for q in range(pop - t + 1, pop + t)
                for p, d in seen_new.get(q, ())
                if d != digest and (family is None or families.get(d) != family)
            ]
            if dif.sets_differ_by_few(packed, others, t) is not None:
                out.append(Finding(label, "rows"))
                continue
            seen_new.setdefault(pop, []).append((packed, digest))
        return out

    def set_differs_by_few(self, rows: np.ndarray, fresh: list[np.ndarray], t: int) -> bool:
        """The pairwise check alone, for one row set against everything remembered and the
        packed sets `fresh` (a fast path for a table's many quantile thresholds)."""
        packed = dif.pack(rows)
        if self._near_remembered(packed, dif.popcount(packed), t) is not None:
            return True
        return dif.sets_differ_by_few(packed, fresh, t) is not None

    def _combination_findings(self, plan: _Plan, t: int, before: _Plan) -> list[Finding]:
        fresh = [(label, d, p) for label, d, p in plan.base_sets if d not in self.base]
        if not fresh:
            return []
        fresh = [(label, d, p) for label, d, p in before.base_sets if d not in self.base] + fresh
        if not fresh:
            return []
        order, sets = [], list(self.base.values())
        for _, digest, packed in fresh:
            if digest not in order:
                order.append(digest)
                sets.append(packed)
        signatures = self._signatures_with(order, {d: p for _, d, p in fresh})
        found = dif.find_isolating_combination(sets, signatures, t)
        if found is None:
            return []
        return [Finding(fresh[-1][0], "combination" if found.rows is not None else "unproved", found.rows)]

    def _signatures_with(self, order: list[str], packed: dict[str, np.ndarray]) -> dif.Signatures:
        """The remembered sets' signatures plus these sets, reusing the longest prefix of them
        computed before (a table's cells are audited one more at a time)."""
        if self._sig_cache is not None and self._sig_cache[2] == len(self.base):
            known, cached = self._sig_cache[0], self._sig_cache[1]
            if order[: len(known)] == known:
                signatures = cached.copy()
                start = len(known)
            else:
                signatures, start = self.signatures.copy(), 0
        else:
            signatures, start = self.signatures.copy(), 0
        for digest in order[start:]:
            signatures.add(packed[digest], dif.set_key(packed[digest], self.n, self.salt))
        self._sig_cache = (list(order), signatures, len(self.base))
        return signatures

    def _column_findings(self, plan: _Plan, t: int, rng: np.random.Generator, before: _Plan) -> list[Finding]:
        """Each new numeric column against every column released before and every other new
        one (of another footprint), grouped by the rows they were released on."""
        groups: dict[str, list[tuple[str, str, np.ndarray]]] = {}  # base -> [(digest, name, values)]
        for digest, (base, name, values) in self.columns.items():
            groups.setdefault(base, []).append((digest, name, values))
        owners: dict[str, str] = {}  # new column digest -> label
        for label, base, positions, name, values, digest in before.columns:
            if digest not in self.columns and digest not in owners:
                owners[digest] = label
                groups.setdefault(base, []).append((digest, name, values))
                self._positions.setdefault(base, positions)
        fresh = []
        for label, base, positions, name, values, digest in plan.columns:
            if digest in self.columns or digest in owners:
                continue  # released before, or twice in this release: nothing new
            owners[digest] = label
            fresh.append((label, base, positions, name, values, digest))
        stacked: dict[tuple, np.ndarray] = {}
        cache: dict = {}  # work shared by the new columns of one base against one group
        for label, base, positions, name, values, digest in fresh:
            in_u = np.zeros(self.n, dtype=bool)
            in_u[positions] = True
            u_full = np.zeros(self.n)
            u_full[positions] = values
            for b, cols in groups.items():
                refs = [c for c in cols if owners.get(c[0]) != label]
                if not refs:
                    continue
                rank = self._ranks(b, plan.positions)
                general = []
                for ref in refs:
                    mismatch = (
                        self._same_column(positions, values, in_u, b, rank, ref[2], plan.positions)
                        if ref[1] == name
                        else None
                    )
                    if mismatch is None:
                        general.append(ref)
                    elif 0 < mismatch < t:
                        return [Finding(label, "column")]
                if general:
                    key = (b, tuple(c[0] for c in general))
                    if key not in stacked:
                        stacked[key] = np.column_stack([c[2] for c in general])
                    f_positions = plan.positions.get(b)
                    if f_positions is None:
                        f_positions = self.positions(b)
                    if self._near_affine(
                        positions, u_full, in_u, f_positions, rank, stacked[key], t, rng, cache, ((base,), key), digest
                    ):
                        return [Finding(label, "column")]
            groups.setdefault(base, []).append((digest, name, values))
            self._positions.setdefault(base, positions)
        return []

    def _same_column(self, positions, u, in_u, base, rank, f, fresh_positions) -> int | None:
        """The same column (by name) released on other rows: where both were released its
        values agree, and their difference is the column on the rows in one set and not the
        other (with any other fit most of the shared rows would differ). The number of those
        rows where the column is not 0; None when the values differ on the shared rows (e.g.
        a centred column with another mean): then it is compared like any other column."""
        r = rank[positions]
        shared = r >= 0
        if int(shared.sum()) < 64 or not np.array_equal(u[shared], f[r[shared]]):
            return None
        f_positions = fresh_positions.get(base)
        if f_positions is None:
            f_positions = self.positions(base)
        only_f = ~in_u[f_positions]
        return int(np.count_nonzero(u[~shared])) + int(np.count_nonzero(f[only_f]))

    def _ranks(self, base: str, fresh_positions: dict[str, np.ndarray]) -> np.ndarray:
        """Each dataset row's position among the base's rows (-1 outside), cached."""
        key = ("rank", base)
        if key not in self._positions:
            positions = fresh_positions.get(base)
            if positions is None:
                positions = self.positions(base)
            rank = np.full(self.n, -1, dtype=np.int64)
            rank[positions] = np.arange(positions.size)
            self._positions[key] = rank
        return self._positions[key]

    def _ranked(self, digest: str, values: np.ndarray) -> np.ndarray:
        """A column's standardised ranks on its base rows, kept (a bounded cache)."""
        out = self._rank_cache.get(digest)
        if out is None:
            out = dif.standard_ranks(values[:, None])[:, 0]
            if len(self._rank_cache) > 2048:
                self._rank_cache.clear()
            self._rank_cache[digest] = out
        return out

    def _near_affine(
        self,
        positions: np.ndarray,
        u_full: np.ndarray,
        in_u: np.ndarray,
        f_positions: np.ndarray,
        rank: np.ndarray,
        F: np.ndarray,
        t: int,
        rng: np.random.Generator,
        cache: dict | None = None,
        key=None,
        u_digest: str = "",
    ) -> bool:
        """Whether u (on `positions`; `u_full` over the dataset) is near an affine function of
        a column of F (columns stacked on the rows `f_positions`; `rank` places dataset rows
        among them).

        Outside the rows both were released on, a near relation needs each column constant
        (0, or the fit's intercept) but for a few rows: u on its rows alone, and f on its
        rows alone unless b is 0 (then u is constant but for a few rows, which the model's
        own rule refuses). So pairs that fail this are not examined further. On the same rows,
        a near relation has a rank correlation of nearly +-1 (each differing row moves the
        others' ranks by at most one), a cheap screen of every column at once."""
        if key is None:
            cache = {}
        else:  # work that depends only on the two bases (and the group's columns): kept
            cache = self._pair_cache
            if len(cache) > 4096:
                cache.clear()
        bk = ("bases", key[0][0] if key else None, key[1][0] if key else None, t)
        if bk not in cache:
            only_u = positions[rank[positions] < 0]
            outside_f = ~in_u[f_positions]
            cache[bk] = (only_u, outside_f, positions.size + int(np.count_nonzero(outside_f)))
        only_u, outside_f, union_size = cache[bk]
        if int(outside_f.sum()) >= t:
            ck = ("offmode", key, t)
            if ck not in cache:
                cache[ck] = dif.varies_on_many(F[outside_f], t)
            possible = ~cache[ck]
            if not possible.any():
                return False
        else:
            possible = np.ones(F.shape[1], dtype=bool)
        if only_u.size >= t and dif.varies_on_many(u_full[only_u][:, None], t)[0]:
            return False
        if only_u.size == 0 and not outside_f.any() and positions.size >= 4 * t:
            ck = ("ranks", key, t)
            if ck not in cache:
                columns = key[1][1]
                cache[ck] = np.column_stack([self._ranked(d, F[:, j]) for j, d in enumerate(columns)])[rank[positions]]
            near = dif.rank_screen(u_full[positions], cache[ck], t, self._ranked(u_digest, u_full[positions]))
            possible &= near
            if not possible.any():
                return False

        def at(rows):
            r = rank[rows]
            out = np.zeros((rows.size, F.shape[1]))
            inside = r >= 0
            out[inside] = F[r[inside]]
            return out

        if union_size > 4 * SCREEN_ROWS:
            # Half the sample from each column's rows: a column released on a few rows is
            # then seen on its rows, however many rows the other has.
            parts, expected = [], 0.0
            for stratum in (positions, f_positions):
                k = min(SCREEN_ROWS // 2, stratum.size)
                parts.append(stratum[rng.integers(0, stratum.size, size=k)] if k else stratum[:0])
                expected += k * (t - 1) / max(stratum.size, 1)
            rows = np.concatenate(parts)
            allowed = dif.screen_allowance_for(expected)
            gf = (rank[rows] >= 0).astype(float)
            candidates = possible.copy()
            idx = np.flatnonzero(possible)
            candidates[idx] = dif.screen_near_affine(
                u_full[rows],
                at(rows)[:, idx],
                in_u[rows].astype(float),
                np.repeat(gf[:, None], idx.size, axis=1),
                allowed,
                rng,
            )
            if not candidates.any():
                return False
        else:
            candidates = possible
        union = np.union1d(positions, f_positions)
        full = at(union)
        gu, gf = in_u[union].astype(float), (rank[union] >= 0).astype(float)
        for j in np.flatnonzero(candidates):
            mismatch = dif.near_affine_mismatch(u_full[union], full[:, j], gu, gf, t, rng)
            if 0 < mismatch < t:
                return True
        return False

    # -- remembering
    def _plan(self, footprints: list[Footprint], t: int) -> _Plan:
        """The footprints packed and digested, kept for the `remember` that follows an audit."""
        key = (tuple(id(fp) for fp in footprints), t)
        if self._last_plan is not None and self._last_plan[0] == key and self._last_plan[2] is footprints[0]:
            return self._last_plan[1]
        plan = _Plan.of(footprints, self.n, t)
        self._last_plan = (key, plan, footprints[0] if footprints else None)
        return plan

    def remember(self, footprints: list[Footprint], t: int) -> None:
        plan = self._plan(footprints, t)
        self._last_plan = None
        sets: dict[str, tuple[str, str, np.ndarray]] = {}
        columns: list[tuple[str, str, str, np.ndarray]] = []
        for _, digest, packed in plan.base_sets:
            if digest not in self.base:
                sets[digest] = (digest, "base", packed)
        for _, digest, packed, _ in plan.pair_sets:
            if digest not in self.pairs and digest not in sets:
                sets[digest] = (digest, "pair", packed)
        seen = set()
        for _, base, positions, name, values, digest in plan.columns:
            if digest in self.columns or digest in seen:
                continue
            seen.add(digest)
            columns.append((digest, base, name, values))
            if base not in self.pairs and base not in sets:
                # The column's base rows are needed to place its values later.
                sets[base] = (base, "pair", dif.pack(_mask(positions, self.n)))
        self._write_bundle(list(sets.values()), columns)
        for digest, kind, packed in sets.values():
            if kind == "base":
                self._add_base(digest, packed)
            self._add_pair(digest, packed)
        for digest, base, name, values in columns:
            self.columns[digest] = (base, name, values)

    @property
    def size(self) -> int:
        """Row sets and columns remembered (the universe not counted)."""
        return len(self.pairs) - 1 + len(self.columns)


@dataclass
class _Plan:
    """A release's footprints as packed sets and placed columns, each with its digest."""

    base_sets: list[tuple[str, str, np.ndarray]]
    pair_sets: list[tuple[str, str, np.ndarray, str]]
    columns: list[tuple[str, str, np.ndarray, str, np.ndarray, str]]
    positions: dict[str, np.ndarray]
    # digest -> the footprint whose count cells (or rows) it is: not compared with each other
    families: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, footprints: list[Footprint], n: int, t: int) -> _Plan:
        parts = [cls.one(fp, n, t) for fp in footprints]
        out = cls([], [], [], {})
        for part in parts:
            out.base_sets += part.base_sets
            out.pair_sets += part.pair_sets
            out.columns += part.columns
            out.positions.update(part.positions)
            out.families.update(part.families)
        return out

    @classmethod
    def one(cls, fp: Footprint, n: int, t: int) -> _Plan:
        """One footprint's part, computed once (a table's accepted cells are planned again at
        every later cell's audit otherwise)."""
        key = (n, t)
        if key in fp._planned:
            return fp._planned[key]
        base_sets, pair_sets, columns, positions = [], [], [], {}
        rows = np.asarray(fp.rows, dtype=bool)
        if rows.size == n and rows.any():
            packed = dif.pack(rows)
            digest = _digest(packed, n)
            row_positions = np.flatnonzero(rows)
            positions[digest] = row_positions
            if fp.combine:
                base_sets.append((fp.label, digest, packed))
            pair_sets.append((fp.label, digest, packed, digest))
            for indicator in fp.indicators:
                for p, d in _indicator_sets(indicator, rows, packed, digest, n):
                    pair_sets.append((fp.label, d, p, digest))
            families = {}
            if fp.cells:
                families[digest] = id(fp)
                for cell in fp.cells:
                    for p, d in _indicator_sets(("cell", cell), rows, packed, digest, n):
                        pair_sets.append((fp.label, d, p, digest))
                        families.setdefault(d, id(fp))
            col_digest, col_positions = digest, row_positions
            if fp.column_rows is not None:
                col_rows = np.asarray(fp.column_rows, dtype=bool)
                col_packed = dif.pack(col_rows)
                col_digest, col_positions = _digest(col_packed, n), np.flatnonzero(col_rows)
                positions[col_digest] = col_positions
                pair_sets.append((fp.label, col_digest, col_packed, col_digest))
            for name, values in fp.columns:
                values = np.asarray(values, dtype=np.float64)
                if values.shape != (col_positions.size,):
                    raise ValueError("a footprint column does not match its rows")
                for derived in _level_sets(values, col_positions, n, fp.label, t):
                    pair_sets.append(derived + (col_digest,))
                columns.append(
                    (fp.label, col_digest, col_positions, str(name), values, _column_digest(col_digest, values))
                )
        plan = cls(base_sets, pair_sets, columns, positions, families if rows.size == n and rows.any() else {})
        fp._planned[key] = plan
        return plan


class _PairIndex:
    """The remembered sets' bitmaps in one growing matrix (capacity doubled when full) with
    their sizes: a new set is compared with every set within t - 1 of its size in one
    vectorised step, and remembering a set copies one row, not the whole matrix."""

    def __init__(self, width: int):
        self.matrix = np.zeros((16, width), dtype=np.uint8)
        self.pops = np.zeros(16, dtype=np.int64)
        self.digests: list[str] = []

    def add(self, packed: np.ndarray, pop: int, digest: str) -> None:
        k = len(self.digests)
        if k == self.matrix.shape[0]:
            self.matrix = np.concatenate([self.matrix, np.zeros_like(self.matrix)])
            self.pops = np.concatenate([self.pops, np.zeros_like(self.pops)])
        self.matrix[k], self.pops[k] = packed, pop
        self.digests.append(digest)

    def near(self, packed: np.ndarray, pop: int, t: int) -> str | None:
        k = len(self.digests)
        close = np.flatnonzero(np.abs(self.pops[:k] - pop) < t)
        if close.size == 0:
            return None
        diff = np.bitwise_count(np.bitwise_xor(self.matrix[close], packed)).sum(axis=1, dtype=np.int64)
        hits = np.flatnonzero((diff > 0) & (diff < t))
        return self.digests[int(close[hits[0]])] if hits.size else None


_POPS: dict[str, int] = {}  # set digest -> its number of rows (digests are of the set's bits)


def _popcount(digest: str, packed: np.ndarray) -> int:
    pop = _POPS.get(digest)
    if pop is None:
        if len(_POPS) > 200_000:
            _POPS.clear()
        pop = _POPS[digest] = dif.popcount(packed)
    return pop


_INDICATORS: dict = {}  # (n, base digest, rows digest) -> the packed set and its complement


def _indicator_sets(indicator, rows: np.ndarray, base_packed: np.ndarray, base: str, n: int):
    """An indicator column as two sets: its rows and the rest of its base rows. Given as
    (name, dataset row numbers) or a mask; several models of one study share most of their
    columns, so each is packed once (a small cache keyed by content)."""
    if isinstance(indicator, tuple):
        positions = np.asarray(indicator[1], dtype=np.int64)
    else:
        positions = np.flatnonzero(np.asarray(indicator, dtype=bool) & rows)
    key = (n, base, hashlib.sha1(positions.tobytes()).hexdigest())
    out = _INDICATORS.get(key)
    if out is None:
        part = dif.pack(_mask(positions, n))
        rest = np.bitwise_and(base_packed, np.bitwise_not(part))
        out = [(p, _digest(p, n)) for p in (part, rest) if dif.popcount(p)]
        if len(_INDICATORS) > 20_000:
            _INDICATORS.clear()
        _INDICATORS[key] = out
    return out


def _level_sets(values: np.ndarray, positions: np.ndarray, n: int, label: str, t: int):
    """A numeric column taking at most three values on all but t - 1 rows is also compared
    as sets (its rows at each of those values): it could equal an affine function of a 0/1
    column except on those few rows."""
    if values.size == 0:
        return []
    uniq, counts = np.unique(values, return_counts=True)
    top = np.argsort(counts, kind="stable")[::-1][:3]
    if values.size - int(counts[top].sum()) >= t:
        return []
    out = []
    for k in top:
        packed = dif.pack(_mask(positions[values == uniq[k]], n))
        out.append((label, _digest(packed, n), packed))
    return out


def _mask(positions: np.ndarray, n: int) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    mask[positions] = True
    return mask


def _write_new(path: Path, text: str) -> None:
    """Create a file once (another process may race us: the first one wins)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


class ReleaseMemory:
    """A node's release memories, one per data version (in memory when `folder` is None)."""

    def __init__(self, folder: Path | None, name: str = "releases"):
        self.folder, self.name = folder, name
        self._versions: dict[str, VersionMemory] = {}

    def for_version(self, version: str, n: int) -> VersionMemory:
        key = f"{version}:{n}"
        memory = self._versions.get(key)
        if memory is None:
            folder = None if self.folder is None else self.folder / self.name / version[:32]
            memory = VersionMemory(folder, n)
            self._versions[key] = memory
        else:
            memory.reload()
        return memory

"""Whether what a node has released, taken together, singles out a few people.

Every exact statistic a node releases is a sum over rows of some value: a count, a sum of
ages, an information matrix entry. Two releases on row sets A and B that differ by one person
give that person's value as their difference; three releases whose combination A + B - C is
one person do the same, however much A, B and C differ pairwise. So the node remembers every
row set and column it has released on a version of its data and refuses a new release when
any linear combination of them (the new one included) rests on 1 to t - 1 rows, t being the
policy's `min_subset_difference`. Two checks:

- **Combinations of row sets** (`find_isolating_combination`). Rows that belong to exactly
  the same released sets ("atoms") can never be told apart by any combination, so the sets
  are columns of a small 0/1 matrix A (sets x atoms). A combination c'A that is zero on
  every atom of t or more rows and not zero on some smaller atom isolates fewer than t rows.
  Such a c exists exactly when a small atom's column of A is not in the span of the large
  atoms' columns (a rank test). When some are not, the node looks at the combinations that
  vanish on the large atoms: if every one of them rests on t or more rows in all (say two
  atoms of 4 and 6 rows that no combination separates), the release is safe; if one rests on
  fewer, or if there are too many to examine, it is refused (fail closed).
- **Pairs of columns** (`near_affine_mismatch`). A design column, offset or summarised
  variable that equals an affine function of an already released one except on 1..t-1 rows
  (`age` against a transform of `age` that moves one age; two columns equal but for one
  person; the same level indicator on two cohorts that differ, within that level, by a few
  people) lets the difference of the two releases isolate those rows. Columns are compared
  as vectors over all the node's rows, zero outside the rows they were released on, so an
  interaction `x:h` over everyone and `x` over a cohort of `h == 1` are compared too. 0/1
  columns are compared as sets (their symmetric difference), numeric ones by an exact robust
  fit (`near_affine_mismatch`), after a cheap screen on a sample of rows.

Pure numpy: the node's memory (node/release_memory.py) feeds it bitmaps and vectors.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
from dataclasses import dataclass

import numpy as np

#: Residual norm above which a 0/1 atom column is treated as outside a span (conservative:
#: floating-point noise on these small integer matrices is far below it).
SPAN_TOL = 1e-9
#: Most candidate supports examined when proving that every isolating combination is large.
ENUMERATION_BUDGET = 20_000
#: Above this many atoms of fewer than t rows the node does not try to prove a release safe:
#: the released sets already cut its rows into crumbs, and it refuses (fail closed).
MAX_SMALL_ATOMS = 20_000
#: A column value and a fitted value closer than this, relative to the larger of the two
#: columns' largest values, are equal: far below what a real difference in data shows, far
#: above the rounding of an affine transform (center(x) against x).
VALUE_RTOL = 1e-12

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class Isolation:
    """A combination of released sets that rests on `rows` rows (1..t-1), or None = unproved."""

    rows: int | None
    reason: str


# --------------------------------------------------------------------------- bitmaps


def pack(mask: np.ndarray) -> np.ndarray:
    return np.packbits(np.asarray(mask, dtype=bool))


def unpack(packed: np.ndarray, n: int) -> np.ndarray:
    return np.unpackbits(packed, count=n).astype(bool)


def popcount(packed: np.ndarray) -> int:
    return int(np.bitwise_count(packed).sum())


def set_key(packed: np.ndarray, n: int, salt: bytes) -> tuple[int, int]:
    """Two 64-bit keys for a set, from its bits and the node's secret salt."""
    digest = hashlib.sha256(salt + packed.tobytes() + str(n).encode()).digest()
    return int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:16], "little")


class Signatures:
    """Per-row sums of the keys of the sets a row belongs to (two 64-bit lanes, modulo 2^64):
    rows with equal signatures belong to the same sets (up to a 2^-128 chance), so grouping
    rows by signature gives the atoms in one sort, and adding a set costs one pass."""

    def __init__(self, n: int):
        self.n = n
        self.lo = np.zeros(n, dtype=np.uint64)
        self.hi = np.zeros(n, dtype=np.uint64)

    def copy(self) -> Signatures:
        out = Signatures(self.n)
        out.lo, out.hi = self.lo.copy(), self.hi.copy()
        return out

    def add(self, packed: np.ndarray, key: tuple[int, int]) -> None:
        rows = unpack(packed, self.n)
        with np.errstate(over="ignore"):
            self.lo[rows] += np.uint64(key[0] & _MASK64)
            self.hi[rows] += np.uint64(key[1] & _MASK64)

    def atoms(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(representative row, size, in-any-set flag) of each atom."""
        order = np.lexsort((self.lo, self.hi))
        lo, hi = self.lo[order], self.hi[order]
        starts = np.flatnonzero(np.r_[True, (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])])
        sizes = np.diff(np.r_[starts, self.n])
        reps = order[starts]
        inside = (self.lo[reps] != 0) | (self.hi[reps] != 0)
        return reps, sizes, inside


# --------------------------------------------------------------------------- combinations


def membership(packed_sets: list[np.ndarray], rows: np.ndarray) -> np.ndarray:
    """0/1 matrix (sets x rows): whether each row is in each set."""
    if not packed_sets:
        return np.zeros((0, len(rows)))
    bitmaps = np.stack(packed_sets)
    byte = bitmaps[:, rows >> 3]
    return ((byte >> (7 - (rows & 7)).astype(np.uint8)) & 1).astype(float)


def find_isolating_combination(
    packed_sets: list[np.ndarray], signatures: Signatures, t: int, budget: int = ENUMERATION_BUDGET
) -> Isolation | None:
    """None when no linear combination of the sets rests on 1..t-1 rows; else an Isolation
    (with the number of rows when one was found, None when safety could not be proved).

    `signatures` must hold exactly these sets. The universe (every row) should be one of the
    sets, so that complements count."""
    if t <= 1 or not packed_sets:
        return None
    reps, sizes, inside = signatures.atoms()
    reps, sizes = reps[inside], sizes[inside]
    small = sizes < t
    if not small.any():
        return None
    if int(small.sum()) > MAX_SMALL_ATOMS:
        return Isolation(
            None,
            "the row sets this node has released cut its rows into too many small groups "
            "to prove that no combination singles out a few people",
        )
    A = membership(packed_sets, reps)
    big_cols, small_cols = A[:, ~small], A[:, small]
    small_sizes = sizes[small]
    basis, perp = _span_and_complement(big_cols, A.shape[0])
    residual = small_cols - basis @ (basis.T @ small_cols) if basis.size else small_cols
    exposed = ~(np.linalg.norm(residual, axis=0) <= SPAN_TOL)  # (NaN: exposed, fail closed)
    if not exposed.any():
        return None
    weights = small_sizes[exposed]
    if int(weights.sum()) < t:
        return Isolation(int(weights.sum()), "a combination of released row sets rests on fewer rows than the minimum")
    # The combinations that vanish on every large atom, restricted to the exposed small atoms.
    V = perp.T @ small_cols[:, exposed]
    rows = _row_basis(V)
    found = _lightest_combination(rows, weights, t, budget)
    if found is None:
        return None
    return found


def _span_and_complement(B: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal bases of the column span of B (m x b) and of its orthogonal complement."""
    if B.shape[1] == 0:
        return np.zeros((m, 0)), np.eye(m)
    if B.shape[1] > 4 * m:
        # Many atoms: the span of B equals the span of B B' (m x m), a far smaller problem.
        U, s, _ = np.linalg.svd(B @ B.T)
        s = np.sqrt(np.maximum(s, 0.0))
    else:
        U, s, _ = np.linalg.svd(B, full_matrices=True)
    tol = max(B.shape) * np.finfo(float).eps * (s[0] if s.size else 0.0) * 16
    r = int(np.count_nonzero(s > tol))
    return U[:, :r], U[:, r:]


def _row_basis(V: np.ndarray) -> np.ndarray:
    """An orthonormal basis (rows) of the row space of V."""
    if V.size == 0:
        return np.zeros((0, V.shape[1]))
    _, s, vt = np.linalg.svd(V, full_matrices=False)
    tol = max(V.shape) * np.finfo(float).eps * (s[0] if s.size else 0.0) * 16
    return vt[: int(np.count_nonzero(s > tol))]


def _lightest_combination(rows: np.ndarray, weights: np.ndarray, t: int, budget: int) -> Isolation | None:
    """Is there a non-zero vector in the row space of `rows` (d x s) whose support weighs
    less than t? None when there is none; an Isolation when one is found or when the search
    would exceed `budget` (fail closed).

    First the cheap candidates: the rows of the reduced echelon form (each is zero on the
    other pivots, so often sparse). Then the exact search over supports: sets of atoms
    weighing less than t in all (at most t - 1 atoms, as each weighs at least 1); a vector of
    the space lives on such a set T when the columns outside T leave a direction free
    (rank(rows[:, not T]) < d)."""
    d, s = rows.shape
    if d == 0:
        return None
    found = Isolation(None, "a combination of released row sets rests on fewer rows than the minimum")
    for vector in _echelon_rows(rows):
        support = np.abs(vector) > SPAN_TOL * max(1.0, float(np.abs(vector).max()))
        w = int(weights[support].sum())
        if w < t:
            return Isolation(w, found.reason)
    if d == 1:
        return None
    light = np.flatnonzero(weights < t)
    order = light[np.argsort(weights[light], kind="stable")]
    examined = 0
    unproved = Isolation(
        None, "the node cannot prove that no combination of the row sets it has released singles out a few people"
    )
    for size in range(1, t):
        for combo in itertools.combinations(order.tolist(), size):
            picked = list(combo)
            if int(weights[picked].sum()) >= t:
                continue
            examined += 1
            if examined > budget:
                return unproved
            outside = np.ones(s, dtype=bool)
            outside[picked] = False
            sub = rows[:, outside]
            rank = np.linalg.matrix_rank(sub, tol=SPAN_TOL) if sub.size else 0
            if rank < d:
                return Isolation(int(weights[picked].sum()), found.reason)
    return None


def _echelon_rows(rows: np.ndarray) -> np.ndarray:
    """The reduced row echelon form of a full-rank d x s matrix, pivots chosen by QR with
    column pivoting (numerically stable)."""
    import scipy.linalg

    d = rows.shape[0]
    _, _, piv = scipy.linalg.qr(rows, mode="economic", pivoting=True)
    pivots = piv[:d]
    try:
        return np.linalg.solve(rows[:, pivots], rows)
    except np.linalg.LinAlgError:
        return rows


# --------------------------------------------------------------------------- pairs of columns


def sets_differ_by_few(packed: np.ndarray, others: list[np.ndarray], t: int) -> int | None:
    """The index of the first of `others` that `packed` differs from by 1..t-1 rows."""
    for k, other in enumerate(others):
        diff = int(np.bitwise_count(np.bitwise_xor(other, packed)).sum())
        if 0 < diff < t:
            return k
    return None


def near_affine_mismatch(
    u: np.ndarray, f: np.ndarray, gu: np.ndarray, gf: np.ndarray, t: int, rng: np.random.Generator
) -> int:
    """The fewest rows (over the union of the two columns' rows) on which u differs from
    b*f + a*g for some a, b and g in {nothing, u's rows, f's rows}, when that is below t;
    else t (no near relation). 0 means u is exactly such a function (nothing new).

    u, f: the two columns on the union of their rows (0 where a column was not released);
    gu, gf: 0/1 indicators of each column's rows on that union. All but t - 1 rows lie on
    the line, so the median of the slopes between random pairs of rows is its slope (and the
    median residual its intercept); on a handful of rows every pair of rows is tried."""
    if u.size == 0:
        return t
    mismatch = _mismatches(u, f[:, None], gu, gf[:, None], rng, exhaustive=u.size <= 48)
    best = int(mismatch.min())
    return best if best < t else t


def off_mode(values: np.ndarray) -> int:
    """Rows away from the most common value."""
    if values.size == 0:
        return 0
    _, counts = np.unique(values, return_counts=True)
    return int(values.size - counts.max())


def varies_on_many(F: np.ndarray, t: int) -> np.ndarray:
    """For each column of F (rows x q): are at least t of its rows away from any one value?
    First on its first 4t rows (if t of those already differ from the commonest of them,
    they differ from every single value), then exactly for the columns left undecided."""
    if F.shape[0] < t:
        return np.zeros(F.shape[1], dtype=bool)
    head = np.sort(F[: 4 * t], axis=0)
    k = head.shape[0]
    same = np.vstack([np.zeros((1, head.shape[1]), dtype=bool), head[1:] == head[:-1]])
    # longest run of equal values per column
    runs = np.zeros(head.shape[1], dtype=np.int64)
    current = np.zeros(head.shape[1], dtype=np.int64)
    for row in same:
        current = np.where(row, current + 1, 1)
        runs = np.maximum(runs, current)
    out = (k - runs) >= t
    for j in np.flatnonzero(~out):
        out[j] = off_mode(F[:, j]) >= t
    return out


def standard_ranks(F: np.ndarray) -> np.ndarray:
    """Each column's (average) ranks, centred and scaled to unit norm (0 for a constant one)."""
    from scipy.stats import rankdata

    R = rankdata(F, axis=0).astype(float)
    R -= R.mean(axis=0)
    norms = np.sqrt(np.einsum("ij,ij->j", R, R))
    return np.divide(R, norms, out=np.zeros_like(R), where=norms > 0)


def rank_screen(u: np.ndarray, ranked: np.ndarray, t: int, r: np.ndarray | None = None) -> np.ndarray:
    """Which columns could equal an affine function of u but for fewer than t rows: their
    rank correlation with u is within 12 (t/n)(1 + t/n) of +-1 (a bound with room: each
    differing row moves another row's rank by at most one). A constant column or u is left
    to the other rules (u = a + b * constant is constant: the off-mode rule)."""
    n = u.size
    r = standard_ranks(u[:, None])[:, 0] if r is None else r
    if not np.any(r):
        return np.zeros(ranked.shape[1], dtype=bool)
    rho = np.abs(r @ ranked)
    slack = 12.0 * (t / n) * (1.0 + t / n)
    return (rho >= 1.0 - slack) & np.any(ranked != 0, axis=0)


def screen_allowance(k: int, union: int, t: int) -> int:
    """How many of k sampled rows (of `union`) may disagree with a true near relation: the
    1..t-1 rows it fails on fall in the sample more often only with probability under 1e-10
    (a Poisson bound, which is above the hypergeometric count's tail)."""
    return _poisson_bound(round(k * (t - 1) / max(union, 1), 3))


def screen_allowance_for(expected: float) -> int:
    """The same bound for a sample in which the failing rows are expected `expected` times
    at most (a stratified sample: the sum over its strata)."""
    return _poisson_bound(round(expected, 3))


@functools.lru_cache(maxsize=4096)
def _poisson_bound(lam: float) -> int:
    """The smallest a with P(Poisson(lam) > a) < 1e-10."""
    lam = max(lam, 1e-9)
    term = math.exp(-lam)  # P(X = 0)
    cdf, a = term, 0
    while 1.0 - cdf >= 1e-10 and a < 10_000:
        a += 1
        term *= lam / a
        cdf += term
    return a


def screen_near_affine(
    u: np.ndarray, F: np.ndarray, gu: np.ndarray, GF: np.ndarray, allowed: int, rng: np.random.Generator
) -> np.ndarray:
    """A cheap screen of many columns at once on a sample of rows: for each column of F
    (rows x q), whether the robust fit agrees with u on all but `allowed` sampled rows.
    False: no near relation (the sample disagrees on more rows than a true one could);
    True: check the pair on every row. `GF` holds each column's own 0/1 rows indicator at
    the sampled rows."""
    if F.shape[1] == 0:
        return np.zeros(0, dtype=bool)
    return _mismatches(u, F, gu, GF, rng, exhaustive=False, pairings=1) <= allowed


def _mismatches(
    u: np.ndarray,
    F: np.ndarray,
    gu: np.ndarray,
    GF: np.ndarray,
    rng: np.random.Generator,
    exhaustive: bool,
    pairings: int = 2,
) -> np.ndarray:
    """For each column of F (rows x q): the fewest rows on which u differs from the best of
    the fits b*f, b*f + a*gu and b*f + a*g (g the column's own rows, GF)."""
    k, q = F.shape
    best = np.full(q, k, dtype=np.int64)
    top_u = float(np.max(np.abs(u))) if k else 0.0
    for G in (None, np.broadcast_to(gu[:, None], F.shape), GF):
        for a, b in _candidate_fits(u, F, G, rng, exhaustive, pairings):
            with np.errstate(invalid="ignore", over="ignore"):
                fitted = b[None, :] * F + (a[None, :] * G if G is not None else 0.0)
                tol = VALUE_RTOL * np.maximum(top_u, np.max(np.abs(fitted), axis=0))
                wrong = ~(np.abs(u[:, None] - fitted) <= tol[None, :])
            count = np.count_nonzero(wrong, axis=0)
            count[~(np.isfinite(a) & np.isfinite(b))] = k
            best = np.minimum(best, count)
    return best


def _candidate_fits(u, F, G, rng, exhaustive, pairings=2):
    """(a, b) per column: from the medians of pairwise slopes and residuals (random
    pairings), or from every pair of rows when there are only a few."""
    k, q = F.shape
    if exhaustive:
        for i in range(k):
            for j in range(i + 1, k):
                yield _two_row_fit(u, F, G, i, j)
        return
    for _ in range(pairings):
        other = rng.permutation(k)
        du = u - u[other]
        dF = F - F[other]
        same = np.ones((k, 1), dtype=bool) if G is None else (G == G[other])
        with np.errstate(divide="ignore", invalid="ignore"):
            if G is None:
                slopes = np.where(F != 0, u[:, None] / F, np.nan)
            else:
                slopes = np.where(same & (dF != 0), du[:, None] / dF, np.nan)
            b = _nanmedian(slopes)
            b = np.where(np.isnan(b), 0.0, b)
            if G is None:
                a = np.zeros(q)
            else:
                residual = np.where(G != 0, u[:, None] - b[None, :] * F, np.nan)
                a = _nanmedian(residual)
                a = np.where(np.isnan(a), 0.0, a)
        yield a, b


def _two_row_fit(u, F, G, i, j):
    q = F.shape[1]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if G is None:
            fi = np.where(F[i] != 0, F[i], F[j])
            ui = np.where(F[i] != 0, u[i], u[j])
            return np.zeros(q), np.where(fi != 0, ui / fi, 0.0)
        det = F[i] * G[j] - F[j] * G[i]
        b = (u[i] * G[j] - u[j] * G[i]) / det
        a = (F[i] * u[j] - F[j] * u[i]) / det
        flat = (det == 0) & ((G[i] != 0) | (G[j] != 0))
        b = np.where(flat, 0.0, b)
        a = np.where(flat, np.where(G[i] != 0, u[i], u[j]), a)
        return a, b


def _nanmedian(values: np.ndarray) -> np.ndarray:
    """Column (lower) medians ignoring NaN, NaN where a column has none: one sort (NaN sort
    last), far cheaper than numpy's nanmedian on many small columns."""
    ordered = np.sort(values, axis=0)
    counts = np.count_nonzero(~np.isnan(values), axis=0)
    index = np.maximum(counts - 1, 0) // 2
    out = np.take_along_axis(ordered, index[None, :], axis=0)[0]
    return np.where(counts > 0, out, np.nan)

"""1:1 nearest-neighbour matching on the logit of the propensity score, without replacement,
within a caliper: the algorithm a node runs on its own rows (a PSM study's `propensity.match`).

Deterministic and documented, so that the same matching run on a service's rows directly
(tests/reference_propensity.py, a plain quadratic loop) gives the same pairs:

1. The exposed rows are taken in descending order of the logit (MatchIt's default order,
   "largest"), ties in the row order of the node's data.
2. Each looks at the still-unmatched controls on either side of its logit: the nearest below
   (the largest logit under its own) and the nearest at or above (the smallest logit from its
   own up), each the first in row order among controls sharing that logit. It takes the nearer
   of the two; distances within TIE (1e-9 on the logit scale) of each other are a tie, won by
   the control first in row order. (A tolerance, because linear terms in whole-number scores
   make exact ties in real arithmetic, e.g. controls one point either side, that floating
   point would otherwise break by rounding noise: any implementation with coefficients equal
   to 1e-12 then makes the same pairs.)
3. If that distance is above the caliper (an absolute width on the logit scale), the exposed
   row stays unmatched and the control stays available.

Logits are X β computed row by row (node/propensity.py), so rows with the same covariates tie
exactly.

The controls are kept sorted by (logit, row) with two path-compressed "next available" links
(left and right), so each exposed row costs a binary search and near-constant time, not a
scan of every control.
"""

from __future__ import annotations

import numpy as np

TIE = 1e-9


def match_nearest(logit: np.ndarray, exposed: np.ndarray, caliper: float) -> tuple[np.ndarray, np.ndarray]:
    """Pairs as (exposed row, control row) index arrays into `logit`, in matching order."""
    logit = np.asarray(logit, dtype=float)
    exposed = np.asarray(exposed, dtype=bool)
    treated = np.flatnonzero(exposed)
    controls = np.flatnonzero(~exposed)
    if treated.size == 0 or controls.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    order_t = treated[np.lexsort((treated, -logit[treated]))]
    order_c = controls[np.lexsort((controls, logit[controls]))]
    values = logit[order_c]
    n = values.size
    right = list(range(n + 1))  # right[i]: the first available index >= i (n: none)
    left = list(range(n + 1))  # left[i + 1]: the last available index <= i (0: none)
    rows_c = order_c.tolist()

    def find(links: list[int], i: int) -> int:
        root = i
        while links[root] != root:
            root = links[root]
        while links[i] != root:
            links[i], i = root, links[i]
        return root

    out_t, out_c = [], []
    for t in order_t.tolist():
        v = float(logit[t])
        pos = int(np.searchsorted(values, v, side="left"))
        r = find(right, pos)
        li = find(left, pos) - 1  # last available index < pos
        best, best_d = -1, np.inf
        if r < n:
            best, best_d = r, float(values[r]) - v
        if li >= 0:
            # The first available control of the block of controls sharing that logit.
            li = find(right, int(np.searchsorted(values, values[li], side="left")))
            d = v - float(values[li])
            if d < best_d - TIE or (abs(d - best_d) <= TIE and rows_c[li] < rows_c[best]):
                best, best_d = li, d
        if best < 0 or not best_d <= caliper:
            continue
        out_t.append(t)
        out_c.append(rows_c[best])
        right[best] = best + 1
        left[best + 1] = best
    return np.asarray(out_t, dtype=np.int64), np.asarray(out_c, dtype=np.int64)


def leave_none_or_many_unmatched(
    treated: np.ndarray, controls: np.ndarray, logit: np.ndarray, n_exposed: int, n_controls: int, t: int
) -> tuple[np.ndarray, np.ndarray]:
    """The pairs kept so that the exposed left unmatched, and the controls left unmatched,
    number 0 or at least t (the policy's min_subset_difference): otherwise a result on the
    matched set beside one on the cohort would differ by those few people. While either group
    holds 1 to t - 1 people, the pair with the largest logit distance is unmatched too (ties:
    the one matched last)."""
    keep = len(treated)
    order = np.lexsort((-np.arange(keep), -np.abs(logit[treated] - logit[controls])))

    def few(k: int) -> bool:
        return 0 < n_exposed - k < t or 0 < n_controls - k < t

    dropped = 0
    while dropped < keep and few(keep - dropped):
        dropped += 1
    kept = np.sort(order[dropped:])
    return treated[kept], controls[kept]

"""Small-number rules for the tables a study displays, with secondary suppression.

Counts a node released as a count table arrive already rounded or suppressed (None) under the
node's own policy. Counts the coordinator forms itself (sums over nodes) are shown under the
network rule of DOMAIN.md §F, the NHS Digital convention: 0 stays 0, 1-7 suppressed, others
rounded to the nearest 5.

Secondary suppression, for a table with row and column totals: a suppressed cell must not be
recoverable from the totals and the cells shown. The suppressed entries of such a table (totals
included) form a bipartite graph of rows and columns; their values are fixed by the totals
exactly when the entry is a bridge of that graph, i.e. lies on no cycle. So each suppressed
cell that lies on no cycle is put on one: the cheapest rectangle (its row, its column, one
other row and one other column) is suppressed with it, preferring cells to totals, non-zero
cells to zeros, and small counts to large. Afterwards no row or column holds exactly one
suppressed entry, and no suppressed cell's value is determined by the others (a shift around
its rectangle keeps every total).
"""

from __future__ import annotations

import math

SUPPRESS_MAX = 7
ROUND_TO = 5


def display_count(n: float, suppress_max: int = SUPPRESS_MAX, round_to: int = ROUND_TO) -> int | None:
    """A count as shown: 0 stays 0, 1..suppress_max is None, others rounded (halves up)."""
    n = int(round(float(n)))
    if n == 0:
        return 0
    if n <= suppress_max:
        return None
    return int(math.floor(n / round_to + 0.5) * round_to)


def secondary_suppression(table: list[list[int | None]]) -> set[tuple[int, int]]:
    """Suppress entries of `table` (rows of cells; the last column the row totals, the last
    row the column totals) in place so that no suppressed entry is determined by the entries
    shown; returns the positions suppressed here."""
    rows, cols = len(table), len(table[0]) if table else 0
    added: set[tuple[int, int]] = set()
    for i, j in [(i, j) for i in range(rows) for j in range(cols) if table[i][j] is None]:
        if _on_cycle(table, i, j):
            continue
        best, best_cost = None, None
        for k in range(rows):
            for m in range(cols):
                if k == i or m == j:
                    continue
                new = [p for p in ((i, m), (k, j), (k, m)) if table[p[0]][p[1]] is not None]
                values = [table[a][b] for a, b in new]
                cost = (sum(a == rows - 1 or b == cols - 1 for a, b in new),
                        sum(v == 0 for v in values), sum(values), len(new), k, m)
                if best_cost is None or cost < best_cost:
                    best, best_cost = new, cost
        for a, b in best or []:
            table[a][b] = None
            added.add((a, b))
    return added


def _on_cycle(table, i: int, j: int) -> bool:
    """Is suppressed entry (i, j) on a cycle: are row i and column j still connected through
    the other suppressed entries?"""
    rows, cols = len(table), len(table[0])
    hidden = {(a, b) for a in range(rows) for b in range(cols) if table[a][b] is None and (a, b) != (i, j)}
    seen, frontier = {("r", i)}, [("r", i)]
    while frontier:
        kind, x = frontier.pop()
        if kind == "r":
            nxt = [("c", b) for a, b in hidden if a == x]
        else:
            nxt = [("r", a) for a, b in hidden if b == x]
        for node in nxt:
            if node == ("c", j):
                return True
            if node not in seen:
                seen.add(node)
                frontier.append(node)
    return False

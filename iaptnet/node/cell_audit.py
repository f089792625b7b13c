"""Count cells in the differencing audit: a rounded count is still a count.

A table's cells, an interrupted time series' months and periods are shown rounded to 5 (and
suppressed at 1-7), and rounding alone does not stop differencing: 143 people show as 145 and
142 as 140, so two cells whose rows differ by one person say whether that person is in the
cell whenever the first sits just above a rounding boundary, and an analyst who learnt the
exact count from a model's information matrix can choose a cohort that puts it there.

So before a kind shows its counts, it asks `CellAudit.differing` which of the cells it would
show have rows (or leave rows of their cohort) that differ by 1 to t - 1 people from a row set
the node released before; it withholds those like small counts (its complementary
suppression runs again around them) and declares the cells it shows as `cells` of the
cohort's facts, so that the release is remembered with them and every later release, of any
kind, is compared with them (node/release_memory.py).

Cells of one release are not compared with each other or with their cohort: two rounded
counts of one table are what the small-number rules and complementary suppression govern, and
pinning either to a rounding boundary needs an exact count of its rows, which only a release
on those rows (or rows a few people away) gives, before or after: one the audit compares with
the remembered cells. Comparing them would withhold the neighbours of every small cell.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

import numpy as np

from .runtime import NodeRuntime


class CellAudit:
    """The pairs audit of one release's count cells, over a cohort of the node's rows."""

    def __init__(self, runtime: NodeRuntime, cohort: np.ndarray, t: int):
        dataset = runtime.dataset
        with runtime.memory.transaction() as memory:
            self.remembered = memory.releases(dataset.data_version, dataset.n_rows)
        self.cohort, self.n, self.t = np.asarray(cohort, dtype=bool), dataset.n_rows, t
        self._judged: dict[Hashable, bool] = {}  # key -> differs (the memory is fixed in a task)

    def differing(self, cells: Iterable[tuple[Hashable, np.ndarray]]) -> set:
        """The keys of the cells (key, dataset row numbers) whose rows, or whose rest of the
        cohort, differ by 1..t-1 people from a row set remembered on this data. A cell covering
        the whole cohort is the cohort itself, which the dispatcher judges (and refuses the
        release for). A key is judged once per task: suppression asks again after each round
        of withholding, about the same cells."""
        if self.t <= 1:
            return set()
        out = set()
        for key, positions in cells:
            if key not in self._judged:
                part = np.zeros(self.n, dtype=bool)
                part[positions] = True
                rest = self.cohort & ~part
                self._judged[key] = bool(rest.any()) and any(
                    self.remembered.set_differs_by_few(s, [], self.t) for s in (part, rest)
                )
            if self._judged[key]:
                out.add(key)
        return out

"""Count cells in the differencing audit: a rounded count is still a count.

A table's cells, an interrupted time series' months and periods are shown rounded to 5 (and
suppressed at 1-7), and rounding alone does not stop differencing: 143 people show as 145 and
142 as 140, so two cells whose rows differ by one person say whether that person is in the
cell whenever the first sits just above a rounding boundary, and an analyst who learnt the
exact count from a model's information matrix can choose a cohort that puts it there.

So before a kind shows its counts, it asks `CellAudit.differing` which of the cells it would
show must be withheld, by two judgements:

- **pairs**: a cell whose rows (or the rest of its cohort) differ by 1 to t - 1 people from a
  row set the node released before;
- **combinations**: a cell that, joined with its cohort to the span of every column the node
  has released (node/span.py), would lift some row's leverage above `max_combined_leverage`.
  Three models on A, B and C with A + B - C one person short of a cell give that cell's
  rows but one exactly, though every pair of the four differs by dozens; the cell would put
  that person's unit vector in the span (leverage 1). The cell withheld is the smallest that
  holds a row lifted too far, and the question is asked again about what remains. A cell
  that is the sum of other cells shown (a table's overall column, the sum of its `by`
  columns; one level of a variable, given the column's cohort and the other levels) adds
  nothing to the span and is left out of it (`CellAudit.for_span`): the same span from fewer
  columns (the demo's Table 1: 100 cells per node instead of 215).

A withheld cell is hidden like a small count (its complementary suppression runs again around
it). The cells shown are declared as `cells` of the cohort's facts, so that the release is
remembered with them: every later release of any kind is compared with them in pairs, and
they join the span, so that models that would complete a combination with a shown cell are
refused in turn.

Cells of one release are not compared with each other in pairs: two rounded counts of one
table are what the small-number rules and complementary suppression govern, and pinning either
to a rounding boundary needs an exact count of its rows, which only a release on those rows
(or rows a few people away) gives, before or after. Comparing them would withhold the
neighbours of every small cell. (In the span they are judged together, as they are remembered.)

A withheld cell answers a yes/no question as a refusal does (an analyst who knows the cell's
exact count from elsewhere sees that it is hidden), so a task that withholds any counts once
against the policy's `max_refusals_per_day`, like a refusal of the data's rules
(`disclosure.withheld_by_audit`).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

import numpy as np

from .disclosure import ModelFacts, withheld_by_audit
from .policy import Rules
from .release_memory import Footprint
from .runtime import NodeRuntime


class CellAudit:
    """The differencing audit of one release's count cells, over a cohort of the node's rows."""

    def __init__(self, runtime: NodeRuntime, cohort: np.ndarray, rules: Rules, relations=(), empty=()):
        dataset = runtime.dataset
        with runtime.memory.transaction() as memory:
            self.remembered = memory.releases(dataset.data_version, dataset.n_rows)
        self.runtime, self.version = runtime, dataset.data_version
        self.cohort, self.n = np.asarray(cohort, dtype=bool), dataset.n_rows
        self.t, self.limit = rules.min_subset_difference, rules.max_combined_leverage
        self._judged: dict[Hashable, bool] = {}  # key -> differs (the memory is fixed in a task)
        # (total, parts): the total's rows are the disjoint union of the parts' rows
        self.relations = [r for r in relations if isinstance(r, tuple) and len(r) == 2]
        self.empty = set(empty)  # cells with no rows: shown as 0, members of relations all the same
        self._last: list[tuple[Hashable, np.ndarray]] = []  # the cells of the last judgement

    def differing(self, cells: Iterable[tuple[Hashable, np.ndarray]]) -> set:
        """The keys of the cells (key, dataset row numbers, sorted) to withhold. A cell covering
        the whole cohort is the cohort itself, which the dispatcher judges (and refuses the
        release for). A key is judged in pairs once per task: suppression asks again after
        each round of withholding, about the same cells."""
        cells = self._last = list(cells)
        out = self._pairs(cells)
        if not out:
            out = self._combinations(cells)
        if out:
            withheld_by_audit()
        return out

    def _pairs(self, cells: list[tuple[Hashable, np.ndarray]]) -> set:
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

    def _combinations(self, cells: list[tuple[Hashable, np.ndarray]]) -> set:
        """The smallest cell holding a row that the cells and their cohort, joined to the span
        of released columns, would lift above the limit (empty when none is)."""
        if self.limit >= 1.0 or not self.cohort.any():
            return set()
        cells = self.for_span(cells)
        footprint = Footprint("count cells", self.cohort, cells=[positions for _, positions in cells])
        with self.runtime.memory.transaction() as memory:
            lifted = memory.span_lifted([footprint], self.version, self.n)
        if lifted is None:
            return set()
        rows, leverage = lifted
        high = rows[~(leverage <= self.limit)]  # (NaN counts as too high: fail closed)
        if not high.size:
            return set()
        whole = int(self.cohort.sum())
        holding = [
            (len(positions), i)
            for i, (_, positions) in enumerate(cells)
            if len(positions) < whole and np.isin(high, positions, assume_unique=True).any()
        ]
        if not holding:
            return set()  # only the cohort lifts it: the dispatcher refuses the release
        return {cells[min(holding)[1]][0]}

    def facts(self, label: str) -> ModelFacts:
        """The cohort's facts, declared with the cells of the last judgement (the ones shown,
        once nothing more is withheld): every later release is compared with them in pairs,
        and they join the span of released columns as they were judged, so the dispatcher's
        check of the release reuses the judgement's work."""
        return ModelFacts(
            label,
            self.cohort,
            cells=[positions for _, positions in self._last],
            span_cells=[positions for _, positions in self.for_span(self._last)],
        )

    def for_span(self, cells: list[tuple[Hashable, np.ndarray]]) -> list[tuple[Hashable, np.ndarray]]:
        """The cells without those that are sums or differences of the others shown: for each
        relation whose members are all kept, the largest member that is not a cohort's count
        is left out (the cohort counts stay, as most relations share them). Each cell left out
        is a combination of cells kept when it was, so the span is the same."""
        kept = dict(cells)
        for total, parts in self.relations:
            members = [key for key in (total, *parts) if key not in self.empty]
            if all(key in kept for key in members):
                droppable = [key for key in members if not (isinstance(key, tuple) and key[:1] == ("N",))]
                if droppable:
                    del kept[max(droppable, key=lambda key: len(kept[key]))]
        return [(key, positions) for key, positions in cells if key in kept]

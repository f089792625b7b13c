"""The node half of descriptive tables (`kind = "table"`): what leaves the node for a Table 1
or a cohort funnel.

`describe.table` (one task per study) releases, for the study's cohort at this node:

- **counts** (count tables, rounded and suppressed by the dispatcher under the small-number
  rules): the cohort in each column (overall, each level of `by`, `by` missing), each
  categorical or binary variable's levels and missing rows, each numeric variable's recorded
  and missing rows, each funnel step. Before declaring them the node applies **secondary
  suppression** (protocol/suppression.py) to its own tables, so that no suppressed count can be
  recovered from the totals it releases, nor a small number of people leaving between two
  funnel steps from the two steps' counts; the complementary cells are not declared at all.
  The cohort's rows are declared as the tables' facts (subset rule: a cohort differing from
  an earlier release by 1-7 people is refused), with each count cell shown as one of their
  indicators: a rounded count is still a count, so a cell whose rows differ by 1-7 people
  from a row set released before (of any kind, and remembered with the table) is withheld like a
  small count, with complementary suppression around it (`_suppress_and_audit`).
- **exact summaries** (model statistics: n, mean and centred sum of squares) of each numeric
  variable in each column, over the rows with the value recorded, guarded by the model rules
  (minimum rows, rows away from the most common value, the subset rule). A summary is
  withheld, rather than the task refused, when those rules would refuse it, when the column's
  count of missing values is suppressed (exact n beside the column's count would reveal it),
  or when it is the only one withheld of its row (the overall summary is the sum of the
  columns' ones, so a second is withheld with it).

`describe.quantiles` (rounds of a federated bisection) releases, for thresholds t chosen by the
coordinator, the exact number of rows at or below t in a column whose summary was released.
Each count is declared as a per-round statistic whose coefficient is t and whose row weights
are the 0/1 indicators of the rows counted (so the dispatcher's probing checks apply, against
the column's rows and the nearest thresholds answered), and the node withholds a threshold
that would make any bin between thresholds answered for the variable (in any column of the
study) hold 1 to min-1 rows, in any part of the cohort the released columns can tell apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.linalg

from ..protocol import cohort_filter
from ..protocol.errors import DataError
from ..protocol.kinds import describe as contract
from ..protocol.kinds.describe import (
    QUANTILE_TASK,
    TABLE_TASK,
    Layout,
    cell_keys,
    layout,
    relations,
    step_pairs,
    wire_name,
)
from ..protocol.sdc import suppress
from ..protocol.study import StudySpec, check_at_node
from .cell_audit import CellAudit
from .cohort import cohort_mask
from .design import apply_merges, study_frame
from .disclosure import (
    LevelCount,
    ModelFacts,
    Release,
    check_model,
    check_round,
    check_size,
    require_rows,
    task_rules,
    withheld_by_audit,
)
from .policy import round_count
from .registry import handler
from .release_memory import Footprint
from .runtime import NodeRuntime, PreparedStudy

MAX_THRESHOLDS = 2000
WEIGHTS = "rows at or below the threshold"


@dataclass
class VariableState:
    """A numeric variable's recorded rows in the cohort, kept for the quantile rounds."""

    facts: ModelFacts  # the recorded rows (a mask over the dataset)
    values: np.ndarray  # their values
    groups: np.ndarray  # their `by` column (0 without a `by`)
    released: tuple[int, ...]  # columns whose exact summary left the node
    name: str = ""  # the variable
    # Whether thresholds of this study on the variable were answered by an earlier process of
    # the node (set at the first quantile task; their bins are not in `answered`).
    bisected_before: bool | None = None
    answered: dict[int, list[float]] = field(default_factory=dict)  # column -> thresholds
    _cache: dict = field(default_factory=dict)

    def base(self, column: int) -> np.ndarray:
        key = ("base", column)
        if key not in self._cache:
            self._cache[key] = np.ones(len(self.values), dtype=bool) if column == 0 else self.groups == column
        return self._cache[key]

    def group_list(self) -> list[int]:
        if "groups" not in self._cache:
            self._cache["groups"] = [int(g) for g in np.unique(self.groups)]
        return self._cache["groups"]

    def sorted_values(self, group: int) -> np.ndarray:
        key = ("values", group)
        if key not in self._cache:
            self._cache[key] = np.sort(self.values[self.groups == group])
        return self._cache[key]


@dataclass
class TableState(PreparedStudy):
    variables: dict[int, VariableState] = field(default_factory=dict)


# --------------------------------------------------------------------------- describe.table


@handler(TABLE_TASK, studies="payload")
def describe_table(runtime: NodeRuntime, task) -> Release:
    spec = _study(task.payload)
    dataset = runtime.dataset.for_study(spec)  # the service column with the network's levels
    check_at_node(spec, dataset.schema)
    lay = layout(spec.params, spec.schema_with_augment(dataset.schema), spec.merge, spec.source)
    frame = study_frame(dataset.frame, spec, runtime.augments)
    cohort = cohort_mask(frame, spec.where_tree())
    needed = list(dict.fromkeys([*([lay.by] if lay.by else []), *(v.name for v in lay.variables)]))
    rows = apply_merges(frame.loc[cohort, needed], spec)
    groups = _group_codes(rows, lay)
    in_column = np.full(len(frame), -1, dtype=np.int64)
    in_column[cohort] = groups

    rules = task_rules()
    require_rows(cohort, spec.name, rules)  # the size rule first: nothing is counted on a few rows
    counts = _counts(rows, groups, lay)
    steps = _funnel_masks(frame, cohort, lay)
    for s, mask in enumerate(steps[1:], start=1):
        for c, n in enumerate(_column_counts(in_column[mask], lay)):
            counts[("f", s, c)] = n
    primary = {key for key, n in counts.items() if round_count(n, rules) is None}
    # A `by` group smaller than the cohort minimum is shown nowhere (its cells are hidden
    # like small counts, so complementary suppression protects them from the totals).
    small_groups = {c for c in lay.group_columns if 0 < counts[("N", c)] < rules.min_rows}
    forced = {key for key in cell_keys(lay) if key[-1] in small_groups}

    release = Release()
    release.public("data_version", dataset.data_version)
    checker = SubsetCheck(runtime, dataset.data_version, dataset.n_rows, rules)
    leaving = [(a, b) for a, b in step_pairs(lay) if round_count(counts[a] - counts[b], rules) is None]
    cells = CellRows(lay, cohort, rows, groups, in_column, steps)
    hidden, audit = _suppress_and_audit(runtime, counts, primary, forced, leaving, lay, cells, rules)
    # The cohort's rows join the differencing audit with every count cell shown over them
    # (each cell's rows and the rest of the cohort are compared in pairs with every row set
    # released before), so a later release cannot difference a rounded count either.
    # The cohort and the cells shown join the span of released columns (node/cell_audit.py).
    cohort_facts = audit.facts(f"{spec.name}: cohort")
    checker.accept(cohort_facts)  # refused by the dispatcher if it breaks the subset rule
    for key in cell_keys(lay):
        if key in hidden and (key not in primary or key in forced):
            continue  # complementary suppression: not declared at all
        section_key, name = wire_name(key)
        _table(release, section_key, cohort_facts).count(name, counts[key])

    state = TableState(designs={}, families={})
    for i, v in enumerate(lay.variables):
        if v.show == "summary":
            state.variables[i] = _summaries(
                release, spec, lay, i, rows, groups, cohort, hidden | forced, checker, rules
            )
    earlier = runtime.prepared.get(task.study_hash)
    if isinstance(earlier, TableState):  # the same study again: its thresholds still count
        for i, v in state.variables.items():
            if i in earlier.variables:
                v.answered = {c: list(ts) for c, ts in earlier.variables[i].answered.items()}
    release.after(lambda: runtime.remember(task.study_hash, state))
    return release


class CellRows:
    """The rows of the dataset behind each count cell of a table (dataset row numbers)."""

    def __init__(self, lay: Layout, cohort, rows: pd.DataFrame, groups, in_column, steps):
        self.lay, self.steps, self.in_column = lay, steps, in_column
        self.cohort_positions = np.flatnonzero(cohort)
        self.groups, self.rows = groups, rows
        self._codes: dict[int, np.ndarray] = {}

    def positions(self, key: tuple) -> np.ndarray:
        column = key[-1]
        if key[0] == "v":
            i, r = key[1], key[2]
            if i not in self._codes:
                self._codes[i] = _row_codes(self.rows, self.lay.variables[i])
            keep = self._codes[i] == r
            if column:
                keep &= self.groups == column
            return self.cohort_positions[keep]
        mask = self.steps[0] if key[0] == "N" else self.steps[key[1]]
        if column:
            mask = mask & (self.in_column == column)
        return np.flatnonzero(mask)


def _suppress_and_audit(runtime, counts, primary, forced, leaving, lay, cells: CellRows, rules):
    """(hidden cells, the audit of the cells shown): secondary suppression, then the
    differencing audit of the shown cells' rows (node/cell_audit.py); a cell it finds is
    withheld like a small one and suppression runs again around it, until nothing more is
    found. The audit's last judgement is of the cells shown (`CellAudit.facts`)."""
    empty = {key for key, n in counts.items() if n == 0}
    audit = CellAudit(runtime, cells.steps[0], rules, relations(lay), empty)
    withheld = set(forced)
    while True:
        hidden = suppress(counts, primary, relations(lay), leaving, hidden=withheld)
        shown = [key for key in cell_keys(lay) if key not in hidden and round_count(counts[key], rules)]
        differs = audit.differing((key, cells.positions(key)) for key in shown)
        if not differs:
            return hidden, audit
        withheld |= differs


def _study(payload: dict) -> StudySpec:
    models = payload.get("models")
    if not isinstance(models, dict) or len(models) != 1:
        raise DataError("a table task carries exactly one study.")
    spec = StudySpec.from_wire(next(iter(models.values())))
    if spec.kind != "table":
        raise DataError("the task's study is not a table study.")
    return spec


def _table(release: Release, key: str, facts: ModelFacts):
    for section in release.sections:
        if section.kind == "table" and section.key == key:
            return section
    return release.table(key, facts=facts)


def _group_codes(rows: pd.DataFrame, lay: Layout) -> np.ndarray:
    """Each cohort row's `by` column: 1..K its level, K+1 missing; 0 for all without a `by`."""
    if not lay.by:
        return np.zeros(len(rows), dtype=np.int64)
    col = rows[lay.by]
    if isinstance(col.dtype, pd.CategoricalDtype):
        codes = col.cat.codes.to_numpy().astype(np.int64)
    else:  # binary: 0/1/NaN
        values = col.to_numpy(dtype=float)
        codes = np.where(np.isnan(values), -1, values).astype(np.int64)
    return np.where(codes < 0, len(lay.by_levels), codes) + 1


def _column_counts(groups: np.ndarray, lay: Layout) -> list[int]:
    """Rows per column (overall first) from the rows' `by` columns."""
    per = np.bincount(groups, minlength=lay.n_columns)
    per[0] = len(groups)
    return [int(n) for n in per]


def _row_codes(rows: pd.DataFrame, v) -> np.ndarray:
    """Each cohort row's row of the variable's block: its level (or recorded), else missing."""
    col = rows[v.name]
    if v.show == "summary":
        return np.isnan(col.to_numpy(dtype=float)).astype(np.int64)
    if isinstance(col.dtype, pd.CategoricalDtype):
        codes = col.cat.codes.to_numpy().astype(np.int64)
    else:
        values = col.to_numpy(dtype=float)
        codes = np.where(np.isnan(values), -1, values).astype(np.int64)
    return np.where(codes < 0, len(v.rows) - 1, codes)


def _counts(rows: pd.DataFrame, groups: np.ndarray, lay: Layout) -> dict[tuple, int]:
    counts: dict[tuple, int] = {}
    for c, n in enumerate(_column_counts(groups, lay)):
        counts[("N", c)] = n
    width = lay.n_columns
    for i, v in enumerate(lay.variables):
        codes = _row_codes(rows, v)
        table = np.bincount(codes * width + groups, minlength=len(v.rows) * width).reshape(len(v.rows), width)
        if lay.by:
            table[:, 0] = table[:, 1:].sum(axis=1)
        for r in range(len(v.rows)):
            for c in range(width):
                counts[("v", i, r, c)] = int(table[r, c])
    return counts


def _funnel_masks(frame: pd.DataFrame, cohort: np.ndarray, lay: Layout) -> list[np.ndarray]:
    """Rows at each step: the cohort, then cumulatively each step's filter."""
    masks = [cohort]
    for text in lay.funnel:
        masks.append(masks[-1] & cohort_mask(frame, cohort_filter.parse(text)))
    return masks


def _summaries(
    release: Release,
    spec: StudySpec,
    lay: Layout,
    i: int,
    rows: pd.DataFrame,
    groups: np.ndarray,
    cohort: np.ndarray,
    hidden: set,
    checker: SubsetCheck,
    rules,
) -> VariableState:
    """Declare the exact (n, mean, centred sum of squares) of a numeric variable per column,
    withholding those the policy would refuse (see the module docstring)."""
    v = lay.variables[i]
    values = rows[v.name].to_numpy(dtype=float)
    recorded = ~np.isnan(values)
    positions = np.flatnonzero(cohort)
    mask = np.zeros(len(cohort), dtype=bool)
    mask[positions[recorded]] = True
    everyone, every_group = np.where(recorded, values, 0.0), groups  # for the audit: one base per column
    values, groups = values[recorded], groups[recorded]
    columns = range(lay.n_columns)
    candidates, released = {}, []
    for c in columns:
        in_c = np.ones(len(values), dtype=bool) if c == 0 else groups == c
        part = np.zeros(len(cohort), dtype=bool)
        part[positions[recorded][in_c]] = True
        x = values[in_c]
        off_mode = len(x) - int(np.unique(x, return_counts=True)[1].max()) if len(x) else 0
        # The audit compares the variable, 0 where it is not recorded, on the column's rows:
        # the same vector, on rows every variable of the column shares.
        in_column = np.ones(len(every_group), dtype=bool) if c == 0 else every_group == c
        column_rows = np.zeros(len(cohort), dtype=bool)
        column_rows[positions[in_column]] = True
        facts = ModelFacts(
            f"{spec.name}: {v.name}, column {c}",
            part,
            levels=[LevelCount(v.name, None, off_mode, "leave the variable out of the table")],
            columns=[(v.name, everyone[in_column])],
            column_rows=column_rows,
            span=False,
        )
        candidates[c] = (facts, x)
        # An empty cell is released as empty (the table shows its count, 0, anyway).
        ok = (
            ("v", i, 1, c) not in hidden
            and (not len(x) or not check_size(facts, rules))
            and not check_model(facts, rules)
        )
        if ok and len(x):
            ok = checker.allows(facts, commit=False)
            if ok:
                checker.hold(facts)
        if ok:
            released.append(c)
    checker.drop_held()
    released = _protect_row(released, candidates, lay)
    for c in released:
        facts, x = candidates[c]
        if len(x):
            checker.accept(facts)
        else:
            facts.cohort = False  # an empty cell: shown as empty, like its count of 0
        with np.errstate(over="ignore", invalid="ignore"):  # near a float's limits: not finite, refused below
            mean = float(x.mean()) if len(x) else 0.0
            m2 = float(np.sum((x - mean) ** 2)) if len(x) else 0.0
        section = release.model(contract.summary_key(i, c), facts, group="summaries")
        section.value("n", int(len(x)))
        section.value("mean", mean)
        section.value("m2", m2)
    label = f"{spec.name}: {v.name} recorded"
    return VariableState(ModelFacts(label, mask, span=False), values, groups, tuple(released), name=v.name)


def _protect_row(released: list[int], candidates: dict, lay: Layout) -> list[int]:
    """The overall summary is the sum of the columns' ones: never withhold exactly one."""
    if not lay.by:
        return released
    members = [0, *lay.group_columns]
    kept = list(released)
    while sum(1 for c in members if c not in kept) == 1:
        sizes = {c: len(candidates[c][1]) for c in kept if c != 0}
        nonzero = [c for c in sizes if sizes[c] > 0]
        drop = min(nonzero, key=lambda c: (sizes[c], c)) if nonzero else 0
        if drop not in kept:
            break
        kept.remove(drop)
    return kept


class SubsetCheck:
    """The differencing audit, asked before declaring a row set so that a cell can be
    withheld instead of the task refused: against everything the node released before on
    this data and the sets accepted in this task (node/release_memory.py)."""

    def __init__(self, runtime: NodeRuntime, version: str, n: int, rules):
        self.runtime, self.version, self.n, self.rules = runtime, version, n, rules
        self.accepted: list = []  # footprints accepted in this task
        self.held: list = []  # candidates of one variable, not yet accepted

    def allows(self, facts: ModelFacts, commit: bool = True) -> bool:
        footprint = facts.footprint()
        with self.runtime.memory.transaction() as memory:
            problems = memory.audit_release(
                [footprint], self.version, self.n, self.rules, vetted=[*self.accepted, *self.held]
            )
        if problems:
            withheld_by_audit()
            return False
        if commit:
            self.accepted.append(footprint)
        return True

    def hold(self, facts: ModelFacts) -> None:
        self.held.append(facts.footprint())

    def drop_held(self) -> None:
        self.held = []

    def accept(self, facts: ModelFacts) -> None:
        self.accepted.append(facts.footprint())


# --------------------------------------------------------------------------- describe.quantiles


@handler(QUANTILE_TASK, studies="prepared")
def describe_quantiles(runtime: NodeRuntime, task) -> Release:
    state = runtime.recall(task.study_hash)
    if not isinstance(state, TableState):
        raise DataError("this node did not prepare the study as a table.")
    rules = task_rules()
    queries = _queries(task.arrays, state)
    minimum = max(rules.min_level_count, rules.min_subset_difference)
    release = Release()
    dataset = runtime.dataset
    with runtime.memory.transaction() as memory:
        remembered = memory.releases(dataset.data_version, dataset.n_rows)
        across = _ThresholdsAcross(memory, state, task.study_hash, dataset, minimum)
    accepted: list[np.ndarray] = []  # threshold row sets answered in this task (packed)
    work = {i: {c: list(ts) for c, ts in v.answered.items()} for i, v in state.variables.items()}
    for i, c, j, t in queries:
        v = state.variables[i]
        if c not in v.released:
            continue  # the column's summary did not leave the node: nothing to count in
        base = v.base(c)
        below = base & (v.values <= t)
        count = int(below.sum())
        if not _outside_tails(v, c, count, minimum):
            continue
        answered = work[i]
        released = [(col, s) for col, ts in answered.items() for s in ts] + [(c, t)]
        if isolates_few(v, released, minimum):
            continue
        rows = np.zeros(v.facts.rows.size, dtype=bool)
        rows[np.flatnonzero(v.facts.rows)[below]] = True
        threshold_facts = ModelFacts(
            f"{v.facts.label} at or below a threshold", rows, cohort=False, combine=False, span=False
        )
        if remembered.set_differs_by_few(rows, accepted, rules.min_subset_difference):
            withheld_by_audit()
            continue  # the same count differs by a few people from a row set released before
        if not across.allows(i, c, v, rows):
            withheld_by_audit()
            continue  # combined with other studies' thresholds on the variable, it isolates a few
        weights = below  # 0/1: the rows counted (the policy's checks count them directly)
        history = [base] + [(base & (v.values <= s)) for s in _neighbours(answered.get(c, []), t)]
        section = release.round(
            contract.threshold_key(i, c, j),
            v.facts,
            coefficients=np.array([t]),
            weights={WEIGHTS: weights},
            history={WEIGHTS: history},
            bounded=False,
            group="thresholds",
        )
        if check_round(section, rules):
            release.sections.remove(section)
            continue
        accepted.append(np.packbits(rows))
        across.accept(i)
        section.value("count", count)
        release.model(
            contract.threshold_key(i, c, j), threshold_facts, group="threshold_rows"
        )  # remembered, sends nothing
        answered.setdefault(c, []).append(t)

    def commit():
        for i, answered in work.items():
            state.variables[i].answered = answered

    release.remember(across.remember)  # before the counts leave: a later study is judged with them
    release.after(commit)
    return release


class _ThresholdsAcross:
    """The thresholds of one variable across table studies (class 1 of issue 9): counts at
    thresholds on several cohorts combine like any exact counts (everyone, minus age < 50,
    minus age > 51, at one threshold, counts the people aged 50 or 51 below it), so every
    threshold set answered is remembered per variable with the rows of its column, on disk,
    and once another study has bisected the same variable each new one is judged with all of
    them by the differencing audit's combination test (node/differencing.py). Within one study
    `isolates_few` judges its own columns' bins exactly, so a variable only this study has
    bisected in this process costs nothing more than remembering; after a restart, the study's
    earlier thresholds are judged with from the memory on disk."""

    def __init__(self, memory, state: TableState, study_hash: str, dataset, minimum: int):
        self.runtime_memory, self.study_hash, self.minimum = memory, study_hash, minimum
        self.version, self.n = dataset.data_version, dataset.n_rows
        self.pending: dict[int, list] = {}  # variable -> footprints of this task's thresholds
        self.candidate: tuple | None = None
        self.bases: dict[tuple[int, int], Footprint] = {}  # (variable, column) -> its rows
        self.memories, self.others = {}, {}
        for i, v in state.variables.items():
            self.memories[i] = memory.thresholds(v.name, self.version, self.n)
            studies = memory.threshold_studies(v.name, self.version)
            if v.bisected_before is None:  # a restarted node does not know its earlier bins
                v.bisected_before = study_hash in studies
            self.others[i] = bool(studies - {study_hash}) or v.bisected_before
        self.names = {i: v.name for i, v in state.variables.items()}

    def allows(self, i: int, c: int, v: VariableState, rows: np.ndarray) -> bool:
        label = f"{v.facts.label}, column {c}"
        if (i, c) not in self.bases:  # one footprint per column: packed and digested once
            base = np.zeros(self.n, dtype=bool)
            base[np.flatnonzero(v.facts.rows)[v.base(c)]] = True
            self.bases[(i, c)] = Footprint(label, base)
        pair = [self.bases[(i, c)], Footprint(f"{label} at or below a threshold", rows)]
        self.candidate = (i, pair)
        if not self.others[i]:
            return True
        findings = self.memories[i].audit(pair, self.minimum, vetted=self.pending.get(i, []))
        return not findings

    def accept(self, i: int) -> None:
        j, pair = self.candidate
        self.pending.setdefault(j, []).extend(pair)

    def remember(self) -> None:
        if not self.pending:
            return
        with self.runtime_memory.transaction() as memory:
            for i, footprints in self.pending.items():
                memory.thresholds(self.names[i], self.version, self.n).remember(footprints, self.minimum)
                memory.add_threshold_study(self.names[i], self.version, self.study_hash)


def _outside_tails(v: VariableState, column: int, count: int, minimum: int) -> bool:
    """The tails of a column's values are one cell: a threshold is answered only if at least
    `minimum` rows lie on each side of it, or none on one side when the extreme value there
    is shared by at least `minimum` rows. So a threshold among (or beyond) the few smallest or
    largest values is withheld alike, bisection can find neither the minimum nor the maximum
    (only the minimum-th value from either end), and 0 rows is never told from a few."""
    key = ("ties", column)
    if key not in v._cache:
        x = v.values[v.base(column)]
        v._cache[key] = (
            int(np.count_nonzero(x == x.min())) if x.size else 0,
            int(np.count_nonzero(x == x.max())) if x.size else 0,
            int(x.size),
        )
    bottom, top, n = v._cache[key]
    above = n - count
    low_ok = count >= minimum or (count == 0 and bottom >= minimum)
    high_ok = above >= minimum or (above == 0 and top >= minimum)
    return low_ok and high_ok


def _queries(arrays: dict, state: TableState) -> list[tuple[int, int, int, float]]:
    """(variable, column, index, threshold) for every threshold sent, checked."""
    out = []
    for name, values in sorted(arrays.items()):
        found = contract.parse_thresholds_array_key(name)
        if found is None:
            raise DataError("the task's thresholds are not named t/<variable>/<column>.")
        i, c = found
        if i not in state.variables:
            raise DataError("the task asks for thresholds of a variable the table does not summarise.")
        values = np.asarray(values, dtype=float).ravel()
        if not np.all(np.isfinite(values)):
            raise DataError("the task's thresholds are not all finite numbers.")
        out += [(i, c, j, float(t)) for j, t in enumerate(values)]
    if len(out) > MAX_THRESHOLDS:
        raise DataError(f"the task sends more than {MAX_THRESHOLDS} thresholds.")
    return out


def isolates_few(v: VariableState, released: list[tuple[int, float]], minimum: int) -> bool:
    """Whether some combination of the exact counts released for a variable (each released
    column's n, and the rows at or below each threshold answered in a column) counts only
    cells of 1 to minimum-1 rows, where the cells are the `by` groups cut at every threshold:
    then a small group of people could be singled out by differencing. Linear algebra over
    the cells: no vector of the counts' span may vanish on the larger cells and not on the
    small ones (empty cells are free)."""
    thresholds = np.array(sorted({t for _, t in released}), dtype=float)
    groups = v.group_list()
    width = len(thresholds) + 1
    sizes = []
    for g in groups:
        at = np.searchsorted(v.sorted_values(g), thresholds, side="right")
        sizes.append(np.diff(np.concatenate([[0], at, [len(v.sorted_values(g))]])))
    sizes = np.concatenate(sizes)
    small = (sizes > 0) & (sizes < minimum)
    if not small.any():
        return False
    rows = [(c, t) for c, t in released] + [(c, np.inf) for c in v.released]
    matrix = np.zeros((len(rows), len(groups) * width))
    for r, (c, t) in enumerate(rows):
        upto = width if np.isinf(t) else int(np.searchsorted(thresholds, t)) + 1
        for j, g in enumerate(groups):
            if c == 0 or c == g:
                matrix[r, j * width : j * width + upto] = 1.0
    big = sizes >= minimum
    combos = scipy.linalg.null_space(matrix[:, big].T) if big.any() else np.eye(len(rows))
    return combos.size > 0 and not float(np.abs(matrix[:, small].T @ combos).max()) <= 1e-9  # NaN: isolates


def _neighbours(answered: list[float], t: float) -> list[float]:
    """The nearest thresholds answered in the column below and above t."""
    below = [s for s in answered if s <= t]
    above = [s for s in answered if s > t]
    return ([max(below)] if below else []) + ([min(above)] if above else [])

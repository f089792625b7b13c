"""The node half of an interrupted time series (`kind = "its"`): the study's columns.

`its.columns` computes, for every row of this node, the segmented-regression columns of the
study (protocol/kinds/its.py) from its own group and time values and the change dates the
study names: `after_change`, `time_after_change` and `denominator`. It keeps them at the node
(`runtime.remember_columns`, keyed by the study's hash) for the GLM tasks that fit the
models (their specs name the columns in `augment`); the columns never leave the node.

It releases a count table of the cohort per group level and period (before / after the
change), and for the groups it holds per time value (month) too: referrals, events (sum of
the outcome) and denominator (sum), under the Trust's small-number rules (1-7 suppressed,
others rounded), with complementary suppression (protocol/sdc.py): each group's before and
after counts add up to the group's count, which the fitted models give exactly, so when one
period is suppressed the other is hidden too, even a 0; and a period is the sum of its
months, so a suppressed month hides another month of its period. The events and denominator of a period are sums over its referrals: they are
released only when its referrals are shown and number at least the policy's
`min_level_count` (or none), never as a sum over a few people; hidden ones are not released
at all. The table's rows are the models' complete cases, so the subset rule sees one row set
for the whole study.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..protocol.kinds import its as protocol
from ..protocol.sdc import Relation, round_count, suppress
from . import glm
from .cell_audit import CellAudit
from .cohort import cohort_mask
from .disclosure import Release, task_rules
from .registry import handler

PERIODS = ("before", "after")
WHAT = ("referrals", "events", "denominator")


@handler(protocol.TASK, studies="payload")
def its_columns(runtime, task) -> Release:
    dataset = runtime.dataset
    key, spec = glm.single_study(task.payload, dataset.schema, "its")
    dataset = dataset.for_study(spec)  # the service column with the network's levels
    p = protocol.check_at_node(spec, dataset.schema)
    frame = dataset.frame
    columns = study_columns(frame, p)
    complete = (
        (columns[protocol.DENOMINATOR].to_numpy() > 0)
        & columns[protocol.AFTER].notna().to_numpy()
        & frame[p["outcome"]].notna().to_numpy()
    )
    rows = cohort_mask(frame, spec.where_tree()) & complete
    rules = task_rules()
    release = Release()
    group = frame[p["group"]].astype(object).to_numpy()
    after = columns[protocol.AFTER].to_numpy()
    outcome = frame[p["outcome"]].to_numpy(dtype=float, na_value=np.nan)
    denominator = columns[protocol.DENOMINATOR].to_numpy()
    time = frame[p["time"]].to_numpy(dtype=float, na_value=np.nan)
    counts, months, cells = {}, {}, {}
    for level in dataset.schema[p["group"]].levels:
        for flag, period in enumerate(PERIODS):
            cell = rows & (group == level) & (after == flag)
            counts[(level, period, "referrals")] = int(cell.sum())
            cells[(level, period, "referrals")] = np.flatnonzero(cell)
            counts[(level, period, "events")] = float(outcome[cell].sum())
            counts[(level, period, "denominator")] = float(denominator[cell].sum())
            # The period month by month (the series a report draws), for the groups this
            # node holds: each month a cell of its own, under the same rules.
            if cell.any():
                for month in np.unique(time[cell]).astype(int):
                    in_month = cell & (time == month)
                    months.setdefault((level, period), []).append(month_key(month))
                    counts[(level, month_key(month), "referrals")] = int(in_month.sum())
                    cells[(level, month_key(month), "referrals")] = np.flatnonzero(in_month)
                    counts[(level, month_key(month), "events")] = float(outcome[in_month].sum())
                    counts[(level, month_key(month), "denominator")] = float(denominator[in_month].sum())
    # Rounded counts are still counts: a shown cell whose rows differ by a few people from a
    # row set released before is withheld like a small one (node/cell_audit.py), and its
    # cells' rows are remembered with the release.
    audit, differing = CellAudit(runtime, rows, rules), set()
    while True:
        small, hidden, withheld = segment_suppression(counts, rules, months, differing)
        shown = [
            k
            for k in cells
            if k not in hidden and k not in withheld and round_count(counts[k], rules.suppress_max, rules.round_to)
        ]
        found = audit.differing((k, cells[k]) for k in shown)
        if not found:
            break
        differing |= found
    # The cohort and the months and periods shown join the span of released columns
    # (node/cell_audit.py).
    facts = audit.facts(f"{spec.name} (segments)")
    table = release.table(key, facts=facts, group="segments")
    for key, n in counts.items():
        if key in withheld or (key in hidden and key not in small):
            continue  # not released at all
        table.count("/".join(key), n)  # a small count is released as suppressed
    release.public("data_version", dataset.data_version)
    release.after(lambda: runtime.remember_columns(spec.hash, columns))
    return release


def month_key(month: int) -> str:
    """The count table's name of one time value (`m45`), beside `before` and `after`."""
    return f"m{int(month)}"


def segment_suppression(
    counts: dict, rules, months: dict | None = None, differing: set = frozenset()
) -> tuple[set, set, set]:
    """(small, hidden, withheld) cells of the count table {(level, period, what): n}, where a
    period is `before`, `after` or a month (`m45`). Each group's (before, after) of each
    count is a relation whose total the models release exactly, and each period is the sum
    of its months (`months`: {(level, period): [month keys]}), so a hidden month hides
    another of its period (or the period). The sums of a cell whose referrals are hidden or
    fewer than min_level_count (but not none) are withheld, and hiding them can hide more:
    repeated until stable. `differing`: referral cells the differencing audit withholds
    (node/cell_audit.py), with their sums."""
    levels = dict.fromkeys(level for level, _, _ in counts)
    values, relations = dict(counts), []
    for level in levels:
        for what in WHAT:
            before, after = (level, "before", what), (level, "after", what)
            values[(level, "total", what)] = counts[before] + counts[after]
            relations.append(Relation((level, "total", what), (before, after), implicit=True))
    for (level, period), keys in (months or {}).items():
        for what in WHAT:
            relations.append(Relation((level, period, what), tuple((level, key, what) for key in keys)))
    small = {key for key, n in counts.items() if round_count(n, rules.suppress_max, rules.round_to) is None}
    few = {
        (level, period)
        for level, period, what in counts
        if what == "referrals" and 0 < counts[(level, period, what)] < rules.min_level_count
    }
    withheld: set = {(level, period, what) for level, period, _ in differing for what in WHAT}
    while True:
        hidden = suppress(values, small, relations, hidden=withheld)
        sums = {
            (level, period, what)
            for level, period, kind in hidden | {(*lp, "referrals") for lp in few}
            if kind == "referrals"
            for what in WHAT[1:]
        }
        if sums <= withheld:
            return small, hidden, withheld
        withheld |= sums


def study_columns(frame: pd.DataFrame, p: dict) -> pd.DataFrame:
    """after_change, time_after_change and denominator for every row (missing where the
    group, the time or a denominator column is missing); aligned with the dataset's rows."""
    time = frame[p["time"]].to_numpy(dtype=float, na_value=np.nan)
    group = frame[p["group"]].astype(object)
    change = group.map(lambda v: p["changes"].get(v) if isinstance(v, str) else None)
    change = pd.to_numeric(change, errors="coerce").to_numpy(dtype=float)
    known = np.isfinite(time) & group.notna().to_numpy()
    after = np.where(np.isfinite(change) & (time >= change), 1.0, 0.0)
    since = np.where(after == 1.0, time - change, 0.0)
    after[~known] = np.nan
    since[~known] = np.nan
    denominator = np.zeros(len(frame))
    for column in p["denominator"]:
        denominator = denominator + frame[column].to_numpy(dtype=float, na_value=np.nan)
    return pd.DataFrame(
        {protocol.AFTER: after, protocol.SINCE: since, protocol.DENOMINATOR: denominator}, index=frame.index
    )

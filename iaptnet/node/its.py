"""The node half of an interrupted time series (`kind = "its"`): the study's columns.

`its.columns` computes, for every row of this node, the segmented-regression columns of the
study (protocol/kinds/its.py) from its own group and time values and the change dates the
study names: `after_change`, `time_after_change` and `denominator`. It keeps them at the node
(`runtime.remember_columns`, keyed by the study's hash) for the GLM tasks that fit the
models (their specs name the columns in `augment`); the columns never leave the node.

It releases a count table of the cohort per group level and period (before / after the
change): referrals, events (sum of the outcome) and denominator (sum), under the Trust's
small-number rules (1-7 suppressed, others rounded). The events and denominator of a cell are
sums over the cell's referrals, so when the referral count of a cell is suppressed they are
not released at all (a sum over 1-7 people). The table's rows are the models' complete cases,
so the subset rule sees one row set for the whole study.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..protocol.kinds import its as protocol
from . import glm
from .cohort import cohort_mask
from .disclosure import ModelFacts, Release
from .handlers import handler, task_rules

PERIODS = ("before", "after")


@handler(protocol.TASK, studies="payload")
def its_columns(runtime, task) -> Release:
    dataset = runtime.dataset
    key, spec = glm.single_study(task.payload, dataset.schema, "its")
    p = protocol.check_at_node(spec, dataset.schema)
    frame = dataset.frame
    columns = study_columns(frame, p)
    complete = (columns[protocol.DENOMINATOR].to_numpy() > 0) & columns[protocol.AFTER].notna().to_numpy() \
        & frame[p["outcome"]].notna().to_numpy()
    rows = cohort_mask(frame, spec.where_tree()) & complete
    rules = task_rules()
    release = Release()
    table = release.table(key, facts=ModelFacts(f"{spec.name} (segments)", rows), group="segments")
    group = frame[p["group"]].astype(object).to_numpy()
    after = columns[protocol.AFTER].to_numpy()
    outcome = frame[p["outcome"]].to_numpy(dtype=float, na_value=np.nan)
    denominator = columns[protocol.DENOMINATOR].to_numpy()
    for level in dataset.schema[p["group"]].levels:
        for flag, period in enumerate(PERIODS):
            cell = rows & (group == level) & (after == flag)
            n = int(cell.sum())
            table.count(f"{level}/{period}/referrals", n)
            if n == 0 or n > rules.suppress_max:
                table.count(f"{level}/{period}/events", float(outcome[cell].sum()))
                table.count(f"{level}/{period}/denominator", float(denominator[cell].sum()))
    release.public("data_version", dataset.data_version)
    release.after(lambda: runtime.remember_columns(spec.hash, columns))
    return release


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
    return pd.DataFrame({protocol.AFTER: after, protocol.SINCE: since,
                         protocol.DENOMINATOR: denominator}, index=frame.index)

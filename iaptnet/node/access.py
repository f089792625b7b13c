"""The node half of an access study: referrals per level of each grouping variable.

For each access study in the task the node takes its referrals in the study's period (and
`where`), keeps those with every grouping variable recorded, applies the study's level merges,
leaves out referrals in groups that have no population in its catchment (listed in the study,
from the denominators: a rate needs a population), and releases:

- as **model statistics** (exact, `margins/<key>/<variable>` arrays and `n_used`): the number
  of those referrals at each level of each grouping variable. For a Poisson log-linear model of
  referrals by group with the population as exposure these one-way margins (with the node's
  total) are the sufficient statistics: the coordinator, who holds the populations, computes
  every fitted mean, score and information matrix itself, so the fit is exact without any cell
  of the cross-classification leaving the node. They are guarded by the model rules over the
  facts of the rows counted: at least `min_rows` referrals, no level with 1..min_level_count-1
  referrals (0 is allowed), and the subset rule (the rows counted must not differ by a few
  people from the whole dataset or from any row set released before, which stops differencing
  two cohorts' margins).
- as a **count table** (`counts/<key>`), under the node's small-number rules (1-7 suppressed,
  others rounded to 5 by default): the same margins, the rows counted, the rows in the cohort,
  the rows left out for a missing grouping variable and those left out for a group without
  population. The coordinator shows these, not the exact
  margins, in the per-area rate tables, so what is displayed for this node follows its policy.
"""

from __future__ import annotations

import numpy as np

from ..protocol.errors import DataError
from ..protocol.kinds.access import DATE_COLUMN, TASK, margins_key, node_settings
from ..protocol.study import check_at_node
from .cohort import cohort_mask
from .design import apply_merges
from .disclosure import LevelCount, ModelFacts, Release, require_rows, task_rules
from .glm import studies_from_payload
from .registry import handler
from .runtime import NodeRuntime


@handler(TASK, studies="payload")
def access_counts(runtime: NodeRuntime, task) -> Release:
    dataset = runtime.dataset
    release = Release()
    for key, spec in studies_from_payload(task.payload).items():
        count_referrals(dataset, key, spec, release, runtime.name)
    release.public("data_version", dataset.data_version)
    return release


def count_referrals(dataset, key: str, spec, release: Release, node: str) -> None:
    """Declare one study's margins (model statistics) and its count table."""
    dataset = dataset.for_study(spec)  # the service column with the network's levels
    schema = dataset.schema
    check_at_node(spec, schema)
    settings = node_settings(spec, schema, node)
    frame = dataset.frame
    in_period = (
        "and",
        [
            ("cmp", ">=", ("col", DATE_COLUMN), ("str", settings.first)),
            ("cmp", "<=", ("col", DATE_COLUMN), ("str", settings.last)),
        ],
    )
    tree = spec.where_tree()
    cohort = cohort_mask(frame, ("and", [tree, in_period]) if tree else in_period)
    groups = frame.loc[cohort, list(settings.by)]
    complete = groups.notna().all(axis=1).to_numpy()
    rows = apply_merges(groups.loc[complete], spec)
    counted = np.ones(len(rows), dtype=bool)
    if settings.no_population:
        keys = zip(*(rows[var].astype(str) for var in settings.by))
        counted = np.fromiter((k not in settings.no_population for k in keys), dtype=bool, count=len(rows))
        rows = rows.loc[counted]
    used = np.zeros_like(cohort)
    used[np.flatnonzero(cohort)[complete][counted]] = True
    require_rows(used, spec.name, task_rules())
    n = int(used.sum())
    positions = np.flatnonzero(used)
    margins, levels, indicators = {}, [], []
    for var in settings.by:
        values = rows[var]
        if list(values.cat.categories) != settings.levels[var]:
            raise DataError(f"the column '{var}' does not have the schema's levels at this node.")
        counts = values.value_counts(sort=False).reindex(settings.levels[var], fill_value=0)
        margins[var] = counts.to_numpy(dtype=float)
        codes = values.cat.codes.to_numpy()
        for k, level in enumerate(settings.levels[var]):
            if counts.iloc[k]:
                indicators.append((f"{var}={level}", positions[codes == k]))  # each margin counts these rows exactly
        for level, count in counts.items():
            levels.append(
                LevelCount(
                    var,
                    str(level),
                    int(count),
                    f"merge '{level}' with another level of {var} ([merge.{var}]) "
                    f"or leave {var} out of the study's 'by'",
                )
            )
    # Parameters: the columns of the main-effects model this node has referrals for.
    parameters = 1 + sum(max(int(np.count_nonzero(c)) - 1, 0) for c in margins.values())
    facts = ModelFacts(
        spec.name, used, parameters=parameters, family="poisson", events=n, levels=levels, indicators=indicators
    )
    section = release.model(key, facts, group="access")
    section.value("n_used", n)
    section.value("by", list(settings.by))
    for var, counts in margins.items():
        section.array(margins_key(key, var), counts)
    table = release.table(key, facts=facts, group="counts")
    table.count("n_used", n)
    table.count("n_cohort", int(cohort.sum()))
    table.count("n_missing", int((~complete).sum()))
    table.count("n_no_population", int((~counted).sum()))
    for var, counts in margins.items():
        for level, count in zip(settings.levels[var], counts):
            table.count(f"{var}={level}", count)

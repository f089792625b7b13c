"""Node half of propensity-score studies (`kind = "psm"` and `"iptw"`): scoring, matching,
weighting and balance on this node's own rows.

The propensity model and the outcome model are ordinary GLMs of the study (glm.prepare and
glm.round; protocol/kinds/propensity.py derives them). In between, two task kinds:

- `propensity.score` (β of the pooled propensity model): the node scores the rows of the
  propensity model's design (the cohort, built once by glm.prepare and reused here: the same
  rows at every step), keeps the logits, and releases per exposure group (n, mean, M2) of the
  logit, so the coordinator pools the SD of the logit exactly for the caliper, and the balance
  before matching or weighting: per group (n, mean, M2) of every design column. For IPTW it
  also computes the weights (kept) and releases per group their sum and sum of squares and
  the weighted mean of every design column (balance after weighting).
- `propensity.match` (PSM; the caliper on the logit scale): the node matches within its own
  rows (node/matching.py) and keeps the pair of each matched row; it releases the number of
  pairs and, per design column, the sum over pairs of (exposed minus control), which is all
  the balance after matching needs, and the matching counts as a count table.

What is kept (logits, pair ids, weights) lives in `runtime.augments` under the study's state
key and is never sent; the outcome model reads it as the columns `pair_id` / `iptw_weight`.

What the policy sees:
- the logit moments and the weights are statistics at coefficients the coordinator chose: a
  *round* release whose row vectors (logits, weights) must not rest on or single out a few
  rows, with the logits of an earlier score task of the study as history;
- the balance moments over the cohort are exact *model* statistics under the propensity
  model's own facts (judged when it was prepared); because they are sums over each exposure
  group, the exposed rows and the control rows are declared as row sets too, so the subset
  rule keeps any later release from differing from them by a few people;
- the matched set is declared with its own facts (minimum rows, pairs as events, the subset
  rule against the cohort and every other row set). Over it only sums of pair differences
  leave, never a sum over one group: the matched exposed could otherwise be subtracted from
  the cohort's exposed, and when a few exposed find no control, their covariates would show.
- the matching counts are a count table (small-number rules).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..protocol.errors import DataError
from ..protocol.kinds import propensity as kind
from ..protocol.study import StudySpec
from . import glm
from .design import DesignedModel
from .disclosure import ModelFacts, Release, task_rules
from .matching import leave_none_or_many_unmatched, match_nearest
from .registry import handler
from .runtime import NodeRuntime

GROUPS = (("exposed", 1.0), ("control", 0.0))


@handler(kind.TASK_SCORE, studies="payload")
def propensity_score(runtime: NodeRuntime, task) -> Release:
    key, _, parent = _study(task.payload)
    design, facts = _ps_design(runtime, task.study_hash, key)
    beta = task.arrays.get("beta")
    if beta is None or len(task.arrays) != 1 or beta.shape != (design.X.shape[1],):
        raise DataError("the task's coefficients do not fit the study's propensity model.")
    state = kind.state_key(parent)
    previous = runtime.augments.get(state)
    history = {}
    if previous is not None and kind.LOGIT_COLUMN in previous:
        history = {"logit": [previous[kind.LOGIT_COLUMN].to_numpy()[design.mask]]}
    release = Release()
    finite = bool(np.all(np.isfinite(beta)))
    logit = _logit(design, beta) if finite else np.zeros(design.n)
    exposed = design.y == 1
    weights = {"logit": logit}
    ipw = None
    if parent.kind == "iptw" and finite:
        ipw = iptw_weights(logit, exposed, parent.params, task.payload.get("marginal"))
        weights["inverse probability weight"] = ipw
    section = release.round(
        "propensity", facts, coefficients=beta, weights=weights, history=history, group="propensity"
    )
    cohort = release.model("balance", facts, group="propensity")
    _declare_groups(release, parent, "cohort", design.mask, np.ones(design.n, dtype=bool), design.y)
    columns = np.column_stack([logit, design.X])  # balance rows: the logit, then the design
    for name, value in GROUPS if finite else ():  # (not finite: the round check refuses)
        rows = design.y == value
        n, mean, m2 = moments(logit[rows, None])
        section.array(kind.logit_key(name), [n, mean[0], m2[0]])
        n, mean, m2 = moments(columns[rows])
        cohort.array(kind.before_key(name, "n"), [n]).array(kind.before_key(name, "mean"), mean)
        cohort.array(kind.before_key(name, "m2"), m2)
        if ipw is not None:
            w = ipw[rows]
            section.array(kind.weights_key(name), [float(w.sum()), float(np.dot(w, w))])
            wmean = (w @ columns[rows]) / w.sum() if w.size else np.zeros(columns.shape[1])
            cohort.array(kind.weighted_mean_key(name), wmean)
    frame = pd.DataFrame(index=runtime.dataset.frame.index)
    frame[kind.LOGIT_COLUMN] = _spread(logit, design.mask)
    if ipw is not None:
        frame[kind.WEIGHT_COLUMN] = _spread(ipw, design.mask)
    release.after(lambda: runtime.remember_columns(state, frame))
    return release


@handler(kind.TASK_MATCH, studies="payload")
def propensity_match(runtime: NodeRuntime, task) -> Release:
    key, spec, parent = _study(task.payload)
    if parent.kind != "psm":
        raise DataError("the study is not a matched (psm) study.")
    caliper = task.payload.get("caliper")
    if isinstance(caliper, bool) or not isinstance(caliper, (int, float)) or not math.isfinite(caliper) or caliper <= 0:
        raise DataError("the task's caliper is not a positive number.")
    design, _ = _ps_design(runtime, task.study_hash, key)
    state_key = kind.state_key(parent)
    state = runtime.augments.get(state_key)
    if state is None or kind.LOGIT_COLUMN not in state:
        raise DataError("this node has not scored the study's rows (it may have restarted); start the study again.")
    logit = state[kind.LOGIT_COLUMN].to_numpy()[design.mask]
    exposed = design.y == 1
    treated_rows, control_rows = match_nearest(logit, exposed, float(caliper))
    treated_rows, control_rows = leave_none_or_many_unmatched(
        treated_rows, control_rows, logit, int(exposed.sum()), int((~exposed).sum()), task_rules().min_subset_difference
    )
    pairs = np.full(design.n, np.nan)
    pairs[treated_rows] = np.arange(1, treated_rows.size + 1)
    pairs[control_rows] = np.arange(1, control_rows.size + 1)
    matched = ~np.isnan(pairs)
    facts = matched_facts(parent, design, matched)
    release = Release()
    after = release.model("matched", facts, group="propensity")
    columns = np.column_stack([logit, design.X])
    difference = (columns[treated_rows] - columns[control_rows]).sum(axis=0)
    after.array("after/pairs", [float(treated_rows.size)]).array("after/difference", difference)
    n_exposed, n_pairs = int(exposed.sum()), int(treated_rows.size)
    table = release.table("matching", group="propensity")
    table.count("exposed", n_exposed)
    table.count("controls", design.n - n_exposed)
    table.count("pairs", n_pairs)
    table.count("exposed_unmatched", n_exposed - n_pairs)
    table.count("controls_unmatched", design.n - n_exposed - n_pairs)
    frame = state.copy()
    frame[kind.PAIR_COLUMN] = _spread(pairs, design.mask)
    release.after(lambda: runtime.remember_columns(state_key, frame))
    return release


def iptw_weights(logit: np.ndarray, exposed: np.ndarray, params: dict, marginal) -> np.ndarray:
    """Inverse probability of treatment weights from the logit of the propensity score.

    ATE: 1/ps for the exposed, 1/(1 - ps) for controls (written 1 + exp(-logit) and
    1 + exp(logit), which are exact where 1/ps would lose digits); stabilised: times the
    pooled share of the exposed (of controls). ATT: 1 for the exposed, ps/(1 - ps) = exp(logit)
    for controls."""
    with np.errstate(over="ignore"):
        if params.get("estimand") == "ATT":
            w = np.where(exposed, 1.0, np.exp(logit))
        else:
            w = np.where(exposed, 1.0 + np.exp(-logit), 1.0 + np.exp(logit))
    if params.get("stabilized"):
        if isinstance(marginal, bool) or not isinstance(marginal, (int, float)) or not 0 < marginal < 1:
            raise DataError("the task's share of exposed rows is not a number between 0 and 1.")
        w = w * np.where(exposed, marginal, 1.0 - marginal)
    if not np.all(np.isfinite(w)):
        raise DataError("the propensity scores are so close to 0 or 1 that the weights are not finite.")
    return w


def moments(values: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(n, column means, column sums of squared deviations) of a row block: pooled across
    nodes exactly with Chan's formula, without the cancellation of raw sums of squares."""
    n = values.shape[0]
    if n == 0:
        return 0.0, np.zeros(values.shape[1]), np.zeros(values.shape[1])
    mean = values.mean(axis=0)
    return float(n), mean, ((values - mean) ** 2).sum(axis=0)


def matched_facts(parent: StudySpec, design: DesignedModel, matched: np.ndarray) -> ModelFacts:
    """The policy's view of the matched set: its rows in the dataset (minimum rows; the subset
    rule against the cohort and every other row set released before) and its pairs as events
    (each group at least the minimum events). Only sums over pairs of exposed-minus-control
    differences are released over it, never a sum over one group or one level, so per-level
    counts are not what it could reveal."""
    mask = np.zeros(design.mask.size, dtype=bool)
    mask[np.flatnonzero(design.mask)[matched]] = True
    return ModelFacts(
        f"{parent.name} (matched set)", mask, family="binomial", events=int(np.count_nonzero(design.y[matched] == 1))
    )


def _declare_groups(
    release: Release, parent: StudySpec, what: str, mask: np.ndarray, selected: np.ndarray, exposure: np.ndarray
) -> None:
    """Declare the exposed and the control rows of a released block as row sets of their own:
    its statistics are sums over each group, so the subset rule must see the groups (another
    release over the exposed minus one or two people would give those people away)."""
    rows = np.flatnonzero(mask)
    for name, value in GROUPS:
        group = np.zeros(mask.size, dtype=bool)
        group[rows[selected & (exposure == value)]] = True
        # (sized by the propensity model's events rule, not the cohort size rule)
        release.table(
            f"{what}_{name}",
            facts=ModelFacts(f"{parent.name} ({what} {name} rows)", group, cohort=False),
            group="propensity",
        )


def _study(payload: dict) -> tuple[str, StudySpec, StudySpec]:
    """(model key, propensity model, study) of a propensity task; the derivation is checked."""
    specs = glm.studies_from_payload(payload)
    if len(specs) != 1:
        raise DataError("a propensity task carries exactly one propensity model.")
    ((key, spec),) = specs.items()
    if spec.params.get("step") != "propensity":
        raise DataError("the task's model is not a study's propensity model.")
    return key, spec, kind.parent_of(spec)


def _ps_design(runtime: NodeRuntime, study_hash: str, key: str) -> tuple[DesignedModel, ModelFacts]:
    """The propensity model's design (the study's cohort) as glm.prepare built and kept it."""
    prepared = runtime.recall(study_hash)
    if key not in prepared.designs or key not in prepared.facts:
        raise DataError("this node has not prepared the study's propensity model; start the study again.")
    return prepared.designs[key], prepared.facts[key]


def _logit(design: DesignedModel, beta: np.ndarray) -> np.ndarray:
    """X β row by row (elementwise product, then a sum along the row), so rows with the same
    covariates get bit-identical logits and tie as the matching rules say they should."""
    return (design.X * beta).sum(axis=1) + design.offset


def _spread(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Values of the design's rows placed on the dataset's rows (missing elsewhere)."""
    out = np.full(mask.size, np.nan)
    out[mask] = values
    return out

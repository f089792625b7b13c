"""The pooled-rows reference for propensity-score studies (`kind = "psm"` and `"iptw"`).

Everything here works on the concatenated rows with statsmodels and numpy, independently of
iaptnet's federated code, so tests can compare the federated results with it and a benchmark
can time the pooled analysis. `settings` is the study TOML as a dict (outcome, exposure,
covariates, where, merge, family, caliper, estimand, stabilized, adjust_outcome); `where` may
be a boolean mask, a function of the frame, or a string in the study's filter grammar (then
evaluated with iaptnet's own filter, a convenience for the benchmark: the tests pass masks).

- `reference_psm(frame, settings, group)`: the propensity model, the SD of its logit over
  the cohort and the caliper, the same matching as the nodes' run on each `group`'s rows
  (a plain quadratic loop), balance before and after, and the outcome GLM on the matched rows
  with standard errors clustered on the pair.
- `reference_iptw(frame, settings)`: the propensity model, the weights and their summary,
  balance before and after weighting, and the outcome GLM with var_weights and HC0 SEs.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import statsmodels.api as sm
import statsmodels.formula
import statsmodels.formula.api as smf

# Term names and order as iaptnet's (formulaic, statsmodels' legacy order).
statsmodels.formula.options.formula_engine = "formulaic"

FAMILIES = {"binomial": sm.families.Binomial, "gaussian": sm.families.Gaussian, "poisson": sm.families.Poisson}
_CALLS = {"C", "I", "np", "log", "exp", "sqrt", "center", "scale"}


def columns_of(formula_part: str) -> list[str]:
    """The column names an expression of the formula language reads."""
    names = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", formula_part)
    return sorted(set(n for n in names if n not in _CALLS))


def merged(frame: pd.DataFrame, merge: dict | None) -> pd.DataFrame:
    """Level merges: the new level takes the place of the first level it lists."""
    if not merge:
        return frame
    frame = frame.copy()
    for column, groups in merge.items():
        old_to_new = {old: new for new, olds in groups.items() for old in olds}
        first = {olds[0]: new for new, olds in groups.items()}
        levels = [first.get(lv, lv) for lv in frame[column].cat.categories if lv in first or lv not in old_to_new]
        values = frame[column].astype(object).map(lambda v: old_to_new.get(v, v))
        frame[column] = pd.Categorical(values, categories=levels)
    return frame


def cohort(frame: pd.DataFrame, settings: dict) -> pd.DataFrame:
    """The study's rows: filter, outcome recorded, complete cases of exposure and covariates."""
    where = settings.get("where")
    if where is None:
        mask = np.ones(len(frame), dtype=bool)
    elif isinstance(where, str):
        from iaptnet.node.cohort import cohort_mask
        from iaptnet.protocol.cohort_filter import parse

        mask = cohort_mask(frame, parse(where))
    elif callable(where):
        mask = np.asarray(where(frame), dtype=bool)
    else:
        mask = np.asarray(where, dtype=bool)
    needed = [settings["outcome"], settings["exposure"], *columns_of(settings["covariates"])]
    rows = frame.loc[mask].dropna(subset=needed)
    return merged(rows, settings.get("merge"))


def propensity_fit(rows: pd.DataFrame, settings: dict):
    """statsmodels' logistic propensity model, converged tightly, and its logits (X β row by
    row, so that rows with equal covariates have equal logits)."""
    model = smf.glm(f"{settings['exposure']} ~ {settings['covariates']}", rows, family=sm.families.Binomial())
    fit = model.fit(tol=1e-13, tol_criterion="params", maxiter=200)
    X = np.asarray(model.exog)
    logit = (X * fit.params.to_numpy()).sum(axis=1)
    return fit, X, list(model.exog_names), logit


TIE = 1e-9


def match_within(logit: np.ndarray, exposed: np.ndarray, caliper: float) -> np.ndarray:
    """Pair number (1, 2, ... in matching order; NaN unmatched) of each row of one service.

    Exposed rows in descending order of the logit, ties by row order. Each looks at the
    unmatched controls nearest below its logit and nearest at or above it (the first in row
    order among equal logits), takes the nearer (distances within TIE: the first in row
    order), if it lies within the caliper."""
    pair = np.full(len(logit), np.nan)
    treated = np.flatnonzero(exposed)
    treated = treated[np.lexsort((treated, -logit[treated]))]
    available = ~np.asarray(exposed, dtype=bool)
    k = 0
    for t in treated:
        options = []
        below = np.flatnonzero(available & (logit < logit[t]))
        if below.size:
            value = logit[below].max()
            options.append((logit[t] - value, below[logit[below] == value].min()))
        above = np.flatnonzero(available & (logit >= logit[t]))
        if above.size:
            value = logit[above].min()
            options.append((value - logit[t], above[logit[above] == value].min()))
        if not options:
            break
        distance, c = min(options)
        if len(options) == 2 and abs(options[0][0] - options[1][0]) <= TIE:
            distance, c = min(options, key=lambda o: o[1])
        if distance <= caliper:
            k += 1
            pair[t] = pair[c] = k
            available[c] = False
    return pair


def none_or_many_unmatched(pair: np.ndarray, logit: np.ndarray, exposed: np.ndarray, t: int) -> np.ndarray:
    """The documented disclosure rule after matching one service: while the exposed or the
    controls left unmatched number 1 to t - 1, unmatch the pair with the largest logit
    distance (ties: the highest pair number)."""
    pair = pair.copy()
    while True:
        matched = ~np.isnan(pair)
        n_pairs = int(matched.sum()) // 2
        left = (int(exposed.sum()) - n_pairs, int((~exposed).sum()) - n_pairs)
        if n_pairs == 0 or not any(0 < k < t for k in left):
            return pair
        numbers = np.unique(pair[matched])
        distance = {k: abs(float(np.diff(logit[pair == k])[0])) for k in numbers}
        worst = max(numbers, key=lambda k: (distance[k], k))
        pair[pair == worst] = np.nan


def smd_table(
    names: list[str],
    values: np.ndarray,
    exposed: np.ndarray,
    after: np.ndarray | None = None,
    weights: np.ndarray | None = None,
) -> pd.DataFrame:
    """Means and SMDs before, and after matching (`after`: rows kept) or weighting (`weights`),
    with the before-groups' variances (n - 1) in both SMDs."""
    e, c = exposed, ~exposed
    v1, v0 = values[e].var(axis=0, ddof=1), values[c].var(axis=0, ddof=1)
    sd = np.sqrt((v1 + v0) / 2.0)
    out = pd.DataFrame(index=names)
    out["mean_exposed_before"] = values[e].mean(axis=0)
    out["mean_control_before"] = values[c].mean(axis=0)
    if weights is not None:
        out["mean_exposed_after"] = np.average(values[e], axis=0, weights=weights[e])
        out["mean_control_after"] = np.average(values[c], axis=0, weights=weights[c])
    else:
        out["mean_exposed_after"] = values[e & after].mean(axis=0)
        out["mean_control_after"] = values[c & after].mean(axis=0)
    out["difference_before"] = out["mean_exposed_before"] - out["mean_control_before"]
    out["difference_after"] = out["mean_exposed_after"] - out["mean_control_after"]
    with np.errstate(divide="ignore", invalid="ignore"):
        out["smd_before"] = out["difference_before"] / sd
        out["smd_after"] = out["difference_after"] / sd
    return out


def _outcome_formula(settings: dict) -> str:
    formula = f"{settings['outcome']} ~ {settings['exposure']}"
    return formula + (f" + {settings['covariates']}" if settings.get("adjust_outcome") else "")


def reference_psm(frame: pd.DataFrame, settings: dict, group: str, match=None) -> dict:
    """`match(logit, exposed, caliper) -> pair numbers` defaults to the plain loop above; a
    benchmark timing the pooled analysis may pass a faster implementation of the same rule."""
    match = match or match_within
    rows = cohort(frame, settings).reset_index(drop=True)
    ps, X, names, logit = propensity_fit(rows, settings)
    exposed = rows[settings["exposure"]].to_numpy(dtype=float) == 1
    logit_sd = float(np.std(logit, ddof=1))
    caliper = settings.get("caliper", 0.2) * logit_sd
    pair = np.full(len(rows), np.nan)
    for _, index in rows.groupby(group, sort=False, observed=True).indices.items():
        pair[index] = none_or_many_unmatched(
            match(logit[index], exposed[index], caliper),
            logit[index],
            exposed[index],
            settings.get("min_subset_difference", 8),
        )
    matched = ~np.isnan(pair)
    values = np.column_stack([logit, X])
    balance = smd_table(["ps_logit", *names], values, exposed, after=matched)
    kept = rows.loc[matched]
    labels = kept[group].astype(str).to_numpy() + ":" + pair[matched].astype(int).astype(str)
    clusters = pd.factorize(pd.Series(labels))[0]
    family = FAMILIES[settings.get("family", "binomial")]()
    outcome = smf.glm(_outcome_formula(settings), kept, family=family).fit(
        tol=1e-13, tol_criterion="params", maxiter=200, cov_type="cluster", cov_kwds={"groups": clusters}
    )
    return {
        "rows": rows,
        "ps": ps,
        "logit": logit,
        "logit_sd": logit_sd,
        "caliper": caliper,
        "pair": pair,
        "balance": balance,
        "outcome": outcome,
        "n_pairs": int(matched.sum() // 2),
    }


def iptw_weights(ps_fitted: np.ndarray, exposed: np.ndarray, settings: dict) -> np.ndarray:
    """ATE: 1/ps and 1/(1-ps) (stabilised: times the share of exposed / of controls); ATT: 1
    and ps/(1-ps)."""
    if settings.get("estimand", "ATE") == "ATT":
        return np.where(exposed, 1.0, ps_fitted / (1.0 - ps_fitted))
    w = np.where(exposed, 1.0 / ps_fitted, 1.0 / (1.0 - ps_fitted))
    if settings.get("stabilized"):
        share = exposed.mean()
        w = w * np.where(exposed, share, 1.0 - share)
    return w


def reference_iptw(frame: pd.DataFrame, settings: dict) -> dict:
    rows = cohort(frame, settings).reset_index(drop=True)
    ps, X, names, logit = propensity_fit(rows, settings)
    exposed = rows[settings["exposure"]].to_numpy(dtype=float) == 1
    w = iptw_weights(ps.fittedvalues.to_numpy(), exposed, settings)
    balance = smd_table(["ps_logit", *names], np.column_stack([logit, X]), exposed, weights=w)
    family = FAMILIES[settings.get("family", "binomial")]()
    outcome = smf.glm(_outcome_formula(settings), rows, family=family, var_weights=w).fit(
        tol=1e-13, tol_criterion="params", maxiter=200, cov_type="HC0"
    )
    summary = {
        g: {
            "n": int(m.sum()),
            "sum_weights": float(w[m].sum()),
            "effective_n": float(w[m].sum() ** 2 / np.sum(w[m] ** 2)),
        }
        for g, m in (("exposed", exposed), ("control", ~exposed))
    }
    return {
        "rows": rows,
        "ps": ps,
        "logit": logit,
        "logit_sd": float(np.std(logit, ddof=1)),
        "weights": w,
        "weighting": summary,
        "balance": balance,
        "outcome": outcome,
    }

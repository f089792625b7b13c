"""The pooled-rows reference for an interrupted time series, computed independently of iaptnet.

`reference_its(frame, settings)` takes the pooled rows (the concatenated derived frames of
every node) and the study's settings (the study TOML as a dict), computes the segmented
columns itself (after the change, months since the change, the summed denominator) and fits
with statsmodels:

- `rows`: the referral-level Poisson GLMs with offset log(denominator), as iaptnet fits them
  (pooled, and per group with a change), with the study's covariance (HC0 by default);
- `monthly`: the same models on the monthly aggregates (events and denominator summed per
  group and month), the textbook ITS on aggregates; with nonrobust covariances both give the
  same estimates and standard errors;
- `segments`: referrals, events and denominator per group and period, exact.

bench/ can time it as "the same analysis run pooled with statsmodels".
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import statsmodels.api as sm
import statsmodels.formula
import statsmodels.formula.api as smf

statsmodels.formula.options.formula_engine = "formulaic"

ORIGINS = {"referral_month": "2012-04"}


def change_months(settings: dict) -> dict[str, int]:
    """The study's [changes] as time values: numbers as they are, "YYYY-MM" from the origin."""
    time = settings.get("time", "referral_month")
    origin = settings.get("time_origin", ORIGINS.get(time))
    out = {}
    for level, value in settings["changes"].items():
        if isinstance(value, int):
            out[str(level)] = value
        else:
            y, m = map(int, str(value)[:7].split("-"))
            oy, om = map(int, origin[:7].split("-"))
            out[str(level)] = (y - oy) * 12 + (m - om)
    return out


def segmented(frame: pd.DataFrame, settings: dict) -> pd.DataFrame:
    """The cohort's complete rows with after_change, time_after_change and denominator."""
    time = settings.get("time", "referral_month")
    group = settings.get("group", "service_id")
    outcome = settings["outcome"]
    denominator = settings["denominator"]
    denominator = [denominator] if isinstance(denominator, str) else denominator
    rows = frame.query(settings["where"]) if settings.get("where") else frame
    rows = rows.dropna(subset=[time, group, outcome, *denominator]).copy()
    changes = change_months(settings)
    change = rows[group].astype(str).map(changes).astype(float)
    t = rows[time].astype(float)
    rows["after_change"] = ((t >= change) & change.notna()).astype(float)
    rows["time_after_change"] = np.where(rows["after_change"] == 1, t - change, 0.0)
    rows["denominator"] = rows[denominator].astype(float).sum(axis=1)
    rows = rows[rows["denominator"] > 0]
    rows[outcome] = rows[outcome].astype(float)
    rows[time] = t.loc[rows.index]
    return rows


def _fit(data: pd.DataFrame, formula: str, cov_type: str):
    model = smf.glm(formula, data, family=sm.families.Poisson(), offset=np.log(data["denominator"]))
    return model.fit(tol=1e-13, tol_criterion="params", maxiter=200, cov_type=cov_type)


def monthly(rows: pd.DataFrame, settings: dict) -> pd.DataFrame:
    """Events and denominator summed per group and month (the segmented terms are constant
    within a group-month)."""
    time = settings.get("time", "referral_month")
    group = settings.get("group", "service_id")
    keys = [group, time, "after_change", "time_after_change"]
    out = rows.groupby(keys, observed=True, as_index=False)[[settings["outcome"], "denominator"]].sum()
    out[group] = pd.Categorical(out[group], categories=rows[group].cat.categories)
    return out


def reference_its(frame: pd.DataFrame, settings: dict) -> dict:
    time = settings.get("time", "referral_month")
    group = settings.get("group", "service_id")
    outcome = settings["outcome"]
    cov_type = settings.get("cov_type", "HC0")
    rows = segmented(frame, settings)
    pooled = f"{outcome} ~ 0 + {group} + {group}:{time} + after_change + time_after_change"
    single = f"{outcome} ~ {time} + after_change + time_after_change"
    present = rows.copy()
    present[group] = present[group].cat.remove_unused_categories()
    agg = monthly(present, settings)
    out = {
        "rows": {"pooled": _fit(present, pooled, cov_type)},
        "monthly": {"pooled": _fit(agg, pooled, "nonrobust")},
        "segments": {},
    }
    for level in change_months(settings):
        part = rows[rows[group].astype(str) == level]
        if part["after_change"].nunique() == 2:
            out["rows"][level] = _fit(part, single, cov_type)
            out["monthly"][level] = _fit(agg[agg[group].astype(str) == level], single, "nonrobust")
    for level in rows[group].cat.categories:
        part = rows[rows[group].astype(str) == level]
        out["segments"][str(level)] = {
            period: {
                "referrals": int(len(cell)),
                "events": float(cell[outcome].sum()),
                "denominator": float(cell["denominator"].sum()),
            }
            for period, cell in (
                ("before", part[part["after_change"] == 0]),
                ("after", part[part["after_change"] == 1]),
            )
        }
    return out

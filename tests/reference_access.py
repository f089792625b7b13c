"""The access analysis computed directly on pooled referral rows (the independent reference).

`reference_access(rows, population, settings)` takes
- rows: the pooled analysis rows of every node, with a column `area` naming the node each row
  came from, `referral_date` and the grouping variables (categoricals with the schema's
  levels, as the nodes serve them);
- population: the denominators as a DataFrame in the CSV layout (area, age_band, sex,
  ethnic_group, imd_quintile, population), with group values already in the schema's labels;
- settings: {"by": [...], "period": (first, last), "years": float, "merge": {var: {new: [old,
  ...]}}, "area_effects": bool, "areas": {node: [area, ...]}, "nodes": [node, ...],
  "where": optional function rows -> boolean mask};

and returns what an access study reports, computed with pandas and statsmodels on the cell
table built from the rows: {"n", "cells" (the cell table), "adjusted" and "crude" (statsmodels
GLM results), "rates" (per variable and level: referrals, population, person_years, rate,
rate_low, rate_high, the exact Poisson CI from scipy's chi-square), "area_rates"}.
It shares no code with iaptnet, so that tests compare two independent computations; a benchmark
can time it as "the same analysis on pooled rows".
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import statsmodels.api as sm
import statsmodels.formula.api as smf
from scipy import stats

PER = 100_000
ONS = {"age_group": "age_band", "sex": "sex", "ethnicity_ons": "ethnic_group", "imd_quintile": "imd_quintile"}


def _merged(levels: list[str], groups: dict) -> tuple[list[str], dict]:
    mapping = {old: new for new, olds in groups.items() for old in olds}
    order = []
    for level in levels:
        new = mapping.get(level, level)
        if new not in order:
            order.append(new)
    return order, mapping


def reference_access(rows: pd.DataFrame, population: pd.DataFrame, settings: dict) -> dict:
    by = list(settings["by"])
    first, last = (pd.Timestamp(d) for d in settings["period"])
    years = float(settings["years"])
    merge = settings.get("merge", {})
    nodes = sorted(settings["nodes"])
    area_of = {a: node for node in nodes for a in settings.get("areas", {}).get(node, [node])}

    keep = (rows["referral_date"] >= first) & (rows["referral_date"] <= last)
    if settings.get("where") is not None:
        keep &= settings["where"](rows)
    data = rows.loc[keep.fillna(False).to_numpy(dtype=bool)].dropna(subset=by).copy()
    levels = {}
    for var in by:
        order, mapping = _merged(list(rows[var].cat.categories), merge.get(var, {}))
        levels[var] = order
        data[var] = pd.Categorical(data[var].astype(str).map(lambda v: mapping.get(v, v)), categories=order)

    pop = population.rename(columns={ONS[v]: v for v in by if ONS[v] in population.columns})
    pop = pop[pop["area"].isin(area_of)].copy()
    pop["area"] = pop["area"].map(area_of)
    for var in by:
        _, mapping = _merged(levels[var], merge.get(var, {}))
        pop[var] = pop[var].astype(str).map(lambda v: mapping.get(v, v))
    grid = pd.MultiIndex.from_product([nodes] + [levels[v] for v in by], names=["area"] + by)
    people = pop.groupby(["area"] + by)["population"].sum().reindex(grid, fill_value=0)
    referrals = data.groupby(["area"] + by, observed=False).size().reindex(grid, fill_value=0)
    cells = pd.DataFrame({"referrals": referrals, "population": people}).reset_index()
    cells = cells[cells["population"] > 0].reset_index(drop=True)
    cells["area"] = pd.Categorical(cells["area"], categories=nodes)
    for var in by:
        cells[var] = pd.Categorical(cells[var], categories=levels[var])
    cells["person_years"] = cells["population"] * years
    offset = np.log(cells["person_years"].to_numpy(dtype=float))

    def glm(terms):
        model = smf.glm("referrals ~ " + " + ".join(terms), cells, family=sm.families.Poisson(), offset=offset)
        # Converge on the parameters, not on the deviance (statsmodels' default). IRLS takes its
        # covariance (bse) from the weights of the iterate *before* the last, and a deviance
        # change below tol=1e-13 is one or two ulps of a deviance of a few hundred: with some
        # BLAS kernels (OpenBLAS Haswell) it stopped one iteration early, with the estimate exact
        # but its SEs from an iterate 2e-8 away, 1.1e-8 off. A last step below 1e-13 makes the
        # covariance the estimate's (SEs within 1e-14 of a 50-digit fit).
        return model.fit(tol=1e-13, tol_criterion="params", maxiter=200)

    terms = by + (["area"] if settings.get("area_effects", True) and len(nodes) > 1 else [])
    rates, area_rates = [], []
    for var in by:
        for level in levels[var]:
            part = cells[cells[var] == level]
            rates.append(_rate(var, level, part))
            for node in nodes:
                area_rates.append({"area": node, **_rate(var, level, part[part["area"] == node])})
    rates.append(_rate("all", "all", cells))
    for node in nodes:
        area_rates.append({"area": node, **_rate("all", "all", cells[cells["area"] == node])})
    return {
        "n": int(cells["referrals"].sum()),
        "cells": cells,
        "adjusted": glm(terms),
        "crude": {var: glm([var]) for var in by},
        "rates": pd.DataFrame(rates),
        "area_rates": pd.DataFrame(area_rates),
    }


def _rate(var, level, part: pd.DataFrame) -> dict:
    y = float(part["referrals"].sum())
    py = float(part["person_years"].sum())
    low = stats.chi2.ppf(0.025, 2 * y) / 2 if y > 0 else 0.0
    high = stats.chi2.ppf(0.975, 2 * y + 2) / 2
    return {
        "variable": var,
        "level": level,
        "referrals": y,
        "population": float(part["population"].sum()),
        "person_years": py,
        "rate": PER * y / py,
        "rate_low": PER * low / py,
        "rate_high": PER * high / py,
    }

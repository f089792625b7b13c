"""The pooled-rows reference for a meta study, computed independently of iaptnet.

`reference_meta(frame, settings)` takes the pooled rows (the concatenated derived frames of
every node, categoricals with their schema levels) and the study's settings (the study TOML
as a dict) and returns what `kind = "meta"` reports:

- per service: statsmodels' GLM of the formula without the service term on that service's
  rows alone (levels absent there removed), the exposure's estimate and standard error;
- fixed effect, DerSimonian-Laird and REML random effects of those estimates, from the
  textbook formulas in numpy (statsmodels' `combine_effects` checks FE and DL where tau^2 > 0;
  REML by the fixed-point iteration of Viechtbauer 2005, not the root-finder iaptnet uses);
- the one-stage fits: statsmodels' GLM on the pooled cohort without and with the service term.

bench/ can time it as "the same analysis run pooled with statsmodels".
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import statsmodels.api as sm
import statsmodels.formula
import statsmodels.formula.api as smf
from numpy import exp, log, sqrt  # noqa: F401 - formulas may use them
from scipy import stats
from statsmodels.stats.meta_analysis import combine_effects

statsmodels.formula.options.formula_engine = "formulaic"

FAMILIES = {"binomial": sm.families.Binomial, "gaussian": sm.families.Gaussian, "poisson": sm.families.Poisson}
Z = stats.norm.ppf(0.975)


def split_formula(formula: str, service: str) -> tuple[str, str]:
    """(formula without the service term, formula with it), by plain text."""
    outcome, rhs = formula.split("~", 1)
    terms = [t.strip() for t in rhs.split("+")]
    kept = [t for t in terms if t.replace(" ", "") not in (service, f"C({service})")]
    without = f"{outcome.strip()} ~ {' + '.join(kept)}"
    return without, f"{without} + {service}"


def cohort(frame: pd.DataFrame, settings: dict) -> pd.DataFrame:
    """The study's complete cases: its filter (pandas' query language reads the catalogue's
    filters), rows with every column the model reads, and its level merges."""
    rows = frame.query(settings["where"]) if settings.get("where") else frame
    text = " ".join(str(settings.get(k) or "") for k in ("formula", "offset", "weights", "service"))
    needed = [c for c in rows.columns if re.search(rf"\b{re.escape(c)}\b", text)]
    rows = rows.dropna(subset=needed).copy()
    for column, groups in (settings.get("merge") or {}).items():
        mapping = {old: new for new, olds in groups.items() for old in olds}
        order = []
        for level in rows[column].cat.categories:
            new = mapping.get(level, level)
            if new not in order:
                order.append(new)
        rows[column] = pd.Categorical(rows[column].astype(object).map(lambda v: mapping.get(v, v)), categories=order)
    return rows


def glm_fit(rows: pd.DataFrame, formula: str, settings: dict):
    kwargs = {}
    if settings.get("offset"):
        kwargs["offset"] = rows.eval(
            settings["offset"], engine="python", local_dict={"log": np.log, "exp": np.exp, "sqrt": np.sqrt}
        )
    if settings.get("weights"):
        kwargs["var_weights"] = rows[settings["weights"]]
    model = smf.glm(formula, rows, family=FAMILIES[settings["family"]](), missing="drop", **kwargs)
    return model.fit(tol=1e-13, tol_criterion="params", maxiter=200, cov_type=settings.get("cov_type", "nonrobust"))


def local_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows with the categorical levels they lack removed (iaptnet drops absent levels' columns)."""
    rows = rows.copy()
    for name in rows.columns:
        if isinstance(rows[name].dtype, pd.CategoricalDtype):
            rows[name] = rows[name].cat.remove_unused_categories()
    return rows


def tau2_reml_fixed_point(y: np.ndarray, v: np.ndarray, tol: float = 1e-16) -> float:
    """REML tau^2 by the fixed-point iteration tau2 = sum w^2((y-mu)^2 - v)/sum w^2 + 1/sum w
    (Viechtbauer 2005), truncated at 0."""
    tau2 = max(0.0, float(np.var(y, ddof=1) - np.mean(v)))
    for _ in range(100_000):
        w = 1.0 / (v + tau2)
        mu = np.sum(w * y) / np.sum(w)
        new = max(0.0, float(np.sum(w * w * ((y - mu) ** 2 - v)) / np.sum(w * w) + 1.0 / np.sum(w)))
        if abs(new - tau2) <= tol * max(1.0, new):
            return new
        tau2 = new
    raise RuntimeError("REML iteration did not converge")


def pool(y: np.ndarray, v: np.ndarray) -> dict:
    """Fixed effect, DL and REML random effects, each with estimate, SE, CI, tau2, I2, Q,
    prediction interval (t with k-2 df)."""
    k = len(y)
    w = 1.0 / v
    fe = float(np.sum(w * y) / np.sum(w))
    q = float(np.sum(w * (y - fe) ** 2))
    c = float(np.sum(w) - np.sum(w * w) / np.sum(w))
    typical = (k - 1) / c
    out = {
        "fixed": {"estimate": fe, "std_error": math.sqrt(1.0 / np.sum(w)), "Q": q, "I2": max(0.0, (q - (k - 1)) / q)}
    }
    taus = {"random_dl": max(0.0, (q - (k - 1)) / c), "random_reml": tau2_reml_fixed_point(y, v)}
    for key, tau2 in taus.items():
        ws = 1.0 / (v + tau2)
        mu = float(np.sum(ws * y) / np.sum(ws))
        se = math.sqrt(1.0 / np.sum(ws))
        half = stats.t.ppf(0.975, k - 2) * math.sqrt(tau2 + se * se)
        out[key] = {
            "estimate": mu,
            "std_error": se,
            "tau2": tau2,
            "I2": tau2 / (tau2 + typical),
            "Q": q,
            "prediction_low": mu - half,
            "prediction_high": mu + half,
        }
    for entry in out.values():
        entry["conf_low"] = entry["estimate"] - Z * entry["std_error"]
        entry["conf_high"] = entry["estimate"] + Z * entry["std_error"]
    if out["random_dl"]["tau2"] > 0:  # statsmodels agrees where it does not go negative
        res = combine_effects(y, v, method_re="dl")
        assert math.isclose(res.mean_effect_fe, fe, rel_tol=1e-12)
        assert math.isclose(res.mean_effect_re, out["random_dl"]["estimate"], rel_tol=1e-12)
        assert math.isclose(res.sd_eff_w_re, out["random_dl"]["std_error"], rel_tol=1e-12)
    return out


def reference_meta(frame: pd.DataFrame, settings: dict) -> dict:
    service = settings.get("service", "service_id")
    without, with_fe = split_formula(settings["formula"], service)
    exposure = settings["exposure"]
    rows = cohort(frame, settings)
    per_service = {}
    for level in rows[service].cat.categories:
        part = rows[rows[service] == level]
        if len(part) == 0:
            continue
        fit = glm_fit(local_rows(part), without, settings)
        per_service[str(level)] = {"estimate": float(fit.params[exposure]), "std_error": float(fit.bse[exposure])}
    y = np.array([e["estimate"] for e in per_service.values()])
    v = np.array([e["std_error"] ** 2 for e in per_service.values()])
    return {
        "per_service": per_service,
        **pool(y, v),
        "one_stage": glm_fit(local_rows(rows), without, settings),
        "one_stage_service_fe": glm_fit(local_rows(rows), with_fe, settings),
    }

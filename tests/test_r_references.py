"""iaptnet against stored results from R (tests/results/: the inputs, the R scripts that made
each JSON, and the JSON; `make references` regenerates them, R is not needed to run these).

Each test runs iaptnet in-process on the same rows, one node per site, and compares with R:

- meta: per-service glm() and metafor::rma (FE, DL, REML; prediction interval on t_{k-2});
- psm: MatchIt::matchit (nearest, logit of a glm() propensity score, largest first, no
  replacement, caliper in SDs of the logit, exact within a site), then iaptnet's documented
  rule for few unmatched people applied to MatchIt's pairs, and the outcome glm() with
  sandwich::vcovCL (HC1, clustered on the pair);
- iptw: glm() propensity score, ATE (stabilised) and ATT weights, the weighted outcome glm()
  with sandwich's HC0 covariance (survey::svyglm's is HC0 times n / (n - 1), checked too);
- glm: weighted binomial and gaussian glm() with sandwich::vcovCL (HC1) on clinics and
  sandwich's HC0.

R's own computations are exact here (its glm converged to 1e-14 and restarted at its answer,
closed forms), so estimates and standard errors agree to 1e-8 relative; REML's tau^2 is the
one optimised quantity (its tolerance is at META_REML_TAU2_ATOL).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from glmcase import run_study, write_network

RESULTS = Path(__file__).resolve().parent / "results"
RTOL = 1e-8


def reference(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def sites_of(name: str, keep_site: bool = False) -> dict[str, pd.DataFrame]:
    """The input's rows split by site, each in its order (node row i is the site's i-th row)."""
    frame = pd.read_csv(RESULTS / f"{name}_input.csv")
    out = {}
    for site in frame["site"].unique():
        rows = frame[frame["site"] == site].reset_index(drop=True)
        out[str(site)] = rows if keep_site else rows.drop(columns="site")
    return out


def iaptnet_term(r_name: str, factors: dict[str, list[str]]) -> str:
    """R's coefficient name as iaptnet's (formulaic's): (Intercept) -> Intercept, gb -> g[T.b]."""
    if r_name == "(Intercept)":
        return "Intercept"
    for column, levels in factors.items():
        for level in levels:
            if r_name == f"{column}{level}":
                return f"{column}[T.{level}]"
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", r_name):
        raise ValueError(f"no translation for R's term {r_name!r}")
    return r_name


def assert_terms(terms: list[dict], table: dict, factors: dict[str, list[str]], se_key: str = "std_error",
                 rtol: float = RTOL, what: str = "") -> None:
    """iaptnet's terms (estimate and `se_key`) equal R's coefficient table, name by name."""
    ours = {t["term"]: t for t in terms}
    theirs_est = {iaptnet_term(k, factors): v for k, v in table["estimate"].items()}
    theirs_se = {iaptnet_term(k, factors): v for k, v in table["std_error"].items()}
    assert sorted(ours) == sorted(theirs_est), what
    for name in theirs_est:
        np.testing.assert_allclose(ours[name]["estimate"], theirs_est[name], rtol=rtol, atol=0,
                                   err_msg=f"{what} {name} estimate")
        np.testing.assert_allclose(ours[name][se_key], theirs_se[name], rtol=rtol, atol=0,
                                   err_msg=f"{what} {name} {se_key}")


# --- meta-analysis: glm() per service, metafor::rma -----------------------------------------------

META_COLUMNS = {
    "y": {"type": "binary"},
    "x": {"type": "numeric"},
    "z": {"type": "numeric"},
    "g": {"type": "categorical", "levels": ["a", "b", "c"]},
    "site": {"type": "categorical", "levels": ["s1", "s2", "s3", "s4", "s5"]},
}
# REML tau^2 is the root of the restricted score: iaptnet solves it with brentq to machine
# precision; metafor's Fisher scoring stops once a step changes tau^2 by less than its
# threshold, set to 1e-12 in make_meta.R (default 1e-5; meta.json records it). Fisher scoring
# converges linearly near the root, so what is left after a step below the threshold is a small
# multiple of it: 100 times the threshold, absolute, is R's accuracy for tau^2 here.
META_REML_TAU2_ATOL = 100 * 1e-12
# Quantities computed from the estimates by closed forms (FE, DL, Q, I^2, the REML summary at
# tau^2), all exact in R: 1e-8 relative, like the estimates. p-values of large z amplify a
# relative difference eps in z to about z^2 eps, so they are compared to RTOL * max(1, z^2).
META_FIELDS = ("estimate", "std_error", "statistic", "conf_low", "conf_high", "Q", "Q_p_value", "I2")
META_RANDOM_FIELDS = ("tau", "prediction_low", "prediction_high")


def test_meta_equals_glm_and_metafor(tmp_path):
    ref = reference("meta")
    sites = sites_of("meta", keep_site=True)
    write_network(tmp_path, sites, META_COLUMNS)
    result = run_study(tmp_path, name="meta_r", kind="meta", family="binomial", formula="y ~ x + z + g + site",
                       exposure="x", service="site")
    by_node = {e["node"]: e for e in result["per_node"]}
    assert sorted(by_node) == sorted(ref["per_service"])
    for site, theirs in ref["per_service"].items():
        for field in ("estimate", "std_error"):
            np.testing.assert_allclose(by_node[site][field], theirs[field], rtol=RTOL, atol=0,
                                       err_msg=f"{site} {field}")
    assert result["k"] == ref["fixed"]["k"] == 5
    for key in ("fixed", "random_dl", "random_reml"):
        ours, theirs = result[key], ref[key]
        assert ours["Q_df"] == theirs["Q_df"] and ours["k"] == theirs["k"]
        fields = META_FIELDS + (META_RANDOM_FIELDS if key != "fixed" else ())
        for field in fields:
            np.testing.assert_allclose(ours[field], theirs[field], rtol=RTOL, atol=0, err_msg=f"{key}.{field}")
        for site, weight in theirs["weights"].items():  # each node's share of the pooled estimate
            np.testing.assert_allclose(by_node[site]["weights"][key], weight, rtol=RTOL, atol=0,
                                       err_msg=f"{key} weight of {site}")
        np.testing.assert_allclose(ours["p_value"], theirs["p_value"], rtol=RTOL * max(1.0, theirs["statistic"] ** 2),
                                   atol=0, err_msg=f"{key}.p_value")
    np.testing.assert_allclose(result["random_dl"]["tau2"], ref["random_dl"]["tau2"], rtol=RTOL, atol=0)
    assert ref["reml_threshold"] == 1e-12
    np.testing.assert_allclose(result["random_reml"]["tau2"], ref["random_reml"]["tau2"], rtol=0,
                               atol=META_REML_TAU2_ATOL)
    assert ref["random_reml"]["tau2"] > 0 and ref["random_dl"]["tau2"] > 0  # the case tests heterogeneity

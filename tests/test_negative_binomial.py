"""The federated negative binomial model: given its theta, a GLM equal to statsmodels' on the
concatenated rows (to 1e-8 relative), and theta's standard error equal to theta.ml's closed form
computed here on those rows; a case without over-dispersion stops with a plain sentence.
(glm.nb's own numbers, theta included: tests/test_r_references.py.)"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
import statsmodels.formula.api as smf
from glmcase import pooled, run_study, write_network
from numpy import log  # noqa: F401 - the reference formulas use it
from scipy import special

from iaptnet.coordinator.results import render_report

RTOL = 1e-8
COLUMNS = {
    "visits": {"type": "integer", "min": 0},
    "x": {"type": "numeric"},
    "g": {"type": "categorical", "levels": ["a", "b", "c"]},
    "days": {"type": "numeric", "min": 1},
}


def make_sites(seed: int = 5, sizes=(350, 520, 430), theta: float = 1.6, poisson: bool = False):
    rng = np.random.default_rng(seed)
    sites = {}
    for k, n in enumerate(sizes):
        levels = ["a", "b"] if k == 2 else ["a", "b", "c"]  # the third site has no c
        g = rng.choice(levels, size=n)
        x = np.round(rng.normal(0.3 * k, 1.0, size=n), 6)
        days = np.round(rng.uniform(20, 120, size=n), 3)
        eff = pd.Series(g).map({"a": 0.0, "b": 0.5, "c": -0.3}).to_numpy()
        mu = np.exp(-3.2 + 0.4 * x + eff + np.log(days))
        lam = mu if poisson else rng.gamma(theta, mu / theta)
        visits = rng.poisson(lam)
        frame = pd.DataFrame({"visits": visits, "x": x, "g": g, "days": days})
        frame.loc[rng.choice(n, size=n // 30, replace=False), "x"] = np.nan
        sites[f"site{k}"] = frame
    return sites


def nb_reference(frame: pd.DataFrame, formula: str, theta: float, offset: str | None = None):
    """statsmodels' GLM with NegativeBinomial(alpha = 1 / theta) on the pooled complete cases."""
    kwargs = {"offset": frame.eval(offset, engine="python")} if offset else {}
    family = sm.families.NegativeBinomial(alpha=1.0 / theta)
    return smf.glm(formula, frame, family=family, **kwargs).fit(tol=1e-14, tol_criterion="params", maxiter=300)


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nbnet")
    sites = make_sites()
    write_network(folder, sites, COLUMNS)
    return folder, pooled(sites, COLUMNS).dropna(subset=["x"]).reset_index(drop=True)


@pytest.mark.parametrize("offset", [None, "log(days)"])
def test_given_theta_equals_statsmodels_and_theta_ml(network, offset):
    folder, frame = network
    formula = "visits ~ x + g"
    fields = {"offset": offset} if offset else {}
    result = run_study(folder, name=f"nb_{bool(offset)}", family="negative_binomial", formula=formula, **fields)
    theta = result["theta"]
    ref = nb_reference(frame, formula, theta, offset)
    names = [t["term"] for t in result["terms"]]
    assert names == list(ref.params.index)
    for key, theirs in (("estimate", ref.params), ("std_error", ref.bse)):
        np.testing.assert_allclose([t[key] for t in result["terms"]], theirs.to_numpy(), rtol=RTOL, atol=0)
    assert result["n"] == int(ref.nobs) and result["scale"] == 1.0
    for key, theirs in (("llf", ref.llf), ("deviance", ref.deviance), ("pearson_chi2", ref.pearson_chi2)):
        np.testing.assert_allclose(result[key], theirs, rtol=RTOL, atol=0, err_msg=key)
    # glm.nb counts theta among the parameters of its AIC.
    np.testing.assert_allclose(result["aic"], -2 * ref.llf + 2 * (len(names) + 1), rtol=RTOL, atol=0)
    # The null deviance: the intercept-only model at the same theta (with the offset).
    null = nb_reference(frame, "visits ~ 1", theta, offset)
    np.testing.assert_allclose(result["null_deviance"], null.deviance, rtol=RTOL, atol=0)
    # theta is the maximum: the theta score (MASS::theta.ml's) is zero at the fitted means, and
    # its standard error is 1 / sqrt(-d^2 loglik / d theta^2) there, with alpha's by the delta
    # method.
    y, mu = frame["visits"].to_numpy(float), ref.mu
    score = special.digamma(y + theta) - special.digamma(theta) + np.log(theta) + 1
    score = np.sum(score - np.log(theta + mu) - (y + theta) / (theta + mu))
    info = -special.polygamma(1, y + theta) + special.polygamma(1, theta) - 1 / theta
    info = np.sum(info + 2 / (theta + mu) - (y + theta) / (theta + mu) ** 2)
    assert abs(score) * np.sqrt(1 / info) < 1e-8
    np.testing.assert_allclose(result["theta_std_error"], np.sqrt(1 / info), rtol=RTOL, atol=0)
    np.testing.assert_allclose(result["alpha"], 1 / theta, rtol=1e-15)
    np.testing.assert_allclose(result["alpha_std_error"], np.sqrt(1 / info) / theta**2, rtol=RTOL, atol=0)
    report = render_report(result)
    assert f"theta {theta:.4f}" in report and "alpha = 1/theta" in report and "rate ratio" in report


def test_counts_without_over_dispersion_stop_with_a_sentence(tmp_path):
    from iaptnet.protocol.errors import ModelError

    write_network(tmp_path, make_sites(seed=9, poisson=True), COLUMNS)
    with pytest.raises(ModelError, match=r"theta grows beyond 1e\+06.*no over-dispersion.*family = \"poisson\""):
        run_study(tmp_path, name="equi", family="negative_binomial", formula="visits ~ x + g", offset="log(days)")

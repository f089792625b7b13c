"""Marginal effects (`marginal = [...]`): the standardised risks with a binary exposure set to 1
and to 0 for everyone, their difference and ratio with delta-method intervals, against an
independent computation on the concatenated rows: statsmodels' GLM fit, then g-computation in
numpy (the design rebuilt with the exposure set, interactions included, by formulaic) and the
delta method with statsmodels' covariance (binomial with an interaction and poisson with an
offset, each model-based and HC0); 1e-8 relative. And against R (make_marginal.R,
stored in tests/results/marginal.json): base R's glm on public data (the RAND Health Insurance
Experiment, 3,000 person-years over 4 services), the risks from predict(type = "response") on
copies of the data with the exposure set, the delta method with vcov() and sandwich's HC0
(binomial with an interaction, model-based and HC0; poisson, model-based), through `iaptnet
run`; 1e-8 relative (measured when the reference was made: risks, difference and ratio within
5e-15, SE(RD) and the limits within 1.5e-13; the coefficients' SEs within 1.3e-12)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
import statsmodels.formula.api as smf
from formulaic import model_matrix
from glmcase import pooled, run_study, write_network
from numpy import log  # noqa: F401 - the reference formulas use it
from scipy import special

from iaptnet.coordinator.results import render_report
from iaptnet.protocol.errors import SpecError

RESULTS = Path(__file__).resolve().parent / "results"
RTOL = 1e-8
Z = special.ndtri(0.975)
COLUMNS = {
    "y": {"type": "binary"},
    "visits": {"type": "integer", "min": 0},
    "t": {"type": "binary"},
    "x": {"type": "numeric"},
    "g": {"type": "categorical", "levels": ["a", "b", "c"]},
    "days": {"type": "numeric", "min": 1},
}


def make_sites(seed: int = 21, sizes=(420, 300, 560, 380)) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    sites = {}
    for k, n in enumerate(sizes):
        g = rng.choice(["a", "b", "c"], size=n, p=[0.5, 0.3, 0.2])
        x = np.round(rng.normal(0.2 * k, 1.0, size=n), 6)
        t = (rng.random(n) < 1 / (1 + np.exp(0.3 - 0.5 * x))).astype(int)
        eff = pd.Series(g).map({"a": 0.0, "b": 0.4, "c": -0.3}).to_numpy()
        y = (rng.random(n) < 1 / (1 + np.exp(-(-0.5 + 0.7 * t + 0.4 * x - 0.3 * t * x + eff)))).astype(int)
        days = np.round(rng.uniform(20, 120, size=n), 3)
        mu = np.exp(-3.5 + 0.4 * t + 0.3 * x + eff + np.log(days))
        visits = rng.poisson(rng.gamma(1.5, mu / 1.5))
        sites[f"site{k}"] = pd.DataFrame({"y": y, "visits": visits, "t": t, "x": x, "g": g, "days": days})
    return sites


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    folder = tmp_path_factory.mktemp("marginal")
    sites = make_sites()
    write_network(folder, sites, COLUMNS)
    return folder, pooled(sites, COLUMNS)


def g_computation(fit, frame: pd.DataFrame, formula: str, term: str, offset: np.ndarray | None) -> dict:
    """Mean predictions with `term` set to 1 and 0, and the delta method with the fit's cov."""
    rhs = formula.split("~", 1)[1]
    beta, cov = fit.params.to_numpy(), fit.cov_params().to_numpy()
    off = 0.0 if offset is None else offset
    risks, grads = [], []
    for value in (1, 0):
        X = model_matrix(rhs, frame.assign(**{term: value}), output="numpy")
        X = np.asarray(X, dtype=float)[:, [list(model_matrix(rhs, frame).columns).index(c) for c in fit.params.index]]
        mu = fit.model.family.link.inverse(X @ beta + off)
        slope = fit.model.family.link.inverse_deriv(X @ beta + off)
        risks.append(mu.mean())
        grads.append((X * slope[:, None]).mean(axis=0))
    (r1, r0), (g1, g0) = risks, grads
    se_rd = np.sqrt((g1 - g0) @ cov @ (g1 - g0))
    log_grad = g1 / r1 - g0 / r0
    se_log = np.sqrt(log_grad @ cov @ log_grad)
    return {
        "term": term,
        "risk_exposed": r1,
        "risk_unexposed": r0,
        "risk_difference": r1 - r0,
        "rd_std_error": se_rd,
        "rd_low": r1 - r0 - Z * se_rd,
        "rd_high": r1 - r0 + Z * se_rd,
        "risk_ratio": r1 / r0,
        "rr_low": r1 / r0 * np.exp(-Z * se_log),
        "rr_high": r1 / r0 * np.exp(Z * se_log),
    }


def assert_marginal(ours: dict, theirs: dict) -> None:
    assert ours["term"] == theirs["term"]
    for key, value in theirs.items():
        if key != "term":
            np.testing.assert_allclose(ours[key], value, rtol=RTOL, atol=0, err_msg=key)


@pytest.mark.parametrize("cov_type", ["nonrobust", "HC0"])
def test_binomial_with_an_interaction(network, cov_type):
    folder, frame = network
    formula = "y ~ t * x + g"
    result = run_study(
        folder, name=f"m_{cov_type}", family="binomial", formula=formula, marginal=["t"], cov_type=cov_type
    )
    fit = smf.glm(formula, frame, family=sm.families.Binomial()).fit(
        tol=1e-13, tol_criterion="params", maxiter=200, cov_type=cov_type
    )
    (ours,) = result["marginal"]
    assert_marginal(ours, g_computation(fit, frame, formula, "t", None))
    assert ours["risk_difference"] > 0 and ours["rr_low"] < ours["risk_ratio"] < ours["rr_high"]
    assert "standardised t:" in render_report(result)


@pytest.mark.parametrize("cov_type", ["nonrobust", "HC0"])
def test_poisson_with_an_offset(network, cov_type):
    folder, frame = network
    formula = "visits ~ t + x + g"
    result = run_study(
        folder,
        name=f"m_poisson_{cov_type}",
        family="poisson",
        formula=formula,
        offset="log(days)",
        marginal=["t"],
        cov_type=cov_type,
    )
    offset = np.log(frame["days"].to_numpy())
    fit = smf.glm(formula, frame, family=sm.families.Poisson(), offset=offset).fit(
        tol=1e-13, tol_criterion="params", maxiter=200, cov_type=cov_type
    )
    assert_marginal(result["marginal"][0], g_computation(fit, frame, formula, "t", offset))


def test_negative_binomial_given_theta(network):
    folder, frame = network
    formula = "visits ~ t * x + g"
    result = run_study(folder, name="m_nb", family="negative_binomial", formula=formula, marginal=["t"])
    family = sm.families.NegativeBinomial(alpha=1 / result["theta"])
    fit = smf.glm(formula, frame, family=family).fit(tol=1e-14, tol_criterion="params", maxiter=300)
    assert_marginal(result["marginal"][0], g_computation(fit, frame, formula, "t", None))


@pytest.mark.parametrize(
    ("marginal", "formula", "sentence"),
    [
        ("t", "y ~ t + x", "field 'marginal' must be a list of binary columns"),
        (["x"], "y ~ t + x", "'x' is not a binary (0/1) column"),
        (["t"], "y ~ x", "the formula has no term 't'"),
        (["t"], "y ~ t + t:x", "whose interaction with 'x' needs the term 'x'"),
    ],
)
def test_bad_marginal_fields_are_one_sentence(network, marginal, formula, sentence):
    folder, _ = network
    with pytest.raises(SpecError, match="m_bad.toml: field 'marginal'") as caught:
        run_study(folder, name="m_bad", family="binomial", formula=formula, marginal=marginal)
    assert sentence in str(caught.value) and "\n" not in str(caught.value)


# --- contrasts: a categorical exposure set to two levels, a numeric one to two values ---------------


def setting(frame: pd.DataFrame, column: str, value):
    """`column` set to `value` on every row (a categorical column to the level, its levels kept)."""
    if isinstance(frame[column].dtype, pd.CategoricalDtype):
        return frame.assign(**{column: pd.Categorical([value] * len(frame), categories=frame[column].cat.categories)})
    return frame.assign(**{column: float(value)})


def g_contrast(fit, frame: pd.DataFrame, formula: str, column: str, values, offset=None) -> dict:
    """g_computation for a contrast: mean predictions with `column` set to each of `values`."""
    rhs = formula.split("~", 1)[1]
    beta, cov = fit.params.to_numpy(), fit.cov_params().to_numpy()
    order = [list(model_matrix(rhs, frame).columns).index(c) for c in fit.params.index]
    off = 0.0 if offset is None else offset
    risks, grads = [], []
    for value in values:
        X = np.asarray(model_matrix(rhs, setting(frame, column, value), output="numpy"), dtype=float)[:, order]
        mu = fit.model.family.link.inverse(X @ beta + off)
        slope = fit.model.family.link.inverse_deriv(X @ beta + off)
        risks.append(mu.mean())
        grads.append((X * slope[:, None]).mean(axis=0))
    (r1, r0), (g1, g0) = risks, grads
    se_rd = np.sqrt((g1 - g0) @ cov @ (g1 - g0))
    log_grad = g1 / r1 - g0 / r0
    se_log = np.sqrt(log_grad @ cov @ log_grad)
    first, second = (str(v) if isinstance(v, str) else f"{v:g}" for v in values)
    return {
        "term": f"{column} {first} vs {second}",
        "risk_exposed": r1,
        "risk_unexposed": r0,
        "risk_difference": r1 - r0,
        "rd_std_error": se_rd,
        "rd_low": r1 - r0 - Z * se_rd,
        "rd_high": r1 - r0 + Z * se_rd,
        "risk_ratio": r1 / r0,
        "rr_low": r1 / r0 * np.exp(-Z * se_log),
        "rr_high": r1 / r0 * np.exp(Z * se_log),
    }


LARGEST = {}  # the largest relative difference from statsmodels per contrast case (reported)


def assert_contrast(ours: dict, theirs: dict, case: str) -> None:
    assert_marginal(ours, theirs)
    worst = max(abs(ours[k] - v) / abs(v) for k, v in theirs.items() if k != "term")
    LARGEST[case] = max(LARGEST.get(case, 0.0), worst)


@pytest.mark.parametrize("cov_type", ["nonrobust", "HC0"])
def test_contrasts_of_a_categorical_and_a_numeric_exposure(network, cov_type):
    """`g` set to level c and to a (its reference), to c and to b (neither the reference), and
    the numeric `x` set to 1.5 and to -0.5, in a model where both interact (`g * x`: with x set
    to 1.5 the interaction columns are 1.5 times g's), beside the binary `t` as before."""
    folder, frame = network
    formula = "y ~ t + g * x"
    contrasts = [
        {"exposure": "g", "compare": ["c", "a"]},
        {"exposure": "g", "compare": ["c", "b"]},
        {"exposure": "x", "compare": [1.5, -0.5]},
    ]
    result = run_study(
        folder,
        name=f"c_{cov_type}",
        family="binomial",
        formula=formula,
        marginal=["t", *contrasts],
        cov_type=cov_type,
    )
    fit = smf.glm(formula, frame, family=sm.families.Binomial()).fit(
        tol=1e-13, tol_criterion="params", maxiter=200, cov_type=cov_type
    )
    binary, *ours = result["marginal"]
    assert_marginal(binary, g_computation(fit, frame, formula, "t", None))
    assert [m["term"] for m in ours] == ["g c vs a", "g c vs b", "x 1.5 vs -0.5"]
    for m, contrast in zip(ours, contrasts):
        assert m["exposure"] == contrast["exposure"] and m["compare"] == contrast["compare"]
        theirs = g_contrast(fit, frame, formula, contrast["exposure"], contrast["compare"])
        assert_contrast(m, theirs, f"binomial {cov_type} {m['term']}")
    text = render_report(result)
    assert "standardised g: " in text and "set to c vs" in text and "set to 1.5 vs" in text


def test_contrasts_in_a_poisson_model_with_an_offset(network):
    folder, frame = network
    formula = "visits ~ t + x + g"
    contrasts = [{"exposure": "g", "compare": ["b", "c"]}, {"exposure": "x", "compare": [1, 0]}]
    result = run_study(
        folder, name="c_poisson", family="poisson", formula=formula, offset="log(days)", marginal=contrasts
    )
    offset = np.log(frame["days"].to_numpy())
    fit = smf.glm(formula, frame, family=sm.families.Poisson(), offset=offset).fit(
        tol=1e-13, tol_criterion="params", maxiter=200
    )
    for m, contrast in zip(result["marginal"], contrasts):
        theirs = g_contrast(fit, frame, formula, contrast["exposure"], contrast["compare"], offset)
        assert_contrast(m, theirs, f"poisson {m['term']}")


def test_a_binary_contrast_is_the_binary_exposure_reversed(network):
    folder, _ = network
    result = run_study(
        folder,
        name="c_reversed",
        family="binomial",
        formula="y ~ t + x",
        marginal=["t", {"exposure": "t", "compare": [0, 1]}],
    )
    plain, reversed_ = result["marginal"]
    assert reversed_["term"] == "t 0 vs 1"
    assert reversed_["risk_exposed"] == pytest.approx(plain["risk_unexposed"], rel=1e-14)
    assert reversed_["risk_difference"] == pytest.approx(-plain["risk_difference"], rel=1e-12)
    assert reversed_["rd_std_error"] == pytest.approx(plain["rd_std_error"], rel=1e-12)


def test_a_contrast_through_the_cli(network, tmp_path):
    """The study file as an analyst writes it (inline tables in the list), through `iaptnet run`."""
    from iaptnet.cli import main

    folder, frame = network
    study = tmp_path / "cli_contrast.toml"
    study.write_text(
        'name = "cli_contrast"\nfamily = "binomial"\nformula = "y ~ t + x + g"\nexposure = "g[T.c]"\n'
        'marginal = ["t", {exposure = "g", compare = ["c", "a"]}, {exposure = "x", compare = [2, 0]}]\n'
    )
    out = tmp_path / "out"
    assert main(["run", str(study), "--network", str(folder / "network.toml"), "--out", str(out), "--quiet"]) == 0
    result = json.loads((out / "results.json").read_text())  # (one study: its results at the top)
    assert "\ng c vs a," in (out / "tables" / "cli_contrast-marginal.csv").read_text()
    fit = smf.glm("y ~ t + x + g", frame, family=sm.families.Binomial()).fit(tol=1e-13, tol_criterion="params")
    _, categorical, numeric = result["marginal"]
    assert_contrast(categorical, g_contrast(fit, frame, "y ~ t + x + g", "g", ["c", "a"]), "cli g c vs a")
    assert_contrast(numeric, g_contrast(fit, frame, "y ~ t + x + g", "x", [2, 0]), "cli x 2 vs 0")
    assert numeric["compare"] == [2.0, 0.0]


@pytest.mark.parametrize(
    ("marginal", "formula", "sentence"),
    [
        ([{"exposure": "nope", "compare": ["b", "a"]}], "y ~ t + g", "which is not a column of the dataset"),
        ([{"exposure": "g", "compare": ["z", "a"]}], "y ~ t + g", "compares 'z', which is not a level of 'g'"),
        ([{"exposure": "g", "compare": [2, 1]}], "y ~ t + g", 'two of its levels as text, e.g. compare = ["c", "a"]'),
        ([{"exposure": "days", "compare": [0, 10]}], "y ~ t + days", "outside the column's declared range 1 to inf"),
        ([{"exposure": "visits", "compare": [1.5, 0]}], "y ~ t + visits", "is an integer column: give whole numbers"),
        ([{"exposure": "g", "compare": ["b", "a"]}], "y ~ t + x", "the formula has no term 'g' or 'C(g)'"),
        ([{"exposure": "x", "compare": [1, 0]}], "y ~ t + log(days)", "the formula has no term 'x'"),
        ([{"exposure": "x", "compare": [1, 0]}], "y ~ t + x + x:g", "whose interaction with 'g' needs the term 'g'"),
        ([{"exposure": "g", "compare": ["b", "b"]}], "y ~ g", "compares 'b' with itself"),
        ([{"exposure": "g", "compare": ["b"]}], "y ~ g", "must compare two values"),
        ([{"exposure": "g", "levels": ["b", "a"]}], "y ~ g", "has a contrast that has unknown key 'levels'"),
        ([{"exposure": "t", "compare": [2, 0]}], "y ~ t", "must compare 1 with 0"),
        ([{"exposure": "g", "compare": ["b", "a"]}] * 2, "y ~ g", "lists 'g b vs a' twice"),
    ],
)
def test_bad_contrasts_are_one_sentence(network, marginal, formula, sentence):
    folder, _ = network
    with pytest.raises(SpecError, match="c_bad.toml: field 'marginal'") as caught:
        run_study(folder, name="c_bad", family="binomial", formula=formula, marginal=marginal)
    assert sentence in str(caught.value) and "\n" not in str(caught.value)


def test_a_contrast_sees_the_study_merges(network):
    """Levels are those after the study's merges: a merged-away level is not one to compare."""
    folder, _ = network
    with pytest.raises(SpecError, match="not a level of 'g' \\(after the study's merges\\); its levels are a, b"):
        run_study(
            folder,
            name="c_merged",
            family="binomial",
            formula="y ~ t + g",
            merge={"g": {"b": ["b", "c"]}},
            marginal=[{"exposure": "g", "compare": ["c", "a"]}],
        )


# --- against R: glm, predict() on counterfactual copies, vcov() and sandwich's HC0 ----------------

R_COLUMNS = {
    "mdvis": {"type": "integer", "min": 0},
    "lncoins": {"type": "numeric"},
    "idp": {"type": "binary"},
    "lpi": {"type": "numeric"},
    "fmde": {"type": "numeric"},
    "physlm": {"type": "numeric"},
    "disea": {"type": "numeric"},
    "hlthg": {"type": "binary"},
    "hlthf": {"type": "binary"},
    "anyvis": {"type": "binary"},
}
R_MODELS = ["binomial_nonrobust", "binomial_hc0", "poisson_nonrobust"]
MARGINAL_FIELDS = (
    "risk_exposed",
    "risk_unexposed",
    "risk_difference",
    "rd_std_error",
    "rd_low",
    "rd_high",
    "risk_ratio",
    "rr_low",
    "rr_high",
)


def r_reference() -> dict:
    return json.loads((RESULTS / "marginal.json").read_text())


@pytest.fixture(scope="module")
def r_results(tmp_path_factory) -> dict[str, dict]:
    """The three reference models as study files run together by `iaptnet run` (they share
    rounds, the marginal round included), one node per service; each study's results.json."""
    import tomli_w

    from iaptnet.cli import main

    folder = tmp_path_factory.mktemp("marginal_r")
    frame = pd.read_csv(RESULTS / "marginal_input.csv")
    sites = {
        str(site): frame[frame["site"] == site].drop(columns="site").reset_index(drop=True)
        for site in frame["site"].unique()
    }
    write_network(folder, sites, R_COLUMNS)
    studies = []
    for model in R_MODELS:
        theirs = r_reference()[model]
        fields = {"name": f"marginal_{model}", "family": theirs["family"], "formula": theirs["formula"]}
        fields.update(marginal=[theirs["exposure"]], cov_type=theirs["cov_type"])
        path = folder / f"marginal_{model}.toml"
        path.write_text(tomli_w.dumps(fields))
        studies.append(str(path))
    out = folder / "out"
    assert main(["run", *studies, "--network", str(folder / "network.toml"), "--out", str(out), "--quiet"]) == 0
    return {model: json.loads((out / f"marginal_{model}" / "results.json").read_text()) for model in R_MODELS}


@pytest.mark.parametrize("model", R_MODELS)
def test_marginal_equals_r_g_computation(r_results, model):
    theirs = r_reference()[model]
    result = r_results[model]
    assert result["n"] == theirs["n"] and result["cov_type"] == theirs["cov_type"]
    terms = {t["term"]: t for t in result["terms"]}  # (formulaic orders terms by degree, R as written)
    names = ["Intercept" if k == "(Intercept)" else k for k in theirs["estimate"]]
    assert sorted(terms) == sorted(names)
    for field in ("estimate", "std_error"):
        ours = [terms[name][field] for name in names]
        np.testing.assert_allclose(ours, list(theirs[field].values()), rtol=RTOL, atol=0, err_msg=f"{model} {field}")
    (ours,) = result["marginal"]
    assert ours["term"] == theirs["marginal"]["term"] == theirs["exposure"]
    for field in MARGINAL_FIELDS:
        np.testing.assert_allclose(
            ours[field], theirs["marginal"][field], rtol=RTOL, atol=0, err_msg=f"{model} {field}"
        )

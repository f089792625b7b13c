"""A GLM study's [sensitivity] table (protocol/sensitivity.py): the companion studies it
stands for, their results folded into the study's, checked against independent computations
on the pooled rows (statsmodels for the fits and the standardised risks, the dense
clubSandwich transcription of tests/test_cr2.py for CR2); the report, the demo's table and
the Trust's approval of every companion."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
import statsmodels.formula.api as smf
from glmcase import pooled, write_network, write_schema, write_study
from scipy import stats
from test_cr2 import dense_cr2

from iaptnet.cli import main
from iaptnet.coordinator.inprocess import run_inprocess
from iaptnet.coordinator.studies import load_study
from iaptnet.protocol.errors import SpecError
from iaptnet.protocol.sensitivity import expand, without_term

COLUMNS = {
    "y": {"type": "binary"},
    "t": {"type": "binary"},
    "x": {"type": "numeric"},
    "site": {"type": "categorical", "levels": ["s0", "s1", "s2", "s3"]},
}
SIZES = {"s0": 900, "s1": 500, "s2": 700, "s3": 400}
FORMULA = "y ~ t + x + site"


def make_sites(seed: int = 11) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    sites = {}
    for k, (name, n) in enumerate(SIZES.items()):
        x = rng.normal(size=n)
        t = (rng.random(n) < 0.3 + 0.1 * k).astype(int)
        u = rng.normal(scale=0.4)  # the site's own shift: a reason to ask for these analyses
        eta = -0.3 + 0.5 * t + 0.8 * x + u
        y = (rng.random(n) < 1 / (1 + np.exp(-eta))).astype(int)
        sites[name] = pd.DataFrame({"y": y, "t": t, "x": x, "site": name})
    return sites


STUDY = {
    "name": "finding",
    "family": "binomial",
    "formula": FORMULA,
    "exposure": "t",
    "sensitivity": {"cluster": "site", "random_intercept": "site", "marginal": True},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sensitivity")
    sites = make_sites()
    network = write_network(folder / "net", sites, COLUMNS)
    study = write_study(folder / "finding.toml", **STUDY, schema=str(folder / "net" / "schema.toml"))
    out = folder / "out"
    assert main(["run", str(study), "--network", str(network), "--out", str(out), "--quiet"]) == 0
    result = json.loads((out / "results.json").read_text())  # (one study: no folder of its own)
    return {"folder": folder, "sites": sites, "network": network, "study": study, "out": out, "result": result}


def entries(result: dict) -> dict[str, dict]:
    return {e["analysis"]: e for e in result["sensitivity"]}


# ------------------------------------------------------------------- what the table stands for


def test_the_table_stands_for_two_companion_studies_and_the_risk_difference():
    own, companions = expand(dict(STUDY, formula="y ~ t + C(site) + x"), "s.toml")
    assert "sensitivity" not in own and own["marginal"] == ["t"]
    (a1, cr2), (a2, mixed) = companions
    assert (a1, a2) == ("cr2", "random_intercept")
    assert cr2["name"] == "finding.cr2" and mixed["name"] == "finding.random_intercept"
    assert cr2["formula"] == mixed["formula"] == "y ~ t + x"
    assert (cr2["cov_type"], cr2["cluster"]) == ("CR2", "site") and mixed["random_intercept"] == "site"
    assert "marginal" not in cr2 and "random_intercept" not in cr2 and "cov_type" not in mixed
    assert without_term("y ~ site", "site", "s") == "y ~ 1"
    assert without_term("y ~ x + sites", "site", "s") == "y ~ x + sites"  # another column
    assert expand({"name": "n", "formula": "y ~ x"}, "s") == ({"name": "n", "formula": "y ~ x"}, [])


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"sensitivity": "site"}, "[sensitivity] must be a table"),
        ({"sensitivity": {"clusters": "site"}}, "unknown field 'clusters'"),
        ({"sensitivity": {"cluster": 3}}, "[sensitivity].cluster must name a column"),
        ({"sensitivity": {"marginal": "yes"}}, "[sensitivity].marginal must be true or false"),
        ({"sensitivity": {"cluster": "nope"}}, "'nope'"),
        ({"sensitivity": {"cluster": "site"}, "formula": "y ~ t * site + x"}, "only as its own term"),
        ({"sensitivity": {"cluster": "site"}, "cov_type": "HC0"}, "sets no 'cov_type' of its own"),
        ({"sensitivity": {"marginal": True}, "exposure": None}, "needs the study's 'exposure'"),
        ({"sensitivity": {"marginal": True}, "exposure": "x"}, "'x' is not a binary"),
        ({"sensitivity": {"marginal": True}, "marginal": ["t"]}, "give the exposures once"),
        ({"sensitivity": {"cluster": "site"}, "kind": "meta"}, "is for GLM studies"),
    ],
)
def test_a_bad_table_is_one_sentence_naming_the_file(tmp_path, change, words):
    write_schema(tmp_path / "schema.toml", COLUMNS)
    fields = {k: v for k, v in {**STUDY, **change, "schema": "schema.toml"}.items() if v is not None}
    path = write_study(tmp_path / "bad.toml", **fields)
    with pytest.raises(SpecError) as err:
        load_study(path)
    message = str(err.value)
    assert str(path) in message and words in message, message
    assert "\n" not in message


# ------------------------------------------------------------------- the numbers, independently


def reference(sites, formula):
    frame = pooled(sites, COLUMNS)
    return frame, smf.glm(formula, frame, family=sm.families.Binomial()).fit(tol=1e-13, tol_criterion="params")


def test_the_main_estimate_is_the_plain_model_with_its_risk_difference(run):
    result = run["result"]
    frame, fit = reference(run["sites"], FORMULA)
    assert result["cov_type"] == "nonrobust"
    np.testing.assert_allclose(result["exposure_term"]["estimate"], fit.params["t"], rtol=1e-8)
    np.testing.assert_allclose(result["exposure_term"]["std_error"], fit.bse["t"], rtol=1e-8)
    # g-computation on the pooled rows with statsmodels' fit and covariance.
    X = np.asarray(fit.model.exog)
    i = list(fit.params.index).index("t")  # (no interaction: setting t sets one column)
    X1, X0 = X.copy(), X.copy()
    X1[:, i], X0[:, i] = 1.0, 0.0
    mu1, mu0 = fit.model.predict(fit.params.to_numpy(), X1), fit.model.predict(fit.params.to_numpy(), X0)
    r1, r0 = mu1.mean(), mu0.mean()
    grad = ((mu1 * (1 - mu1))[:, None] * X1).mean(0) - ((mu0 * (1 - mu0))[:, None] * X0).mean(0)
    se = float(np.sqrt(grad @ fit.cov_params().to_numpy() @ grad))
    rd = entries(result)["marginal"]["term"]
    np.testing.assert_allclose([rd["risk_exposed"], rd["risk_unexposed"]], [r1, r0], rtol=1e-8)
    np.testing.assert_allclose([rd["risk_difference"], rd["rd_std_error"]], [r1 - r0, se], rtol=1e-8)
    assert result["marginal"][0]["risk_difference"] == rd["risk_difference"]  # the study's own entry


def test_the_cr2_companion_equals_clubsandwich_without_the_sites_fixed_effects(run):
    entry = entries(run["result"])["cr2"]
    frame, fit = reference(run["sites"], "y ~ t + x")
    X = np.asarray(fit.model.exog)
    mu = fit.fittedvalues.to_numpy()
    w = mu * (1 - mu)
    M = np.linalg.inv((X * w[:, None]).T @ X)
    groups = []
    for name in SIZES:
        rows = (frame["site"] == name).to_numpy()
        groups.append(
            {"theta": w[rows], "Y": np.sqrt(w[rows])[:, None] * X[rows], "resid": (fit.model.endog - mu)[rows]}
        )
    V, df = dense_cr2(groups, M)
    i = list(fit.params.index).index("t")
    se = float(np.sqrt(V[i, i]))
    term = entry["term"]
    assert entry["formula"] == "y ~ t + x" and entry["cluster"] == "site" and entry["n_clusters"] == len(SIZES)
    assert entry["study"] == "finding.cr2" and entry["n"] == len(frame)
    np.testing.assert_allclose(term["estimate"], fit.params["t"], rtol=1e-8)
    np.testing.assert_allclose([term["std_error"], term["df"]], [se, df[i]], rtol=1e-8)
    q = stats.t.ppf(0.975, df[i])
    np.testing.assert_allclose(
        [term["conf_low"], term["conf_high"]], fit.params["t"] + np.array([-q, q]) * se, rtol=1e-8
    )
    np.testing.assert_allclose(term["p_value"], 2 * stats.t.sf(abs(fit.params["t"] / se), df[i]), rtol=1e-7)


def test_the_random_intercept_companion_is_the_study_a_user_would_write(run, tmp_path):
    entry = entries(run["result"])["random_intercept"]
    alone = write_study(
        tmp_path / "alone.toml",
        name="alone",
        family="binomial",
        formula="y ~ t + x",
        exposure="t",
        random_intercept="site",
        schema=str(run["network"].parent / "schema.toml"),
    )
    result = run_inprocess([alone], run["network"])[0]
    assert entry["formula"] == result["formula"] and entry["n"] == result["n"] and entry["n_groups"] == len(SIZES)
    assert entry["term"] == {k: v for k, v in result["exposure_term"].items() if k in entry["term"]}
    assert entry["variance_components"] == result["variance_components"]
    assert entry["variance_components"][0]["variance"] > 0


def test_the_study_hash_is_the_plain_model_with_its_marginal_and_each_companion_has_its_own(run):
    loaded = load_study(run["study"])
    assert run["result"]["study_hash"] == loaded.spec.hash
    hashes = {e["analysis"]: e.get("study_hash") for e in run["result"]["sensitivity"]}
    assert hashes["cr2"] == loaded.companions[0][1].spec.hash
    assert hashes["random_intercept"] == loaded.companions[1][1].spec.hash
    assert len({loaded.spec.hash, hashes["cr2"], hashes["random_intercept"]}) == 3


def test_the_hub_parses_the_companions_the_analyst_did(run):
    from iaptnet.coordinator.serverapp import load_wire_study
    from iaptnet.protocol.study import read_study_file

    schema = run["network"].parent / "schema.toml"
    data = read_study_file(run["study"])
    ours = load_study(run["study"])
    entry = {
        "source": str(run["study"]),
        "data": data,
        "hash": ours.spec.hash,
        "schema": {"source": str(schema), "text": schema.read_text()},
    }
    theirs = load_wire_study(entry)
    assert [(a, c.spec.hash) for a, c in theirs.companions] == [(a, c.spec.hash) for a, c in ours.companions]


# ------------------------------------------------------------------- where people see them


def test_the_report_shows_each_analysis_beside_the_main_estimate(run):
    from reportcase import page_tables

    from iaptnet.report.sections import SENSITIVITY_WAYS

    html = (run["out"] / "report.html").read_text()
    page = page_tables(html)
    assert page.figures["sensitivity-forest"]["points"] == 3
    rows = page.tables["sensitivity"]
    result = run["result"]
    ways = {text: analysis for analysis, text in SENSITIVITY_WAYS.items()}
    shown = {ways[r[1][0]]: r for r in rows}  # analysis -> row
    assert set(shown) == {"main", "cr2", "random_intercept"}
    for analysis, term in (
        ("main", result["exposure_term"]),
        ("cr2", entries(result)["cr2"]["term"]),
        ("random_intercept", entries(result)["random_intercept"]["term"]),
    ):
        assert float(shown[analysis][2][1]) == pytest.approx(term["ratio"], rel=1e-12)
    assert float(shown["cr2"][4][1]) == pytest.approx(entries(result)["cr2"]["term"]["df"], rel=1e-12)
    (risk,) = page.tables["sensitivity-risk-difference"]
    assert float(risk[3][1]) == pytest.approx(entries(result)["marginal"]["term"]["risk_difference"], rel=1e-12)
    assert "finding-sensitivity" in page.tables
    assert (run["out"] / "tables" / "sensitivity.csv").exists()


def test_the_demo_prints_the_sensitivity_table(run):
    from iaptnet.coordinator.demo import render_sensitivity

    result = dict(run["result"], reference={"finding": "planted"})
    text = render_sensitivity([result])
    header, line = text.splitlines()
    assert "CR2 by service" in header and "random intercept" in header
    cr2 = entries(result)["cr2"]["term"]
    assert line.startswith("planted") and f"df {cr2['df']:.1f}" in line and f"{cr2['ratio']:.3f}" in line
    rd = entries(result)["marginal"]["term"]["risk_difference"]
    assert f"{100 * rd:+.1f}" in line
    assert render_sensitivity([{**result, "sensitivity": []}]) == ""


def test_the_trust_approves_the_study_and_its_companions_together(run, tmp_path, capsys):
    folder = tmp_path / "net"
    network = write_network(folder, run["sites"], COLUMNS)
    policy = folder / "policy.toml"
    policy.write_text('mode = "approved"\nstate_dir = "state"\n')
    network.write_text(
        network.read_text().replace('schema = "schema.toml"\n', 'schema = "schema.toml"\npolicy = "policy.toml"\n')
    )
    study = write_study(tmp_path / "finding.toml", **STUDY, schema=str(folder / "schema.toml"))
    assert main(["run", str(study), "--network", str(network), "--quiet"]) != 0
    assert "has not approved" in capsys.readouterr().err
    assert main(["node", "approve", str(study), "--policy", str(policy), "--yes"]) == 0
    said = capsys.readouterr().out
    loaded = load_study(study)
    for spec in [loaded.spec, *(c.spec for _, c in loaded.companions)]:
        assert f"approved: {spec.hash}" in said
    assert "std errors CR2, clustered by site" in said and "marginal   standardised risks of t" in said
    result = run_inprocess([study], network)[0]
    assert [e["analysis"] for e in result["sensitivity"]] == ["cr2", "random_intercept", "marginal"]


def test_the_terminal_report_has_a_line_per_companion(run):
    from iaptnet.coordinator.results import render_report

    text = render_report(run["result"])
    cr2, mixed = entries(run["result"])["cr2"], entries(run["result"])["random_intercept"]
    lines = [line for line in text.splitlines() if line.startswith("  sensitivity, ")]
    assert len(lines) == 2
    assert f"CR2 by site (4 clusters, df {cr2['term']['df']:.1f})" in lines[0]
    assert f"{cr2['term']['ratio']:.3f}" in lines[0] and cr2["formula"] in lines[0]
    assert "random intercept for site" in lines[1] and f"{mixed['term']['ratio']:.3f}" in lines[1]
    assert "standardised t:" in text  # the risk difference, as the study's own marginal line

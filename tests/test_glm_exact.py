"""The federated GLM equals statsmodels' GLM on the concatenated rows (to 1e-8 relative),
for all three families, with levels missing at some nodes, interactions, offsets, missing
values, cohort filters and pooled centring/scaling."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from glmcase import assert_matches, pooled, reference_fit, run_study, write_network
from numpy import log, sqrt  # noqa: F401 - the reference formulas use them

COLUMNS = {
    "y": {"type": "binary"},
    "count": {"type": "integer", "min": 0},
    "w": {"type": "numeric"},
    "x": {"type": "numeric"},
    "z": {"type": "numeric"},
    "g": {"type": "categorical", "levels": ["a", "b", "c", "d"]},
    "h": {"type": "categorical", "levels": ["lo", "hi"]},
    "logtime": {"type": "numeric"},
}


def make_sites(seed: int = 7, sizes=(400, 700, 550, 300)) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    sites = {}
    for k, n in enumerate(sizes):
        levels = ["a", "b", "c", "d"] if k != 1 else ["a", "b"]  # site 1 lacks c and d
        if k == 3:
            levels = ["a", "c", "d"]  # site 3 lacks b
        g = rng.choice(levels, size=n)
        h = rng.choice(["lo", "hi"], size=n, p=[0.6, 0.4])
        x = rng.normal(1.0 + 0.2 * k, 1.0, size=n)
        z = rng.normal(size=n)
        logtime = rng.normal(0.5, 0.4, size=n)
        eff = pd.Series(g).map({"a": 0.0, "b": 0.4, "c": -0.5, "d": 0.2}).to_numpy()
        eta = -0.2 + 0.7 * x + eff + 0.3 * (h == "hi") + 0.25 * x * z
        y = (rng.random(n) < 1 / (1 + np.exp(-eta))).astype(float)
        count = rng.poisson(np.exp(-0.5 + 0.3 * x + 0.5 * eff + logtime))
        w = 3.0 + 1.5 * x - 0.8 * z + eff + rng.normal(scale=1.3, size=n)
        frame = pd.DataFrame({"y": y, "count": count, "w": w, "x": x, "z": z, "g": g, "h": h, "logtime": logtime})
        for col in ("x", "g", "w", "count"):
            frame.loc[rng.choice(n, size=n // 25, replace=False), col] = np.nan
        frame["count"] = frame["count"].astype("Int64")
        sites[f"site{k}"] = frame
    return sites


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    folder = tmp_path_factory.mktemp("glmnet")
    sites = make_sites()
    write_network(folder, sites, COLUMNS)
    return folder, pooled(sites, COLUMNS)


def test_binomial_with_interaction_filter_missing_and_absent_levels(network):
    folder, frame = network
    formula = "y ~ x * z + g + h"
    # The filter leaves out a good share of each site (z <= -1.5, about 7%): a filter that
    # left out 1-7 rows beside the module's unfiltered models on the same rows would be a
    # differencing pair, which the nodes' default policy refuses (tests/test_attacks.py).
    result = run_study(
        folder, name="logit", family="binomial", formula=formula, where='z > -1.5 and h in ["lo", "hi"]', exposure="x"
    )
    ref = reference_fit(frame[(frame.z > -1.5)], formula, "binomial", ["y", "x", "z", "g", "h"])
    assert_matches(result, ref)
    assert result["converged"] and result["n_missing"] > 0
    assert result["exposure_term"]["term"] == "x"
    np.testing.assert_allclose(result["exposure_term"]["ratio"], np.exp(ref.params["x"]), rtol=1e-8)


def test_gaussian_with_categorical_interaction(network):
    folder, frame = network
    formula = "w ~ x + C(g) + C(g):z + I(x ** 2)"
    result = run_study(folder, name="linear", family="gaussian", formula=formula)
    ref = reference_fit(frame, formula, "gaussian", ["w", "x", "g", "z"])
    assert_matches(result, ref)
    np.testing.assert_allclose(result["scale"], ref.scale, rtol=1e-8)


def test_poisson_with_offset_and_transforms(network):
    folder, frame = network
    formula = "count ~ x + g + I(z ** 2) + I((x - 1) ** 2) + I(z / 2 + 1)"
    result = run_study(folder, name="rates", family="poisson", formula=formula, offset="logtime", where='g != "d"')
    sub = frame[(frame.g != "d") & frame.g.notna()].copy()
    sub["g"] = sub["g"].cat.remove_unused_categories()
    ref = reference_fit(sub, formula, "poisson", ["count", "x", "g", "z"], offset="logtime")
    # g = "d" has no rows in the cohort: the column is dropped, as the reference drops it.
    assert [d["term"] for d in result["dropped_terms"]] == ["g[T.d]"]
    assert_matches(result, ref)
    assert "ratio" in result["terms"][1]


def test_pooled_centring_and_scaling(network):
    folder, frame = network
    formula = "y ~ center(x) * scale(z) + h"
    result = run_study(folder, name="centred", family="binomial", formula=formula)
    complete = frame.dropna(subset=["y", "x", "z", "h"])
    ref = reference_fit(complete, formula, "binomial", ["y", "x", "z", "h"])
    assert_matches(result, ref)


def test_models_share_rounds(tmp_path, network):
    from glmcase import write_study

    from iaptnet.coordinator.inprocess import run_inprocess

    folder, frame = network
    a = write_study(tmp_path / "a.toml", name="a", family="binomial", formula="y ~ x + g")
    b = write_study(
        tmp_path / "b.toml", name="b", family="gaussian", formula="w ~ x + z", schema=str(folder / "schema.toml")
    )
    c = write_study(tmp_path / "c.toml", name="c", family="poisson", formula="count ~ x", offset="logtime")
    results = run_inprocess([a, b, c], folder / "network.toml")
    assert [r["study"] for r in results] == ["a", "b", "c"]
    rounds = {r["rounds"] for r in results}
    assert len(rounds) == 1  # one conversation: every model travelled in the same rounds
    assert rounds.pop() == 1 + max(r["iterations"] for r in results)
    assert_matches(results[0], reference_fit(frame, "y ~ x + g", "binomial", ["y", "x", "g"]))
    assert_matches(results[1], reference_fit(frame, "w ~ x + z", "gaussian", ["w", "x", "z"]))
    assert_matches(results[2], reference_fit(frame, "count ~ x", "poisson", ["count", "x"], offset="logtime"))


def test_result_does_not_depend_on_node_order(tmp_path):
    sites = make_sites(seed=11)
    forward = write_network(tmp_path / "f", sites, COLUMNS).parent
    backward = write_network(tmp_path / "b", dict(reversed(list(sites.items()))), COLUMNS).parent
    r1 = run_study(forward, name="o", family="binomial", formula="y ~ x + g + h")
    r2 = run_study(backward, name="o", family="binomial", formula="y ~ x + g + h")
    assert [t["estimate"] for t in r1["terms"]] == [t["estimate"] for t in r2["terms"]]
    assert [t["std_error"] for t in r1["terms"]] == [t["std_error"] for t in r2["terms"]]


# --- prior weights, robust and cluster-robust covariances, offset expressions -------------------

WEIGHTED_COLUMNS = dict(
    COLUMNS, wt={"type": "numeric", "min": 0}, clinic={"type": "integer"}, days={"type": "numeric", "min": 0.01}
)  # log() and sqrt() need a declared range


@pytest.fixture(scope="module")
def weighted_network(tmp_path_factory):
    rng = np.random.default_rng(21)
    sites = make_sites(seed=21)
    for k, frame in enumerate(sites.values()):
        n = len(frame)
        frame["wt"] = rng.gamma(2.0, 0.5, size=n)
        frame["clinic"] = 100 * k + rng.integers(0, 12, size=n)  # clinics lie within a site
        frame["days"] = np.exp(frame["logtime"]) * 30
    folder = tmp_path_factory.mktemp("weighted")
    write_network(folder, sites, WEIGHTED_COLUMNS)
    return folder, pooled(sites, WEIGHTED_COLUMNS)


def _reference(frame, formula, family, needed, **fit_kwargs):
    import statsmodels.formula.api as smf
    from glmcase import FAMILIES

    frame = frame.dropna(subset=needed)
    extra = {}
    if "wt" in needed:
        extra["var_weights"] = frame["wt"]
    if "offset" in fit_kwargs:
        extra["offset"] = fit_kwargs.pop("offset")(frame)
    if fit_kwargs.get("cov_type") == "cluster":
        fit_kwargs["cov_kwds"] = {"groups": frame["clinic"].to_numpy()}
    model = smf.glm(formula, frame, family=FAMILIES[family](), **extra)
    return model.fit(tol=1e-13, tol_criterion="params", maxiter=200, **fit_kwargs)


@pytest.mark.parametrize(
    "family, formula",
    [
        ("binomial", "y ~ x + g + h"),
        ("gaussian", "w ~ x + z + g"),
        ("poisson", "count ~ x + g"),
    ],
)
def test_prior_weights(weighted_network, family, formula):
    folder, frame = weighted_network
    result = run_study(folder, name=f"weighted_{family}", family=family, formula=formula, weights="wt")
    outcome = formula.split("~")[0].strip()
    needed = [outcome, "x", "g", "wt"] + (["z", "h"] if family != "poisson" else [])
    needed = [c for c in needed if c in formula or c in ("wt", outcome)]
    assert_matches(result, _reference(frame, formula, family, needed))
    assert result["weights"] == "wt"


@pytest.mark.parametrize("family, formula", [("binomial", "y ~ x + g"), ("gaussian", "w ~ x + z")])
def test_robust_sandwich(weighted_network, family, formula):
    folder, frame = weighted_network
    result = run_study(folder, name=f"hc0_{family}", family=family, formula=formula, cov_type="HC0")
    outcome = formula.split("~")[0].strip()
    needed = [outcome] + [c for c in ("x", "z", "g") if c in formula]
    ref = _reference(frame, formula, family, needed, cov_type="HC0")
    assert_matches(result, ref)
    assert result["cov_type"] == "HC0"


def test_cluster_robust_with_clusters_inside_nodes(weighted_network):
    folder, frame = weighted_network
    result = run_study(
        folder,
        name="clustered",
        family="binomial",
        formula="y ~ x + g + h",
        cov_type="cluster",
        cluster="clinic",
        weights="wt",
    )
    ref = _reference(frame, "y ~ x + g + h", "binomial", ["y", "x", "g", "h", "wt", "clinic"], cov_type="cluster")
    assert_matches(result, ref)
    assert result["n_clusters"] == frame.dropna(subset=["y", "x", "g", "h"])["clinic"].nunique()
    # Beside the sandwich, the model-based standard errors (statsmodels' nonrobust fit).
    model_based = _reference(frame, "y ~ x + g + h", "binomial", ["y", "x", "g", "h", "wt", "clinic"])
    np.testing.assert_allclose([t["std_error_model"] for t in result["terms"]], model_based.bse.to_numpy(), rtol=1e-8)
    plain = run_study(folder, name="plain", family="binomial", formula="y ~ x + g + h")
    assert all("std_error_model" not in t for t in plain["terms"])


def test_offset_expression(weighted_network):
    folder, frame = weighted_network
    result = run_study(
        folder, name="rate_days", family="poisson", formula="count ~ x + h + sqrt(days)", offset="log(days / 30)"
    )
    ref = _reference(
        frame,
        "count ~ x + h + sqrt(days)",
        "poisson",
        ["count", "x", "h", "days"],
        offset=lambda f: np.log(f["days"] / 30),
    )
    assert_matches(result, ref)


# --- the robust middle term is asked for only in the rounds that may converge -------------------


def _counting_meat(monkeypatch) -> list:
    """Count the nodes' computations of the robust middle term (one per node per round asked)."""
    from iaptnet.node import glm as node_glm

    calls = []
    original = node_glm.meat
    monkeypatch.setattr(node_glm, "meat", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def test_a_robust_model_is_sent_its_middle_term_only_in_the_rounds_that_may_converge(tmp_path, monkeypatch):
    """The middle term is as large as the information matrix: asked in every round it doubled
    what each node sends (and what the hub carries) for nothing but the last round's."""
    sites = make_sites(seed=21)
    write_network(tmp_path, sites, COLUMNS)
    calls = _counting_meat(monkeypatch)
    result = run_study(tmp_path, name="hc0", family="binomial", formula="y ~ x + g + h", cov_type="HC0")
    assert_matches(
        result, _reference(pooled(sites, COLUMNS), "y ~ x + g + h", "binomial", ["y", "x", "g", "h"], cov_type="HC0")
    )
    assert result["iterations"] >= 3 and result["rounds"] == 1 + result["iterations"]
    assert len(calls) <= 2 * len(sites) < result["iterations"] * len(sites)


def test_a_round_that_converges_without_the_middle_term_is_asked_again_with_it(tmp_path, monkeypatch):
    """Asked for in no round ahead (MEAT_AHEAD 0), the same fit: one more round at the same
    estimate, and the same numbers to the last bit."""
    from iaptnet.coordinator import glm as coordinator_glm

    sites = make_sites(seed=21)
    fields = dict(name="hc0", family="binomial", formula="y ~ x + g + h", cov_type="HC0")
    ahead = run_study(write_network(tmp_path / "ahead", sites, COLUMNS).parent, **fields)
    monkeypatch.setattr(coordinator_glm, "MEAT_AHEAD", 0.0)
    calls = _counting_meat(monkeypatch)
    late = run_study(write_network(tmp_path / "late", sites, COLUMNS).parent, **fields)
    assert len(calls) == len(sites)  # only the round asked again
    reference = _reference(pooled(sites, COLUMNS), "y ~ x + g + h", "binomial", ["y", "x", "g", "h"], cov_type="HC0")
    assert_matches(late, reference)
    assert late["rounds"] == ahead["rounds"] + 1 and late["iterations"] == ahead["iterations"]
    assert [(t["estimate"], t["std_error"]) for t in late["terms"]] == [
        (t["estimate"], t["std_error"]) for t in ahead["terms"]
    ]


def test_a_robust_gaussian_model_takes_no_more_rounds_than_a_plain_one(tmp_path):
    sites = make_sites(seed=21)
    write_network(tmp_path, sites, COLUMNS)
    plain = run_study(tmp_path, name="plain", family="gaussian", formula="w ~ x + z")
    robust = run_study(tmp_path, name="robust", family="gaussian", formula="w ~ x + z", cov_type="HC0")
    assert robust["rounds"] == plain["rounds"] and robust["cov_type"] == "HC0"


def test_a_node_sends_the_middle_term_when_asked_and_only_for_a_robust_model(tmp_path):
    from nodecase import Node, local_beta

    from iaptnet.protocol import messages as m

    frame = make_sites(seed=21)["site0"]
    node = Node(tmp_path / "robust", frame, COLUMNS)
    reply, study = node.prepare(node.spec(formula="y ~ x + h", cov_type="HC0"))
    beta = local_beta(reply)
    assert "meat/m0" not in node.round(study, {"m0": beta}).arrays
    asked = node.round(study, {"m0": beta}, meat=["m0"])
    assert asked.arrays["meat/m0"].shape == (6,)  # 3 x 3, packed
    plain = Node(tmp_path / "plain", frame, COLUMNS)
    reply, study = plain.prepare(plain.spec(formula="y ~ x + h"))
    refused = plain.round(study, {"m0": local_beta(reply)}, meat=["m0"])
    assert refused.status == m.REFUSED and refused.arrays == {}
    assert "robust middle term of a model that has no robust SEs" in refused.message

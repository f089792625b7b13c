"""Random intercepts (`random_intercept = COLUMN`): iaptnet against lme4, and the pieces.

The R references (tests/results/make_glmm.R: glmm_<family>.json and their inputs) are lme4's
glmer (nAGQ = 1 and 10) and lmer (ML and REML) on public data R ships (lme4's VerbAgg and
Arabidopsis, nlme's Milk), split over 3 to 5 services with every group inside one service.
lme4 optimises, so the comparison is at 1e-5 relative (GLMM_RTOL) to lme4 at its optimum
(bobyqa polished by Newton steps on lme4's own deviance function). Measured when the references
were made: estimates within 3.1e-7 (binomial, Laplace), 5e-8 (binomial, 10 points), 5e-9
(poisson), 3e-11 (gaussian); the random intercept's variance within 8e-8; log-likelihoods
within 3e-7 absolute.

Standard errors. lmer's vcov() is sigma^2 times the inverse of X'V^-1 X at the optimum: within
8e-10. glmer's vcov() inverts a finite-difference Hessian of the deviance in (theta, beta)
(lme4's deriv12, step 1e-4): the deviance's rounding (about 1e-10 on a deviance of 8,000,
divided by the step squared) and, for the Laplace approximation, PIRLS's inexact conditional
modes away from the optimum (up to 8e-7 in the poisson deviance) make it differ from the exact
Hessian iaptnet's nodes compute by up to 3.3e-4 (measured: binomial Laplace 1.5e-4, binomial
10 points 4.5e-5, poisson Laplace 3.3e-4, poisson 10 points 2.4e-7): compared at VCOV_RTOL.
make_glmm.R also records the same vcov formula with numDeriv's Richardson Hessian of lme4's
deviance (std_error_richardson): within 1.2e-6 of iaptnet's but for the poisson Laplace fit,
whose deviance function carries the inexact modes (4.8e-4).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from glmcase import run_study, write_network
from scipy.special import gammaln, xlogy

from iaptnet.node.glmm_likelihood import GroupDesign, Groups, MarginalLikelihood, gaussian_sums
from iaptnet.protocol.errors import ModelError, SpecError
from iaptnet.protocol.schema import Schema
from iaptnet.protocol.study import parse_study

RESULTS = Path(__file__).resolve().parent / "results"
GLMM_RTOL = 1e-5
VCOV_RTOL = 5e-4
UNPOLISHED_RTOL = 1e-4  # glmer's own bobyqa stops within 3.7e-5 of its optimum here

COLUMNS = {
    "glmm_binomial": {
        "id": {"type": "integer"},
        "y": {"type": "binary"},
        "anger": {"type": "integer"},
        "gender": {"type": "categorical", "levels": ["F", "M"]},
        "btype": {"type": "categorical", "levels": ["curse", "scold", "shout"]},
        "situ": {"type": "categorical", "levels": ["other", "self"]},
        "mode": {"type": "categorical", "levels": ["want", "do"]},
    },
    "glmm_poisson": {
        "gen": {"type": "integer"},
        "total_fruits": {"type": "integer", "min": 0},
        "nutrient": {"type": "binary"},
        "amd": {"type": "categorical", "levels": ["clipped", "unclipped"]},
        "rack": {"type": "binary"},
        "status": {"type": "categorical", "levels": ["normal", "petri", "transplant"]},
    },
    "glmm_gaussian": {
        "cow": {"type": "integer"},
        "protein": {"type": "numeric"},
        "diet": {"type": "categorical", "levels": ["barley", "mixed", "lupins"]},
        "time": {"type": "integer"},
    },
}
MODELS = [
    ("glmm_binomial", "laplace"),
    ("glmm_binomial", "agq10"),
    ("glmm_poisson", "laplace"),
    ("glmm_poisson", "agq10"),
    ("glmm_gaussian", "ml"),
    ("glmm_gaussian", "reml"),
]


def reference(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def sites_of(name: str) -> dict[str, pd.DataFrame]:
    frame = pd.read_csv(RESULTS / f"{name}_input.csv")
    return {str(s): frame[frame.site == s].drop(columns="site").reset_index(drop=True) for s in frame.site.unique()}


def term_of(r_name: str, name: str) -> str:
    """R's coefficient name as iaptnet's: (Intercept) -> Intercept, btypescold -> btype[T.scold]."""
    if r_name == "(Intercept)":
        return "Intercept"
    for column, spec in COLUMNS[name].items():
        for level in spec.get("levels", [])[1:]:
            if r_name == f"{column}{level}":
                return f"{column}[T.{level}]"
    return r_name


def fields_of(theirs: dict, name: str) -> dict:
    fields = {
        "family": theirs["family"],
        "formula": theirs["formula"],
        "random_intercept": theirs["random_intercept"],
    }
    if "nagq" in theirs:
        fields["nagq"] = theirs["nagq"]
    if "reml" in theirs:
        fields["reml"] = theirs["reml"]
    return fields


@pytest.fixture(scope="module")
def networks(tmp_path_factory):
    out = {}
    for name in COLUMNS:
        folder = tmp_path_factory.mktemp(name)
        write_network(folder, sites_of(name), COLUMNS[name])
        out[name] = folder
    return out


def assert_matches_lme4(result: dict, theirs: dict, name: str) -> None:
    gaussian = theirs["family"] == "gaussian"
    ours = {t["term"]: t for t in result["terms"]}
    assert sorted(ours) == sorted(term_of(k, name) for k in theirs["estimate"])
    for r_name, estimate in theirs["estimate"].items():
        term = ours[term_of(r_name, name)]
        np.testing.assert_allclose(term["estimate"], estimate, rtol=GLMM_RTOL, atol=0, err_msg=r_name)
        np.testing.assert_allclose(
            term["estimate"], theirs["unpolished"]["estimate"][r_name], rtol=UNPOLISHED_RTOL, atol=0, err_msg=r_name
        )
        np.testing.assert_allclose(
            term["std_error"],
            theirs["std_error"][r_name],
            rtol=GLMM_RTOL if gaussian else VCOV_RTOL,
            atol=0,
            err_msg=f"{r_name} std_error",
        )
    assert result["n"] == theirs["n"] and result["n_groups"] == theirs["n_groups"]
    random = result["variance_components"][0]
    assert random["group"] == theirs["random_intercept"]
    np.testing.assert_allclose(random["variance"], theirs["variance"], rtol=GLMM_RTOL, atol=0)
    np.testing.assert_allclose(random["std_dev"], theirs["std_dev"], rtol=GLMM_RTOL, atol=0)
    if gaussian:
        residual = result["variance_components"][1]
        assert residual["group"] == "Residual"
        np.testing.assert_allclose(residual["variance"], theirs["residual_variance"], rtol=GLMM_RTOL, atol=0)
        np.testing.assert_allclose(result["scale"], theirs["residual_variance"], rtol=GLMM_RTOL, atol=0)


@pytest.mark.parametrize("name, model", MODELS)
def test_random_intercept_equals_lme4(networks, name, model):
    theirs = reference(name)[model]
    result = run_study(networks[name], name=f"{name}_{model}", **fields_of(theirs, name))
    assert result["converged"] and result["random_intercept"] == theirs["random_intercept"]
    assert all(n["contributed"] for n in result["nodes"])
    assert_matches_lme4(result, theirs, name)
    llf = result["llf"]
    if name == "glmm_poisson" and model == "agq10":
        # lme4's quadrature adds up deviance residuals: its log-likelihood lacks the poisson
        # saturated model's, sum(y log y - y - log y!).
        y = sites_of(name)
        y = np.concatenate([f.total_fruits.to_numpy(dtype=float) for f in y.values()])
        llf -= float(np.sum(xlogy(y, y) - y - gammaln(y + 1.0)))
    np.testing.assert_allclose(llf, theirs["loglik"], rtol=1e-9, atol=0)


def test_a_centred_term_is_lme4s_fit_with_the_pooled_mean_taken_out(networks):
    """`center(time)` goes through glmm.moments (the nodes' means pooled exactly): the slopes
    and every standard error but the intercept's are lme4's, and the intercept moves by the
    slope times the pooled rows' mean (pandas)."""
    theirs = reference("glmm_gaussian")["ml"]
    fields = dict(fields_of(theirs, "glmm_gaussian"), formula=theirs["formula"].replace("time", "center(time)"))
    result = run_study(networks["glmm_gaussian"], name="glmm_centred", **fields)
    ours = {t["term"]: t for t in result["terms"]}
    mean = pd.concat(sites_of("glmm_gaussian").values())["time"].mean()
    slope = theirs["estimate"]["time"]
    np.testing.assert_allclose(ours["center(time)"]["estimate"], slope, rtol=GLMM_RTOL)
    np.testing.assert_allclose(ours["center(time)"]["std_error"], theirs["std_error"]["time"], rtol=GLMM_RTOL)
    for r_name in ("dietmixed", "dietlupins"):
        np.testing.assert_allclose(
            ours[term_of(r_name, "glmm_gaussian")]["estimate"], theirs["estimate"][r_name], rtol=GLMM_RTOL
        )
    np.testing.assert_allclose(
        ours["Intercept"]["estimate"], theirs["estimate"]["(Intercept)"] + slope * mean, rtol=GLMM_RTOL
    )


@pytest.mark.parametrize("name, model", [("glmm_binomial", "laplace"), ("glmm_binomial", "agq10")])
def test_standard_errors_equal_lme4s_vcov_with_an_accurate_hessian(networks, name, model):
    """lme4's vcov() formula (the beta block of twice the inverse Hessian of the deviance in
    (theta, beta)) with numDeriv's Richardson Hessian instead of deriv12's."""
    theirs = reference(name)[model]
    result = run_study(networks[name], name=f"{name}_{model}_se", **fields_of(theirs, name))
    ours = {t["term"]: t["std_error"] for t in result["terms"]}
    for r_name, se in theirs["std_error_richardson"].items():
        np.testing.assert_allclose(ours[term_of(r_name, name)], se, rtol=GLMM_RTOL, atol=0, err_msg=r_name)


def test_random_intercept_through_iaptnet_run(tmp_path, capsys):
    """`iaptnet run` on a study file: results.json and the terminal report."""
    import tomli_w

    from iaptnet.cli import main

    name = "glmm_binomial"
    theirs = reference(name)["agq10"]
    network = write_network(tmp_path, sites_of(name), COLUMNS[name])
    study = tmp_path / "verbal.toml"
    study.write_text(tomli_w.dumps({"name": "verbal", **fields_of(theirs, name)}))
    assert main(["run", str(study), "--network", str(network), "--out", str(tmp_path / "out")]) == 0
    shown = capsys.readouterr().out
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["nagq"] == 10 and result["kind"] == "glm"
    assert_matches_lme4(result, theirs, name)
    assert "random intercept per id, adaptive Gauss-Hermite, 10 points" in shown
    assert "variance id" in shown and "316 groups" in shown
    report = (tmp_path / "out" / "report.html").read_text()
    assert "With an intercept for each of the 316 groups" in report and "quadrature with 10 points" in report


# --------------------------------------------------------------------------- the node's sums


def small_design(family: str, seed: int = 3) -> GroupDesign:
    rng = np.random.default_rng(seed)
    n = 240
    codes = rng.integers(0, 12, size=n)
    X = np.column_stack([np.ones(n), rng.normal(size=n), rng.random(n) < 0.4]).astype(float)
    b = rng.normal(0, 0.7, size=12)[codes]
    eta = X @ np.array([-0.3, 0.5, 0.4]) + b
    y = (rng.random(n) < 1 / (1 + np.exp(-eta))).astype(float) if family == "binomial" else rng.poisson(np.exp(eta))
    offset = np.zeros(n) if family == "binomial" else rng.normal(0, 0.1, size=n)
    return GroupDesign(X, np.asarray(y, dtype=float), offset, Groups(codes, 12))


@pytest.mark.parametrize("family", ["binomial", "poisson"])
@pytest.mark.parametrize("nagq", [1, 7])
def test_the_gradient_and_hessian_are_exact(family, nagq):
    """The nodes' gradient and Hessian of the log marginal likelihood (jets through the
    groups' modes) against central differences of its value and of the gradient."""
    likelihood = MarginalLikelihood(small_design(family), family, nagq)
    point = np.array([-0.2, 0.4, 0.3, 0.8])

    def at(x):
        return likelihood.evaluate(x[:-1], float(x[-1]))

    _, gradient, hessian, weights = at(point)
    for name, values in likelihood.row_weights(point[:-1], float(point[-1])).items():  # (the history's)
        np.testing.assert_allclose(values, weights[name], rtol=1e-12, atol=1e-15, err_msg=name)
    h = 1e-5
    steps = np.eye(point.size) * h
    numeric_gradient = np.array([(at(point + e)[0] - at(point - e)[0]) / (2 * h) for e in steps])
    numeric_hessian = np.array([(at(point + e)[1] - at(point - e)[1]) / (2 * h) for e in steps])
    np.testing.assert_allclose(gradient, numeric_gradient, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(hessian, numeric_hessian, rtol=1e-7, atol=1e-7)


def test_quadrature_converges_to_the_integral():
    """More points approach the integral itself: each group's likelihood by brute-force
    quadrature on a fine grid."""
    design = small_design("poisson")
    beta, sigma = np.array([-0.2, 0.4, 0.3]), 0.8
    a = design.X @ beta + design.offset
    grid = np.linspace(-8, 8, 4001)
    total = 0.0
    for g in range(design.groups.n_groups):
        rows = design.groups.codes == g
        eta = a[rows][:, None] + sigma * grid[None, :]
        y = design.y[rows][:, None]
        log_f = np.sum(y * eta - np.exp(eta) - gammaln(y + 1), axis=0) - grid**2 / 2 - 0.5 * np.log(2 * np.pi)
        top = log_f.max()
        total += top + np.log(np.trapezoid(np.exp(log_f - top), grid))
    value = MarginalLikelihood(design, "poisson", 25).evaluate(beta, sigma)[0]
    np.testing.assert_allclose(value, total, rtol=1e-10)
    laplace = MarginalLikelihood(design, "poisson", 1).evaluate(beta, sigma)[0]
    assert abs(laplace - total) > 1e3 * abs(value - total)


def test_the_gaussian_sums_are_the_closed_form():
    """Z'V^-1 Z and log det V summed over groups, and their theta derivatives, against dense
    algebra (V = I + theta^2 Z_g Z_g' per group)."""
    design = small_design("poisson")
    Z = np.column_stack([design.X, design.y - design.offset])

    def dense(theta):
        M, ld = 0.0, 0.0
        for g in range(design.groups.n_groups):
            rows = design.groups.codes == g
            V = np.eye(rows.sum()) + theta**2
            M = M + Z[rows].T @ np.linalg.solve(V, Z[rows])
            ld += np.linalg.slogdet(V)[1]
        return M, ld

    theta, h = 0.7, 1e-4
    cross, logdet = gaussian_sums(design, theta)
    M, ld = dense(theta)
    (Mp, ldp), (Mm, ldm) = dense(theta + h), dense(theta - h)
    np.testing.assert_allclose(cross[0], M, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(logdet[0], ld, rtol=1e-12)
    np.testing.assert_allclose(cross[1], (Mp - Mm) / (2 * h), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(cross[2], (Mp - 2 * M + Mm) / h**2, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(logdet[1:], [(ldp - ldm) / (2 * h), (ldp - 2 * ld + ldm) / h**2], rtol=1e-5)


# --------------------------------------------------------------------------- what the nodes see


def test_a_group_at_two_nodes_is_refused(tmp_path):
    """Groups that span services would be counted as two groups (each node's sums are over its
    own rows): the coordinator finds them by their tags and stops, naming the nodes."""
    sites = sites_of("glmm_gaussian")
    s1 = sites["s1"]
    s1.loc[s1.cow == s1.cow.iloc[0], "cow"] = sites["s0"].cow.iloc[0]  # one of s1's cows named as one of s0's
    write_network(tmp_path, sites, COLUMNS["glmm_gaussian"])
    with pytest.raises(ModelError, match=r"1 group\(s\) of the random intercept 'cow' have rows at both s0 and s1"):
        run_study(tmp_path, name="span", family="gaussian", formula="protein ~ diet + time", random_intercept="cow")


def test_a_node_releases_only_sums_over_its_groups(tmp_path):
    """One node's replies: prepare has the design's shape, the number of groups and their tags;
    a round only the three sums (p + 1 and its packed square), nothing per group."""
    from nodecase import Node

    from iaptnet.protocol import messages as m
    from iaptnet.protocol.kinds import glmm as protocol

    frame = sites_of("glmm_binomial")["s1"]
    node = Node(tmp_path / "node", frame, COLUMNS["glmm_binomial"])
    wire = node.spec(family="binomial", formula="y ~ anger + situ", random_intercept="id", nagq=5)
    reply, study = node.prepare(wire, kind=protocol.PREPARE)
    assert reply.status == m.OK, reply.message
    shape = reply.payload["models"]["m0"]
    assert set(shape) == {"columns", "n_used", "events", "nnz", "n_groups", "group_tags"}
    assert shape["n_groups"] == 90 == len(set(shape["group_tags"]))
    assert all(len(t) == 32 and int(t, 16) >= 0 for t in shape["group_tags"])  # hashes, not values
    assert set(reply.arrays) == {"local_info/m0", "local_ibeta/m0"}
    task = m.Task(
        kind=protocol.ROUND,
        study_hash=study,
        payload={"models": ["m0"]},
        arrays={protocol.parameters_key("m0"): np.array([-0.5, 0.05, -1.0, 1.2])},
    )
    round_reply = node.send(task)
    assert round_reply.status == m.OK, round_reply.message
    assert {k: v.shape for k, v in round_reply.arrays.items()} == {
        "loglik/m0": (1,),
        "gradient/m0": (4,),
        "hessian/m0": (10,),
    }
    entry = node.audit_entries()[-1]
    assert entry["kind"] == protocol.ROUND and set(entry["released"]["arrays"]) == set(round_reply.arrays)
    bad = m.Task(
        kind=protocol.ROUND,
        study_hash=study,
        payload={"models": ["m0"]},
        arrays={protocol.parameters_key("m0"): np.array([-0.5, 0.05, -1.0, -1.2])},
    )
    assert node.send(bad).status == m.REFUSED  # a negative sigma


# --------------------------------------------------------------------------- study files


@pytest.fixture(scope="module")
def schema(tmp_path_factory):
    from glmcase import write_schema

    columns = {**COLUMNS["glmm_binomial"], "w": {"type": "numeric", "min": 0}, "score": {"type": "numeric"}}
    return Schema.load(write_schema(tmp_path_factory.mktemp("schema") / "schema.toml", columns))


BASE = {"name": "s", "family": "binomial", "formula": "y ~ anger + situ", "random_intercept": "id"}


@pytest.mark.parametrize(
    "change, words",
    [
        ({"nagq": 0}, "field 'nagq' must be a whole number from 1"),
        ({"nagq": 26}, "field 'nagq' must be a whole number from 1"),
        ({"nagq": True}, "field 'nagq' must be a whole number from 1"),
        ({"reml": True}, "field 'reml' applies to gaussian models only"),
        ({"family": "gaussian", "formula": "score ~ anger", "nagq": 3}, "field 'nagq' applies to binomial and poisson"),
        ({"family": "gaussian", "formula": "score ~ anger", "reml": "yes"}, "field 'reml' must be true or false"),
        ({"random_intercept": "score"}, "field 'random_intercept' must name a categorical or integer column"),
        ({"random_intercept": "nothing"}, "field 'random_intercept' must name a categorical or integer column"),
        ({"random_intercept": "anger"}, "which the formula uses too"),
        ({"weights": "w"}, "field 'weights' cannot be combined with random_intercept"),
        ({"cov_type": "HC0"}, "field 'cov_type' cannot be combined with random_intercept"),
        ({"family": "negative_binomial", "formula": "anger ~ situ"}, 'needs family = "binomial", "poisson"'),
        ({"random_intercept": None, "nagq": 3}, "field 'nagq' applies only with random_intercept"),
    ],
)
def test_a_bad_random_intercept_field_is_one_sentence(schema, change, words):
    data = {**BASE, **change}
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(SpecError) as err:
        parse_study(data, schema, "study.toml")
    message = str(err.value)
    assert message.startswith("study.toml: ") and words in message and "\n" not in message


def test_the_random_intercept_is_part_of_the_study_hash(schema):
    plain, _ = parse_study({k: v for k, v in BASE.items() if k != "random_intercept"}, schema, "s.toml")
    laplace, _ = parse_study(BASE, schema, "s.toml")
    agq, _ = parse_study({**BASE, "nagq": 5}, schema, "s.toml")
    assert len({plain.hash, laplace.hash, agq.hash}) == 3
    assert laplace.params == {"random_intercept": "id", "nagq": 1}
    assert agq.to_wire()["params"] == {"random_intercept": "id", "nagq": 5}


# --------------------------------------------------------------------------- at the boundary


def boundary_sites(family: str) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """Two services of 30 groups of 8 people, the outcome unrelated to the group and its
    groups' residual sums less spread than chance would make them: the likelihood is largest
    at sigma = 0 (the first seed for which the score for sigma^2 at the GLM fit is negative)."""
    import statsmodels.api as sm

    for seed in range(100):
        rng = np.random.default_rng(seed)
        n = 480
        group = np.repeat(np.arange(60), 8)
        x = np.round(rng.normal(size=n), 6)
        if family == "binomial":
            y = (rng.random(n) < 1 / (1 + np.exp(-(0.2 + 0.6 * x)))).astype(int)
            fit = sm.GLM(y, sm.add_constant(x), family=sm.families.Binomial()).fit()
            r, w = y - fit.fittedvalues, fit.fittedvalues * (1 - fit.fittedvalues)
            score = np.sum(np.bincount(group, r) ** 2) - np.sum(w)
        else:
            y = np.round(1.0 + 0.5 * x + rng.normal(size=n), 6)
            fit = sm.OLS(y, sm.add_constant(x)).fit()
            score = np.sum(np.bincount(group, fit.resid) ** 2) - n * np.sum(fit.resid**2) / n
        if score < 0:
            frame = pd.DataFrame({"group": group, "x": x, "y": y})
            return {"s0": frame.iloc[:240].reset_index(drop=True), "s1": frame.iloc[240:].reset_index(drop=True)}, frame
    raise AssertionError("no seed gives a boundary fit")


@pytest.mark.parametrize("family, reml", [("binomial", False), ("gaussian", False), ("gaussian", True)])
def test_a_variance_at_zero_gives_the_glm(tmp_path, family, reml):
    """When the likelihood is largest at sigma = 0 (lme4's singular fit), the fit stops there:
    the random-intercept model is then the GLM, whose estimates and standard errors (with the
    residual variance over n, ML, or n - p, REML) statsmodels gives on the pooled rows."""
    import statsmodels.api as sm

    sites, frame = boundary_sites(family)
    columns = {"group": {"type": "integer"}, "x": {"type": "numeric"}, "y": {"type": family_type(family)}}
    write_network(tmp_path, sites, columns)
    fields = {"reml": reml} if family == "gaussian" else {}
    result = run_study(tmp_path, name="edge", family=family, formula="y ~ x", random_intercept="group", **fields)
    assert result["converged"] and result["variance_components"][0]["variance"] == 0.0
    X = sm.add_constant(frame.x.to_numpy())
    if family == "binomial":
        ref = sm.GLM(frame.y.to_numpy(), X, family=sm.families.Binomial()).fit(tol=1e-13, tol_criterion="params")
        se = ref.bse
    else:
        ref = sm.OLS(frame.y.to_numpy(), X).fit()
        n = len(frame)
        se = ref.bse if reml else ref.bse * np.sqrt((n - 2) / n)
    np.testing.assert_allclose([t["estimate"] for t in result["terms"]], ref.params, rtol=1e-8)
    np.testing.assert_allclose([t["std_error"] for t in result["terms"]], se, rtol=1e-8)


def family_type(family: str) -> str:
    return "binary" if family == "binomial" else "numeric"


def test_approve_says_what_a_random_intercept_releases(schema):
    """`iaptnet node approve` prints the random intercept and what it adds to the releases."""
    from iaptnet.node.governance_cli import describe_study
    from iaptnet.node.policy import Policy

    spec, parsed = parse_study({**BASE, "nagq": 7}, schema, "s.toml")
    text = describe_study(spec, parsed, schema, Policy())
    assert "random     an intercept per group of 'id' (adaptive Gauss-Hermite quadrature, 7 points)" in text
    assert "per group of at least 8 rows only" in text


@pytest.mark.parametrize("name, model", [("glmm_gaussian", "ml"), ("glmm_binomial", "laplace")])
def test_a_node_that_leaves_mid_fit_leaves_the_fit_of_the_others(tmp_path, name, model):
    """With min_nodes, a node that stops answering (here its policy's daily task limit, 3)
    takes its rows and groups with it; the fit goes on to the estimate of the other nodes'
    rows, the same as a network without it."""
    theirs = reference(name)[model]
    sites = sites_of(name)
    last = sorted(sites)[-1]
    policy = 'mode = "exploratory"\n[exploratory]\nmax_rounds_per_study = 3\n'
    write_network(tmp_path / "all", sites, COLUMNS[name], policies={last: policy})
    fields = {**fields_of(theirs, name), "min_nodes": len(sites) - 1}
    result = run_study(tmp_path / "all", name="leaves", **fields)
    gone = [n for n in result["nodes"] if not n["contributed"]]
    assert [n["name"] for n in gone] == [last] and "refused" in gone[0]["reason"]
    rest = {k: v for k, v in sites.items() if k != last}
    write_network(tmp_path / "rest", rest, COLUMNS[name])
    alone = run_study(tmp_path / "rest", name="rest", **fields_of(theirs, name))
    assert result["n"] == alone["n"] and result["n_groups"] == alone["n_groups"]
    for ours, other in zip(result["terms"], alone["terms"]):
        assert ours["term"] == other["term"]
        np.testing.assert_allclose(ours["estimate"], other["estimate"], rtol=1e-7, atol=1e-12)
        np.testing.assert_allclose(ours["std_error"], other["std_error"], rtol=1e-7)
    np.testing.assert_allclose(
        result["variance_components"][0]["variance"], alone["variance_components"][0]["variance"], rtol=1e-7
    )

"""A node lost mid-study under `min_nodes` (issue 13): the study goes on from the remaining
nodes and gives exactly their pooled result, compared with statsmodels on the remaining
nodes' concatenated rows to 1e-8, whenever the node is lost (at prepare, in a Newton round,
in the marginal round, after the moments of a scaled term); the columns only it had rows for
(its service's) are dropped and listed with a reason naming it. `min_nodes` above the
network's size is an error before anything runs.

The in-process engine plays the network; `LosingGrid` makes a chosen node stop answering
from a chosen task on, as a node that died or was cut off (the session waits for it until
its timeout, as on the real network)."""

from __future__ import annotations

import uuid

import numpy as np
import pandas as pd
import pytest
from glmcase import assert_matches, reference_fit, write_network, write_study

from iaptnet.cli import main
from iaptnet.coordinator.engines.inprocess import InProcessGrid
from iaptnet.coordinator.inprocess import run_inprocess
from iaptnet.coordinator.network import load_network
from iaptnet.coordinator.runner import run_batch
from iaptnet.coordinator.studies import load_study
from iaptnet.protocol import messages as m
from iaptnet.protocol.errors import NetworkError, SpecError

SITES = ("s0", "s1", "s2", "s3")
COLUMNS = {
    "y": {"type": "binary"},
    "count": {"type": "integer", "min": 0, "max": 1000},
    "x": {"type": "numeric"},
    "z": {"type": "numeric"},
    "e": {"type": "binary"},
    "g": {"type": "categorical", "levels": ["a", "b", "c"]},
    # The service each row belongs to: one per node, as service_id in the IAPT extract.
    "service": {"type": "categorical", "levels": list(SITES)},
}


def make_sites(seed: int = 3) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    sites = {}
    for k, (name, n) in enumerate(zip(SITES, (260, 340, 300, 280))):
        x = rng.normal(size=n)
        z = rng.normal(size=n)
        g = rng.choice(["a", "b", "c"], size=n)
        eta = -0.2 + 0.7 * x - 0.3 * z + pd.Series(g).map({"a": 0.0, "b": 0.4, "c": -0.5}).to_numpy() + 0.15 * k
        y = (rng.random(n) < 1 / (1 + np.exp(-eta))).astype(int)
        count = rng.poisson(np.exp(0.5 + 0.3 * x + 0.1 * k))
        e = (rng.random(n) < 0.4).astype(int)
        frame = pd.DataFrame({"y": y, "count": count, "x": x, "z": z, "e": e, "g": g, "service": name})
        frame.loc[rng.choice(n, size=n // 25, replace=False), "z"] = np.nan
        sites[name] = frame
    return sites


class LosingGrid(InProcessGrid):
    """The in-process network, where node `lost` stops answering from the first task for
    which `when(task)` holds (its tasks are accepted and never answered)."""

    def __init__(self, network, lost: str, when):
        super().__init__(network.nodes)
        self.lost_id = 1 + [n["name"] for n in network.nodes].index(lost)
        self.when = when
        self.gone = False
        self.tasks: list[tuple[str, int]] = []  # the lost node's
        self.asked: list[str] = []  # every task's kind, once per push

    def push_messages(self, messages):
        messages = list(messages)
        kept = []
        self.asked.extend({m.decode_task(msg.content).kind for msg in messages[:1]})
        for msg in messages:
            task = m.decode_task(msg.content)
            if msg.metadata.dst_node_id == self.lost_id:
                self.tasks.append((task.kind, task.round))
                self.gone = self.gone or bool(self.when(task))
            if not (self.gone and msg.metadata.dst_node_id == self.lost_id):
                kept.append(msg)
        ids = iter(super().push_messages(kept))
        return [
            next(ids) if not (self.gone and msg.metadata.dst_node_id == self.lost_id) else uuid.uuid4().hex
            for msg in messages
        ]


def at(kind: str, round_no: int | None = None, marginal: bool = False):
    def when(task) -> bool:
        return (
            task.kind == kind
            and (round_no is None or task.round >= round_no)
            and (not marginal or "marginal" in task.payload)
        )

    return when


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lost")
    sites = make_sites()
    write_network(folder, sites, COLUMNS)
    return {"folder": folder, "sites": sites, "network": load_network(folder / "network.toml")}


def run_losing(net, lost: str, when, **fields) -> tuple[dict, LosingGrid]:
    path = write_study(net["folder"] / f"{fields['name']}.toml", **fields)
    study = load_study(path, net["network"].schema_paths)
    grid = LosingGrid(net["network"], lost, when)
    return run_batch(grid, [study], engine="inprocess", timeout=0.2)[0], grid


def remaining_reference(net, lost: str, formula: str, family: str, needed: list[str]):
    """statsmodels on the remaining nodes' concatenated rows, the service levels those rows
    have (so the first remaining service is the reference, as a fit on them alone takes)."""
    frame = pd.concat([f for name, f in net["sites"].items() if name != lost], ignore_index=True)
    frame["g"] = pd.Categorical(frame["g"], categories=["a", "b", "c"])
    frame["service"] = pd.Categorical(frame["service"], categories=[s for s in SITES if s != lost])
    return reference_fit(frame, formula, family, needed)


def assert_lost(result: dict, lost: str, at_kind: str) -> None:
    status = {n["name"]: n for n in result["nodes"]}
    assert status[lost]["contributed"] is False and "did not answer within 0.2 s" in status[lost]["reason"]
    assert all(status[s]["contributed"] for s in SITES if s != lost)
    assert result["converged"]


def test_node_lost_in_a_newton_round_gives_the_remaining_nodes_pooled_fit(net):
    formula = "y ~ x + z + g + service"
    result, grid = run_losing(
        net, "s2", at("glm.round", 3), name="lost_round", family="binomial", formula=formula, min_nodes=3
    )
    assert ("glm.round", 3) in grid.tasks  # lost mid-way through the Newton rounds
    assert_lost(result, "s2", "glm.round")
    ref = remaining_reference(net, "s2", formula, "binomial", ["y", "x", "z", "g", "service"])
    assert_matches(result, ref, rtol=1e-8)
    (dropped,) = result["dropped_terms"]
    assert dropped["term"] == "service[T.s2]"
    assert dropped["reason"].startswith("only s2 had rows with this term (s2 left at glm.round (round 3)")
    assert result["n"] == sum(len(f.dropna()) for k, f in net["sites"].items() if k != "s2")


def test_node_holding_the_reference_level_lost_the_next_level_becomes_the_reference(net):
    # Without s0 the remaining service columns add up to the intercept: service[T.s1] is
    # dropped (s1 becomes the reference), as statsmodels does on the remaining rows.
    formula = "y ~ x + z + g + service"
    result, _ = run_losing(
        net, "s0", at("glm.round", 2), name="lost_ref", family="binomial", formula=formula, min_nodes=3
    )
    assert_lost(result, "s0", "glm.round")
    ref = remaining_reference(net, "s0", formula, "binomial", ["y", "x", "z", "g", "service"])
    assert_matches(result, ref, rtol=1e-8)
    reasons = {d["term"]: d["reason"] for d in result["dropped_terms"]}
    assert set(reasons) == {"service[T.s1]"}
    assert (
        "linear combination" in reasons["service[T.s1]"]
        and "s0 left at glm.round (round 2)" in reasons["service[T.s1]"]
    )


def test_node_lost_at_prepare(net):
    # A node that never answered is named by its id in-process ("node 4"); the hub names it by
    # the name its key is registered under (coordinator/serverapp.py's name_nodes).
    formula = "y ~ x + z + g + service"
    result, _ = run_losing(
        net, "s3", at("glm.prepare"), name="lost_prepare", family="binomial", formula=formula, min_nodes=2
    )
    status = {n["name"]: n for n in result["nodes"]}
    assert status["node 4"]["contributed"] is False and status["node 4"]["reason"] == "did not answer within 0.2 s"
    assert_matches(result, remaining_reference(net, "s3", formula, "binomial", ["y", "x", "z", "g", "service"]))
    (dropped,) = result["dropped_terms"]
    assert dropped["term"] == "service[T.s3]"
    assert dropped["reason"] == (
        "no rows of the remaining nodes' cohort have this term (a level absent from it; "
        "node 4 left at glm.prepare (round 1): did not answer within 0.2 s)"
    )


def test_node_lost_after_the_moments_of_a_scaled_term_is_centred_without(net):
    # scale(x) uses the pooled SD: a node lost after the moments is left out of them too (the
    # models are prepared again on the remaining nodes), so the estimate is per remaining SD.
    formula = "count ~ scale(x) + z + service"
    result, grid = run_losing(
        net, "s1", at("glm.round", 3), name="lost_scaled", family="poisson", formula=formula, min_nodes=3
    )
    assert_lost(result, "s1", "glm.round")
    # moments and prepare again, on the three remaining nodes, after the loss
    assert grid.asked[:3] == ["glm.moments", "glm.prepare", "glm.round"]
    assert grid.asked[3:5] == ["glm.moments", "glm.prepare"]
    ref = remaining_reference(net, "s1", formula, "poisson", ["count", "x", "z", "service"])
    assert_matches(result, ref, rtol=1e-8)
    (dropped,) = result["dropped_terms"]
    assert dropped["term"] == "service[T.s1]" and dropped["reason"].startswith("only s1 had rows with this term")


def test_gaussian_node_lost_gives_the_remaining_scale(net):
    formula = "x ~ z + g + service"
    result, _ = run_losing(
        net, "s1", at("glm.round", 2), name="lost_gauss", family="gaussian", formula=formula, min_nodes=3
    )
    assert_lost(result, "s1", "glm.round")
    assert_matches(result, remaining_reference(net, "s1", formula, "gaussian", ["x", "z", "g", "service"]))


def test_node_lost_in_the_marginal_round_is_fitted_again_without_it(net):
    formula = "y ~ e + x + g + service"
    result, grid = run_losing(
        net,
        "s3",
        at("glm.round", marginal=True),
        name="lost_marginal",
        family="binomial",
        formula=formula,
        marginal=["e"],
        min_nodes=3,
    )
    assert_lost(result, "s3", "glm.round")
    assert sum(1 for kind, _ in grid.tasks if kind == "glm.round") >= 3
    ref = remaining_reference(net, "s3", formula, "binomial", ["y", "e", "x", "g", "service"])
    assert_matches(result, ref)
    # the standardised risks are the remaining rows' (g-computation on the reference fit)
    rows = ref.model.data.frame.dropna(subset=["y", "e", "x", "g", "service"])
    risk1 = ref.predict(rows.assign(e=1)).mean()
    risk0 = ref.predict(rows.assign(e=0)).mean()
    (marginal,) = result["marginal"]
    assert marginal["risk_exposed"] == pytest.approx(risk1, rel=1e-8)
    assert marginal["risk_unexposed"] == pytest.approx(risk0, rel=1e-8)


def test_losing_more_nodes_than_min_nodes_allows_stops_the_study(net):
    with pytest.raises(NetworkError) as err:
        run_losing(net, "s2", at("glm.round", 2), name="lost_too_many", family="binomial", formula="y ~ x", min_nodes=4)
    assert "s2 did not answer within 0.2 s (the study needs at least 4 nodes; 3 remain)" in str(err.value)


def test_min_nodes_above_the_network_size_is_refused_before_anything_runs(net, capsys):
    path = write_study(
        net["folder"] / "too_many.toml", name="too_many", family="binomial", formula="y ~ x", min_nodes=5
    )
    network = net["folder"] / "network.toml"
    with pytest.raises(SpecError) as err:
        run_inprocess([path], network)
    assert str(err.value) == (
        f"{path}: field 'min_nodes' is 5, but the network {network} has 4 node(s); set it to at most 4."
    )
    assert main(["run", str(path), "--network", str(network)]) == SpecError.exit_code
    assert "field 'min_nodes' is 5" in capsys.readouterr().err
    # On a hub (the run's grid), the same before any task: nothing was asked of any node.
    grid = LosingGrid(net["network"], "s0", lambda task: False)
    with pytest.raises(SpecError, match="field 'min_nodes' is 5, but the network has 4 node"):
        run_batch(grid, [load_study(path, net["network"].schema_paths)], engine="inprocess")
    assert grid.tasks == []


# --------------------------------------------------------------------------- the other kinds
#
# Kinds whose conversation has more than one round lose a node after it answered the first:
# the result is the same study on a network file listing only the remaining nodes, run through
# the same in-process engine (the honest reference for "its rows dropped"), at 1e-8. `access`
# has a single round (access.counts), so a node lost there is a node lost at the start.

#: What may differ between the study that lost a node and the same study without it: where and
#: when it ran, how many rounds it took, the node list (it names the lost node), and reasons
#: that say which node left.
NOT_COMPARED = {"nodes", "rounds", "iterations", "created_at", "reason", "engine", "software", "network"}


def run_with_and_without(root, sites, columns, lost: str, when, **fields) -> tuple[dict, dict, LosingGrid]:
    """The study on the whole network losing `lost` when `when` first holds, and the same
    study (same fields, min_nodes too) on a network of the remaining nodes."""
    write_network(root / "all", sites, columns)
    write_network(root / "rest", {k: v for k, v in sites.items() if k != lost}, columns)
    network = load_network(root / "all" / "network.toml")
    path = write_study(root / "all" / f"{fields['name']}.toml", **fields)
    grid = LosingGrid(network, lost, when)
    ours = run_batch(grid, [load_study(path, network.schema_paths)], engine="inprocess", timeout=0.2)[0]
    theirs = run_inprocess(
        [write_study(root / "rest" / f"{fields['name']}.toml", **fields)], root / "rest" / "network.toml"
    )
    return ours, theirs[0], grid


def assert_same_result(ours, theirs, where: str = "result") -> None:
    """Every field of the two results equal (numbers to 1e-8 relative), but NOT_COMPARED."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        assert set(ours) - NOT_COMPARED == set(theirs) - NOT_COMPARED, where
        for key in set(ours) - NOT_COMPARED:
            assert_same_result(ours[key], theirs[key], f"{where}.{key}")
    elif isinstance(ours, list) and isinstance(theirs, list):
        assert len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_same_result(a, b, f"{where}[{i}]")
    elif isinstance(ours, float) and isinstance(theirs, float) and where.endswith("p_value") and 0 < ours < 1e-8:
        # A tail probability magnifies its statistic's rounding (at z = 9, p = 1e-19 moves
        # 80 times as much as z, relatively): it is compared on the log scale.
        np.testing.assert_allclose(np.log(ours), np.log(theirs), rtol=1e-8, atol=0, err_msg=where)
    elif isinstance(ours, float) and isinstance(theirs, float):
        np.testing.assert_allclose(ours, theirs, rtol=1e-8, atol=0, err_msg=where)
    else:
        assert ours == theirs, where


def assert_terms_equal(ours: list[dict], theirs: list[dict]) -> None:
    assert [t["term"] for t in ours] == [t["term"] for t in theirs]
    for key in ("estimate", "std_error"):
        np.testing.assert_allclose([t[key] for t in ours], [t[key] for t in theirs], rtol=1e-8, atol=0)


def assert_named_lost(nodes: list[dict], lost: str) -> None:
    status = {n["name"]: n for n in nodes}
    assert status[lost]["contributed"] is False and status[lost]["reason"] == "did not answer within 0.2 s"
    assert all(n["contributed"] for name, n in status.items() if name != lost)


def in_model(key: str, kind: str = "glm.round"):
    """From the first task of `kind` that carries model `key` (e.g. a study's outcome model)."""
    return lambda task: task.kind == kind and key in task.payload.get("models", ())


@pytest.mark.parametrize(
    "lost, why",
    [
        ("site4", None),  # a control service: only the pooled model had its rows
        ("site2", "no referral in the cohort falls before"),  # held its group's own model alone
    ],
)
def test_its_node_lost_in_the_models_is_the_series_of_the_remaining_nodes(tmp_path, lost, why):
    from test_its import COLUMNS as ITS_COLUMNS
    from test_its import SETTINGS as ITS
    from test_its import make_site

    rng = np.random.default_rng(11)
    sites = {f"site{s}": make_site(s, n, rng) for s, n in (("1", 1100), ("2", 900), ("3", 1000), ("4", 700))}
    ours, theirs, grid = run_with_and_without(
        tmp_path, sites, ITS_COLUMNS, lost, at("glm.round", 3), **{**ITS, "name": "its_lost", "min_nodes": 3}
    )
    assert grid.tasks[:3] == [("its.columns", 1), ("glm.prepare", 2), ("glm.round", 3)]  # answered its counts
    assert_named_lost(ours["nodes"], lost)
    assert_named_lost(ours["pooled"]["nodes"], lost)
    assert_terms_equal(ours["pooled"]["terms"], theirs["pooled"]["terms"])
    # its counts leave the table (no stale rows), the groups' own models are chosen again
    assert ours["segments"] == theirs["segments"]
    assert all(lost not in s["nodes"] for s in ours["segments"])
    fitted = {s["group"]: s for s in ours["per_service"]}
    if why:
        assert not fitted[lost[-1]]["fitted"] and why in fitted[lost[-1]]["reason"]
    for mine, other in zip(ours["per_service"], theirs["per_service"]):
        if mine["fitted"]:
            assert_terms_equal(mine["terms"], other["terms"])
    assert_same_result(ours, theirs)


PS_FIELDS = dict(outcome="y", exposure="e", covariates="x + z + g", min_nodes=3)


@pytest.mark.parametrize(
    "kind, step, when",
    [
        ("psm", "propensity.score", at("propensity.score")),
        ("psm", "propensity.match", at("propensity.match")),
        ("psm", "the outcome model", in_model("outcome")),
        ("iptw", "propensity.score", at("propensity.score")),
        ("iptw", "the outcome model", in_model("outcome")),
    ],
)
def test_propensity_node_lost_after_the_propensity_model_is_the_remaining_nodes_study(tmp_path, net, kind, step, when):
    # The propensity model, the SD of its logit (the caliper), the matching or weights, the
    # balance and the outcome model are all the remaining nodes' own: the steps start again
    # from the propensity model without the lost node.
    ours, theirs, grid = run_with_and_without(
        tmp_path, net["sites"], COLUMNS, "s2", when, name=f"{kind}_lost", kind=kind, **PS_FIELDS
    )
    assert ("glm.round", 2) in grid.tasks  # s2 answered the propensity model's rounds
    assert ("propensity.score", 5) in grid.tasks or step == "propensity.score"
    assert_named_lost(ours["nodes"], "s2")
    assert_terms_equal(ours["terms"], theirs["terms"])
    assert_terms_equal(ours["propensity_model"]["terms"], theirs["propensity_model"]["terms"])
    assert ours["n_cohort"] == theirs["n_cohort"] and ours["n"] == theirs["n"]  # its rows are gone
    assert_same_result(ours, theirs)


@pytest.mark.parametrize("name, model", [("glmm_gaussian", "ml"), ("glmm_binomial", "laplace")])
def test_random_intercept_node_lost_mid_fit_is_the_remaining_nodes_fit(tmp_path, name, model):
    from test_glmm import COLUMNS as GLMM_COLUMNS
    from test_glmm import fields_of, reference, sites_of

    sites = sites_of(name)
    lost = sorted(sites)[1]
    fields = {**fields_of(reference(name)[model], name), "min_nodes": len(sites) - 1}
    ours, theirs, grid = run_with_and_without(
        tmp_path, sites, GLMM_COLUMNS[name], lost, at("glmm.round", 3), name="glmm_lost", **fields
    )
    assert ("glmm.round", 3) in grid.tasks and grid.asked.count("glmm.round") > 3  # lost mid-fit
    assert_named_lost(ours["nodes"], lost)
    assert_terms_equal(ours["terms"], theirs["terms"])
    assert ours["n"] == theirs["n"] and ours["n_groups"] == theirs["n_groups"]
    np.testing.assert_allclose(
        ours["variance_components"][0]["variance"], theirs["variance_components"][0]["variance"], rtol=1e-8
    )
    assert_same_result(ours, theirs)


def test_table_node_lost_in_the_quantile_rounds_is_the_remaining_nodes_table(tmp_path, net):
    # Counts, means and SDs are pooled again without it and the searches start again; the
    # quantiles (on the grid of whole numbers) are the remaining rows'.
    fields = dict(
        name="table_lost",
        kind="table",
        by="g",
        variables=["e", "service", {"name": "count", "resolution": 1.0, "quantiles": [0.1, 0.5, 0.9]}],
        min_nodes=3,
    )
    ours, theirs, grid = run_with_and_without(
        tmp_path, net["sites"], COLUMNS, "s1", at("describe.quantiles", 3), **fields
    )
    assert grid.tasks[:2] == [("describe.table", 1), ("describe.quantiles", 2)]  # answered the table
    assert_named_lost(ours["nodes"], "s1")
    summary = {t["variable"]: t for t in ours["tables"]}["count"]["summary"][0]
    rows = pd.concat([f for k, f in net["sites"].items() if k != "s1"])["count"]
    assert summary["n"] == len(rows) and summary["mean"] == pytest.approx(rows.mean(), rel=1e-12)
    exact = {q["p"]: q["value"] for q in summary["quantiles"] if q["exact"]}
    assert 0.5 in exact  # the others may be an interval, as on the network without s1
    assert exact == {p: float(np.quantile(rows, p, method="inverted_cdf")) for p in exact}
    assert_same_result(ours, theirs)


def test_meta_node_lost_in_the_one_stage_models_leaves_the_meta_analysis_too(tmp_path, net):
    # s2 released its own estimate, then was lost in the one-stage models' rounds: the
    # meta-analysis (k, fixed and random effects, tau² and its interval, weights) and the
    # one-stage models are those of the network without s2, and s2's entry says why it left.
    ours, theirs, grid = run_with_and_without(
        tmp_path,
        net["sites"],
        COLUMNS,
        "s2",
        at("glm.round", 3),
        name="meta_lost",
        kind="meta",
        family="binomial",
        formula="y ~ x + z + g + service",
        exposure="x",
        service="service",
        min_nodes=3,
    )
    assert grid.tasks[:2] == [("meta.local_fit", 1), ("glm.prepare", 1)]  # s2 gave its estimate
    entry = next(e for e in ours["per_node"] if e["node"] == "s2")
    assert entry["estimate"] is None and entry["reason"] == "did not answer within 0.2 s"
    assert ours["k"] == theirs["k"] == 3
    ours = {**ours, "per_node": [e for e in ours["per_node"] if e["node"] != "s2"]}
    assert_named_lost(ours["one_stage_service_fe"]["nodes"], "s2")
    assert_same_result(ours, theirs)

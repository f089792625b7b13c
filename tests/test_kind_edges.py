"""Every kind at its edges, through the public command line: one group, a level present at one
node only, constant outcomes and exposures, a network of one node; and an interrupted time
series whose change falls in the first or last period, or with every count after the change
suppressed. Each ends as a result or one true sentence, never a traceback or a warning; the
its last-period case is fitted without its slope-change term, equal to statsmodels on the
pooled rows."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import tomli_w
from fuzzcase import COLUMNS, KINDS, NODES, Case, _network_of, _run_argv, build_workspace, run_case
from reference_its import _fit, segmented

from iaptnet.coordinator.its import SLOPE_DROPPED


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("edges"), iapt_patients=500)


def run(workspace, kind, edit=None, study=None, nodes=NODES, columns=None):
    """The kind's study (with `study`'s fields) on the workspace's sites changed by `edit`."""
    files, names = {}, {}
    for node in nodes:
        frame = pd.read_csv(workspace.custom / f"{node}.csv")
        if edit:
            frame = edit(frame, node)
        files[f"{node}.csv"], names[node] = frame.to_csv(index=False).encode(), f"{node}.csv"
    files["study.toml"] = tomli_w.dumps({**workspace.studies[kind], **(study or {})}).encode()
    files["population.csv"] = (workspace.custom / "population.csv").read_bytes()
    schema = str(workspace.custom / "schema.toml")
    if columns is not None:
        files["schema.toml"], schema = tomli_w.dumps({"columns": columns}).encode(), "{case}/schema.toml"
    files["network.toml"] = _network_of(schema, names)
    case = Case("edge", files, _run_argv("{case}/study.toml", "{case}/network.toml"), kind)
    folder = workspace.root / "cases" / "edge"
    outcome = run_case(case, workspace, folder)
    assert outcome.ok, (outcome.kind, outcome.stderr, outcome.detail, outcome.warnings)
    result = json.loads((folder / "out" / "results.json").read_text()) if outcome.kind == "success" else None
    return outcome, result, folder


def constant(column, value):
    return lambda frame, node: frame.assign(**{column: value})


def level_at_one_node(frame, node):
    return frame.assign(g=frame["g"].replace("c", "b")) if node == "s0" else frame


EDGES = {
    "level c at one node only": level_at_one_node,
    "constant outcome y": constant("y", 1),
    "constant exposure t": constant("t", 1),
    "constant count k": constant("k", 0),
    "one level of g": constant("g", "a"),
    "one sex": constant("sex", "female"),
}


@pytest.mark.parametrize("edge", EDGES)
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_at_its_edges_ends_as_a_result_or_one_sentence(workspace, kind, edge):
    run(workspace, kind, EDGES[edge])


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_on_a_network_of_one_node(workspace, kind):
    run(workspace, kind, nodes=("s0",))


def test_a_level_at_one_node_only_is_fitted_from_that_node(workspace):
    outcome, result, _ = run(workspace, "glm", level_at_one_node)
    assert outcome.kind == "success"
    assert "g[T.c]" in {t["term"] for t in result["terms"]}


# --------------------------------------------------------------------------- its


def pooled_rows(folder, nodes=NODES):
    frame = pd.concat([pd.read_csv(folder / f"{n}.csv") for n in nodes], ignore_index=True)
    levels = [v for v in COLUMNS["svc"]["levels"] if v in set(frame["svc"].astype(str))]
    frame["svc"] = pd.Categorical(frame["svc"].astype(str), categories=levels)
    return frame


@pytest.mark.parametrize("changes", [{"1": 23}, {"1": 23, "2": 23}, {"1": 23, "2": 8}])
def test_its_change_in_the_last_period_is_fitted_without_the_slope_change(workspace, changes):
    outcome, result, folder = run(workspace, "its", study={"changes": changes})
    assert outcome.kind == "success", outcome.stderr
    settings = {**workspace.studies["its"], "changes": changes, "cov_type": "HC0"}
    rows = segmented(pooled_rows(folder), settings)
    last = {g for g, month in changes.items() if month == 23}
    for entry in result["per_service"]:
        assert entry["fitted"], entry
        if entry["group"] in last:
            assert entry["slope_change"] is None
            assert {"term": "time_after_change", "reason": SLOPE_DROPPED} in entry["dropped_terms"]
            ref = _fit(rows[rows["svc"] == entry["group"]], "k ~ month + after_change", "HC0")
            assert [t["term"] for t in entry["terms"]] == list(ref.params.index)
            np.testing.assert_allclose([t["estimate"] for t in entry["terms"]], ref.params, rtol=1e-8)
            np.testing.assert_allclose([t["std_error"] for t in entry["terms"]], ref.bse, rtol=1e-8)
        else:
            assert entry["slope_change"]["ratio_per_12"] > 0
    pooled = result["pooled"]
    if last == set(changes):  # every change in the last period: the pooled model has no slope change
        assert result["slope_change"] is None
        assert {"term": "time_after_change", "reason": SLOPE_DROPPED} in pooled["dropped_terms"]
        formula = "k ~ 0 + svc + svc:month + after_change"
        ref = _fit(rows, formula, "HC0")
        by_name = {t["term"]: t["estimate"] for t in pooled["terms"]}
        np.testing.assert_allclose(by_name["after_change"], ref.params["after_change"], rtol=1e-8)
    else:
        assert result["slope_change"] is not None


def test_its_change_with_one_month_before_it(workspace):
    """A single month before the change: the group's own trend and its slope change are one
    column; the group is not fitted alone, and when it is the only one the study says why."""
    outcome, result, _ = run(workspace, "its", study={"changes": {"1": 1, "2": 8}})
    assert outcome.kind == "success"
    entry = {e["group"]: e for e in result["per_service"]}["1"]
    assert not entry["fitted"] and "one month" in entry["reason"]
    outcome, _, _ = run(workspace, "its", study={"changes": {"1": 1}})
    assert outcome.kind == "clean" and "fall in one month" in outcome.stderr


def test_its_change_in_the_first_period(workspace):
    """With no declared start of time, a change at the data's first month leaves no referral
    before it: the sentence says so per group."""
    columns = {**COLUMNS, "month": {"type": "integer"}}
    outcome, _, _ = run(workspace, "its", study={"changes": {"1": 0, "2": 0}}, columns=columns)
    assert outcome.kind == "clean"
    assert "no group with a change has referrals both before and after it" in outcome.stderr
    assert "group 1: none before" in outcome.stderr


def test_its_with_every_count_after_the_change_suppressed(workspace):
    """3 referrals after the change at one node: the count is suppressed, and the sentence
    says suppressed, not that none fall after the change."""

    def few_late(frame, node):
        late = frame.index[frame["month"] >= 20]
        return frame.drop(late[3:]) if node == "s0" else frame

    outcome, _, _ = run(workspace, "its", few_late, study={"changes": {"1": 20}})
    assert outcome.kind == "clean"
    assert "suppressed" in outcome.stderr and "group 1:" in outcome.stderr
    assert "no referral" not in outcome.stderr


def test_its_with_no_referral_after_the_change(workspace):
    outcome, _, _ = run(workspace, "its", lambda f, n: f.assign(month=f["month"] % 12), study={"changes": {"1": 12}})
    assert outcome.kind == "clean"
    assert "no referral in the cohort falls on or after a change date" in outcome.stderr
    assert "group 1:" in outcome.stderr and "none after" in outcome.stderr

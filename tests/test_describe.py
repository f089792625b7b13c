"""Descriptive tables (`kind = "table"`) equal the same table computed on the pooled rows
(tests/reference_describe.py): counts under the documented small-number and secondary
suppression rule, exact n/mean/SD (1e-10 relative), quantiles exact on the values' grid
(numpy's 'linear' definition), the funnel; and what each node releases passes its policy."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from glmcase import pooled, run_study, write_network
from nodecase import Node, assert_nothing_released
from reference_describe import describe_reference

from iaptnet.coordinator.describe import render
from iaptnet.protocol import messages as m
from iaptnet.protocol.errors import SpecError
from iaptnet.protocol.iapt_schema import iapt_analysis_schema
from iaptnet.protocol.kinds.describe import QUANTILE_TASK, TABLE_TASK, layout, relations
from iaptnet.protocol.schema import Schema
from iaptnet.protocol.sdc import unprotected
from iaptnet.protocol.study import parse_study, read_study_file

RULES = {"suppress_max": 7, "round_to": 5, "min_rows": 100, "min_level_count": 8}  # exploratory defaults
COLUMNS = {
    "g": {"type": "categorical", "levels": ["a", "b", "c", "d"]},
    "flag": {"type": "binary"},
    "score": {"type": "integer", "min": 0, "max": 10},
    "days": {"type": "numeric", "min": 0},
    "dose": {"type": "numeric"},
    "step1": {"type": "binary"},
    "w": {"type": "numeric"},
}


def make_sites(seed: int = 11, sizes=(1500, 2300, 1800)) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    sites = {}
    for k, n in enumerate(sizes):
        g = rng.choice(["a", "b", "c", "d"], size=n, p=[0.5, 0.3, 0.192, 0.008])  # d: a few per site
        flag = (rng.random(n) < 0.35).astype(float)
        flag[rng.random(n) < 0.15] = np.nan  # 200+ rows per site with `by` missing
        score = rng.binomial(10, 0.45 + 0.05 * k, size=n).astype(float)
        score[rng.choice(n, 60, replace=False)] = np.nan
        days = 7.0 * rng.integers(0, 6 + k, size=n)  # whole weeks, summarised on a grid of days
        dose = 0.5 * rng.integers(0, 7, size=n) - 2.0  # on a grid of halves, from -2
        step1 = (rng.random(n) < 0.7).astype(float)
        w = rng.normal(50, 10, size=n)
        sites[f"site{k}"] = pd.DataFrame(
            {"g": g, "flag": flag, "score": score, "days": days, "dose": dose, "step1": step1, "w": w}
        )
    return sites


STUDY = {
    "name": "tab",
    "kind": "table",
    "by": "flag",
    "variables": [
        "g",
        "score",
        {"name": "days", "resolution": 1.0},
        {"name": "dose", "resolution": 0.5, "quantiles": [0.1, 0.5, 0.9]},
        "w",
    ],
    "funnel": [
        {"label": "step one", "where": "step1 == 1"},
        "score >= 4",
        {"label": "w below 74", "where": "w < 74"},
    ],  # leaves out a few of the cohort at site2
}


def settings_for(study: dict, columns: dict) -> dict:
    """The reference's settings for a study of this file's schema."""
    variables = []
    for item in study.get("variables", []):
        item = {"name": item} if isinstance(item, str) else item
        spec = columns[item["name"]]
        if spec["type"] in ("categorical", "binary"):
            variables.append({"name": item["name"], "show": "counts", "levels": spec.get("levels", ["0", "1"])})
        else:
            res = item.get("resolution", 1.0 if spec["type"] == "integer" else None)
            variables.append(
                {
                    "name": item["name"],
                    "show": "summary",
                    "resolution": res,
                    "origin": float(spec.get("min", 0.0)),
                    "quantiles": item.get("quantiles", [0.25, 0.5, 0.75]),
                }
            )
    by = study.get("by")
    return {
        "node": "site",
        "where": study.get("where"),
        "by": by,
        "by_levels": columns[by].get("levels", ["0", "1"]) if by else [],
        "variables": variables,
        "funnel": [f if isinstance(f, str) else f["where"] for f in study.get("funnel", [])],
        "rules": RULES,
    }


def pooled_frame(sites: dict, columns: dict) -> pd.DataFrame:
    frame = pooled(sites, columns)
    frame["site"] = np.concatenate([[name] * len(f) for name, f in sites.items()])
    return frame


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tables")
    sites = make_sites()
    write_network(folder, sites, COLUMNS)
    return folder, pooled_frame(sites, COLUMNS)


def assert_table_matches(result: dict, ref: dict, study: dict) -> None:
    assert [c["count"] for c in result["group_sizes"]] == ref["group_sizes"]
    assert len(result["tables"]) == len(ref["tables"])
    for table, expected in zip(result["tables"], ref["tables"]):
        counts = [[cell["count"] for cell in row["cells"]] for row in table["rows"]]
        assert counts == expected["rows"], table["variable"]
        for row in table["rows"]:
            for cell, total in zip(row["cells"], ref["group_sizes"]):
                if cell["count"] is not None and total:
                    pct = 100.0 * cell["count"] / total
                    assert cell["percent"] == (round(pct, 1) if total >= 4000 else round(pct))
        if table["show"] != "summary":
            continue
        assert len(table["summary"]) == len(expected["summary"])
        for got, want in zip(table["summary"], expected["summary"]):
            assert got["suppressed"] == want["suppressed"], table["variable"]
            if want["suppressed"]:
                assert got["mean"] is None and got["sd"] is None and got["withheld_by"]
                continue
            assert got["n"] == want["n"]
            if want["n"] > 1:
                np.testing.assert_allclose(got["mean"], want["mean"], rtol=1e-10)
                np.testing.assert_allclose(got["sd"], want["sd"], rtol=1e-10)
            for q in got["quantiles"]:
                assert q["exact"], (table["variable"], q)
                np.testing.assert_allclose(q["value"], want["quantiles"][q["p"]], rtol=1e-12, atol=0)
            assert len(got["quantiles"]) == len(want["quantiles"])
    if study.get("funnel"):
        steps = [[cell["count"] for cell in step["cells"]] for step in result["funnel"]["steps"]]
        assert steps == ref["funnel"]


def test_table_equals_pooled_rows(network):
    folder, frame = network
    result = run_study(folder, **STUDY)
    ref = describe_reference(frame, settings_for(STUDY, COLUMNS))
    assert_table_matches(result, ref, STUDY)
    # The data exercise the rules: suppressed cells, suppressed summaries, exact quantiles.
    g = result["tables"][0]
    assert any(cell["suppressed"] for row in g["rows"] for cell in row["cells"])
    days = result["tables"][2]["summary"]
    assert all(not s["suppressed"] for s in days) and days[0]["quantiles"][1]["value"] == np.median(frame.days)
    # A step that loses 1-7 people at a site is not shown beside the step before it.
    last = result["funnel"]["steps"][-1]["cells"]
    assert last[0]["suppressed"] and result["funnel"]["steps"][-2]["cells"][0]["count"] is not None
    assert result["kind"] == "table" and result["terms"] == [] and len(result["nodes"]) == 3
    text = render(result)
    assert "median [Q1, Q3]" in text and "step one" in text
    json.dumps(result)  # results.json is plain JSON


def test_network_table_hides_none_or_two_per_row_and_column(network):
    """Secondary suppression: no row or column of the network table (its totals included)
    hides exactly one count, so no suppressed count equals a total minus counts shown."""
    folder, frame = network
    study = {"name": "tab_rare", "kind": "table", "by": "g", "variables": ["flag"], "where": "w > 30"}
    result = run_study(folder, **study)
    ref = describe_reference(frame, settings_for(study, COLUMNS))
    assert_table_matches(result, ref, study)
    hidden = set()
    for c, cell in enumerate(result["group_sizes"]):
        if cell["suppressed"]:
            hidden.add(("N", c))
    for i, table in enumerate(result["tables"]):
        for r, row in enumerate(table["rows"]):
            hidden |= {("v", i, r, c) for c, cell in enumerate(row["cells"]) if cell["suppressed"]}
    lay = layout(
        {"by": "g", "variables": [{"name": "flag"}], "funnel": []}, Schema.from_dict({"columns": COLUMNS}, "s"), {}
    )
    assert hidden, "the rare level d must be suppressed somewhere"
    assert any(key[0] == "v" and key[-1] == 4 for key in hidden)  # level d: 1-7 rows of a flag at a site
    assert unprotected(hidden, relations(lay)) == []


def test_merged_levels_are_counted_together(network):
    folder, frame = network
    study = {"name": "tab_merged", "kind": "table", "by": "g", "variables": ["flag"], "merge": {"g": {"c": ["c", "d"]}}}
    result = run_study(folder, **study)
    merged = frame.assign(g=pd.Categorical(frame.g.astype(str).replace("d", "c"), categories=["a", "b", "c"]))
    columns = {**COLUMNS, "g": {"type": "categorical", "levels": ["a", "b", "c"]}}
    ref = describe_reference(merged, settings_for({**study, "merge": None}, columns))
    assert_table_matches(result, ref, study)
    assert [col["level"] for col in result["columns"]] == [None, "a", "b", "c", None]
    assert not any(cell["suppressed"] for row in result["tables"][0]["rows"][:2] for cell in row["cells"][:4])


def test_each_node_releases_a_protected_table(tmp_path):
    """At one node: small counts are released as suppressed, their complements are not
    released at all, every row and column hides none or at least two of its counts, and a
    `by` group below the cohort minimum (flag 1: about 60 rows) shows nothing: no count, no
    summary."""
    rng = np.random.default_rng(5)
    n = 600
    frame = pd.DataFrame(
        {
            "g": rng.choice(["a", "b", "c", "d"], size=n, p=[0.6, 0.3, 0.095, 0.005]),
            "flag": np.where(rng.random(n) < 0.1, 1.0, 0.0),  # ~60 rows: below min_rows 100
            "score": rng.binomial(10, 0.5, size=n).astype(float),
            "days": 7.0 * rng.poisson(3, size=n),
            "dose": 0.0,
            "step1": 1.0,
            "w": rng.normal(size=n),
        }
    )
    node = Node(tmp_path, frame, COLUMNS)
    spec, _ = parse_study(
        {"name": "one", "kind": "table", "by": "flag", "variables": ["g", "score"]}, node.schema, "one.toml"
    )
    reply = node.send(m.Task(kind=TABLE_TASK, study_hash=spec.hash, payload={"models": {"m0": spec.to_wire()}}))
    assert reply.status == m.OK, reply.message
    lay = layout(spec.params, node.schema, {})
    exact = {("N", 0): n, ("N", 1): int((frame.flag == 0).sum()), ("N", 2): int((frame.flag == 1).sum()), ("N", 3): 0}
    for c, mask in enumerate([np.ones(n, bool), frame.flag == 0, frame.flag == 1, np.zeros(n, bool)]):
        for r, level in enumerate(["a", "b", "c", "d"]):
            exact[("v", 0, r, c)] = int(((frame.g == level) & mask).sum())
        exact[("v", 0, 4, c)] = 0  # g missing
        exact[("v", 1, 0, c)], exact[("v", 1, 1, c)] = int(mask.sum()), 0  # score recorded, missing
    tables = reply.payload["tables"]
    hidden = set()
    for key, n_exact in exact.items():
        section, name = ("N", str(key[1])) if key[0] == "N" else (f"v{key[1]}", f"{key[2]}/{key[3]}")
        value = tables.get(section, {}).get(name, "absent")
        if key[-1] == 2:
            assert value == "absent", key  # the small group: nothing at all
        elif 1 <= n_exact <= 7:
            assert value is None, key  # primary: released as suppressed
        if value is None or value == "absent":
            hidden.add(key)
        else:
            assert value == (0 if n_exact == 0 else int(np.floor(n_exact / 5 + 0.5) * 5))
    assert any(tables.get("v0", {}).get(f"{r}/{c}", "absent") == "absent" for r in range(5) for c in range(4))
    assert unprotected(hidden, relations(lay)) == []
    summaries = reply.payload["summaries"]
    assert "v1/2" not in summaries and "v1/0" in summaries  # flag 1 has fewer than 100 rows
    assert "v1/1" not in summaries  # the second withheld of the row (overall = sum of columns)
    assert summaries["v1/0"]["n"] == n and abs(summaries["v1/0"]["mean"] - frame.score.mean()) < 1e-12
    entry = node.audit_entries()[-1]
    assert entry["status"] == "ok" and entry["released"]["payload"] == reply.payload


def test_threshold_probing_is_withheld(tmp_path):
    """A coordinator that asks for thresholds just below and at one person's unique value
    gets no count that sets that person apart, and the rest of the round is answered."""
    rng = np.random.default_rng(9)
    n = 800
    days = 7.0 * rng.poisson(3, size=n)
    days[17] = 1000.0  # the target: nobody else waits this long
    frame = pd.DataFrame(
        {"g": "a", "flag": 0.0, "score": 5.0, "days": days, "dose": 0.0, "step1": 1.0, "w": rng.normal(size=n)}
    )
    node = Node(tmp_path, frame, COLUMNS)
    spec, _ = parse_study(
        {"name": "probe", "kind": "table", "variables": [{"name": "days", "resolution": 1}]}, node.schema, "probe.toml"
    )
    reply = node.send(m.Task(kind=TABLE_TASK, study_hash=spec.hash, payload={"models": {"m0": spec.to_wire()}}))
    assert reply.status == m.OK and "v0/0" in reply.payload["summaries"]
    asks = np.array([21.0, 999.0, 1000.0, 998.5])
    reply = node.send(m.Task(kind=QUANTILE_TASK, study_hash=spec.hash, arrays={"t/0/0": asks}))
    assert reply.status == m.OK
    counts = {key: v["count"] for key, v in reply.payload.get("thresholds", {}).items()}
    assert counts.get("v0/0/0") == int((days <= 21).sum())
    assert "v0/0/1" not in counts and "v0/0/3" not in counts  # 1 row above: withheld
    assert counts.get("v0/0/2") in (None, n)  # at or above the maximum: everyone (no one set apart)
    # The same threshold sent again, alone, is still withheld: bins only get finer; preparing
    # the study again does not forget the thresholds answered.
    node.send(m.Task(kind=TABLE_TASK, study_hash=spec.hash, payload={"models": {"m0": spec.to_wire()}}))
    reply = node.send(m.Task(kind=QUANTILE_TASK, study_hash=spec.hash, arrays={"t/0/0": np.array([999.0])}))
    assert reply.status == m.OK and reply.payload.get("thresholds", {}) == {}
    assert "1000" not in json.dumps(reply.payload) and reply.arrays == {}


def test_differencing_two_cohorts_is_refused(tmp_path):
    """A table of everyone, then of everyone but one person: the second is refused by the
    subset rule (counts are rounded, but the Trust may round to 1)."""
    rng = np.random.default_rng(2)
    n = 400
    frame = pd.DataFrame(
        {
            "g": rng.choice(["a", "b"], size=n),
            "flag": 0.0,
            "score": 5.0,
            "days": 7.0 * rng.poisson(3, size=n),
            "dose": 0.0,
            "step1": 1.0,
            "w": rng.normal(size=n),
        }
    )
    frame.loc[17, "w"] = 99.0  # the target
    node = Node(tmp_path, frame, COLUMNS)
    replies = []
    for name, where in (("all", None), ("all_but_one", "w < 90")):
        fields = {"name": name, "kind": "table", "variables": ["g"], **({"where": where} if where else {})}
        spec, _ = parse_study(fields, node.schema, f"{name}.toml")
        replies.append(
            node.send(m.Task(kind=TABLE_TASK, study_hash=spec.hash, payload={"models": {"m0": spec.to_wire()}}))
        )
    assert replies[0].status == m.OK
    assert_nothing_released(replies[1], rule="min_subset_difference")


def test_thresholds_in_two_columns_cannot_be_differenced(tmp_path):
    """Overall and `by`-column counts at the same threshold would give the other column's
    count by subtraction: the node withholds the second when that count is 1-7 people, though
    each column's own count is large."""
    rng = np.random.default_rng(4)
    n0, n1 = 700, 150
    days = np.concatenate([rng.integers(0, 100, size=n0), 100 + rng.integers(0, 50, size=n1)]).astype(float)
    days[n0 : n0 + 3] = 10.0  # three people with flag 1 wait 50 days or less
    frame = pd.DataFrame(
        {
            "g": "a",
            "flag": [0.0] * n0 + [1.0] * n1,
            "score": 5.0,
            "days": days,
            "dose": 0.0,
            "step1": 1.0,
            "w": rng.normal(size=n0 + n1),
        }
    )
    node = Node(tmp_path, frame, COLUMNS)
    spec, _ = parse_study(
        {"name": "cols", "kind": "table", "by": "flag", "variables": [{"name": "days", "resolution": 1}]},
        node.schema,
        "cols.toml",
    )
    reply = node.send(m.Task(kind=TABLE_TASK, study_hash=spec.hash, payload={"models": {"m0": spec.to_wire()}}))
    assert {"v0/0", "v0/1", "v0/2"} <= set(reply.payload["summaries"])
    reply = node.send(
        m.Task(kind=QUANTILE_TASK, study_hash=spec.hash, arrays={"t/0/0": np.array([50.0]), "t/0/1": np.array([50.0])})
    )
    counts = {key: v["count"] for key, v in reply.payload.get("thresholds", {}).items()}
    assert counts == {"v0/0/0": int((days <= 50).sum())}  # the flag 0 count would leave 3 people


def test_quantile_is_an_interval_when_a_node_withholds_a_step(tmp_path):
    """A small node whose fine bins hold 1-7 rows stops the bisection: the quantile is
    reported as an interval holding the pooled-rows quantile, never averaged or guessed."""
    rng = np.random.default_rng(3)
    sites = {}
    for k, n in enumerate((2000, 150)):
        x = rng.integers(0, 200, size=n).astype(float)  # many values: fine bins are small at site1
        sites[f"site{k}"] = pd.DataFrame(
            {"g": "a", "flag": 0.0, "score": 5.0, "days": x, "dose": 0.0, "step1": 1.0, "w": rng.normal(size=n)}
        )
    write_network(tmp_path, sites, COLUMNS)
    result = run_study(tmp_path, name="interval", kind="table", variables=[{"name": "days", "resolution": 1}])
    frame = pooled_frame(sites, COLUMNS)
    summary = result["tables"][0]["summary"][0]
    assert not summary["suppressed"]
    inexact = [q for q in summary["quantiles"] if not q["exact"]]
    assert inexact, "site1's fine bins are too small for an exact answer"
    for q in summary["quantiles"]:
        truth = float(np.quantile(frame.days, q["p"]))
        assert q["low"] <= truth <= q["high"]
        if q["exact"]:
            assert q["value"] == truth


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"by": "w"}, "field 'by' names the numeric column 'w'"),
        ({"by": "nope"}, "field 'by' must name a categorical or binary column"),
        ({"variables": ["nope"]}, "field 'variables' names column 'nope'"),
        ({"variables": ["flag", "flag"]}, "lists 'flag' twice"),
        ({"variables": [{"name": "score", "quantiles": [0.5, 1.5]}]}, "field 'variables.score'.quantiles"),
        ({"variables": [{"name": "w", "resolution": -1}]}, "field 'variables.w'.resolution must be a positive number"),
        ({"variables": [{"name": "g", "resolution": 1}]}, "apply to integer and numeric columns only"),
        ({"variables": [{"name": "g", "colour": "red"}]}, "unknown option 'colour'"),
        ({"variables": ["g"], "by": "g"}, "is the 'by' column"),
        ({"variables": 3}, "field 'variables' must be a list"),
        ({"variables": []}, "needs 'variables'"),
        ({"funnel": ["step1 = 1"]}, "field 'funnel' step 1"),
        ({"funnel": ["nope == 1"]}, "field 'funnel' step 1: names column 'nope'"),
        ({"funnel": [{"label": "x"}]}, "field 'funnel' step 1 must be a filter string"),
        ({"variables": ["g"], "family": "binomial"}, "unknown field 'family'"),
        ({"variables": ["g"], "by": "flag", "by_labels": {"2": "x"}}, "field 'by_labels' names '2'"),
    ],
)
def test_bad_study_fields_are_one_sentence(fields, message):
    schema = Schema.from_dict({"columns": COLUMNS}, "schema.toml")
    with pytest.raises(SpecError) as err:
        parse_study({"name": "bad", "kind": "table", **fields}, schema, "bad.toml")
    text = str(err.value)
    assert text.startswith("bad.toml: ") and message in text, text
    assert "\n" not in text


def test_catalogue_studies_parse_against_the_iapt_schema():
    from importlib import resources

    folder = resources.files("iaptnet") / "catalogue"
    for name in ("t1_table1_older_adults.toml", "t2_funnel.toml"):
        path = folder / name
        spec, plan = parse_study(read_study_file(path), iapt_analysis_schema(), str(path))
        assert spec.kind == "table" and spec.params
        assert plan.layout.by in ("older_adult", "age_group")
    assert len(plan.step_labels) == 5  # t2: referred and four steps


def test_quantiles_of_values_far_above_the_schema_minimum():
    """Waiting times with a schema minimum of 0 but every value between 20 and 50 (the demo's
    Table 1): the search must start at the pooled mean, not gallop up from 0 through the
    withheld lower tail (which left every quartile an open interval, 0..?)."""
    from iaptnet.coordinator.quantiles import Search

    rng = np.random.default_rng(3)
    values = np.round(rng.normal(35, 6, size=20_000)).clip(20, 50)
    ps = (0.25, 0.5, 0.75)
    search = Search.for_variable(values.size, values.mean(), values.std(), ps, (0.0, 1.0, 0, None))
    for _ in range(60):  # rounds, as the coordinator runs them
        asks = search.asks()
        if not asks:
            break
        for i in asks:
            count = int(np.count_nonzero(values <= search.value(i)))
            inside = count >= 8 and values.size - count >= 8  # a node withholds the tails
            search.record(i, count if inside else None)
    got = [q["value"] for q in search.results()]
    assert got == list(np.quantile(values, ps))

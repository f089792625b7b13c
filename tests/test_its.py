"""`kind = "its"`: the segmented Poisson regressions equal statsmodels' GLM on the pooled rows
with the same columns (tests/reference_its.py), and, with model-based standard errors, the same
model on the monthly aggregates, to 1e-8; the per-group count table obeys the small-number
rules; bad study fields are one sentence."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from glmcase import pooled, write_network, write_schema, write_study
from nodecase import Node
from reference_its import reference_its
from reference_meta import pool

from iaptnet.coordinator.inprocess import run_inprocess
from iaptnet.coordinator.its import render
from iaptnet.node.policy import Rules
from iaptnet.protocol import messages as m
from iaptnet.protocol.errors import SpecError
from iaptnet.protocol.kinds import its as protocol
from iaptnet.protocol.schema import Schema
from iaptnet.protocol.study import parse_study

COLUMNS = {
    "dna": {"type": "integer", "min": 0},
    "att": {"type": "integer", "min": 0},
    "month": {"type": "integer", "min": 0, "max": 47},
    "svc": {"type": "categorical", "levels": ["1", "2", "3", "4", "5"]},
    "age": {"type": "numeric"},
}
CHANGES = {"1": 20, "2": 30, "3": 12, "5": 24}  # service 4 has no change (a control); 5 no rows
RTOL = 1e-8


def make_site(service: str, n: int, rng) -> pd.DataFrame:
    month = rng.integers(0, 48, size=n)
    change = CHANGES.get(service, 10**6)
    after = month >= change
    att = rng.poisson(3.0, size=n)
    log_rate = (
        -1.2 + 0.1 * int(service) - 0.006 * month + np.log(0.7) * after + 0.01 * np.where(after, month - change, 0)
    )
    dna = rng.poisson(np.exp(log_rate) * (att + 0.5))
    frame = pd.DataFrame({"dna": dna, "att": att, "month": month, "svc": service, "age": rng.normal(40, 12, size=n)})
    frame["att"] = frame["att"].astype("Int64")
    frame.loc[rng.choice(n, size=n // 50, replace=False), "att"] = pd.NA
    return frame


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    rng = np.random.default_rng(11)
    sites = {f"site{s}": make_site(s, n, rng) for s, n in (("1", 1100), ("2", 900), ("3", 1000), ("4", 700))}
    folder = tmp_path_factory.mktemp("its")
    write_network(folder, sites, COLUMNS)
    return folder, pooled(sites, COLUMNS)


SETTINGS = {
    "name": "its",
    "kind": "its",
    "outcome": "dna",
    "denominator": ["dna", "att"],
    "time": "month",
    "group": "svc",
    "changes": CHANGES,
    "where": "age > 20",
}


def run(folder, **fields):
    path = write_study(folder / f"{fields['name']}.toml", **fields)
    return run_inprocess([path], folder / "network.toml")[0]


def assert_same(model: dict, ref, *, full: bool = True) -> None:
    """Terms (names, estimates, SEs) and, for row-level references, the fit statistics."""
    assert [t["term"] for t in model["terms"]] == list(ref.params.index)
    np.testing.assert_allclose([t["estimate"] for t in model["terms"]], ref.params.to_numpy(), rtol=RTOL)
    np.testing.assert_allclose([t["std_error"] for t in model["terms"]], ref.bse.to_numpy(), rtol=RTOL)
    if full:
        assert model["n"] == int(ref.nobs)
        np.testing.assert_allclose(
            [model["deviance"], model["llf"], model["aic"]], [ref.deviance, ref.llf, ref.aic], rtol=RTOL
        )


def test_segmented_regressions_equal_pooled_rows(network):
    folder, frame = network
    result = run(folder, **SETTINGS)
    ref = reference_its(frame, SETTINGS)
    assert result["cov_type"] == "HC0"
    assert_same(result["pooled"], ref["rows"]["pooled"])
    fitted = {s["group"]: s for s in result["per_service"]}
    for level in ("1", "2", "3"):
        assert fitted[level]["fitted"]
        assert_same(fitted[level], ref["rows"][level])
    assert not fitted["5"]["fitted"] and "no referral in the cohort falls before" in fitted["5"]["reason"]
    level = result["level_change"]
    assert level["term"] == protocol.AFTER
    np.testing.assert_allclose(level["ratio"], np.exp(ref["rows"]["pooled"].params[protocol.AFTER]), rtol=RTOL)
    slope = result["slope_change"]
    np.testing.assert_allclose(
        slope["ratio_per_12"], np.exp(12 * ref["rows"]["pooled"].params[protocol.SINCE]), rtol=RTOL
    )
    # absent service 5 has no columns in the pooled model
    assert {d["term"] for d in result["pooled"]["dropped_terms"]} == {"svc[5]", "svc[5]:month"}
    # the count table: each node's counts under the small-number rules, summed
    for seg in result["segments"]:
        exact = ref["segments"][seg["group"]]
        for period in ("before", "after"):
            for what in ("referrals", "events", "denominator"):
                n = exact[period][what]
                assert seg[period][what] == (0 if n == 0 else 5 * int(np.floor(n / 5 + 0.5)))
    # the groups' own level changes, pooled by meta-analysis
    meta = result["level_change_meta"]
    assert meta["groups"] == ["1", "2", "3"]
    y = np.array([ref["rows"][g].params[protocol.AFTER] for g in meta["groups"]])
    v = np.array([ref["rows"][g].bse[protocol.AFTER] ** 2 for g in meta["groups"]])
    expected = pool(y, v)
    for key in expected:
        for field in expected[key]:
            np.testing.assert_allclose(meta[key][field], expected[key][field], rtol=RTOL, atol=1e-14)
    text = render(result)
    assert "pooled (common change)" in text and "not fitted" in text and "REML" in text


def test_model_based_errors_equal_the_monthly_aggregate_model(network):
    folder, frame = network
    settings = {**SETTINGS, "name": "its_nonrobust", "cov_type": "nonrobust"}
    result = run(folder, **settings)
    ref = reference_its(frame, settings)
    assert_same(result["pooled"], ref["rows"]["pooled"])
    assert_same(result["pooled"], ref["monthly"]["pooled"], full=False)
    for entry in result["per_service"]:
        if entry["fitted"]:
            assert_same(entry, ref["monthly"][entry["group"]], full=False)


def test_suppressed_cells_release_no_sums(tmp_path):
    """A group with 1-7 referrals after its change: its count is suppressed and the events and
    denominator summed over those few referrals are not released at all; nor is anything of
    its period before the change (the models give the group's count exactly, so the count
    before would give the one after)."""
    rng = np.random.default_rng(4)
    frame = make_site("1", 400, rng)
    frame["month"] = np.where(np.arange(400) < 5, 47, np.minimum(frame["month"], 40))
    frame["svc"] = "1"
    node = Node(tmp_path, frame, COLUMNS)
    spec, _ = parse_study({**BASE, "name": "few", "changes": {"1": 45}}, node.schema, "few.toml")
    reply, _ = node.prepare(spec.to_wire(), kind=protocol.TASK)
    assert reply.status == m.OK and reply.arrays == {}
    table = reply.payload["segments"]["m0"]
    assert table["1/after/referrals"] is None
    assert "1/after/events" not in table and "1/after/denominator" not in table
    assert not any(key.startswith("1/before/") for key in table)
    assert table["2/before/referrals"] == 0 == table["2/after/events"]
    assert set(reply.payload) == {"segments", "data_version"}


BASE = {
    "name": "s",
    "kind": "its",
    "outcome": "dna",
    "denominator": ["dna", "att"],
    "time": "month",
    "group": "svc",
    "changes": {"1": 20},
}


@pytest.mark.parametrize(
    "change, words",
    [
        ({"changes": {"9": 20}}, "field 'changes' names '9', which is not a level of 'svc'"),
        ({"changes": {"1": 0}}, "falls outside the time the data covers"),
        ({"changes": {"1": 48}}, "falls outside the time the data covers"),
        ({"changes": {"1": "2016-01"}}, "the study has no 'time_origin'"),
        ({"changes": {"1": "2016-01-15"}, "time_origin": "2015-01"}, 'as "YYYY-MM"'),
        ({"changes": {}}, "field 'changes' must be a table"),
        ({"changes": {"1": dt.date(2016, 1, 1)}, "time_origin": "2015-01"}, "write it as a string"),
        ({"family": "binomial"}, "field 'family' must be \"poisson\""),
        ({"denominator": ["svc"]}, "field 'denominator' names 'svc', which is not a numeric column"),
        ({"denominator": []}, "field 'denominator' must be a column"),
        ({"outcome": "svc"}, "field 'outcome' must name a count column"),
        ({"time": "age"}, "field 'time' must name an integer time column"),
        ({"cov_type": "cluster"}, "field 'cov_type' must be"),
        ({"exposure": "x"}, "unknown field 'exposure'"),
        ({"merge": {"svc": {"1": ["1", "2"]}}}, "merges levels of the group column"),
    ],
)
def test_bad_fields_are_one_sentence(tmp_path, change, words):
    schema = Schema.load(write_schema(tmp_path / "schema.toml", COLUMNS))
    with pytest.raises(SpecError) as err:
        parse_study({**BASE, **change}, schema, "s.toml")
    assert str(err.value).startswith("s.toml: ") and words in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_dates_become_months_from_the_origin(tmp_path):
    schema = Schema.load(write_schema(tmp_path / "schema.toml", COLUMNS))
    spec, _ = parse_study(
        {**BASE, "changes": {"1": "2016-09", "2": "2015-02-01"}, "time_origin": "2015-01"}, schema, "s.toml"
    )
    assert spec.params["changes"] == {"1": 20, "2": 1}
    assert protocol.month_label(20, "2015-01") == "2016-09"
    models = protocol.model_specs(spec)
    assert list(models) == ["pooled", "g0", "g1"]
    assert models["g1"].where == '(denominator > 0.0 and svc == "2")'
    assert len(set(protocol.approval_hashes(spec))) == 4


def test_models_name_their_study(tmp_path):
    from dataclasses import replace

    from iaptnet.protocol.study import approval_hash

    schema = Schema.load(write_schema(tmp_path / "schema.toml", COLUMNS))
    spec, _ = parse_study(BASE, schema, "s.toml")
    for model in protocol.model_specs(spec).values():
        assert approval_hash(model) == spec.hash
        assert model.augment == {"state": spec.hash, "columns": protocol.COLUMNS}
    with pytest.raises(SpecError, match="is not one the study 's' derives"):
        approval_hash(replace(protocol.pooled_spec(spec), where="denominator > 1.0"))
    lines = protocol.describe(spec, Rules())
    assert any("no sums for a suppressed cell" in line for line in lines)


# --------------------------------------------------------------------------- monthly counts


def _month_counts(referrals: dict[str, list[int]]) -> tuple[dict, dict]:
    """A node's count table for one group: {period: referrals of each month}; events and the
    denominator as 2 and 5 per referral."""
    from iaptnet.node.its import month_key

    counts, months, t = {}, {}, 0
    for period, per_month in referrals.items():
        for what, factor in (("referrals", 1), ("events", 2), ("denominator", 5)):
            counts[("1", period, what)] = float(sum(per_month) * factor)
        for n in per_month:
            key = month_key(t)
            months.setdefault(("1", period), []).append(key)
            for what, factor in (("referrals", 1), ("events", 2), ("denominator", 5)):
                counts[("1", key, what)] = float(n * factor)
            t += 1
    return counts, months


@pytest.mark.parametrize(
    "referrals",
    [
        {"before": [40, 3, 50, 60], "after": [45, 55, 65]},  # one small month
        {"before": [40, 50, 60], "after": [2, 55, 65]},  # the small month after the change
        {"before": [40, 3, 50, 6], "after": [45, 1, 65]},  # several
        {"before": [0, 0, 50, 60], "after": [45, 55, 65]},  # empty months are shown as 0
    ],
)
def test_a_small_month_cannot_be_worked_out_from_its_period_and_the_other_months(referrals):
    """The attack: the period's count minus the months shown gives a suppressed month exactly.
    Closed by complementary suppression: in every period, the hidden cells among the period
    and its months are none or at least two, and a month's sums follow its referrals."""
    from iaptnet.node.its import WHAT, segment_suppression

    counts, months = _month_counts(referrals)
    rules = Rules()
    small, hidden, withheld = segment_suppression(counts, rules, months)
    unreleased = hidden | withheld
    assert any(n < 8 for per_month in referrals.values() for n in per_month)
    for (level, period), keys in months.items():
        for what in WHAT:
            cells = [(level, period, what), *((level, k, what) for k in keys)]
            gone = [c for c in cells if c in unreleased]
            assert len(gone) != 1, (what, gone)
    for level, period, what in counts:
        if what == "referrals" and 0 < counts[(level, period, what)] < rules.min_level_count:
            assert (level, period, "events") in unreleased and (level, period, "denominator") in unreleased


def test_the_series_is_released_month_by_month(tmp_path):
    """Each group's months, network-wide, add up (up to the nodes' rounding to 5) to its
    periods, and carry the crude rate of their rounded counts."""
    from iaptnet import synth

    network = synth.generate_network(tmp_path / "net", patients=40_000)
    (result,) = run_inprocess([Path(__file__).parents[1] / "iaptnet/catalogue/s1_reminders_its.toml"], network)
    for segment in result["segments"]:
        months = segment["months"]
        times = [month["time"] for month in months]
        assert times == sorted(times) and len(months) > 24
        before = [month for month in months if month["time"] < segment["change_time"]]
        shown = [month["referrals"] for month in before if month["referrals"] is not None]
        if len(shown) == len(before):
            assert abs(sum(shown) - segment["before"]["referrals"]) <= 2.5 * len(before)
        for month in months:
            if month["rate"] is not None:
                assert month["rate"] == month["events"] / month["denominator"]


def test_a_month_one_person_away_from_an_earlier_release_is_withheld(tmp_path):
    """Two series of one service, on everyone (aged over 0) and on those under 90, which
    leaves out the target (99) and ten people aged 91 to 98 in other months. Month 10 holds
    the target and twelve others: 13 shows as 15, and without him 12 would show as 10, which
    says he was referred in month 10. The second series withholds that month (and a partner of
    its period), so no rounding can say it."""
    rng = np.random.default_rng(5)
    n = 400
    month = rng.integers(0, 40, size=n)
    month[month == 10] = 11
    month[:13] = 10
    age = np.clip(rng.normal(40, 12, size=n), 18, 85)
    age[0] = 99.0
    age[13:23] = [91, 92, 93, 94, 95, 96, 97, 98, 98, 98]
    frame = pd.DataFrame(
        {"dna": rng.poisson(1.0, size=n), "att": rng.poisson(3.0, size=n) + 1, "month": month, "svc": "1", "age": age}
    )
    assert ((frame.age >= 90) & (frame.month != 10)).sum() == 10 and frame.age.max() == 99.0
    node = Node(tmp_path, frame, COLUMNS)
    tables = []
    for name, where in (("everyone", "age > 0"), ("under_90", "age < 90")):
        spec, _ = parse_study({**BASE, "name": name, "where": where}, node.schema, f"{name}.toml")
        reply, _ = node.prepare(spec.to_wire(), kind=protocol.TASK)
        assert reply.status == m.OK, reply.message
        tables.append(reply.payload["segments"]["m0"])
    assert tables[0]["1/m10/referrals"] == 15
    assert tables[1].get("1/m10/referrals") is None, tables[1]
    assert "1/m10/events" not in tables[1]
    # Month 10 is not the one unknown of its period (before = the sum of months 0 to 19).
    relation = ["1/before/referrals", *(f"1/m{t}/referrals" for t in range(20))]
    assert sum(tables[1].get(key) is None for key in relation) >= 2


def test_a_month_that_two_models_complete_to_one_person_is_withheld(tmp_path):
    """The series' month 10 holds the target (aged 99) and twelve others. Two models, on months
    10 to 12 and on months 11 to 12, both under 90, differ by exactly those twelve: every pair
    of the three row sets differs by a dozen or more, but the month's count less the two models'
    rows is the target, so its rounded count (13 shows as 15, 12 as 10) would say he was
    referred in month 10. Joined to the span of the models' columns, the month would lift his
    leverage to 1: it is withheld, with a partner."""
    rng = np.random.default_rng(5)
    n = 400
    month = rng.integers(0, 40, size=n)
    month[month == 10] = 13
    month[:13] = 10
    age = np.clip(rng.normal(40, 12, size=n), 18, 85)
    age[0] = 99.0
    age[13:23] = [91, 92, 93, 94, 95, 96, 97, 98, 98, 98]
    month[13:23] = 30  # the other old people, outside the months the models take
    frame = pd.DataFrame(
        {"dna": rng.poisson(1.0, size=n), "att": rng.poisson(3.0, size=n) + 1, "month": month, "svc": "1", "age": age}
    )
    policy = 'mode = "exploratory"\n[rules]\nmin_rows = 10\n[exploratory]\nmin_rows = 10\n'
    node = Node(tmp_path, frame, COLUMNS, policy=policy)
    wide, narrow = "month >= 10 and month <= 12 and age < 90", "month >= 11 and month <= 12 and age < 90"
    assert len(frame.query(wide)) - len(frame.query(narrow)) == 12  # the month but the target
    for name, where in (("wide", wide), ("narrow", narrow)):
        reply, _ = node.prepare(node.spec(name=name, formula="dna ~ att", family="gaussian", where=where))
        assert reply.status == m.OK, reply.message
    spec, _ = parse_study({**BASE, "name": "everyone", "where": "age > 0"}, node.schema, "everyone.toml")
    reply, _ = node.prepare(spec.to_wire(), kind=protocol.TASK)
    assert reply.status == m.OK, reply.message
    table = reply.payload["segments"]["m0"]
    assert table.get("1/m10/referrals") is None, table
    relation = ["1/before/referrals", *(f"1/m{t}/referrals" for t in range(20))]
    assert sum(table.get(key) is None for key in relation) >= 2

"""Statistical disclosure control of counts (iaptnet/protocol/sdc.py).

Property tests over random small linked tables (two-way tables with margins, funnels split by
a column, before/after pairs whose total is known from elsewhere, and Table-1 layouts counted
from random people): after `suppress`, rules (a)-(d) hold, and an attacker who knows the shown
counts exactly, the relations, that steps are nested and that every count is a non-negative
integer cannot pin any hidden count, nor a small difference between two steps: integer
programs find two completions that differ there. Counts that the shown zeros alone make 0
(the parts of a total shown as 0) are public and exempt.

Then attacks through the real code paths: a `by` column holding one person, a funnel step
suppressed before a step of 0, and an its group with one period suppressed and the other 0.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from glmcase import write_network, write_study
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nodecase import Node
from scipy.optimize import Bounds, LinearConstraint, milp

from iaptnet.coordinator.inprocess import run_inprocess
from iaptnet.node.policy import Rules
from iaptnet.node.policy import round_count as policy_round_count
from iaptnet.protocol import messages as m
from iaptnet.protocol.kinds import its as its_protocol
from iaptnet.protocol.kinds.describe import Layout, VariableLayout, cell_keys, relations, step_pairs
from iaptnet.protocol.sdc import Chain, Relation, round_count, suppress, unprotected
from iaptnet.protocol.study import parse_study

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
COUNTS = st.sampled_from([0, 0, 0, 1, 2, 3, 5, 7, 8, 9, 12, 20, 35])


# --------------------------------------------------------------------------- rounding


def test_round_count_is_the_nhs_rule():
    assert [round_count(n) for n in (0, 1, 7, 8, 12, 13, 1234)] == [0, None, None, 10, 10, 15, 1235]
    assert round_count(17.5) == 20 and round_count(22) == 20 and round_count(23) == 25  # halves up
    assert [round_count(n, 10, 10) for n in (0, 10, 11, 15, 24)] == [0, None, 10, 20, 20]
    assert round_count(3, 0, 1) == 3
    with pytest.raises(ValueError):
        round_count(-1)
    rules = Rules(suppress_max=4, round_to=3)
    assert [policy_round_count(n, rules) for n in range(12)] == [round_count(n, 4, 3) for n in range(12)]


# --------------------------------------------------------------------------- the attacker


def _split(items):
    rels, chains = [], []
    for item in items:
        if isinstance(item, Chain):
            chains.append(tuple(item.steps))
        elif isinstance(item, Relation):
            rels.append(item)
        else:
            rels.append(Relation(item[0], tuple(item[1])))
    return rels, chains


def attacker_range(values, hidden, items, functional: dict) -> tuple[float, float | None]:
    """Least and greatest value of sum(coef * count) over the non-negative integer counts that
    agree with every shown count, every relation (implicit totals known) and the nesting of
    chains; None for an unbounded maximum."""
    rels, chains = _split(items)
    names = sorted(hidden, key=repr)
    index = {k: i for i, k in enumerate(names)}
    n = len(names)
    eq_rows, eq_rhs, ub_rows, ub_rhs = [], [], [], []

    def linear(terms):
        row, const = np.zeros(n), 0.0
        for key, coef in terms:
            if key in index:
                row[index[key]] += coef
            else:
                const += coef * values[key]
        return row, const

    for r in rels:
        terms = [(p, 1.0) for p in r.parts] + [(r.total, -1.0)]
        if r.implicit:
            row, const = linear([(p, 1.0) for p in r.parts])
            const -= values[r.total]
        else:
            row, const = linear(terms)
        if row.any():
            eq_rows.append(row)
            eq_rhs.append(-const)
    for steps in chains:
        for a, b in zip(steps, steps[1:]):  # later <= earlier
            row, const = linear([(b, 1.0), (a, -1.0)])
            if row.any():
                ub_rows.append(row)
                ub_rhs.append(-const)
    goal, offset = linear(list(functional.items()))
    constraints = []
    if eq_rows:
        constraints.append(LinearConstraint(np.array(eq_rows), eq_rhs, eq_rhs))
    if ub_rows:
        constraints.append(LinearConstraint(np.array(ub_rows), -np.inf, ub_rhs))
    out = []
    for sign in (1.0, -1.0):
        res = milp(sign * goal, constraints=constraints, integrality=np.ones(n), bounds=Bounds(0, np.inf))
        if res.status == 2:  # HiGHS' presolve can call a feasible problem infeasible: ask again without it
            res = milp(
                sign * goal,
                constraints=constraints,
                integrality=np.ones(n),
                bounds=Bounds(0, np.inf),
                options={"presolve": False},
            )
        if res.status == 3 or (res.status != 0 and sign < 0):  # unbounded above
            out.append(None)
            continue
        assert res.status == 0, res.message  # the true counts are a completion
        out.append(sign * res.fun + offset)
    return out[0], out[1]


def public_zeros(values, hidden, items) -> set:
    """Hidden counts the shown zeros alone make 0: parts of a total shown as 0, steps after a
    step shown as 0 (and totals of such parts)."""
    rels, chains = _split(items)
    zero: set = set()

    def is_zero(k):
        return k in zero or (k not in hidden and values[k] == 0)

    again = True
    while again:
        again = False
        for r in rels:
            new = []
            if is_zero(r.total):
                new = [p for p in r.parts if p in hidden]
            elif r.total in hidden and all(is_zero(p) for p in r.parts):
                new = [r.total]
            for k in new:
                if k not in zero:
                    zero.add(k)
                    again = True
        for steps in chains:
            for i, s in enumerate(steps):
                if is_zero(s):
                    for k in steps[i + 1 :]:
                        if k in hidden and k not in zero:
                            zero.add(k)
                            again = True
                    break
    return zero


def assert_protected(values, small, items, differences=(), hidden=None):
    """Rules (a)-(d) and the attacker, for `hidden` = suppress(...)."""
    if hidden is None:
        hidden = suppress(values, small, items, differences)
    rels, chains = _split(items)
    assert set(small) <= hidden
    assert unprotected(hidden, items) == []  # (a), (d)
    for r in rels:
        assert not (r.implicit and r.total in hidden)
        if r.total in hidden:  # (b)
            assert set(r.parts) <= hidden, (r, hidden)
    for steps in chains:  # (c)
        first = next((i for i, s in enumerate(steps) if s in small), None)
        if first is not None:
            assert set(steps[first:]) <= hidden
    for a, b in differences:
        assert a in hidden or b in hidden
    public = public_zeros(values, hidden, items)
    for key in sorted(hidden - public, key=repr):
        if not any(key in (r.total, *r.parts) for r in rels) and not any(key in s for s in chains):
            continue  # in no relation: nothing links it to the shown counts
        low, high = attacker_range(values, hidden, items, {key: 1.0})
        assert high is None or high > low + 0.5, (key, values[key], low, high, sorted(hidden, key=repr))
    for a, b in differences:
        if a in public:
            continue
        low, high = attacker_range(values, hidden, items, {a: 1.0, b: -1.0})
        assert high is None or high > low + 0.5, ("difference", a, b, low, high)
    return hidden


def primary(values, suppress_max=7):
    return {k for k, v in values.items() if round_count(v, suppress_max) is None}


# --------------------------------------------------------------------------- random tables


@st.composite
def two_way(draw):
    """A rows x columns table with row and column totals and a grand total (sometimes known
    from elsewhere), e.g. the access display's area x level tables."""
    n_rows, n_cols = draw(st.integers(2, 5)), draw(st.integers(2, 5))
    x = [[draw(COUNTS) for _ in range(n_cols)] for _ in range(n_rows)]
    grand = draw(st.sampled_from(["shown", "implicit", "none"]))
    values = {("x", i, j): x[i][j] for i in range(n_rows) for j in range(n_cols)}
    values.update({("row", i): sum(x[i]) for i in range(n_rows)})
    values.update({("col", j): sum(x[i][j] for i in range(n_rows)) for j in range(n_cols)})
    values["all"] = sum(map(sum, x))
    items = [(("row", i), [("x", i, j) for j in range(n_cols)]) for i in range(n_rows)]
    items += [(("col", j), [("x", i, j) for i in range(n_rows)]) for j in range(n_cols)]
    if grand != "none":
        items += [
            Relation("all", tuple(("row", i) for i in range(n_rows)), grand == "implicit"),
            Relation("all", tuple(("col", j) for j in range(n_cols)), grand == "implicit"),
        ]
    return values, items


@given(two_way())
@PROPERTY
def test_two_way_tables_with_margins(table):
    values, items = table
    small = primary(values)
    if any(isinstance(r, Relation) and r.implicit for r in items):
        small.discard("all")
    assert_protected(values, small, items)


@st.composite
def funnels(draw):
    """Funnel steps per column of a split (column 0 the overall): nested counts, chains per
    column, small differences between any two steps."""
    groups, steps = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    leave = st.sampled_from([0, 0, 1, 2, 3, 5, 8, 15])
    counts = {}
    for g in range(1, groups + 1):
        n = draw(st.sampled_from([0, 1, 3, 6, 9, 15, 30, 60]))
        for s in range(steps + 1):
            if s:
                n -= min(n, draw(leave))
            counts[("s", s, g)] = n
    for s in range(steps + 1):
        counts[("s", s, 0)] = sum(counts[("s", s, g)] for g in range(1, groups + 1))
    items = [(("s", s, 0), [("s", s, g) for g in range(1, groups + 1)]) for s in range(steps + 1)]
    items += [Chain(tuple(("s", s, c) for s in range(steps + 1))) for c in range(groups + 1)]
    pairs = [
        (("s", a, c), ("s", b, c))
        for c in range(groups + 1)
        for a in range(steps + 1)
        for b in range(a + 1, steps + 1)
        if round_count(counts[("s", a, c)] - counts[("s", b, c)]) is None
    ]
    return counts, items, pairs


@given(funnels())
@PROPERTY
def test_funnels(funnel):
    values, items, pairs = funnel
    assert_protected(values, primary(values), items, pairs)


@st.composite
def segments(draw):
    """Per group, before and after counts whose total the analyst knows exactly (an its
    study's groups: the fitted models give their referrals), and a shown overall row."""
    groups = draw(st.integers(1, 4))
    values, items = {}, []
    for g in range(groups):
        before, after = draw(COUNTS), draw(COUNTS)
        values.update({("before", g): before, ("after", g): after, ("group", g): before + after})
        items.append(Relation(("group", g), (("before", g), ("after", g)), implicit=True))
    if draw(st.booleans()):
        for period in ("before", "after"):
            values[period] = sum(values[(period, g)] for g in range(groups))
            items.append((period, [(period, g) for g in range(groups)]))
    return values, items


@given(segments())
@PROPERTY
def test_relations_with_implicit_totals(table):
    values, items = table
    small = {k for k in primary(values) if k[0] != "group"}
    hidden = assert_protected(values, small, items)
    for item in items:  # (d): one period hidden, the other is hidden too, zero or not
        if isinstance(item, Relation) and item.implicit and set(item.parts) & hidden:
            assert set(item.parts) <= hidden


PEOPLE = st.lists(
    st.tuples(
        st.sampled_from([1, 1, 1, 2, 2, 3]),  # by: a, b, missing
        st.sampled_from([0, 0, 1, 2]),  # variable 0: p, q, missing
        st.sampled_from([0, 0, 0, 1]),  # variable 1: recorded, missing
        st.booleans(),
        st.booleans(),
    ),  # funnel steps
    max_size=45,
)


def people_counts(people, lay: Layout) -> dict:
    counts = {k: 0 for k in cell_keys(lay)}
    for group, level, missing, step1, step2 in people:
        for c in (0, group):
            counts[("N", c)] += 1
            counts[("v", 0, level, c)] += 1
            counts[("v", 1, missing, c)] += 1
            if step1:
                counts[("f", 1, c)] += 1
                if step2:
                    counts[("f", 2, c)] += 1
    return counts


LAYOUT = Layout(
    "by",
    ("a", "b"),
    (
        VariableLayout("v0", "categorical", "counts", ("p", "q", "missing")),
        VariableLayout("v1", "integer", "summary", ("recorded", "missing"), (0.5,), 1.0),
    ),
    ("step1 == 1", "step2 == 1"),
)


@given(PEOPLE)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_table_layouts_counted_from_people(people):
    """A Table 1 with a `by` split and a funnel, with the relations the node uses."""
    values = people_counts(people, LAYOUT)
    small = primary(values)
    pairs = [(a, b) for a, b in step_pairs(LAYOUT) if round_count(values[a] - values[b]) is None]
    hidden = assert_protected(values, small, relations(LAYOUT), pairs)
    for c in range(LAYOUT.n_columns):  # a hidden column count hides the column's every cell
        if ("N", c) in hidden:
            assert all(k in hidden for k in cell_keys(LAYOUT) if k[0] == "v" and k[-1] == c)


def test_one_person_column_hides_the_column():
    """The analyst's attack: a `by` column holding one person, every other row of that column
    0. Without rule (b) the zeros would give that person's level of every variable."""
    people = [(1, 0, 0, True, True)] * 30 + [(1, 1, 0, True, False)] * 20 + [(2, 1, 0, True, True)]
    values = people_counts(people, LAYOUT)
    hidden = assert_protected(
        values,
        primary(values),
        relations(LAYOUT),
        [(a, b) for a, b in step_pairs(LAYOUT) if round_count(values[a] - values[b]) is None],
    )
    column_b = {k for k in cell_keys(LAYOUT) if k[-1] == 2}
    assert column_b <= hidden


def test_a_count_pinned_through_several_relations_is_freed():
    """Rule (a) alone can leave a count fixed through several relations (a cell joining two
    blocks of hidden cells is its rows' totals minus its columns'): the audit frees it. The
    rules alone are what the coordinator applies to pooled counts it cannot see."""
    x = [[12, 12, 9, 5, 50], [35, 50, 9, 12, 80], [5, 35, 50, 80, 80], [1, 9, 5, 12, 20], [2, 5, 9, 20, 20]]
    values = {("x", i, j): x[i][j] for i in range(5) for j in range(5)}
    values.update({("row", i): sum(x[i]) for i in range(5)})
    values.update({("col", j): sum(x[i][j] for i in range(5)) for j in range(5)})
    items = [(("row", i), [("x", i, j) for j in range(5)]) for i in range(5)]
    items += [(("col", j), [("x", i, j) for i in range(5)]) for j in range(5)]
    small = primary(values)
    rules_only = suppress({k: (None if k in small else v) for k, v in values.items()}, small, items)
    assert unprotected(rules_only, items) == []
    low, high = attacker_range(values, rules_only, items, {("x", 3, 0): 1.0})
    assert low == high == 1  # the rules alone give this person away
    hidden = assert_protected(values, small, items)
    assert rules_only < hidden


def test_deterministic_and_order_free():
    x = [[0, 3, 9], [12, 1, 20], [8, 30, 0]]
    values = {("x", i, j): x[i][j] for i in range(3) for j in range(3)}
    values.update({("row", i): sum(x[i]) for i in range(3)})
    values.update({("col", j): sum(x[i][j] for i in range(3)) for j in range(3)})
    items = [(("row", i), [("x", i, j) for j in range(3)]) for i in range(3)]
    items += [(("col", j), [("x", i, j) for i in range(3)]) for j in range(3)]
    first = suppress(values, primary(values), items)
    shuffled = dict(reversed(list(values.items())))
    assert suppress(shuffled, primary(values), items) == first == suppress(values, primary(values), items)
    assert_protected(values, primary(values), items, hidden=first)


def test_pooled_counts_without_values_use_the_rules_only():
    """At the coordinator the hidden pooled counts are unknown: rules (a)-(d) still apply."""
    values = {"t": 40, "a": None, "b": 20, "c": 0}
    assert suppress(values, {"a"}, [("t", ["a", "b", "c"])]) == {"a", "b"}
    assert suppress(values, set(), [("t", ["a", "b", "c"])], hidden={"t"}) == {"t", "a", "b", "c"}
    implicit = [Relation("n", ("before", "after"), implicit=True)]
    assert suppress({"n": None, "before": None, "after": 0}, {"before"}, implicit) == {"before", "after"}


# --------------------------------------------------------------------------- attacks through the real code

TABLE_COLUMNS = {
    "g": {"type": "categorical", "levels": ["a", "b", "c", "d"]},
    "flag": {"type": "binary"},
    "score": {"type": "integer", "min": 0, "max": 10},
    "step1": {"type": "binary"},
}


def table_sites(seed=3):
    rng = np.random.default_rng(seed)
    sites = {}
    for k, n in enumerate((400, 500)):
        frame = pd.DataFrame(
            {
                "g": rng.choice(["a", "b", "c"], size=n, p=[0.5, 0.3, 0.2]),
                "flag": (rng.random(n) < 0.4).astype(float),
                "score": rng.integers(0, 11, size=n).astype(float),
                "step1": (rng.random(n) < 0.7).astype(float),
            }
        )
        frame.loc[frame.index[:10], "flag"] = np.nan
        sites[f"site{k}"] = frame
    return sites


def test_a_by_column_of_one_person_reveals_nothing(tmp_path):
    """One person at site0 has g = d: their flag, score and funnel steps are not readable
    from results.json (the whole column is hidden, and no row or column hides just one)."""
    sites = table_sites()
    person = sites["site0"].index[50]
    sites["site0"].loc[person, ["g", "flag", "score", "step1"]] = ["d", 1.0, 10.0, 1.0]
    write_network(tmp_path, sites, TABLE_COLUMNS)
    study = write_study(
        tmp_path / "one.toml",
        name="one",
        kind="table",
        by="g",
        variables=["flag", "score"],
        funnel=["step1 == 1", "score >= 9"],
    )
    result = run_inprocess([study], tmp_path / "network.toml")[0]
    d = [c["level"] for c in result["columns"]].index("d")
    assert result["group_sizes"][d]["suppressed"]
    for table in result["tables"]:
        for row in table["rows"]:
            assert row["cells"][d]["count"] is None and row["cells"][d]["percent"] is None, (table["variable"], row)
            assert sum(cell["count"] is None for cell in row["cells"]) >= 2  # the overall is their sum
        if table["show"] == "summary":
            assert table["summary"][d]["suppressed"] and table["summary"][d]["mean"] is None
    for step in result["funnel"]["steps"]:
        assert step["cells"][d]["count"] is None


def test_a_suppressed_funnel_step_hides_the_zero_after_it(tmp_path):
    """Three people of site0's cohort pass the first step and none of them the second:
    without rule (c) the 0 would say all three left at the second step. (Each condition
    admits many people of the whole dataset, as the node requires: the cohort makes them few.)"""
    sites = table_sites()
    for _name, frame in sites.items():
        frame["step1"] = 0.0
        frame["score"] = np.minimum(frame["score"], 8.0)
    site0 = sites["site0"]
    site0.loc[site0.index[:20], "step1"] = 1.0
    site0.loc[site0.index[3:40], "score"] = 9.0  # so only 3 with step1 are in the cohort
    sites["site1"].loc[sites["site1"].index[:40], ["step1", "score"]] = [1.0, 9.0]
    write_network(tmp_path, sites, TABLE_COLUMNS)
    study = write_study(
        tmp_path / "fun.toml", name="fun", kind="table", where="score <= 8", funnel=["step1 == 1", "score >= 9"]
    )
    result = run_inprocess([study], tmp_path / "network.toml")[0]
    steps = [[cell["count"] for cell in step["cells"]] for step in result["funnel"]["steps"]]
    assert steps[0][0] is not None
    assert steps[1][0] is None and steps[2][0] is None


ITS_COLUMNS = {
    "dna": {"type": "integer", "min": 0},
    "att": {"type": "integer", "min": 0},
    "month": {"type": "integer", "min": 0, "max": 47},
    "svc": {"type": "categorical", "levels": ["1", "2", "3", "4"]},
}


def its_site(rng, rows: dict[str, tuple[int, int]], change: dict[str, int]) -> pd.DataFrame:
    """rows: service -> (referrals before its change, after it); no change: all before."""
    parts = []
    for svc, (before, after) in rows.items():
        at = change.get(svc, 48)
        month = np.concatenate([rng.integers(0, at, size=before), rng.integers(at, 48, size=after)])
        parts.append(
            pd.DataFrame(
                {
                    "dna": 1 + rng.poisson(0.8, size=before + after),
                    "att": 1 + rng.poisson(3.0, size=before + after),
                    "month": month,
                    "svc": svc,
                }
            )
        )
    return pd.concat(parts, ignore_index=True)


def test_its_node_hides_both_periods_of_a_group(tmp_path):
    """Service 2 has 0 referrals before its change and 3 after: the 0 beside a suppressed
    count (whose total the models give) would say all three are after the change."""
    rng = np.random.default_rng(1)
    changes = {"1": 20, "2": 30}
    frame = its_site(rng, {"1": (300, 400), "2": (0, 3)}, changes)
    node = Node(tmp_path, frame, ITS_COLUMNS)
    spec, _ = parse_study(
        {
            "name": "grp",
            "kind": "its",
            "outcome": "dna",
            "denominator": ["att"],
            "time": "month",
            "group": "svc",
            "changes": changes,
        },
        node.schema,
        "grp.toml",
    )
    reply, _ = node.prepare(spec.to_wire(), kind=its_protocol.TASK)
    assert reply.status == m.OK, reply.message
    table = reply.payload["segments"]["m0"]
    assert table.get("2/before/referrals") is None and table.get("2/after/referrals") is None
    assert not any(k.startswith("2/") and not k.endswith("referrals") for k in table)
    assert table["1/before/referrals"] == 300 and table["1/after/referrals"] == 400
    assert table["3/before/referrals"] == 0 == table["3/after/events"]


def test_its_segments_never_show_a_zero_beside_a_suppressed_period(tmp_path):
    """Through the whole study: service 3 (at site1, whose Trust lets the models use it) has
    5 referrals before its change and none after; results.json shows neither. (Service 4,
    without a change, is a control.)"""
    rng = np.random.default_rng(2)
    changes = {"1": 20, "2": 24, "3": 30}
    sites = {
        "site0": its_site(rng, {"1": (400, 500)}, changes),
        "site1": its_site(rng, {"2": (450, 350), "3": (5, 0), "4": (300, 0)}, changes),
    }
    loose = "min_level_count = 1\nmax_leverage = 1\nmin_subset_difference = 1\n"
    relaxed = f'mode = "exploratory"\n[rules]\n{loose}[exploratory]\n{loose}'
    write_network(tmp_path, sites, ITS_COLUMNS, policies={"site1": relaxed})
    study = write_study(
        tmp_path / "its.toml",
        name="its3",
        kind="its",
        outcome="dna",
        denominator=["att"],
        time="month",
        group="svc",
        changes=changes,
    )
    result = run_inprocess([study], tmp_path / "network.toml")[0]
    seg = {s["group"]: s for s in result["segments"]}
    for period in ("before", "after"):
        assert seg["3"][period]["referrals"] is None and seg["3"][period]["events"] is None
        assert seg["3"][period]["rate"] is None
    assert seg["1"]["after"]["referrals"] == 500
    fitted = {s["group"]: s for s in result["per_service"]}
    assert not fitted["3"]["fitted"] and "suppressed" in fitted["3"]["reason"]

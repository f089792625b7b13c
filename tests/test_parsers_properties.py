"""Property tests of the two parsers that read text from outside: the cohort filter and the
formula check. Whatever the text, each ends as a parsed result or one SpecError (never another
exception, never evaluation); a filter's canonical rendering parses back to the same tree; a
filter evaluated on a frame agrees with an independent three-valued evaluation; transforms
built from the whitelist pass and their near neighbours outside it do not."""

from __future__ import annotations

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iaptnet.node.cohort import cohort_mask
from iaptnet.protocol import cohort_filter
from iaptnet.protocol.errors import SpecError
from iaptnet.protocol.formula_check import check_formula
from iaptnet.protocol.schema import Schema

SCHEMA = Schema.from_dict(
    {
        "columns": {
            "y": {"type": "binary"},
            "x": {"type": "numeric"},
            "age": {"type": "integer", "min": 18, "max": 100},
            "d": {"type": "numeric", "min": 0},
            "g": {"type": "categorical", "levels": ["a", "b", "c"]},
        }
    },
    "s",
)
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------- the filter

NUMBERS = st.sampled_from([0, 1, 2.5, -3, 40, 65])
comparison = st.one_of(
    st.tuples(st.sampled_from(["x", "age"]), st.sampled_from(["==", "!=", "<", "<=", ">", ">="]), NUMBERS).map(
        lambda t: f"{t[0]} {t[1]} {t[2]}"
    ),
    st.tuples(st.sampled_from(["==", "!="]), st.sampled_from(["a", "b", "c"])).map(lambda t: f'g {t[0]} "{t[1]}"'),
    st.sampled_from(["x is missing", "x is not missing", "g is missing", 'g in ["a", "c"]', 'g not in ["b"]']),
)
filters = st.recursive(
    comparison,
    lambda inner: st.one_of(
        st.tuples(inner, st.sampled_from(["and", "or"]), inner).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        inner.map(lambda e: f"not {e}"),
    ),
    max_leaves=8,
)


@SETTINGS
@given(st.text(max_size=200))
def test_any_filter_text_is_a_tree_or_one_sentence(text):
    try:
        cohort_filter.parse(text)
    except SpecError as exc:
        assert str(exc) and "\n" not in str(exc)


@SETTINGS
@given(filters)
def test_a_filter_renders_to_text_that_parses_back_to_it(text):
    tree = cohort_filter.parse(text)
    rendered = cohort_filter.render(tree)
    assert cohort_filter.parse(rendered) == tree
    assert cohort_filter.render(cohort_filter.parse(rendered)) == rendered


def _frame(seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = 60
    x = rng.choice([0, 1, 2.5, -3, 40, 7.0], size=n).astype(float)
    x[rng.random(n) < 0.2] = np.nan
    g = pd.Categorical(rng.choice(["a", "b", "c"], size=n), categories=["a", "b", "c"])
    g[rng.random(n) < 0.2] = np.nan
    return pd.DataFrame({"x": x, "age": rng.integers(18, 90, size=n).astype(float), "g": g})


def _reference(frame: pd.DataFrame, tree) -> np.ndarray:
    """Kleene logic by hand: True, False or None (unknown) per row."""

    def value(row, tree):
        kind = tree[0]
        if kind in ("and", "or"):
            vals = [value(row, t) for t in tree[1]]
            if kind == "and":
                return False if False in vals else (None if None in vals else True)
            return True if True in vals else (None if None in vals else False)
        if kind == "not":
            v = value(row, tree[1])
            return None if v is None else not v
        if kind == "missing":
            missing = pd.isna(row[tree[1]])
            return (not missing) if tree[2] else missing
        if kind == "in":
            v = row[tree[1]]
            if pd.isna(v):
                return None
            hit = v in [lit[1] for lit in tree[2]]
            return not hit if tree[3] else hit
        op, left, right = tree[1], tree[2], tree[3]
        a = row[left[1]] if left[0] == "col" else left[1]
        b = row[right[1]] if right[0] == "col" else right[1]
        if pd.isna(a) or pd.isna(b):
            return None
        return {"==": a == b, "!=": a != b, "<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op]

    return np.array([value(row, tree) is True for _, row in frame.iterrows()])


@SETTINGS
@given(filters, st.integers(0, 3))
def test_a_filter_keeps_exactly_the_rows_three_valued_logic_says(text, seed):
    frame = _frame(seed)
    tree = cohort_filter.parse(text)
    np.testing.assert_array_equal(cohort_mask(frame, tree), _reference(frame, tree))


# --------------------------------------------------------------------------- the formula

affine = st.recursive(
    st.sampled_from(["x", "age"]),
    lambda inner: st.one_of(
        st.tuples(inner, st.sampled_from(["+", "-", "*", "/"]), st.sampled_from(["2", "0.5", "10"])).map(
            lambda t: f"({t[0]} {t[1]} {t[2]})"
        )
    ),
    max_leaves=3,
)
allowed_terms = st.one_of(
    st.sampled_from(["x", "age", "g", "C(g)", "center(x)", "scale(age)", "x:g", "log(age)", "sqrt(d)"]),
    affine.map(lambda a: f"I({a})"),
    st.tuples(affine, st.sampled_from(["2", "3"])).map(lambda t: f"I({t[0]} ** {t[1]})"),
)


@SETTINGS
@given(st.lists(allowed_terms, min_size=1, max_size=5))
def test_whitelisted_transforms_pass(terms):
    check_formula("y ~ " + " + ".join(terms), SCHEMA, "binomial")


@SETTINGS
@given(
    st.sampled_from(["x", "age"]),
    st.sampled_from(
        [
            "I({c} ** 4)",
            "exp({c})",
            "I({c} * x)",
            "I({c} * 1e-30)",
            "I(({c} ** 2) ** 2)",
            "log(x)",
            "I({c} + 1e9)",
            "I(-{c})",
            "np.log({c})",
            "I({c} ** 0.5)",
            "sqrt(x)",
        ]
    ),
)
def test_near_neighbours_outside_the_whitelist_fail(column, template):
    text = "y ~ " + template.format(c=column)
    try:
        check_formula(text, SCHEMA, "binomial")
    except SpecError:
        return
    raise AssertionError(f"accepted {text}")


@SETTINGS
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=120))
def test_any_formula_text_is_parsed_or_one_sentence(text):
    try:
        check_formula("y ~ " + text, SCHEMA, "binomial")
    except SpecError as exc:
        assert str(exc) and "\n" not in str(exc)

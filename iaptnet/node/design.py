"""Build a model's design matrix once per study, from the node's own rows.

Categorical levels come from the schema (the analysis frame holds pandas Categoricals whose
categories are the schema levels), so every node builds the same columns in the same order,
including columns for levels it has no rows of. Complete-case handling drops rows with a
missing outcome, offset or right-hand column. Centring and scaling use pooled statistics sent
by the coordinator, never local ones, so every node applies the same transform.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pandas as pd

from ..protocol.errors import DataError
from ..protocol.formula_check import ParsedFormula, check_formula
from ..protocol.schema import Schema
from ..protocol.study import StudySpec
from .cohort import cohort_mask

#: The only names a factor can see when formulaic evaluates it (never the caller's frame).
EVAL_CONTEXT = {
    "log": np.log,
    "exp": np.exp,
    "sqrt": np.sqrt,
    "np": SimpleNamespace(log=np.log, exp=np.exp, sqrt=np.sqrt),
}


@dataclass
class DesignedModel:
    """y, X and offset for the complete cases of one model at this node."""

    names: list[str]
    X: np.ndarray
    y: np.ndarray
    offset: np.ndarray
    n_cohort: int
    n_missing: int

    @property
    def n(self) -> int:
        return len(self.y)


def model_rows(frame: pd.DataFrame, spec: StudySpec, parsed: ParsedFormula) -> tuple[pd.DataFrame, int, int]:
    """The complete cases of the study's cohort: (rows, n in cohort, n dropped as missing)."""
    mask = cohort_mask(frame, spec.where_tree())
    needed = [parsed.outcome, *sorted(parsed.columns)]
    if spec.offset:
        needed.append(spec.offset)
    cohort = frame.loc[mask, list(dict.fromkeys(needed))]
    complete = cohort.notna().all(axis=1).to_numpy()
    return cohort.loc[complete], int(mask.sum()), int((~complete).sum())


def stateful_arguments(parsed: ParsedFormula) -> dict[str, str]:
    """For each center()/scale() factor, the expression inside it (evaluated for moments)."""
    out = {}
    for expr in parsed.stateful:
        call = ast.parse(expr, mode="eval").body
        out[expr] = ast.unparse(call.args[0])
    return out


def evaluate_expression(rows: pd.DataFrame, expr: str) -> np.ndarray:
    """Evaluate one already-checked factor expression on the rows, via formulaic."""
    from formulaic import model_matrix

    mm = model_matrix(f"~ 0 + I({expr})", rows, context=EVAL_CONTEXT, na_action="ignore", output="numpy")
    return np.asarray(mm, dtype=float)[:, 0]


def build_design(frame: pd.DataFrame, schema: Schema, spec: StudySpec,
                 transform_state: dict | None = None) -> DesignedModel:
    """Filter, drop incomplete rows and build X with formulaic; raise DataError on failure."""
    from formulaic import ModelSpec

    parsed = check_formula(spec.formula, schema, spec.family, spec.source)
    rows, n_cohort, n_missing = model_rows(frame, spec, parsed)
    rhs = legacy_ordered(spec.formula.split("~", 1)[1], schema)
    model_spec = ModelSpec(formula=rhs, na_action="ignore", output="pandas",
                           transform_state=dict(transform_state or {}))
    if len(rows) == 0:
        names = _names_from_empty(rows, model_spec)
        p = len(names)
        return DesignedModel(names, np.zeros((0, p)), np.zeros(0), np.zeros(0), n_cohort, n_missing)
    try:
        mm = model_spec.get_model_matrix(rows, context=EVAL_CONTEXT)
    except Exception as exc:  # formulaic raises many types; none may carry data values out
        raise DataError(f"the formula could not be evaluated on this node's rows ({type(exc).__name__}).") from exc
    X = np.ascontiguousarray(mm.to_numpy(dtype=float))
    if not np.all(np.isfinite(X)):
        raise DataError("a transform in the formula gives values that are not finite (for example log of 0) for some rows.")
    y = rows[parsed.outcome].to_numpy(dtype=float)
    offset = rows[spec.offset].to_numpy(dtype=float) if spec.offset else np.zeros(len(rows))
    return DesignedModel(list(mm.columns), X, y, offset, n_cohort, n_missing)


def legacy_ordered(rhs: str, schema: Schema):
    """The right-hand side with terms in statsmodels' default ("legacy", patsy) order.

    Intercept first, then terms made only of categorical factors (by degree), then the rest
    grouped by their numeric factors in order of appearance, each group by degree. Which
    factors are categorical is known from the schema, so every node orders alike.
    """
    from formulaic import Formula

    terms = list(Formula(rhs, _ordering="none"))

    def categorical(factor) -> bool:
        expr = str(factor.expr)
        if factor.eval_method.value == "lookup":
            return expr in schema and schema[expr].is_categorical
        return expr.replace(" ", "").startswith("C(")

    intercept = [t for t in terms if t.degree == 0]
    cats = sorted((t for t in terms if t.degree > 0 and all(categorical(f) for f in t.factors)),
                  key=lambda t: t.degree)
    groups: dict[tuple, list] = {}
    for t in terms:
        if t.degree == 0 or t in cats:
            continue
        key = tuple(sorted(str(f.expr) for f in t.factors if not categorical(f)))
        groups.setdefault(key, []).append(t)
    rest = [t for group in groups.values() for t in sorted(group, key=lambda t: t.degree)]
    return Formula(intercept + cats + rest, _ordering="none")


def _names_from_empty(rows: pd.DataFrame, model_spec) -> list[str]:
    """Column names when the node has no complete rows: evaluate on one placeholder row."""
    placeholder = {}
    for name in rows.columns:
        col = rows[name]
        if isinstance(col.dtype, pd.CategoricalDtype):
            placeholder[name] = pd.Categorical([col.cat.categories[0]], categories=col.cat.categories)
        else:
            placeholder[name] = [1.0]
    try:
        mm = model_spec.get_model_matrix(pd.DataFrame(placeholder), context=EVAL_CONTEXT)
        return list(mm.columns)
    except Exception:
        return []

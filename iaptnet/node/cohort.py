"""Evaluate a parsed cohort filter on the node's analysis frame.

Three-valued (Kleene) logic, as SQL's WHERE: a comparison with a missing value is unknown,
`not unknown` stays unknown, and rows whose condition is unknown are left out. Only
`is missing` / `is not missing` look at missingness directly.

While the node answers a task (`recording_conditions`), every cohort evaluated also records,
per column, the rows of the whole dataset that the filter's conditions on that column admit.
The dispatcher judges those sets against the conditions of earlier filters (node/dispatch.py):
a decision that depends on one column's values only, so it cannot answer a question about
another column's.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import numpy as np
import pandas as pd

from ..protocol.cohort_filter import by_column, calendar_date, check_shape
from ..protocol.errors import SpecError

#: (column, rows of the dataset its conditions admit) for every cohort evaluated in a task.
_CONDITIONS: contextvars.ContextVar[list | None] = contextvars.ContextVar("filter_conditions", default=None)


@contextlib.contextmanager
def recording_conditions() -> Iterator[list[tuple[str, np.ndarray]]]:
    """Collect the per-column condition sets of every cohort evaluated inside the block."""
    found: list[tuple[str, np.ndarray]] = []
    token = _CONDITIONS.set(found)
    try:
        yield found
    finally:
        _CONDITIONS.reset(token)


_OPS = {
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


def cohort_mask(frame: pd.DataFrame, tree: tuple | None) -> np.ndarray:
    """Boolean numpy mask of the rows in the cohort (all rows when there is no filter)."""
    if tree is None:
        return np.ones(len(frame), dtype=bool)
    found = _CONDITIONS.get()
    if found is None:
        return _eval(frame, tree).fillna(False).to_numpy(dtype=bool)
    # At the node, whatever built the filter: a cohort must have the shape of one (conditions
    # on one column each, joined by `and`); it is then the rows every column's conditions admit.
    check_shape(tree, "the study")
    mask = np.ones(len(frame), dtype=bool)
    for column, conditions in by_column(tree).items():
        admitted = _eval(frame, conditions[0] if len(conditions) == 1 else ("and", conditions))
        admitted = admitted.fillna(False).to_numpy(dtype=bool)
        found.append((column, admitted))
        mask &= admitted
    return mask


def _eval(frame: pd.DataFrame, tree: tuple) -> pd.Series:
    kind = tree[0]
    if kind == "and":
        out = _eval(frame, tree[1][0])
        for sub in tree[1][1:]:
            out = out & _eval(frame, sub)
        return out
    if kind == "or":
        out = _eval(frame, tree[1][0])
        for sub in tree[1][1:]:
            out = out | _eval(frame, sub)
        return out
    if kind == "not":
        return ~_eval(frame, tree[1])
    if kind == "missing":
        isna = frame[tree[1]].isna()
        return pd.Series(~isna if tree[2] else isna, index=frame.index, dtype="boolean")
    if kind == "in":
        col = frame[tree[1]]
        values = [_literal(col, v) for v in tree[2]]
        result = _plain(col).isin(values)
        if tree[3]:
            result = ~result
        return _with_missing(result, col.isna())
    op, left, right = tree[1], tree[2], tree[3]
    _check_dates(frame, left, right)
    lhs, lmiss = _operand(frame, left, right)
    rhs, rmiss = _operand(frame, right, left)
    result = pd.Series(_OPS[op](lhs, rhs), index=frame.index)
    return _with_missing(result, lmiss | rmiss)


def _plain(col: pd.Series) -> pd.Series:
    """Categoricals compare as their level strings."""
    if isinstance(col.dtype, pd.CategoricalDtype):
        return col.astype(object)
    return col


def _is_date(frame: pd.DataFrame, operand: tuple) -> bool:
    return operand[0] == "col" and pd.api.types.is_datetime64_any_dtype(frame[operand[1]])


def _check_dates(frame: pd.DataFrame, left: tuple, right: tuple) -> None:
    """A date column compares only with a date column or a date string. The coordinator checks
    this, but a node does not trust that it did: pandas would raise, or call every row unequal."""
    for date, other in ((left, right), (right, left)):
        if _is_date(frame, date) and not (_is_date(frame, other) or other[0] == "str"):
            raise SpecError(f"the filter compares the date column '{date[1]}' with something other than a date.")


def _literal(col: pd.Series, lit: tuple):
    if pd.api.types.is_datetime64_any_dtype(col):
        day = calendar_date(lit[1]) if lit[0] == "str" else None
        if day is None:
            raise SpecError(
                f"the filter compares the date column '{col.name}' with {_shown(lit)}, which is not a calendar date."
            )
        return pd.Timestamp(day)
    return lit[1]


def _shown(lit: tuple) -> str:
    return f'"{lit[1]}"' if lit[0] == "str" else repr(lit[1])


def _operand(frame: pd.DataFrame, op: tuple, other: tuple):
    if op[0] == "col":
        col = frame[op[1]]
        return _plain(col), col.isna().to_numpy()
    if other[0] == "col":
        return _literal(frame[other[1]], op), np.zeros(len(frame), dtype=bool)
    return op[1], np.zeros(len(frame), dtype=bool)


def _with_missing(result: pd.Series, missing) -> pd.Series:
    out = pd.Series(np.asarray(result, dtype=bool), index=result.index, dtype="boolean")
    out[np.asarray(missing, dtype=bool)] = pd.NA
    return out

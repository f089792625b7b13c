"""Checking a raw table against its schema and converting it to the typed frame models use.

Every value is either converted, counted as missing, or counted as invalid with a reason; an
invalid value is never quietly treated as missing, and the report says how many there are so
that the node can refuse to serve the table. The report holds counts and schema facts only,
never a value from a row, because it may be shown on the coordinator's side.

Typed frame conventions (the design-matrix code relies on them):
- numeric, integer, binary: float64, NaN for missing (and for invalid values, which are counted);
- categorical: pandas Categorical whose categories are exactly the schema levels, in order;
- date: datetime64[ns], NaT for missing;
- identifier: pandas string dtype, kept for the uniqueness check only.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..protocol.errors import DataError
from ..protocol.schema import SERVICE_CODE, Column, Schema
from .sources import NA_TOKENS

NOT_A_NUMBER = "not a number"
NOT_AN_INTEGER = "not an integer"
BELOW_MIN = "below min"
ABOVE_MAX = "above max"
NOT_BINARY = "not 0/1"
UNKNOWN_LEVEL = "unknown level"
NOT_A_DATE = "not a date"
REPEATED_KEY = "repeated in a unique column"

#: Reasons in the order they are checked (a value is counted under its first failing reason).
REASONS = (NOT_A_NUMBER, NOT_AN_INTEGER, BELOW_MIN, ABOVE_MAX, NOT_BINARY, UNKNOWN_LEVEL, NOT_A_DATE)

_NA = frozenset(NA_TOKENS)


@dataclass(frozen=True)
class ColumnReport:
    """Counts for one schema column. `present` is False when the file lacks the column."""

    name: str
    type: str
    present: bool
    required: bool
    n_missing: int
    invalid: dict[str, int] = field(default_factory=dict)  # reason -> count (non-zero only)
    # Identifier columns: rows repeating an earlier row's value. Invalid only for a column the
    # schema marks `unique` (a row key such as pathway_id); informational otherwise (lsoa_code).
    n_duplicates: int = 0
    min: float | None = None
    max: float | None = None

    @property
    def n_invalid(self) -> int:
        return sum(self.invalid.values())

    @property
    def ok(self) -> bool:
        return (self.present or not self.required) and not self.invalid

    def problems(self) -> str:
        """The invalid counts in words, with the schema's limits (never the values)."""
        limit = {BELOW_MIN: self.min, ABOVE_MAX: self.max}
        parts = []
        for reason in REASONS:
            if reason in self.invalid:
                bound = f" {_number(limit[reason])}" if limit.get(reason) is not None else ""
                parts.append(f"{self.invalid[reason]:,} {reason}{bound}")
        if self.n_duplicates:
            parts.append(f"{self.n_duplicates:,} repeated values")
        return "; ".join(parts)


@dataclass(frozen=True)
class ValidationReport:
    """What `node check` prints and what the node may tell the coordinator: counts only."""

    source: str
    schema: str
    n_rows: int
    columns: tuple[ColumnReport, ...]
    ignored: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()  # count-only remarks, e.g. from consistency checks

    @property
    def missing_required(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns if c.required and not c.present)

    @property
    def invalid_columns(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns if c.invalid)

    @property
    def n_duplicate_identifiers(self) -> int:
        return sum(c.n_duplicates for c in self.columns)

    @property
    def ok(self) -> bool:
        """Usable for studies: every required column present and no invalid value."""
        return not self.missing_required and not self.invalid_columns

    def with_notes(self, notes: list[str] | tuple[str, ...]) -> ValidationReport:
        return ValidationReport(
            self.source, self.schema, self.n_rows, self.columns, self.ignored, self.notes + tuple(notes)
        )

    def render(self) -> str:
        """A plain-text table, one line per schema column."""
        width = max([len("column")] + [len(c.name) for c in self.columns])
        lines = [
            f"{self.source}: {self.n_rows:,} rows checked against schema '{self.schema}'",
            f"{'column':<{width}}  {'type':<11}  {'missing':>16}  {'invalid':>9}  problems",
        ]
        for c in self.columns:
            if not c.present:
                state = "MISSING: a required column" if c.required else "absent (optional)"
                lines.append(f"{c.name:<{width}}  {c.type:<11}  {state}")
                continue
            share = f"({100 * c.n_missing / self.n_rows:.1f}%)" if self.n_rows else ""
            missing = f"{c.n_missing:,} {share}".strip()
            lines.append(f"{c.name:<{width}}  {c.type:<11}  {missing:>16}  {c.n_invalid:>9,}  {c.problems()}".rstrip())
        if self.missing_required:
            lines.append("required columns not in the file: " + ", ".join(self.missing_required))
        if self.ignored:
            lines.append("ignored (not in the schema): " + ", ".join(self.ignored))
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def as_dict(self) -> dict:
        """JSON-ready form (counts and names only)."""
        return {
            "source": self.source,
            "schema": self.schema,
            "n_rows": self.n_rows,
            "ok": self.ok,
            "missing_required": list(self.missing_required),
            "ignored": list(self.ignored),
            "notes": list(self.notes),
            "columns": [
                {
                    "name": c.name,
                    "type": c.type,
                    "present": c.present,
                    "n_missing": c.n_missing,
                    "invalid": dict(c.invalid),
                    "n_duplicates": c.n_duplicates,
                }
                for c in self.columns
            ],
        }


def validate(raw: pd.DataFrame, schema: Schema, source: str) -> tuple[pd.DataFrame, ValidationReport]:
    """Convert `raw` to the typed frame of `schema` and count what could not be converted.

    The typed frame has one column per schema column, in schema order; a column absent from
    `raw` is present in the frame as all-missing (the report says whether that is allowed).
    A service column not yet bound to codes (`levels = "network"`, the node declaring none)
    takes the well-formed codes its rows hold, sorted.
    """
    raw = raw.rename(columns=lambda c: str(c).strip())
    renames = {c.source: c.name for c in schema.columns.values() if c.source}
    raw = raw.rename(columns=renames)
    schema = _bind_found_services(schema, raw)
    if raw.columns.duplicated().any():
        name = raw.columns[raw.columns.duplicated()][0]
        raise DataError(f"{source}: column '{name}' appears twice; expected each column once.")
    n = len(raw)
    typed: dict[str, pd.Series | np.ndarray | pd.Categorical] = {}
    reports = []
    for col in schema.columns.values():
        if col.name not in raw.columns:
            typed[col.name] = _empty(col, n)
            reports.append(ColumnReport(col.name, col.type, False, not col.optional, n, min=col.min, max=col.max))
            continue
        values, missing, invalid = _CONVERT[col.type](raw[col.name], col)
        duplicates = 0
        if col.type == "identifier":
            duplicates = int(values.dropna().duplicated().sum())
            if col.unique and duplicates:
                invalid = dict(invalid, **{REPEATED_KEY: duplicates})
        typed[col.name] = values
        reports.append(
            ColumnReport(
                col.name,
                col.type,
                True,
                not col.optional,
                int(missing.sum()),
                {r: c for r, c in invalid.items() if c},
                duplicates,
                col.min,
                col.max,
            )
        )
    ignored = tuple(c for c in raw.columns if c not in schema.columns)
    frame = pd.DataFrame(typed, index=pd.RangeIndex(n))
    return frame, ValidationReport(source, schema.name, n, tuple(reports), ignored)


# --- conversions: each returns (typed values, missing mask, {reason: count}) -------------------


def _uniques(series: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes, distinct values, which distinct values are missing): codes index the distinct
    values (-1 for a missing row); text is trimmed, and NA tokens count as missing. Work
    happens once per distinct value, not per row."""
    codes, uniques = pd.factorize(series, use_na_sentinel=True)
    values = np.array([v.strip() if isinstance(v, str) else v for v in np.asarray(uniques, dtype=object)], dtype=object)
    missing = np.array([isinstance(v, str) and v in _NA for v in values], dtype=bool)
    return codes, values, missing


def _take(per_unique: np.ndarray, codes: np.ndarray, fill) -> np.ndarray:
    """Expand per-distinct-value results to rows; code -1 (missing) picks `fill`."""
    return np.append(per_unique, np.array([fill], dtype=per_unique.dtype))[codes]


def _to_float(series: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values, missing, not-a-number) for any input dtype."""
    if pd.api.types.is_numeric_dtype(series.dtype):  # ints, floats, bools (not categoricals)
        values = series.to_numpy(dtype="float64", na_value=np.nan)
        missing = np.isnan(values)
        return values, missing, np.isinf(values)
    codes, uniques, missing_u = _uniques(series)
    # Text and plain numbers parse; anything else (a date, True) is not a number.
    text = pd.Series(
        [v if isinstance(v, str) else str(v) if _as_number(v) is not None else "" for v in uniques], dtype=object
    )
    parsed = pd.to_numeric(text, errors="coerce").to_numpy(dtype="float64", copy=True)
    parsed[missing_u] = np.nan
    bad_u = ~missing_u & ~np.isfinite(parsed)
    parsed[bad_u] = np.nan
    return _take(parsed, codes, np.nan), _take(missing_u, codes, True), _take(bad_u, codes, False)


def _numeric(series: pd.Series, col: Column):
    values, missing, bad = _to_float(series)
    invalid = {NOT_A_NUMBER: bad}
    if col.type == "integer":
        invalid[NOT_AN_INTEGER] = np.floor(values) != values
    if col.type == "binary":
        invalid[NOT_BINARY] = ~np.isnan(values) & (values != 0) & (values != 1)
    if col.min is not None:
        invalid[BELOW_MIN] = values < col.min
    if col.max is not None:
        invalid[ABOVE_MAX] = values > col.max
    return _finish(values, missing, invalid, np.nan)


def _bind_found_services(schema: Schema, raw: pd.DataFrame) -> Schema:
    column = schema.network_column
    if column is None or schema[column].levels or column not in raw.columns:
        return schema
    found = {_code_text(v) for v in pd.unique(raw[column].dropna())}
    codes = sorted(code for code in found if SERVICE_CODE.match(code))
    return schema.with_services(codes) if codes else schema


def _code_text(value) -> str:
    """A service code as text; a whole number from a typed source (2.0) as "2"."""
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        if float(value).is_integer():
            return str(int(value))
    return str(value).strip()


def _finish(values: np.ndarray, missing: np.ndarray, invalid: dict, blank):
    """Count each invalid value under its first reason and blank it in the typed values."""
    seen = np.zeros(len(values), dtype=bool)
    counts = {}
    for reason in REASONS:
        if reason in invalid:
            mask = np.asarray(invalid[reason], dtype=bool) & ~seen & ~missing
            counts[reason] = int(mask.sum())
            seen |= mask
    values = values.copy()
    values[seen] = blank
    return values, missing, counts


def _categorical(series: pd.Series, col: Column):
    """Match on trimmed text, then on numeric value (so 1, 1.0 or "1.0" from a typed source
    match level "1", and 1 matches "01" when no other level has that value)."""
    codes, uniques, missing_u = _uniques(series)
    exact = {level: i for i, level in enumerate(col.levels)}
    by_value: dict[float, int] = {}
    for i, level in enumerate(col.levels):
        value = _as_number(level)
        if value is not None:
            by_value[value] = -2 if value in by_value else i  # two levels share it: text only
    level_u = np.full(len(uniques), -2, dtype=np.int64)  # -2: unknown level
    for k, value in enumerate(uniques):
        if missing_u[k]:
            level_u[k] = -1
            continue
        found = exact.get(value if isinstance(value, str) else str(value))
        if found is None:
            found = by_value.get(_as_number(value), -2)
        level_u[k] = found
    row_level = _take(level_u, codes, -1)
    missing = row_level == -1
    unknown = row_level == -2
    row_level[unknown] = -1
    values = pd.Categorical.from_codes(row_level, categories=list(col.levels))
    return values, missing, {UNKNOWN_LEVEL: int(unknown.sum())}


def _as_number(value) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


_NS_MIN, _NS_MAX = pd.Timestamp.min, pd.Timestamp.max


def _date(series: pd.Series, col: Column):
    """ISO 8601 text (2012-04-01) or UK day-first text (01/04/2012), or native dates."""
    if pd.api.types.is_datetime64_any_dtype(series):
        if getattr(series.dt, "tz", None) is not None:
            series = series.dt.tz_localize(None)
        codes, uniques = pd.factorize(series, use_na_sentinel=True)
        parsed = pd.Series(uniques)
        missing_u = np.zeros(len(parsed), dtype=bool)
    else:
        codes, uniques, missing_u = _uniques(series)
        uniques = pd.Series(uniques, dtype=object)
        is_text = np.array([isinstance(v, str) for v in uniques], dtype=bool) & ~missing_u
        is_date = np.array([isinstance(v, (dt.date, np.datetime64)) for v in uniques], dtype=bool)
        parsed = pd.Series(pd.NaT, index=uniques.index, dtype="datetime64[us]")
        if is_text.any():
            text = uniques[is_text]
            iso = pd.to_datetime(text, format="ISO8601", errors="coerce")
            uk = pd.to_datetime(text[iso.isna()], format="%d/%m/%Y", errors="coerce")
            parsed[is_text] = iso.fillna(uk).astype("datetime64[us]")
        if is_date.any():
            native = pd.to_datetime(uniques[is_date], errors="coerce")
            parsed[is_date] = native.astype("datetime64[us]")
    in_range = parsed.notna() & (parsed >= _NS_MIN) & (parsed <= _NS_MAX)
    bad_u = ~missing_u & ~in_range.to_numpy()
    as_ns = parsed.where(in_range).astype("datetime64[ns]").to_numpy()
    values = _take(as_ns, codes, np.datetime64("NaT", "ns"))  # invalid dates are NaT (counted)
    bad = _take(bad_u, codes, False)
    return values, _take(missing_u, codes, True), {NOT_A_DATE: int(bad.sum())}


def _identifier(series: pd.Series, col: Column):
    values = identifier_text(series)
    return values, values.isna().to_numpy(), {}


def identifier_text(series: pd.Series) -> pd.Series:
    """Identifiers as trimmed text, missing tokens as missing (how a key column is compared).
    Mostly distinct values, so whole-column string operations rather than per distinct value."""
    series = series.reset_index(drop=True)
    whole = series.dropna() if pd.api.types.is_float_dtype(series) else None
    if whole is not None and ((whole % 1 == 0) & (whole.abs() < 2**53)).all():
        series = series.astype("Int64")  # integer ids that passed through a float column (exactly)
    text = series.astype("str").str.strip()
    return text.mask(text.isin(NA_TOKENS))


def _empty(col: Column, n: int):
    if col.type == "categorical":
        return pd.Categorical.from_codes(np.full(n, -1), categories=list(col.levels))
    if col.type == "date":
        return np.full(n, np.datetime64("NaT", "ns"))
    if col.type == "identifier":
        return pd.Series([None] * n, dtype="str")
    return np.full(n, np.nan)


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


_CONVERT = {
    "numeric": _numeric,
    "integer": _numeric,
    "binary": _numeric,
    "categorical": _categorical,
    "date": _date,
    "identifier": _identifier,
}

"""The CSV grammar of tables by group that access studies read: the population table
(protocol/population.py) and the need table (protocol/prevalence.py) share it, so both read
columns, ages, sexes and levels alike. Pure (stdlib only)."""

from __future__ import annotations

import csv
import io
import math
import re
from typing import Protocol

from .errors import SpecError
from .schema import Schema

AREA = "area"
#: The ONS-layout column of each grouping variable of the IAPT dataset.
ONS_COLUMNS = {"age_group": "age_band", "sex": "sex", "ethnicity_ons": "ethnic_group", "imd_quintile": "imd_quintile"}
SEX_CODES = {
    "1": "male",
    "2": "female",
    "m": "male",
    "f": "female",
    "males": "male",
    "females": "female",
    "men": "male",
    "women": "female",
}
_BAND = re.compile(r"^(\d+)\s*-\s*(\d+)$")
_OPEN_BAND = re.compile(r"^(\d+)\s*\+$")
_AGE = re.compile(r"^(\d{1,3})(\+?)$")


class GroupShares(Protocol):
    """A share per group (the need table): the variables it is by, where it came from, and
    the share for a row's levels (None when the table has no such group)."""

    vars: tuple[str, ...]
    source: str

    def of(self, levels: dict[str, str]) -> float | None: ...


def read_header(text: str, where: str, expected: str, max_columns: int):
    """(a csv reader positioned after the header, the header's names trimmed and lower-cased)."""
    if not isinstance(text, str):
        raise SpecError(f"{where} is not text.")
    reader = csv.reader(io.StringIO(text.lstrip("\ufeff")))
    try:
        header = next(reader)
    except StopIteration:
        raise SpecError(f"{where} is empty; it needs a header line {expected}.") from None
    except csv.Error as exc:
        raise SpecError(f"{where} is not a valid CSV file ({exc}).") from None
    names = [h.strip().lower()[:60] for h in header]
    if len(names) > max_columns:
        raise SpecError(f"{where} has {len(names)} columns; expected {expected}.")
    if len(set(names)) != len(names):
        raise SpecError(f"{where} has a repeated column in its header line.")
    return reader, names


def group_columns(names: list[str], skip: tuple[str, ...], schema: Schema, where: str, unknown: str) -> dict[int, str]:
    """Column index -> the schema variable a group column holds, in column order: its
    ONS-layout name (the CSV's ethnic_group holds the ONS five groups, ethnicity_ons, not the
    dataset's NHS ethnic_group) or a categorical column's own name; `unknown` ends the
    sentence for any other column."""
    by_ons = {ons: var for var, ons in ONS_COLUMNS.items()}
    holds: dict[int, str] = {}
    for i, name in enumerate(names):
        if name in skip:
            continue
        var = by_ons.get(name) or (name if name in schema and schema[name].is_categorical else None)
        if var is None:
            raise SpecError(f"{where} has a column '{name}' that is {unknown}.")
        if var in holds.values():
            raise SpecError(f"{where} has two columns for '{var}'.")
        holds[i] = var
    return holds


def data_rows(reader, width: int, where: str, max_rows: int, too_many: str = ""):
    """(line number, values) of each non-blank data row, each with `width` values."""
    line = 1
    try:
        for line, row in enumerate(reader, start=2):
            if not row or all(not cell.strip() for cell in row):
                continue
            if line > max_rows:
                raise SpecError(f"{where} has more than {max_rows:,} rows{too_many}.")
            if len(row) != width:
                raise SpecError(f"{where}, line {line}: has {len(row)} values for {width} columns.")
            yield line, row
    except csv.Error as exc:
        raise SpecError(f"{where}, line {line}: not valid CSV ({exc}).") from None


BELOW_FIRST_BAND = object()  # an age below the first band: not in the population a service serves


def level_matcher(var: str, schema: Schema):
    """value -> schema level (None when unknown, BELOW_FIRST_BAND for ages under the first band)."""
    if var not in schema:
        return lambda value: value.strip()
    levels = list(schema[var].levels)
    plain = {normalise(level): level for level in levels}
    aliases = dict(SEX_CODES) if set(levels) == {"female", "male"} else {}
    bands = _age_bands(levels)

    def match(value: str):
        key = normalise(value)
        if key in plain:
            return plain[key]
        if key in aliases:
            return aliases[key]
        if bands:
            found = _AGE.match(key)
            if found:
                age = int(found.group(1))
                if age < bands[0][0]:
                    return BELOW_FIRST_BAND
                for low, high, level in bands:
                    if low <= age <= high and (not found.group(2) or high == math.inf):
                        return level
        return None

    return match


def _age_bands(levels: list[str]) -> list[tuple[float, float, str]]:
    """[(first age, last age, level)] when every level is a band like 18-24 or 65+."""
    bands = []
    for level in levels:
        closed, open_ = _BAND.match(level.strip()), _OPEN_BAND.match(level.strip())
        if closed:
            bands.append((int(closed.group(1)), int(closed.group(2)), level))
        elif open_:
            bands.append((int(open_.group(1)), math.inf, level))
        else:
            return []
    return sorted(bands)


def normalise(text: str) -> str:
    """A value as compared: spaces collapsed, lower case."""
    return " ".join(str(text).split()).lower()

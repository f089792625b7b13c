"""Need for an access study: the prevalence of common mental disorders by group, read and checked.

Referral rates against the whole population say who is referred less; whether that is less
than their need is a question for the population *with* a common mental disorder. NHS
England's access measure divides by an estimate of it (APMS-based prevalence). An access
study may name such a table (field `need`); the coordinator then multiplies each population
row by the prevalence of its group before anything else, so every rate, rate ratio and model
of the study is against people with need (docs/reference/domain.md#access-analyses: expected = population x prevalence).

The layout is the population table's (protocol/population.py), with `prevalence` (a proportion
between 0 and 1) in place of `population`, and no `area` (prevalence is national):

    age_band,sex,prevalence
    18-24,female,0.26

Its group columns are any of the population layout's (`age_band`, `sex`, `ethnic_group`,
`imd_quintile`, or a categorical column's own name), matched to the schema's levels as the
population table's are. Every population row needs a prevalence for its group: a group the
table lacks, a repeated group, a value outside [0, 1] or an unknown column is refused with
one sentence naming the file, the line and the column.

Pure: text in, a `Prevalence` out (stdlib only); its sha256 digest goes into the study hash.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

from .errors import SpecError
from .group_csv import (
    AREA,
    BELOW_FIRST_BAND,
    ONS_COLUMNS,
    data_rows,
    group_columns,
    level_matcher,
    read_header,
)
from .schema import Schema

PREVALENCE = "prevalence"
MAX_ROWS = 100_000


@dataclass(frozen=True)
class Prevalence:
    """Proportion with need per group: `values[(level of vars[0], level of vars[1], ...)]`."""

    source: str
    vars: tuple[str, ...]  # schema variables, in the table's column order
    values: dict[tuple[str, ...], float]
    digest: str

    def of(self, levels: dict[str, str]) -> float | None:
        """The prevalence of a population row's group (its schema levels), None if absent."""
        return self.values.get(tuple(levels[v] for v in self.vars))


def parse_prevalence(text: str, source: str, schema: Schema, study: str) -> Prevalence:
    """Read the CSV text of a need table (see the module docstring)."""
    where = f"{source}: the need table (field 'need' of {study})"
    reader, names = read_header(text, where, f"such as age_band,sex,{PREVALENCE}", max_columns=10)
    if PREVALENCE not in names:
        raise SpecError(
            f"{where} has no column '{PREVALENCE}' (the proportion of the group with need); "
            f"its columns are {', '.join(names)}."
        )
    if AREA in names:
        raise SpecError(f"{where} has a column 'area'; prevalence is national here: give one row per group.")
    holds = group_columns(
        names,
        (PREVALENCE,),
        schema,
        where,
        f"not a group column of the population layout ({', '.join(ONS_COLUMNS.values())})",
    )
    if not holds:
        raise SpecError(f"{where} has no group column (for example age_band and sex) beside '{PREVALENCE}'.")
    matchers = {i: level_matcher(var, schema) for i, var in holds.items()}
    value_i = names.index(PREVALENCE)
    values: dict[tuple[str, ...], float] = {}
    for line, row in data_rows(reader, len(names), where, MAX_ROWS):
        key = []
        for i, var in holds.items():
            level = matchers[i](row[i])
            if level is None or level is BELOW_FIRST_BAND:
                raise SpecError(
                    f"{where}, line {line}: column '{names[i]}' has '{row[i].strip()[:40]}', "
                    f"which is not a level of {var} ({', '.join(schema[var].levels)})."
                )
            key.append(level)
        try:
            value = float(row[value_i].strip())
        except ValueError:
            value = math.nan
        if not 0.0 <= value <= 1.0:
            raise SpecError(
                f"{where}, line {line}: column '{PREVALENCE}' has '{row[value_i].strip()[:40]}'; "
                "it must be a proportion between 0 and 1 (write 0.26 for 26%)."
            )
        if tuple(key) in values:
            raise SpecError(f"{where}, line {line}: repeats the group of an earlier row; each group needs one row.")
        values[tuple(key)] = value
    if not values:
        raise SpecError(f"{where} has no rows.")
    variables = tuple(holds.values())
    blob = json.dumps(
        {"vars": list(variables), "values": sorted([list(k), v] for k, v in values.items())},
        sort_keys=True,
        separators=(",", ":"),
    )
    return Prevalence(source, variables, values, hashlib.sha256(blob.encode()).hexdigest())

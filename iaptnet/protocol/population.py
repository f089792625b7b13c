"""Population denominators for access studies: the CSV the coordinator holds, read and checked.

The layout is ONS mid-year-estimate style, one row per area and group (long format):

    area,age_band,sex,ethnic_group,imd_quintile,population
    camden_islington,18-24,female,White,1,5099

`area` is the node (service) whose catchment the row belongs to (a study may map a node to
several areas, e.g. local authorities), `population` the number of people in the group (the
average over the study period; whole numbers or decimals). The group columns are optional as
a set: a table needs the column of every variable the study groups by, and sums over the
others. Each grouping variable reads its own name (`age_group`) or its ONS-layout name
(`age_band` for age_group, `ethnic_group` for ethnicity_ons). Values are matched to the
dataset schema's levels ignoring case and surrounding spaces; ages may also be single years
(`37`, `90+`), which are put into the schema's bands (ages below the first band are not in
the population the service serves and are left out); sex also reads ONS codes (1 male,
2 female) and M/F. Every area needs a row for every group a study counts (after summing over
the columns it does not use); a population of 0 is allowed and means the group has no one
there, so the node leaves that group's referrals out. Anything else (an unknown value, a total row, a column the layout does not
have, a repeated row) is refused with one sentence naming the file, the line and the column,
because summing it would silently count people twice.

Pure: text in, a `PopulationTable` out (stdlib only). The table is aggregated to the study's
grain (area x the levels of its grouping variables, after its level merges), and its sha256
digest becomes part of the study hash, so two files with the same denominators in another
order give the same study.
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
    GroupShares,
    data_rows,
    group_columns,
    level_matcher,
    normalise,
    read_header,
)
from .schema import Schema
from .study import merged_levels

POPULATION = "population"
LAYOUT = (AREA, "age_band", "sex", "ethnic_group", "imd_quintile", POPULATION)
MAX_ROWS = 2_000_000


@dataclass(frozen=True)
class PopulationTable:
    """Denominators at a study's grain: cells[area][levels tuple] = population (> 0 or 0)."""

    source: str
    by: tuple[str, ...]
    levels: dict[str, tuple[str, ...]]
    cells: dict[str, dict[tuple[str, ...], float]]
    digest: str

    @property
    def areas(self) -> list[str]:
        return sorted(self.cells)

    def groups(self) -> list[tuple[str, ...]]:
        """Every combination of the grouping variables' levels, first variable slowest."""
        out: list[tuple[str, ...]] = [()]
        for var in self.by:
            out = [g + (level,) for g in out for level in self.levels[var]]
        return out

    def area_population(self, areas: list[str], label: str, study: str) -> list[float]:
        """The population of each group summed over `areas` (the catchment of one node), in
        `groups()` order; SpecError when an area, or a group's row in an area, is absent (an
        explicit 0 is a group without population, whose referrals the node leaves out)."""
        where = f"{self.source}: the population table (field 'population' of {study})"
        missing = [a for a in areas if a not in self.cells]
        if missing:
            raise SpecError(
                f"{where} has no rows for area '{missing[0]}' (node {label}); add its rows, or map "
                f'the node to the table\'s areas with [areas] {label} = ["..."].'
            )
        out = []
        for group in self.groups():
            absent = [a for a in areas if group not in self.cells[a]]
            if absent:
                named = ", ".join(f"{v} '{lv}'" for v, lv in zip(self.by, group))
                raise SpecError(
                    f"{where} has no row for {named} in area '{absent[0]}' (node {label}); every "
                    "group the study counts needs a row in every area (population 0 where there is "
                    "no one)."
                )
            out.append(math.fsum(self.cells[a][group] for a in areas))
        return out

    def zero_groups(self) -> dict[str, list[list[str]]]:
        """Per area, the groups with no population there (a node leaves their referrals out:
        a rate needs a population, and a Poisson mean of 0 cannot have referrals)."""
        out = {}
        for area in self.areas:
            zero = [list(g) for g in self.groups() if not self.cells[area].get(g, 0.0) > 0]
            if zero:
                out[area] = zero
        return out


def parse_population(
    text: str, source: str, by: list[str], schema: Schema, merge: dict, study: str, need: GroupShares | None = None
) -> PopulationTable:
    """Read the CSV text and aggregate it to area x the study's groups (see the module doc).
    With `need` (protocol/prevalence.py), each row counts its population times the prevalence
    of its group: the table is then of people with need."""
    where = f"{source}: the population table (field 'population' of {study})"
    reader, names = read_header(text, where, ",".join(LAYOUT), max_columns=20)
    for required in (AREA, POPULATION):
        if required not in names:
            raise SpecError(
                f"{where} has no column '{required}'; its columns are {', '.join(names)} "
                f"(expected {', '.join(LAYOUT)})."
            )
    holds = group_columns(
        names,
        (AREA, POPULATION),
        schema,
        where,
        f"not part of the layout ({', '.join(LAYOUT)}); remove it (a population over "
        "several years should be averaged first)",
    )
    for var in by:
        if var not in holds.values():
            expected = ONS_COLUMNS.get(var, var)
            raise SpecError(
                f"{where} has no column '{expected}' for '{var}' (field 'by'); its columns are {', '.join(names)}."
            )
    if need is not None:
        for var in need.vars:
            if var not in holds.values():
                raise SpecError(
                    f"{where} has no column '{ONS_COLUMNS.get(var, var)}', which the need table "
                    f"{need.source} (field 'need') gives prevalence by."
                )
    matchers = {i: level_matcher(var, schema) for i, var in holds.items()}
    area_i, pop_i = names.index(AREA), names.index(POPULATION)
    mappings = [merged_levels(list(schema[var].levels), merge.get(var, {}))[1] for var in by]
    parts: dict[tuple, list[float]] = {}
    seen: set[tuple] = set()
    rows = data_rows(reader, len(names), where, MAX_ROWS, "; aggregate it to areas first")
    for line, row in rows:
        area = row[area_i].strip()
        if not area:
            raise SpecError(f"{where}, line {line}: column 'area' is empty.")
        population = _population(row[pop_i], f"{where}, line {line}")
        raw = (area, *(normalise(row[i]) for i in holds))
        if raw in seen:
            raise SpecError(
                f"{where}, line {line}: repeats the group of an earlier row (area '{area}'); each group needs one row."
            )
        seen.add(raw)
        key = [area]
        skip = False
        for i in holds:
            level = matchers[i](row[i])
            if level is BELOW_FIRST_BAND:
                skip = True
            elif level is None:
                var = holds[i]
                allowed = ", ".join(schema[var].levels) if var in schema else ""
                raise SpecError(
                    f"{where}, line {line}: column '{names[i]}' has '{row[i].strip()[:40]}', "
                    f"which is not a level of {var} ({allowed})."
                )
            key.append(level)
        if skip:
            continue
        levels = dict(zip(holds.values(), key[1:]))
        if need is not None:
            share = need.of(levels)
            if share is None:
                named = ", ".join(f"{ONS_COLUMNS.get(v, v)} '{levels[v]}'" for v in need.vars)
                raise SpecError(
                    f"{where}, line {line}: the need table {need.source} (field 'need') has no "
                    f"prevalence for {named}; give every group of the population a row."
                )
            population *= share
        group = tuple(mapping.get(levels[var], levels[var]) for var, mapping in zip(by, mappings))
        parts.setdefault((area, group), []).append(population)
    if not parts:
        raise SpecError(f"{where} has no rows of adults in the study's groups.")
    cells: dict[str, dict[tuple, float]] = {}
    for (area, group), values in parts.items():
        cells.setdefault(area, {})[group] = math.fsum(values)
    levels = {var: tuple(merged_levels(list(schema[var].levels), merge.get(var, {}))[0]) for var in by}
    for k, var in enumerate(by):
        for level in levels[var]:
            if not any(p > 0 for c in cells.values() for g, p in c.items() if g[k] == level):
                raise SpecError(
                    f"{where} has no population for {var} '{level}' in any area; "
                    "merge that level with another or leave the variable out of field 'by'."
                )
    blob = json.dumps(
        {
            "by": list(by),
            "levels": {v: list(ls) for v, ls in levels.items()},
            "cells": sorted([area, list(g), p] for area, c in cells.items() for g, p in c.items()),
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return PopulationTable(source, tuple(by), levels, cells, hashlib.sha256(blob.encode()).hexdigest())


def _population(text: str, where: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise SpecError(
            f"{where}: column 'population' has '{text.strip()[:40]}', which is not a number "
            "(write whole numbers without thousands separators)."
        ) from None
    if not math.isfinite(value) or value < 0:
        raise SpecError(f"{where}: column 'population' must be a number of people, zero or more.")
    return value

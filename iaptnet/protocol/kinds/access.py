"""Study kind `access`: referral rates against population denominators (docs/reference/domain.md#access-analyses).

    kind = "access"
    name = "a1_access_older_adults"
    population = "synthetic"              # or a CSV path relative to this file (protocol/population.py)
    by = ["age_group", "sex"]             # grouping variables: rates per level, model terms
    period = ["2012-04-01", "2020-03-31"] # first and last referral date counted (inclusive)
    area_effects = true                   # optional: area (node) fixed effects in the adjusted model
    need = "illustrative"                 # optional: prevalence by group (protocol/prevalence.py):
                                          # rates against people with need, not everyone
    exposure = "age_group[T.65+]"         # optional: the adjusted model's term the study is about
    [merge.age_group]                     # common fields: where, merge, min_nodes, reference, ...
    "18-64" = ["18-24", "25-34", "35-44", "45-54", "55-64"]
    [areas]                               # optional: a node whose catchment is several areas
    barnet = ["Barnet"]

Each node counts its referrals in the period (and `where`) with every grouping variable
recorded, per level of each grouping variable: the sufficient statistics of a Poisson
log-linear model of referrals by group with the population as exposure. The coordinator
fits, from those margins and its own denominators, `referrals ~ by... [+ area]` with offset
log(population x years) (adjusted) and `referrals ~ v` for each v (crude), exactly as
statsmodels' GLM on the pooled cell table (coordinator/access.py).

The population table travels inside the study's data: `read_study_file` embeds the text of the
file that `population` names under `population_csv` (and `need`'s under `need_csv`; see
FILES), so the study parses to the same spec and hash wherever it is parsed (the analyst's
machine, the Flower hub, a Trust's `iaptnet node approve`). Only the tables' digests go into
the spec (and so to the nodes).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import SpecError
from ..population import PopulationTable, parse_population
from ..prevalence import Prevalence, parse_prevalence
from ..schema import Schema
from ..study import COMMON_KEYS, StudySpec, common_fields, merged_levels

#: The task a node answers for this kind (node/access.py; coordinator/access.py).
TASK = "access.counts"


def margins_key(model: str, variable: str) -> str:
    """Reply array: the referrals in each level of `variable` (node/access.py writes it,
    coordinator/access.py reads it)."""
    return f"margins/{model}/{variable}"


KEYS = COMMON_KEYS | {"population", "population_csv", "by", "period", "area_effects", "areas", "need", "need_csv"}
PER = 100_000
DATE_COLUMN = "referral_date"
MAX_BY = 6
#: The illustrative denominators shipped for the eight synthetic areas (paper scale).
SYNTHETIC_POPULATION = Path(__file__).resolve().parents[2] / "synth" / "population.csv"
#: Illustrative prevalence of common mental disorders by age band and sex (approximately the
#: APMS 2014 survey's, recalled, not a published table: replace it with the real one).
ILLUSTRATIVE_NEED = Path(__file__).resolve().parents[2] / "synth" / "need_prevalence.csv"
#: Study fields naming a file that `read_study_file` reads and carries inside the study:
#: field -> (key the text goes under, built-in names).
FILES = {
    "population": ("population_csv", {"synthetic": SYNTHETIC_POPULATION}),
    "need": ("need_csv", {"illustrative": ILLUSTRATIVE_NEED}),
}
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


@dataclass(frozen=True)
class AccessStudy:
    """What the coordinator half needs beside the spec (the parsed denominators)."""

    by: tuple[str, ...]
    levels: dict[str, tuple[str, ...]]
    period: tuple[str, str]
    years: float
    area_effects: bool
    areas: dict[str, list[str]]  # node name -> population areas (absent: the node's own name)
    population: PopulationTable  # of people with need when `need` is set
    population_label: str
    need: Prevalence | None = None
    need_label: str | None = None


def parse(data: dict, schema: Schema, source: str) -> tuple[StudySpec, AccessStudy]:
    common = common_fields(data, schema, source, KEYS)
    by = check_by(data.get("by"), schema, source)
    period = check_period(data.get("period"), schema, source)
    area_effects = data.get("area_effects", True)
    if not isinstance(area_effects, bool):
        raise SpecError(f"{source}: field 'area_effects' must be true or false.")
    label, text, file = embedded_table(
        data,
        "population",
        source,
        "is required: a CSV of population "
        'denominators (a path relative to the study file), or "synthetic" '
        "for the table shipped with iaptnet",
    )
    need = need_label = None
    if data.get("need") is not None:
        need_label, need_text, need_file = embedded_table(
            data,
            "need",
            source,
            "must name a CSV of prevalence by group (a path relative to the study "
            'file), or "illustrative" for the table shipped with iaptnet',
        )
        need = parse_prevalence(need_text, need_file, schema, source)
    table = parse_population(text, file, list(by), schema, common["merge"], source, need)
    areas = check_areas(data.get("areas"), table, source)
    levels = {var: table.levels[var] for var in by}
    exposure = common["exposure"]
    if exposure is not None:
        terms = [f"{v}[T.{lv}]" for v in by for lv in levels[v][1:]]
        if area_effects:
            terms += [f"area[T.{a}]" for a in sorted(set(table.areas) | set(areas))]
        if exposure not in terms:
            raise SpecError(
                f"{source}: field 'exposure' must be a term of the adjusted model, e.g. "
                f"{', '.join(terms[:3])}; got {exposure!r}."
            )
    params = {
        "by": list(by),
        "period": list(period),
        "years": period_years(*period),
        "area_effects": area_effects,
        "areas": areas,
        "population": {"sha256": table.digest},
        **({"need": {"sha256": need.digest}} if need else {}),
        # Groups without population in an area: its node leaves their referrals out.
        "no_population": table.zero_groups(),
    }
    spec = StudySpec(**common, params=params)
    study = AccessStudy(by, levels, period, params["years"], area_effects, areas, table, label, need, need_label)
    return spec, study


def embedded_table(data: dict, field_name: str, source: str, expected: str) -> tuple[str, str, str]:
    """(label, CSV text, file) of a table a study field names, which `read_study_file` carried
    inside the study (FILES); `expected` ends the sentence for a missing or empty field."""
    label = data.get(field_name)
    if not isinstance(label, str) or not label.strip():
        raise SpecError(f"{source}: field '{field_name}' {expected}.")
    embedded = data.get(FILES[field_name][0])
    if not isinstance(embedded, dict) or not isinstance(embedded.get("text"), str):
        raise SpecError(
            f"{source}: field '{field_name}' names a table that was not read with the study; "
            "load the study file with iaptnet (which carries the table inside the study)."
        )
    return label.strip(), embedded["text"], str(embedded.get("source") or label)


def check_by(by, schema: Schema, source: str) -> tuple[str, ...]:
    if not isinstance(by, list) or not by or len(by) > MAX_BY or not all(isinstance(v, str) for v in by):
        raise SpecError(
            f"{source}: field 'by' must list the grouping variables, e.g. "
            '["age_group", "sex", "ethnicity_ons", "imd_quintile"].'
        )
    if len(set(by)) != len(by):
        raise SpecError(f"{source}: field 'by' lists a variable twice.")
    for var in by:
        if var not in schema:
            raise SpecError(
                f"{source}: field 'by' names column '{var}', which the dataset '{schema.name}' does not have."
            )
        if not schema[var].is_categorical:
            raise SpecError(
                f"{source}: field 'by' names the {schema[var].type} column '{var}'; grouping "
                "variables must be categorical (for 65+ vs 18-64 merge age_group's levels)."
            )
    return tuple(by)


def check_period(period, schema: Schema, source: str) -> tuple[str, str]:
    if (
        not isinstance(period, list)
        or len(period) != 2
        or not all(isinstance(d, str) and _DATE.match(d) for d in period)
    ):
        raise SpecError(
            f"{source}: field 'period' must be the first and last referral dates counted, as quoted "
            'dates: ["2012-04-01", "2020-03-31"].'
        )
    try:
        first, last = (dt.date.fromisoformat(d) for d in period)
    except ValueError:
        raise SpecError(f"{source}: field 'period' holds a date that does not exist.") from None
    if last < first:
        raise SpecError(f"{source}: field 'period' ends before it starts.")
    if DATE_COLUMN not in schema or schema[DATE_COLUMN].type != "date":
        raise SpecError(
            f"{source}: an access study counts referrals by '{DATE_COLUMN}', a date column the "
            f"dataset '{schema.name}' does not have."
        )
    return period[0], period[1]


def period_years(first: str, last: str) -> float:
    """Years of the period: whole years when it runs from a date to the day before the same
    date k years on (2012-04-01..2020-03-31 is 8), else days / 365.25."""
    a, b = dt.date.fromisoformat(first), dt.date.fromisoformat(last)
    end = b + dt.timedelta(days=1)
    if (end.month, end.day) == (a.month, a.day) and end.year > a.year:
        return float(end.year - a.year)
    return ((b - a).days + 1) / 365.25


def check_areas(areas, table: PopulationTable, source: str) -> dict[str, list[str]]:
    """`[areas] node = ["area", ...]`: canonical (sorted), every area in the table, none twice."""
    if areas is None:
        return {}
    if not isinstance(areas, dict):
        raise SpecError(f"{source}: field 'areas' must be a table mapping node names to the population table's areas.")
    out: dict[str, list[str]] = {}
    used: dict[str, str] = {}
    for node, listed in areas.items():
        if isinstance(listed, str):
            listed = [listed]
        if not isinstance(listed, list) or not listed or not all(isinstance(a, str) and a.strip() for a in listed):
            raise SpecError(f"{source}: field 'areas.{node}' must be an area name or a list of them.")
        for area in listed:
            if area not in table.cells:
                raise SpecError(
                    f"{source}: field 'areas.{node}' names area '{area}', which the population table "
                    f"{table.source} does not have."
                )
            if area in used:
                raise SpecError(
                    f"{source}: field 'areas' gives area '{area}' to two nodes ('{used[area]}' and '{node}')."
                )
            used[area] = node
        out[str(node)] = sorted(set(listed))
    return dict(sorted(out.items()))


def describe(spec: StudySpec, rules) -> list[str]:
    """For a Trust's `iaptnet node approve`: what the study computes and what the node releases."""
    p = spec.params
    return [
        f"  counts     referrals {p['period'][0]}..{p['period'][1]} by {', '.join(p['by'])} "
        f"(rates per {PER:,} against population sha256 {p['population']['sha256'][:16]}"
        + (f", people with need: prevalence sha256 {p['need']['sha256'][:16]}" if p.get("need") else "")
        + ")",
        "",
        "what this node releases for it (every reply is checked against the policy first):",
        "  exactly   the referrals it counts, and their number at each level of each of those",
        "            variables (one-way margins, no cross-tabulation), for the Poisson rate model;",
        f"  counts    the same, and rows in the cohort, missing a group or without population, as counts "
        f"(1-{rules.suppress_max} suppressed, others rounded to {rules.round_to})",
        f"  refused   under {rules.min_rows} referrals, a level with 1-{rules.min_level_count - 1} referrals,",
        f"            rows differing by 1-{rules.min_subset_difference - 1} people from the whole dataset or an earlier release",
    ]


MAX_NO_POPULATION = 200_000


@dataclass(frozen=True)
class NodeSettings:
    by: tuple[str, ...]
    levels: dict[str, list[str]]  # merged level order
    first: str
    last: str
    no_population: frozenset[tuple[str, ...]]  # groups whose referrals this node leaves out


def node_settings(spec: StudySpec, schema: Schema, node: str) -> NodeSettings:
    """What node `node` needs from an access spec that arrived from the coordinator, re-checked."""
    params = spec.params if isinstance(spec.params, dict) else {}
    if spec.kind != "access":
        raise SpecError(f"{spec.source}: the task is for access studies, not '{spec.kind}' ones.")
    by = check_by(params.get("by"), schema, spec.source)
    first, last = check_period(params.get("period"), schema, spec.source)
    levels = {var: merged_levels(list(schema[var].levels), spec.merge.get(var, {}))[0] for var in by}
    areas = params.get("areas") or {}
    zero = params.get("no_population") or {}
    if not isinstance(areas, dict) or not isinstance(zero, dict):
        raise SpecError(f"{spec.source}: the study's areas are not described properly.")
    mine = areas.get(node, [node])
    sets = []
    for area in mine:
        groups = zero.get(area, [])
        if (
            not isinstance(groups, list)
            or len(groups) > MAX_NO_POPULATION
            or not all(isinstance(g, list) and len(g) == len(by) and all(isinstance(v, str) for v in g) for g in groups)
        ):
            raise SpecError(f"{spec.source}: the study's groups without population are not described properly.")
        sets.append({tuple(g) for g in groups})
    # A group has no population in the node's catchment when it has none in any of its areas.
    none_here = frozenset(set.intersection(*sets)) if sets else frozenset()
    return NodeSettings(by, levels, first, last, none_here)

"""`kind = "its"`: interrupted time series of a rate before and after a service change.

    kind = "its"
    name = "s1_reminders_its"
    outcome = "n_dna"                    # events per referral (a count)
    denominator = ["n_dna", "n_treat"]   # per referral, summed: scheduled appointments
    time = "referral_month"              # integer time (default); months since April 2012
    group = "service_id"                 # whose change dates these are (default)
    [changes]                            # group level -> first month with the change
    1 = "2016-01"                        # "YYYY-MM" (or "YYYY-MM-01", or a month number)

Segmented Poisson regression of the events with offset log(denominator): a referral-level
model whose estimates, and model-based standard errors, equal those of the same model on the
monthly aggregates (sum of events with offset log of the summed denominator, per group and
month), because every term is constant within a group-month. Terms, computed by each node
for its own rows (node/its.py, as study columns):

- `after_change` = 1 from the group's change month on (the level change);
- `time_after_change` = months since the change, 0 before (the slope change);
- `denominator` = the summed denominator columns (rows with 0 are left out).

Models: per group with a change, `outcome ~ time + after_change + time_after_change` on that
group's rows; pooled, `outcome ~ 0 + group + group:time + after_change + time_after_change`
(each group its own level and trend, one common level change and slope change; groups without
a change date are controls that inform the trends only). Pure: no I/O, no pandas.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, replace

from .. import cohort_filter
from ..errors import SpecError
from ..formula_check import ParsedFormula, check_formula
from ..schema import Schema
from ..study import COMMON_KEYS, StudySpec, common_fields

KEYS = (COMMON_KEYS - {"exposure"}) | {
    "family",
    "outcome",
    "denominator",
    "time",
    "group",
    "changes",
    "time_origin",
    "cov_type",
}
#: The task kind that computes a study's columns at each node (node/its.py).
TASK = "its.columns"
COV_TYPES = ("nonrobust", "HC0")
AFTER, SINCE, DENOMINATOR = "after_change", "time_after_change", "denominator"
#: The columns a node computes for an ITS study (study columns, node/its.py).
COLUMNS = {AFTER: "binary", SINCE: "integer", DENOMINATOR: "positive"}
#: Known origins of time columns (the IAPT derived variables).
TIME_ORIGINS = {"referral_month": "2012-04"}
MAX_CHANGES = 200
_MONTH = re.compile(r"^(\d{4})-(\d{2})(?:-(\d{2}))?$")


@dataclass(frozen=True)
class ITSParsed:
    """The derived models' formulas (for the coordinator; none centres or scales)."""

    pooled: ParsedFormula
    stateful: tuple[str, ...] = ()


def parse(data: dict, schema: Schema, source: str) -> tuple[StudySpec, ITSParsed]:
    fields = common_fields(data, schema, source, KEYS)
    family = data.get("family", "poisson")
    if family != "poisson":
        raise SpecError(
            f"{source}: field 'family' must be \"poisson\" in an its study (events with offset "
            f"log(denominator): a rate ratio), got {family!r}."
        )
    outcome = _column(data, "outcome", None, ("integer", "numeric"), schema, source, 'a count column, e.g. "n_dna"')
    if schema[outcome].min is not None and schema[outcome].min < 0:
        raise SpecError(
            f"{source}: field 'outcome' names '{outcome}', which may be negative; the outcome must be a count."
        )
    time = _column(
        data, "time", "referral_month", ("integer",), schema, source, 'an integer time column, e.g. "referral_month"'
    )
    group = _column(
        data, "group", "service_id", ("categorical",), schema, source, 'a categorical column, e.g. "service_id"'
    )
    denominator = data.get("denominator")
    if isinstance(denominator, str):
        denominator = [denominator]
    if (
        not isinstance(denominator, list)
        or not denominator
        or len(denominator) > 10
        or not all(isinstance(c, str) for c in denominator)
        or len(set(denominator)) != len(denominator)
    ):
        raise SpecError(
            f"{source}: field 'denominator' must be a column or a list of columns whose sum is each "
            'row\'s denominator, e.g. ["n_dna", "n_treat"] (scheduled appointments).'
        )
    for column in denominator:
        if column not in schema or schema[column].type not in ("integer", "numeric", "binary"):
            raise SpecError(
                f"{source}: field 'denominator' names '{column}', which is not a numeric column of the dataset '{schema.name}'."
            )
        if schema[column].min is not None and schema[column].min < 0:
            raise SpecError(
                f"{source}: field 'denominator' names '{column}', which may be negative; a denominator sums counts."
            )
    origin = data.get("time_origin", TIME_ORIGINS.get(time))
    if origin is not None and (not isinstance(origin, str) or not _MONTH.match(origin) or _month_of(origin) is None):
        raise SpecError(f"{source}: field 'time_origin' must be the month that time 0 stands for, as \"YYYY-MM\".")
    if origin is not None:
        origin = origin[:7]
    changes = _changes(data.get("changes"), schema[group], origin, schema[time], source)
    cov_type = data.get("cov_type", "HC0")
    if cov_type not in COV_TYPES:
        raise SpecError(
            f"{source}: field 'cov_type' must be \"HC0\" (robust to overdispersion between referrals; "
            f'the default) or "nonrobust" (Poisson), got {cov_type!r}.'
        )
    for name in COLUMNS:
        if name in schema:
            raise SpecError(
                f"{source}: the dataset '{schema.name}' has a column '{name}', which an its study computes; "
                "rename that column."
            )
    if group in fields["merge"]:
        raise SpecError(
            f"{source}: field 'merge' merges levels of the group column '{group}', whose levels the changes name."
        )
    params = {
        "outcome": outcome,
        "denominator": list(denominator),
        "time": time,
        "group": group,
        "changes": changes,
        "time_origin": origin,
        "cov_type": cov_type,
    }
    spec = StudySpec(family="poisson", params=params, **fields)
    pooled = pooled_spec(spec)
    parsed = check_formula(pooled.formula, pooled.schema_with_augment(schema), "poisson", source)
    return spec, ITSParsed(parsed)


def _column(data, key, default, types, schema, source, example) -> str:
    value = data.get(key, default)
    if not isinstance(value, str) or value not in schema or schema[value].type not in types:
        raise SpecError(f"{source}: field '{key}' must name {example} of the dataset '{schema.name}'.")
    return value


def _month_of(text: str) -> int | None:
    """Months since year 0 of "YYYY-MM" or "YYYY-MM-01"; None when not such a date."""
    m = _MONTH.match(text)
    if not m:
        return None
    year, month, day = int(m.group(1)), int(m.group(2)), m.group(3)
    try:
        dt.date(year, month, int(day or 1))
    except ValueError:
        return None
    if day is not None and int(day) != 1:
        return None
    return year * 12 + month - 1


def _changes(table, column, origin: str | None, time_column, source: str) -> dict[str, int]:
    where = f"{source}: field 'changes'"
    if not isinstance(table, dict) or not table:
        raise SpecError(
            f"{where} must be a table of {column.name} levels and their change month, e.g. "
            f'[changes] {column.levels[0]} = "2016-01".'
        )
    if len(table) > MAX_CHANGES:
        raise SpecError(f"{where} has more than {MAX_CHANGES} entries.")
    out = {}
    for level, value in table.items():
        if str(level) not in column.levels:
            raise SpecError(
                f"{where} names '{level}', which is not a level of '{column.name}'; its levels are {', '.join(column.levels)}."
            )
        if isinstance(value, bool):
            value = None
        if isinstance(value, int):
            month = value
        elif isinstance(value, (dt.date, dt.time)):
            raise SpecError(
                f"{source}: field 'changes.{level}' is a TOML date; write it as a string, e.g. \"2016-01\" "
                "(studies carry strings and numbers only)."
            )
        elif isinstance(value, str) and origin is not None:
            month = _month_of(value)
            month = None if month is None else month - _month_of(origin)
        else:
            month = None
        if month is None:
            if origin is None and not isinstance(value, int):
                raise SpecError(
                    f"{source}: field 'changes.{level}' must be a number of '{time_column.name}' (the study has no "
                    "'time_origin' to turn a date into one)."
                )
            raise SpecError(
                f"{source}: field 'changes.{level}' must be the first month with the change, as \"YYYY-MM\" "
                f'(or "YYYY-MM-01"), got {value!r}.'
            )
        low, high = time_column.min, time_column.max
        if (low is not None and month <= low) or (high is not None and month > high):
            span = f"{'' if low is None else f'from {low:g} '}{'' if high is None else f'to {high:g}'}".strip()
            raise SpecError(
                f"{source}: field 'changes.{level}' falls outside the time the data covers ('{time_column.name}' "
                f"{span}); a change needs months before and after it."
            )
        out[str(level)] = int(month)
    return {level: out[level] for level in column.levels if level in out}


def month_label(month: int, origin: str | None) -> str:
    """ "YYYY-MM" of a time value when the study has an origin, else the number."""
    if origin is None:
        return str(month)
    total = _month_of(origin) + int(month)
    return f"{total // 12:04d}-{total % 12 + 1:02d}"


def _where(spec: StudySpec, *extra: str) -> str:
    parts = ([spec.where] if spec.where else []) + [f"{DENOMINATOR} > 0", *extra]
    return cohort_filter.render(cohort_filter.parse(" and ".join(f"({p})" for p in parts)))


def _derived(spec: StudySpec, name: str, formula: str, where: str, step: str) -> StudySpec:
    """A model of the study. It names the study in `params["derived_from"]`, so that a Trust
    that approved the study answers it too (protocol/study.py: `approval_hash`)."""
    p = spec.params
    return replace(
        spec,
        kind="glm",
        name=name,
        family="poisson",
        formula=formula,
        where=where,
        offset=f"log({DENOMINATOR})",
        exposure=AFTER,
        cov_type=p["cov_type"],
        augment={"state": spec.hash, "columns": dict(COLUMNS)},
        params={"derived_from": spec.canonical(), "step": step},
        title="",
        description="",
        reference={},
    )


def pooled_spec(spec: StudySpec) -> StudySpec:
    """Each group its own level and trend; one common level change and slope change."""
    p = spec.params
    formula = f"{p['outcome']} ~ 0 + {p['group']} + {p['group']}:{p['time']} + {AFTER} + {SINCE}"
    return _derived(spec, f"{spec.name} (pooled)", formula, _where(spec), "pooled")


def group_spec(spec: StudySpec, level: str) -> StudySpec:
    """One group's own segmented regression."""
    p = spec.params
    formula = f"{p['outcome']} ~ {p['time']} + {AFTER} + {SINCE}"
    return _derived(
        spec,
        f"{spec.name} ({p['group']} {level})",
        formula,
        _where(spec, f'{p["group"]} == "{level}"'),
        f"group {level}",
    )


def model_specs(spec: StudySpec) -> dict[str, StudySpec]:
    """Every model an its study may fit, keyed as the coordinator sends them: "pooled" and
    "g<i>" for the i-th group with a change."""
    if spec.kind != "its" or not isinstance(spec.params, dict) or "changes" not in spec.params:
        raise SpecError(f"{spec.source}: the study is not an its study.")
    out = {"pooled": pooled_spec(spec)}
    for i, level in enumerate(spec.params["changes"]):
        out[f"g{i}"] = group_spec(spec, level)
    return out


def parent_of(spec: StudySpec) -> StudySpec:
    """The its study a model belongs to (checked: the study derives exactly this model)."""
    link = spec.params.get("derived_from") if isinstance(spec.params, dict) else None
    if not isinstance(link, dict):
        raise SpecError(f"{spec.source}: the model is not part of an its study.")
    parent = StudySpec.from_wire(link, spec.source)
    if all(d.canonical() != spec.canonical() for d in model_specs(parent).values()):
        raise SpecError(f"{spec.source}: the model '{spec.name}' is not one the study '{parent.name}' derives.")
    return parent


def approval_hashes(spec: StudySpec) -> list[str]:
    """Every study hash the study's tasks may carry: the study itself (its study columns) and
    each model. Approving the study's own hash is enough (each model names the study, and a
    node checks the derivation); these are listed for tools that go hash by hash."""
    return [spec.hash, *(s.hash for s in model_specs(spec).values())]


def describe(spec: StudySpec, rules) -> list[str]:
    """For a Trust's `iaptnet node approve`: what the study computes and what the node releases."""
    p = spec.params
    changes = ", ".join(f"{level} from {month_label(month, p['time_origin'])}" for level, month in p["changes"].items())
    return [
        f"  model      poisson GLM of {p['outcome']} per {' + '.join(p['denominator'])} by {p['time']} "
        f"(segmented: level and slope change), {p['cov_type']} errors",
        f"  changes    {p['group']} {changes}",
        f"  computes   {', '.join(COLUMNS)} for each row (kept at this node)",
        "",
        "what this node releases for it (every reply is checked against the policy first):",
        f"  table     per {p['group']} and before/after the change: referrals, events and denominator",
        f"            (1-{rules.suppress_max} suppressed, others rounded to {rules.round_to}; no sums for a suppressed cell)",
        "  models    the pooled model and one per group with a change, as any GLM (rows used and events",
        "            exactly, its own fit, per-round score, information matrix and deviance)",
        f"  refused   under {rules.min_rows} rows, under {rules.min_events} rows with an event, 1-{rules.min_level_count - 1} "
        "referrals after a change,",
        f"            rows differing by 1-{rules.min_subset_difference - 1} people from the whole dataset or an earlier release",
    ]


def check_at_node(spec: StudySpec, schema: Schema) -> dict:
    """A node re-checks the study's settings (never trusting the coordinator's parse)."""
    if spec.kind != "its" or not isinstance(spec.params, dict):
        raise SpecError(f"{spec.source}: the task does not carry an its study.")
    p = spec.params
    ok = (
        set(p) == {"outcome", "denominator", "time", "group", "changes", "time_origin", "cov_type"}
        and isinstance(p["outcome"], str)
        and p["outcome"] in schema
        and schema[p["outcome"]].type in ("integer", "numeric")
        and isinstance(p["time"], str)
        and p["time"] in schema
        and schema[p["time"]].type == "integer"
        and isinstance(p["group"], str)
        and p["group"] in schema
        and schema[p["group"]].is_categorical
        and isinstance(p["denominator"], list)
        and 0 < len(p["denominator"]) <= 10
        and all(
            isinstance(c, str) and c in schema and schema[c].type in ("integer", "numeric", "binary")
            for c in p["denominator"]
        )
        and isinstance(p["changes"], dict)
        and 0 < len(p["changes"]) <= MAX_CHANGES
        and all(
            k in schema[p["group"]].levels and isinstance(v, int) and not isinstance(v, bool) and abs(v) < 10**6
            for k, v in p["changes"].items()
        )
        and p["cov_type"] in COV_TYPES
    )
    if not ok:
        raise SpecError(f"{spec.source}: the its study's settings are not valid here.")
    if any(name in schema for name in COLUMNS):
        raise SpecError(f"{spec.source}: this node's dataset has a column that an its study computes.")
    return p

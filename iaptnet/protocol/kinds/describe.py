"""`kind = "table"`: descriptive tables ("Table 1") and cohort funnels, the study TOML and the
layout both sides agree on.

    name = "t1_table1"
    kind = "table"
    where = "finished_treatment == 1 and case_first == 1"
    by = "older_adult"                          # optional: a categorical or binary column
    by_labels = {"0" = "18-64", "1" = "65+"}    # optional, presentation only
    variables = ["age_group", "sex", "phq9_first", {name = "wait_days", resolution = 1}]
    funnel = [{label = "entered treatment", where = "entered_treatment == 1"}, ...]

`variables` is a list of column names or `{name, label, quantiles, resolution}` tables (or a
`[variables.NAME]` table per column). Categorical and binary columns are shown as counts and
percentages; integer and numeric columns as n, mean, SD and quantiles (`quantiles`, default
the quartiles; on the grid `origin + i * resolution`, `resolution` 1 by default for integer
columns and needed for numeric ones). `funnel` steps are filters applied cumulatively to the
cohort (`where`), each a string or `{label, where}`.

What is computed goes to `StudySpec.params` (part of the study hash); labels are presentation
only and stay in the `TablePlan` the coordinator half receives. `layout(params, schema, merge)`
gives the table structure (columns, rows, cell keys) from the params alone, so the node and the
coordinator name every cell alike. Pure: no pandas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .. import cohort_filter
from ..errors import SpecError
from ..schema import Schema
from ..sdc import Chain
from ..study import COMMON_KEYS, StudySpec, common_fields, merged_levels

KEYS = COMMON_KEYS | {"by", "by_labels", "variables", "funnel", "cohort_label"}

#: Task kinds of the node half (node/describe.py).
TABLE_TASK = "describe.table"
QUANTILE_TASK = "describe.quantiles"


# Keys of describe.table and describe.quantiles (node/describe.py writes the replies,
# coordinator/describe.py the quantile tasks): variable i of the table, column c (0: all, then
# each `by` level), threshold j.
def summary_key(i: int, c: int) -> str:
    """Reply payload `summaries`: (n, mean, centred sum of squares) of a variable in a column."""
    return f"v{i}/{c}"


def threshold_key(i: int, c: int, j: int) -> str:
    """Reply payload `thresholds`: the count at or below the j-th threshold sent."""
    return f"v{i}/{c}/{j}"


def thresholds_array_key(i: int, c: int) -> str:
    """Task array: the thresholds asked for variable i in column c."""
    return f"t/{i}/{c}"


def parse_thresholds_array_key(name: str) -> tuple[int, int] | None:
    """(i, c) of a thresholds array's name; None for any other name."""
    parts = name.split("/")
    if len(parts) != 3 or parts[0] != "t" or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    return int(parts[1]), int(parts[2])


DEFAULT_QUANTILES = (0.25, 0.5, 0.75)
MAX_VARIABLES = 64
MAX_STEPS = 20
MAX_QUANTILES = 9
#: The finest quantile grid: at most this many steps over a column's declared range (the
#: bisection then takes about 30 rounds). A column whose schema does not declare both `min`
#: and `max` takes a resolution within OPEN_RESOLUTION (declare the range to go beyond it).
MAX_GRID_STEPS = 10**9
OPEN_RESOLUTION = (1e-9, 1e9)
VARIABLE_KEYS = {"name", "label", "quantiles", "resolution"}
COUNT_TYPES = ("categorical", "binary")
SUMMARY_TYPES = ("integer", "numeric")


@dataclass(frozen=True)
class VariableLayout:
    """One variable's block: `counts` (a row per level and 'missing') or `summary` (rows
    'recorded' and 'missing', plus n/mean/SD/quantiles per column)."""

    name: str
    type: str
    show: str  # "counts" | "summary"
    rows: tuple[str, ...]
    quantiles: tuple[float, ...] = ()
    resolution: float | None = None


@dataclass(frozen=True)
class Layout:
    """Columns: 0 overall, 1..K the levels of `by`, K+1 rows with `by` missing (only with a
    `by`). Rows of the totals and funnel tables are those columns' cohort counts."""

    by: str | None
    by_levels: tuple[str, ...]
    variables: tuple[VariableLayout, ...]
    funnel: tuple[str, ...]  # canonical filters of the steps after the cohort

    @property
    def n_columns(self) -> int:
        return 1 + (len(self.by_levels) + 1 if self.by else 0)

    @property
    def group_columns(self) -> tuple[int, ...]:
        """The columns that partition the cohort (the overall column is their sum)."""
        return tuple(range(1, self.n_columns)) if self.by else ()


@dataclass
class TablePlan:
    """What the coordinator half needs beside the spec: the layout and the labels."""

    layout: Layout
    column_labels: list[str]
    variable_labels: list[str]
    step_labels: list[str]  # the cohort first, then each funnel step
    grids: dict[int, tuple[float, float, int | None, int | None]] = field(default_factory=dict)


def parse(data: dict, schema: Schema, source: str) -> tuple[StudySpec, TablePlan]:
    common = common_fields(data, schema, source, KEYS)
    by = data.get("by")
    if by is not None:
        if not isinstance(by, str) or by not in schema:
            raise SpecError(
                f"{source}: field 'by' must name a categorical or binary column of the dataset '{schema.name}'."
            )
        if schema[by].type not in COUNT_TYPES:
            raise SpecError(
                f"{source}: field 'by' names the {schema[by].type} column '{by}'; tables are split by a categorical or binary column."
            )
    variables, labels = _variables(data.get("variables"), schema, source, by)
    funnel, step_labels = _funnel(data.get("funnel"), schema, source)
    if not variables and not funnel:
        raise SpecError(
            f"{source}: a table study needs 'variables' (the rows of the table) or 'funnel' (its steps), or both."
        )
    cohort_label = data.get("cohort_label", "cohort")
    if not isinstance(cohort_label, str) or not cohort_label.strip():
        raise SpecError(f"{source}: field 'cohort_label' must be a non-empty string.")
    params = {"by": by, "variables": variables, "funnel": funnel}
    spec = StudySpec(**common, params=params)
    lay = layout(params, schema, spec.merge, source)
    by_labels = _by_labels(data.get("by_labels"), lay, source)
    columns = ["Overall"]
    if by:
        columns += [by_labels.get(level, f"{by} {level}") for level in lay.by_levels]
        columns.append(f"{by} missing")
    grids = {i: grid_of(v, schema) for i, v in enumerate(lay.variables) if v.show == "summary" and v.resolution}
    plan = TablePlan(lay, columns, labels, [cohort_label.strip(), *step_labels], grids)
    return spec, plan


def _variables(raw, schema: Schema, source: str, by: str | None) -> tuple[list[dict], list[str]]:
    if raw is None:
        return [], []
    if isinstance(raw, dict):
        items = [{"name": name, **(opts if isinstance(opts, dict) else {"_bad": opts})} for name, opts in raw.items()]
    elif isinstance(raw, list):
        items = [{"name": item} if isinstance(item, str) else item for item in raw]
    else:
        raise SpecError(
            f"{source}: field 'variables' must be a list of column names (or of {{name = ..., ...}} tables)."
        )
    if len(items) > MAX_VARIABLES:
        raise SpecError(
            f"{source}: field 'variables' lists more than {MAX_VARIABLES} columns; split the table into several studies."
        )
    out, labels, seen = [], [], set()
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise SpecError(f"{source}: field 'variables' must hold column names or tables with a 'name'.")
        name = item["name"]
        where = f"{source}: field 'variables.{name}'"
        unknown = set(item) - VARIABLE_KEYS
        if unknown:
            raise SpecError(
                f"{where} has unknown option '{sorted(unknown)[0]}' (expected {', '.join(sorted(VARIABLE_KEYS - {'name'}))})."
            )
        if name not in schema:
            raise SpecError(
                f"{source}: field 'variables' names column '{name}', which the dataset '{schema.name}' does not have."
            )
        kind = schema[name].type
        if kind not in COUNT_TYPES + SUMMARY_TYPES:
            raise SpecError(
                f"{where}: the {kind} column '{name}' cannot be tabulated (use categorical, binary, integer or numeric columns)."
            )
        if name in seen:
            raise SpecError(f"{source}: field 'variables' lists '{name}' twice.")
        if name == by:
            raise SpecError(f"{where}: '{name}' is the 'by' column; it already splits the table.")
        seen.add(name)
        label = item.get("label", name)
        if not isinstance(label, str) or not label.strip():
            raise SpecError(f"{where}.label must be a non-empty string.")
        labels.append(label)
        entry = {"name": name}
        if kind in SUMMARY_TYPES:
            entry["quantiles"] = _quantiles(item.get("quantiles", list(DEFAULT_QUANTILES)), where)
            entry["resolution"] = _resolution(item.get("resolution"), schema[name], where)
        elif "quantiles" in item or "resolution" in item:
            raise SpecError(
                f"{where}: 'quantiles' and 'resolution' apply to integer and numeric columns only; '{name}' is {kind}."
            )
        out.append(entry)
    return out, labels


def _quantiles(value, where: str) -> list[float]:
    ok = (
        isinstance(value, list)
        and len(value) <= MAX_QUANTILES
        and all(isinstance(p, (int, float)) and not isinstance(p, bool) and 0 < p < 1 for p in value)
    )
    if not ok:
        raise SpecError(
            f"{where}.quantiles must be a list of at most {MAX_QUANTILES} probabilities between 0 and 1, e.g. [0.25, 0.5, 0.75]."
        )
    return sorted({float(p) for p in value})


def _resolution(value, col, where: str) -> float | None:
    """The quantile grid's step for a column. A step too fine for the column's range makes the
    bisection run for thousands of rounds (or overflow a float); one wider than the range puts
    every quantile at the grid's top."""
    if value is None and col.type != "integer":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, type(None))):
        step = math.nan
    else:
        try:
            step = 1.0 if value is None else float(value)
        except OverflowError:  # an integer beyond any float
            step = math.inf
    if not math.isfinite(step) or step <= 0:
        raise SpecError(f"{where}.resolution must be a positive number (the step of the values, e.g. 1 for days).")
    if col.min is not None and col.max is not None and col.max > col.min:
        span = float(col.max) - float(col.min)
        if step > span:
            raise SpecError(
                f"{where}.resolution {step:g} is wider than the column's range ({col.min:g} to {col.max:g}); "
                "every quantile would be the grid's top."
            )
        if span / step > MAX_GRID_STEPS:
            raise SpecError(
                f"{where}.resolution {step:g} makes more than {MAX_GRID_STEPS:,} steps over the column's "
                f"range ({col.min:g} to {col.max:g}); use a coarser one."
            )
    elif not OPEN_RESOLUTION[0] <= step <= OPEN_RESOLUTION[1]:
        raise SpecError(
            f"{where}.resolution must be between {OPEN_RESOLUTION[0]:g} and {OPEN_RESOLUTION[1]:g} for a "
            "column whose schema does not declare both min and max."
        )
    return step


def _funnel(raw, schema: Schema, source: str) -> tuple[list[str], list[str]]:
    if raw is None:
        return [], []
    if not isinstance(raw, list) or not raw or len(raw) > MAX_STEPS:
        raise SpecError(
            f"{source}: field 'funnel' must be a list of 1 to {MAX_STEPS} steps (filters, or {{label = ..., where = ...}} tables)."
        )
    steps, labels = [], []
    for number, item in enumerate(raw, start=1):
        where = f"{source}: field 'funnel' step {number}"
        if isinstance(item, str):
            text, label = item, item
        elif isinstance(item, dict) and set(item) <= {"label", "where"} and isinstance(item.get("where"), str):
            text, label = item["where"], item.get("label", item["where"])
        else:
            raise SpecError(f"{where} must be a filter string or a table with 'where' (and optionally 'label').")
        if not isinstance(label, str) or not label.strip():
            raise SpecError(f"{where}: 'label' must be a non-empty string.")
        steps.append(check_step(text, schema, where))
        labels.append(label.strip())
    return steps, labels


def check_step(text: str, schema: Schema, where: str) -> str:
    """A funnel step's filter, parsed and checked like `where`; returns its canonical text."""
    try:
        tree = cohort_filter.parse(text)
        cohort_filter.check_against_schema(tree, schema, "")
    except SpecError as exc:
        message = str(exc).removeprefix(": ").replace("field 'where' ", "")
        raise SpecError(f"{where}: {message}") from None
    return cohort_filter.render(tree)


def _by_labels(raw, lay: Layout, source: str) -> dict[str, str]:
    if raw is None:
        return {}
    if (
        not lay.by
        or not isinstance(raw, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items())
    ):
        raise SpecError(
            f"{source}: field 'by_labels' must map levels of the 'by' column to labels, e.g. {{\"1\" = \"65+\"}}."
        )
    unknown = set(raw) - set(lay.by_levels)
    if unknown:
        raise SpecError(
            f"{source}: field 'by_labels' names '{sorted(unknown)[0]}', which is not a level of '{lay.by}' ({', '.join(lay.by_levels)})."
        )
    return dict(raw)


def column_levels(name: str, schema: Schema, merge: dict) -> tuple[str, ...]:
    """A categorical or binary column's levels after the study's merges."""
    col = schema[name]
    if col.type == "binary":
        return ("0", "1")
    return tuple(merged_levels(list(col.levels), merge.get(name, {}))[0])


def layout(params: dict, schema: Schema, merge: dict, source: str = "study") -> Layout:
    """The tables' structure from the params (validated again: the node calls this on what
    arrives from the coordinator)."""
    if not isinstance(params, dict) or set(params) != {"by", "variables", "funnel"}:
        raise SpecError(f"{source}: the table study's settings are not in canonical form.")
    by = params["by"]
    if by is not None and (not isinstance(by, str) or by not in schema or schema[by].type not in COUNT_TYPES):
        raise SpecError(f"{source}: field 'by' must name a categorical or binary column.")
    variables = params["variables"]
    funnel = params["funnel"]
    if (
        not isinstance(variables, list)
        or len(variables) > MAX_VARIABLES
        or not isinstance(funnel, list)
        or len(funnel) > MAX_STEPS
    ):
        raise SpecError(f"{source}: the table study's variables or funnel are not lists of the allowed size.")
    out = []
    for v in variables:
        if not isinstance(v, dict) or not isinstance(v.get("name"), str) or v["name"] not in schema:
            raise SpecError(f"{source}: the table study names a variable the dataset does not have.")
        name, kind = v["name"], schema[v["name"]].type
        if kind in COUNT_TYPES and set(v) == {"name"}:
            out.append(VariableLayout(name, kind, "counts", (*column_levels(name, schema, merge), "missing")))
        elif kind in SUMMARY_TYPES and set(v) == {"name", "quantiles", "resolution"}:
            qs, res = v["quantiles"], v["resolution"]
            if _quantiles(qs, source) != qs or (res is not None and _resolution(res, schema[name], source) != res):
                raise SpecError(f"{source}: variable '{name}' has quantiles or a resolution out of range.")
            out.append(VariableLayout(name, kind, "summary", ("recorded", "missing"), tuple(qs), res))
        else:
            raise SpecError(f"{source}: variable '{name}' has settings that do not fit its {kind} type.")
    steps = []
    for number, text in enumerate(funnel, start=1):
        if not isinstance(text, str):
            raise SpecError(f"{source}: funnel step {number} is not a filter.")
        if check_step(text, schema, f"{source}: funnel step {number}") != text:
            raise SpecError(f"{source}: funnel step {number} is not in canonical form.")
        steps.append(text)
    by_levels = column_levels(by, schema, merge) if by else ()
    return Layout(by, by_levels, tuple(out), tuple(steps))


def grid_of(variable: VariableLayout, schema: Schema) -> tuple[float, float, int | None, int | None]:
    """(origin, step, lowest index, highest index) of a variable's quantile grid: values lie
    at or above origin + lowest * step and at or below origin + highest * step (None: not
    known from the schema). The origin is the schema's minimum, else 0."""
    col = schema[variable.name]
    step = float(variable.resolution)
    origin = float(col.min) if col.min is not None else 0.0
    low = 0 if col.min is not None else None
    high = None
    if col.max is not None:
        high = int(math.ceil((col.max - origin) / step - 1e-9))
        while origin + high * step < col.max:
            high += 1
    return origin, step, low, high


def describe(spec: StudySpec, rules) -> list[str]:
    """For a Trust's `iaptnet node approve`: what the study computes and what the node releases."""
    params = spec.params
    counts = [v["name"] for v in params["variables"] if "quantiles" not in v]
    summaries = [v["name"] for v in params["variables"] if "quantiles" in v]
    lines = [f"  table      by {params['by'] or '(no split)'}"]
    if counts:
        lines.append(f"  counts     {', '.join(counts)}")
    if summaries:
        lines.append(f"  summaries  {', '.join(summaries)} (n, mean, SD; quantiles by bisection)")
    for number, step in enumerate(params["funnel"], start=1):
        lines.append(f"  funnel {number:<3} {step}")
    small = f"1-{rules.suppress_max}" if rules.suppress_max else "none"
    lines += [
        "",
        "what this node releases for it (every reply is checked against the policy first):",
        f"  counts    rounded to {rules.round_to} ({small} suppressed), with secondary suppression so that no",
        "            suppressed count follows from the totals or from two funnel steps",
    ]
    if summaries:
        lines += [
            "  summaries n, mean and centred sum of squares of each numeric variable per column, exactly,",
            f"            only over {rules.min_rows}+ rows whose missing count is shown (else withheld)",
            "  quantiles in rounds: how many rows are at or below a threshold the coordinator sends,",
            f"            withheld when any combination of those counts would single out 1-{rules.min_subset_difference - 1} people",
        ]
    lines += [
        f"  refused   a cohort differing by 1-{rules.min_subset_difference - 1} people from the whole dataset or an earlier release",
        f"  opt out   leave '{TABLE_TASK}' and '{QUANTILE_TASK}' out of the policy's tasks",
    ]
    return lines


# --------------------------------------------------------------------------- cells


def cell_keys(lay: Layout) -> list[tuple]:
    """Every count cell of a study: ("N", column) the cohort in each column (the funnel's
    first step), ("v", variable, row, column) each variable's rows, ("f", step, column) each
    funnel step after the cohort."""
    columns = range(lay.n_columns)
    keys: list[tuple] = [("N", c) for c in columns]
    for i, v in enumerate(lay.variables):
        keys += [("v", i, r, c) for r in range(len(v.rows)) for c in columns]
    for s in range(1, len(lay.funnel) + 1):
        keys += [("f", s, c) for c in columns]
    return keys


def relations(lay: Layout) -> list:
    """The additive relations between the cells, in the order secondary suppression visits
    them (protocol/sdc.py): per variable its rows (overall = sum over the `by` columns) then
    its columns (the column's cohort = sum of the variable's rows, so a hidden cohort hides
    the whole column); the cohort row; each funnel step's row. Funnel steps are nested, not a
    partition: each column's steps are a `Chain` (after a small step every later one is
    hidden), and a small difference between two steps is guarded by `step_pairs`."""
    columns = range(lay.n_columns)
    groups = lay.group_columns
    out: list = []
    for i, v in enumerate(lay.variables):
        rows = range(len(v.rows))
        if groups:
            out += [(("v", i, r, 0), [("v", i, r, g) for g in groups]) for r in rows]
        out += [(("N", c), [("v", i, r, c) for r in rows]) for c in columns]
    if groups:
        out.append((("N", 0), [("N", g) for g in groups]))
        out += [(("f", s, 0), [("f", s, g) for g in groups]) for s in range(1, len(lay.funnel) + 1)]
    if lay.funnel:
        out += [Chain((("N", c), *(("f", s, c) for s in range(1, len(lay.funnel) + 1)))) for c in columns]
    return out


def step_pairs(lay: Layout) -> list[tuple[tuple, tuple]]:
    """(earlier, later) cells of each column for every two funnel steps (the cohort first):
    the later count subtracted from the earlier is the people leaving in between."""

    def cell(s, c):
        return ("N", c) if s == 0 else ("f", s, c)

    n = len(lay.funnel) + 1
    return [(cell(a, c), cell(b, c)) for a in range(n) for b in range(a + 1, n) for c in range(lay.n_columns)]


def wire_name(key: tuple) -> tuple[str, str]:
    """(section key, count name) under which a node releases a cell."""
    if key[0] == "N":
        return "N", str(key[1])
    if key[0] == "v":
        return f"v{key[1]}", f"{key[2]}/{key[3]}"
    return f"f{key[1]}", str(key[2])

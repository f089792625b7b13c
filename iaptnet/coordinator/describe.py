"""The coordinator half of descriptive tables (`kind = "table"`): a Table 1 and a cohort
funnel from the nodes' releases.

1. `describe.table`: every node releases its counts (rounded and suppressed under its own
   policy, with its own complementary suppression), the exact n, mean and centred sum of
   squares of each numeric variable per column, or withholds a cell (node/describe.py).
2. Counts are pooled by one rule: **a network cell is the sum of the nodes' released
   (rounded) counts, and is suppressed when any contributing node suppressed or withheld it.**
   Every node's table is protected (protocol/sdc.py), and a count free at one node stays
   free in the sum, so the network table is too; the same rules run over the network table as
   a check (a count some node suppressed as small is small for rules (b) and (c)).
   Percentages are of the column's cohort, from these rounded counts, to 1 decimal place
   when the denominator is at least 4,000, else whole.
3. Means and SDs are exact (Chan's pooling of the nodes' moments); shown only when every
   contributing node released its part of the cell.
4. Quantiles: rounds of `describe.quantiles`, a federated bisection per variable and column
   (coordinator/quantiles.py), the overall column first, then the `by` columns.
"""

from __future__ import annotations

import math

import numpy as np

from ..protocol import messages as m
from ..protocol.errors import NetworkError
from ..protocol.kinds import describe as contract
from ..protocol.kinds.describe import QUANTILE_TASK, TABLE_TASK, Layout, TablePlan, cell_keys, relations, wire_name
from ..protocol.sdc import suppress
from ..protocol.study import StudySpec
from ..report.words import (
    MISSING,
    column_label,
    count_with_percent,
    mean_sd,
    median_iqr,
    services_of,
    table_column_labels,
    table_row_label,
)
from ..report.words import count as count_text
from .quantiles import Search
from .replies import check_replies
from .results import node_lines, provenance
from .runner import node_status
from .session import Session

MAX_QUANTILE_ROUNDS = 40  # per study, well under the policies' max_rounds_per_study (60 exploratory)
PERCENT_ONE_DECIMAL = 4000  # NHS: 1 decimal place only if the rounded denominator is >= 4,000
ABSENT = object()
PHASES = (lambda c: c == 0, lambda c: c != 0)


def run_study(
    grid, study, *, engine: str, progress=None, timeout: float | None = 300.0, poll_interval: float = 0.0
) -> dict:
    spec, plan = study.spec, study.parsed
    session = Session(
        grid, spec.hash, min_nodes=spec.min_nodes, timeout=timeout, poll_interval=poll_interval, progress=progress
    )
    replies = session.ask(TABLE_TASK, {"models": {"m0": spec.to_wire()}})
    check_replies(replies)
    for reply in replies:
        session.node_named(reply.node).data_version = str(reply.payload.get("data_version", ""))
    lay = plan.layout
    released = {r.node: (_counts(r, lay), _summaries(r, lay)) for r in replies}
    budget = MAX_QUANTILE_ROUNDS
    while True:
        names = [n.name for n in session.active]
        counts = {name: released[name][0] for name in names}
        summaries = pool_summaries({name: released[name][1] for name in names}, lay)
        searches = _searches(summaries, plan)
        # The overall column first: a node answers a threshold only if no combination of
        # the counts it answered, in any column, singles out a few people, so the columns
        # compete for fine thresholds; the overall column's quantiles are the table's main ones.
        for phase in PHASES:
            if [n.name for n in session.active] == names:
                budget -= _bisect(session, {key: s for key, s in searches.items() if phase(key[1])}, budget)
        if [n.name for n in session.active] == names:
            break  # otherwise a node left during the rounds: pool again without it
    pooled = pool_counts(counts, lay)
    for (i, c), search in searches.items():
        summaries[(i, c)]["quantiles"] = search.results()
    node_counts = {name: {"n_cohort": _shown(released[name][0][("N", 0)])} for name in names}
    return _results(spec, plan, pooled, summaries, session, node_counts, engine)


# --------------------------------------------------------------------------- reading replies


def _counts(reply: m.Reply, lay: Layout) -> dict:
    """A node's released counts by cell: an int, None (suppressed) or ABSENT (withheld)."""
    tables = reply.payload.get("tables", {})
    out = {}
    for key in cell_keys(lay):
        section, name = wire_name(key)
        value = tables.get(section, {}).get(name, ABSENT) if isinstance(tables.get(section), dict) else ABSENT
        if value is not None and value is not ABSENT and not isinstance(value, (int, float)):
            raise NetworkError(f"node {reply.node} sent a count the coordinator cannot read.")
        out[key] = value if value is None or value is ABSENT else int(value)
    return out


def _shown(value) -> int | None:
    return None if value is ABSENT else value


def _summaries(reply: m.Reply, lay: Layout) -> dict:
    """A node's exact (n, mean, m2) per (variable, column) it released."""
    block = reply.payload.get("summaries", {})
    out = {}
    for i, v in enumerate(lay.variables):
        if v.show != "summary":
            continue
        for c in range(lay.n_columns):
            entry = block.get(contract.summary_key(i, c))
            if isinstance(entry, dict):
                try:
                    out[(i, c)] = (int(entry["n"]), float(entry["mean"]), float(entry["m2"]))
                except (KeyError, TypeError, ValueError):
                    raise NetworkError(f"node {reply.node} sent a summary the coordinator cannot read.") from None
    return out


# --------------------------------------------------------------------------- pooling


def pool_counts(per_node: dict[str, dict], lay: Layout) -> dict:
    """The network table: sums of released counts, suppressed where any node did not show
    the cell; then the complementary suppression rules over the network table (normally
    nothing to add). A cell some node released as suppressed is small; one a node did not
    release at all was hidden to protect another."""
    pooled, small, withheld = {}, set(), set()
    for key in cell_keys(lay):
        values = [counts[key] for _, counts in sorted(per_node.items())]
        pooled[key] = None if any(v is None or v is ABSENT for v in values) else sum(values)
        if any(v is None for v in values):
            small.add(key)
        elif pooled[key] is None:
            withheld.add(key)
    hidden = suppress(pooled, small, relations(lay), hidden=withheld)
    return {k: (None if k in hidden else v) for k, v in pooled.items()}


def pool_summaries(per_node: dict[str, dict], lay: Layout) -> dict:
    """Exact n, mean and SD per (variable, column), pooled by Chan's formula over the nodes in
    name order; suppressed (None) where a node withheld its part."""
    out = {}
    for i, v in enumerate(lay.variables):
        if v.show != "summary":
            continue
        for c in range(lay.n_columns):
            parts = [(name, s.get((i, c))) for name, s in sorted(per_node.items())]
            withheld = [name for name, p in parts if p is None]
            entry = {
                "n": None,
                "mean": None,
                "sd": None,
                "quantiles": [],
                "suppressed": bool(withheld),
                "withheld_by": withheld,
            }
            if not withheld:
                n, mean, m2 = 0, 0.0, 0.0
                for _, (nk, meank, m2k) in parts:
                    if nk == 0:
                        continue
                    total = n + nk
                    delta = meank - mean
                    mean += delta * nk / total
                    m2 += m2k + delta * delta * n * nk / total
                    n = total
                entry.update(n=n, mean=mean if n else None, sd=math.sqrt(m2 / (n - 1)) if n > 1 else None)
            out[(i, c)] = entry
    return out


def _searches(summaries: dict, plan: TablePlan) -> dict:
    out = {}
    for (i, c), entry in summaries.items():
        v = plan.layout.variables[i]
        if entry["suppressed"] or not entry["n"] or not v.quantiles or i not in plan.grids:
            continue
        out[(i, c)] = Search.for_variable(entry["n"], entry["mean"], entry["sd"] or 0.0, v.quantiles, plan.grids[i])
    return out


def _bisect(session: Session, searches: dict, budget: int) -> int:
    """Rounds of `describe.quantiles` until every search is done or `budget` rounds are used
    (a search cut short is reported as the interval its brackets give); returns the rounds."""
    for used in range(budget):
        asks = {key: s.asks() for key, s in searches.items()}
        asks = {key: idx for key, idx in asks.items() if idx}
        if not asks:
            return used
        arrays = {
            contract.thresholds_array_key(i, c): np.array([searches[(i, c)].value(k) for k in idx], dtype=float)
            for (i, c), idx in asks.items()
        }
        before = len(session.active)
        replies = session.ask(QUANTILE_TASK, {}, arrays)
        if len(session.active) != before:
            return used + 1  # a node left: the caller pools again without it
        for (i, c), idx in asks.items():
            for j, k in enumerate(idx):
                counts = [
                    r.payload.get("thresholds", {}).get(contract.threshold_key(i, c, j), {}).get("count")
                    for r in replies
                ]
                searches[(i, c)].record(k, None if any(x is None for x in counts) else sum(int(x) for x in counts))
    return budget


# --------------------------------------------------------------------------- results


def percent(count, total) -> float | None:
    if count is None or total is None or total == 0:
        return None
    value = 100.0 * count / total
    return round(value, 1) if total >= PERCENT_ONE_DECIMAL else float(round(value))


def _cell(count) -> dict:
    return {"count": count, "suppressed": count is None}


def _results(
    spec: StudySpec, plan: TablePlan, pooled: dict, summaries: dict, session: Session, node_counts: dict, engine: str
) -> dict:
    lay = plan.layout
    columns = range(lay.n_columns)
    totals = [pooled[("N", c)] for c in columns]
    tables = []
    for i, v in enumerate(lay.variables):
        rows = []
        for r, level in enumerate(v.rows):
            cells = []
            for c in columns:
                count = pooled[("v", i, r, c)]
                cells.append({**_cell(count), "percent": percent(count, totals[c])})
            rows.append({"row": level, "cells": cells})
        entry = {"variable": v.name, "label": plan.variable_labels[i], "type": v.type, "show": v.show, "rows": rows}
        if v.show == "summary":
            entry["resolution"] = v.resolution
            entry["summary"] = [summaries[(i, c)] for c in columns]
        tables.append(entry)
    funnel = None
    if lay.funnel:
        steps = [{"label": plan.step_labels[0], "where": spec.where, "cells": [_cell(t) for t in totals]}]
        for s, text in enumerate(lay.funnel, start=1):
            steps.append(
                {"label": plan.step_labels[s], "where": text, "cells": [_cell(pooled[("f", s, c)]) for c in columns]}
            )
        for s, step in enumerate(steps):
            for c, cell in enumerate(step["cells"]):
                cell["percent_of_previous"] = percent(cell["count"], steps[s - 1]["cells"][c]["count"]) if s else None
                cell["percent_of_cohort"] = percent(cell["count"], totals[c])
        funnel = {"steps": steps}
    return {
        "study": spec.name,
        "title": spec.title,
        "study_hash": spec.hash,
        "kind": spec.kind,
        "family": None,
        "where": spec.where,
        "by": lay.by,
        "n": totals[0],
        "columns": [
            {
                "column": c,
                "label": plan.column_labels[c],
                "level": (lay.by_levels[c - 1] if 0 < c <= len(lay.by_levels) else None),
            }
            for c in columns
        ],
        "group_sizes": [_cell(t) for t in totals],
        "tables": tables,
        "funnel": funnel,
        "disclosure": (
            "counts: each node rounds its counts (1-7 suppressed, others to the nearest 5 under "
            "its policy) and applies complementary suppression (a hidden total hides its "
            "breakdown, zeros included; a funnel step of 1-7 hides the steps after it); a network "
            "count is the sum of the nodes' released counts and is suppressed (null) when any "
            "node did not show it. "
            "n, mean and SD are exact; quantiles exact on the resolution's grid."
        ),
        "nodes": node_status(session, node_counts),
        "terms": [],
        "rounds": session.round,
        **provenance(spec, engine),
    }


# --------------------------------------------------------------------------- report


def render(result: dict) -> str:
    """A readable Table 1 (and funnel) for the terminal, in the words and formats of the
    report (report/words.py): levels as the schema's labels, counts as n (%) with one
    percentage format, numeric variables as mean (SD) and median [Q1, Q3] (an interval a..b
    where the nodes' policies stopped the search); '*' marks a suppressed count or a withheld
    statistic."""
    with services_of(result):
        return _render(result)


def _render(result: dict) -> str:
    labels = table_column_labels(result)
    title = result.get("title") or result["study"]
    lines = [
        f"{title}  [table]  study {result['study_hash'][:12]}",
        f"  cohort: {result.get('where') or 'all rows'}; n = {_n(result['n'])}"
        f"  (counts rounded to 5 per service, * suppressed)",
    ]
    lines.extend(node_lines(result))
    rows: list[tuple[str, list[str]]] = []  # (label, cells); cells [] for a heading
    if result["tables"]:
        rows.append(("N", [_n(c["count"]) for c in result["group_sizes"]]))
        for table in result["tables"]:
            rows.append((table.get("label") or column_label(table["variable"]), []))
            if table["show"] == "summary":
                rows += _summary_rows(table)
            for row in table["rows"]:
                if table["show"] == "summary" and row["row"] == "recorded":
                    continue
                if row["row"] == "missing" and all(cell["count"] == 0 for cell in row["cells"]):
                    continue
                rows.append(
                    ("  " + table_row_label(table, row["row"]), [_count_pct(cell, "percent") for cell in row["cells"]])
                )
    funnel = []
    if result.get("funnel"):
        funnel = [
            (step["label"], [_count_pct(cell, "percent_of_previous") for cell in step["cells"]])
            for step in result["funnel"]["steps"]
        ]
    show = [
        c
        for c in range(len(labels))
        if c < len(labels) - 1
        or not result["by"]
        or any(cells and cells[c] not in ("0", "", MISSING) for _, cells in rows + funnel)
    ]
    width = [max([len(labels[c])] + [len(cells[c]) for _, cells in rows + funnel if cells]) + 2 for c in show]
    first = max([36] + [len(label) for label, cells in rows if cells] + [len(label) + 2 for label, _ in funnel])
    head = "  " + " " * first + "".join(f"{labels[c]:>{w}}" for c, w in zip(show, width))

    def line(label, cells):
        return (
            f"  {label:<{first}}" + "".join(f"{cells[c]:>{w}}" for c, w in zip(show, width)) if cells else f"  {label}"
        )

    if rows:
        lines += [head] + [line(label, cells) for label, cells in rows]
    if funnel:
        lines += ["  funnel (n, % of the step before)", head] + [line("  " + label, cells) for label, cells in funnel]
    return "\n".join(lines)


def _n(count) -> str:
    return "*" if count is None else count_text(count)


def _count_pct(cell: dict, key: str) -> str:
    if cell["count"] is None:
        return "*"
    return count_with_percent(cell["count"], cell.get(key))


def _summary_rows(table: dict) -> list[tuple[str, list[str]]]:
    means, medians = [], []
    for entry in table["summary"]:
        if entry["suppressed"]:
            means.append("*")
            medians.append("*")
            continue
        means.append(mean_sd(entry))
        medians.append(median_iqr(entry) or "")
    out = [("  mean (SD)", means)]
    if any(m not in ("", "*") for m in medians):
        out.append(("  median [Q1, Q3]", [m or MISSING for m in medians]))
    return out

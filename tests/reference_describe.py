"""The pooled-rows reference for `kind = "table"`: the same Table 1 and funnel computed
directly on the concatenated rows with pandas and numpy, written independently of iaptnet.

`describe_reference(frame, settings)` takes the pooled (derived) rows with a column naming each
row's service, and the study's settings:

    {"node": "service column", "where": "pandas query or None", "by": column or None,
     "by_levels": [...], "variables": [{"name", "show": "counts"|"summary", "levels": [...],
     "quantiles": [...], "resolution": r or None, "origin": o}, ...],
     "funnel": ["pandas query", ...], "rules": {"suppress_max", "round_to", "min_rows",
     "min_level_count"}}

and returns what results.json reports: `group_sizes`, per variable `rows` (counts by column,
None where suppressed) and `summary` (n, mean, sd, quantiles), and the funnel's counts.

The disclosure rule it applies is the one iaptnet documents: each service's counts are
suppressed when 1..suppress_max, complementary suppression runs over the service's tables
(the relations below, each column's funnel steps as a chain, and the pairs of steps between
which 1..suppress_max people leave), the rest are rounded to the nearest round_to; a network
count is the sum of the services' rounded counts, suppressed when any service hid it, and the
same rules run over the network table. Complementary suppression itself is iaptnet's
(iaptnet.protocol.sdc, tested on its own in tests/test_sdc.py): this reference checks what is
counted, hidden, rounded and pooled around it. A `by` group smaller than min_rows at a service
shows nothing there (its cells are hidden, protected like small ones). A numeric summary of
a column is shown when every service shows its missing count there, has 0 or at least min_rows
rows with a value and 0 or at least min_level_count rows away from the most common value (and,
as the overall is the sum of the columns, never exactly one of a row is withheld). Quantiles:
numpy's default ('linear') on the values rounded up to the grid origin + i * resolution.
(The node's subset rule, which withholds a summary whose rows differ from an earlier release
by a few people, is not modelled here: the tests' data avoid it.)
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd

from iaptnet.protocol.sdc import Chain, suppress


def to_query(where: str | None) -> str | None:
    """A cohort filter of the iaptnet grammar as a pandas query."""
    if where is None:
        return None
    where = re.sub(r"(\w+) is not missing", r"\1.notna()", where)
    return re.sub(r"(\w+) is missing", r"\1.isna()", where)


def describe_reference(frame: pd.DataFrame, settings: dict) -> dict:
    rules = settings["rules"]
    node = settings["node"]
    query = to_query(settings.get("where"))
    cohort = frame.query(query, engine="python") if query else frame
    by = settings.get("by")
    columns = ["overall"] + ([*settings["by_levels"], "missing"] if by else [])
    col = _column_of(cohort, by, settings.get("by_levels", []))
    services = sorted(frame[node].unique())
    steps = [cohort]
    for q in settings.get("funnel", []):
        steps.append(steps[-1].query(to_query(q), engine="python"))

    exact = {
        s: _exact_counts(cohort[cohort[node] == s], col[cohort[node] == s], steps, node, s, settings, columns)
        for s in services
    }
    relations = _relations(settings, columns)
    shown, small = {}, set()
    for s in services:
        primary = {k for k, n in exact[s].items() if 1 <= n <= rules["suppress_max"]}
        leaving = [
            (a, b)
            for a, b in _step_pairs(len(steps), len(columns))
            if 1 <= exact[s][a] - exact[s][b] <= rules["suppress_max"]
        ]
        # A `by` group below the cohort minimum shows nothing at that service.
        tiny = {c for c in range(1, len(columns)) if 0 < exact[s][("N", c)] < rules["min_rows"]}
        forced = {k for k in exact[s] if k[-1] in tiny}
        hidden = suppress(exact[s], primary, relations, leaving, hidden=forced)
        shown[s] = {k: (None if k in hidden else _round(n, rules["round_to"])) for k, n in exact[s].items()}
        small |= primary - forced
    pooled = {}
    for k in exact[services[0]]:
        values = [shown[s][k] for s in services]
        pooled[k] = None if any(v is None for v in values) else sum(values)
    withheld = {k for k, v in pooled.items() if v is None} - small
    network_hidden = suppress(pooled, small, relations, hidden=withheld)
    pooled = {k: (None if k in network_hidden else v) for k, v in pooled.items()}

    out = {"group_sizes": [pooled[("N", c)] for c in range(len(columns))], "tables": [], "funnel": None}
    for i, v in enumerate(settings["variables"]):
        nrows = len(v["levels"]) + 1 if v["show"] == "counts" else 2
        table = {"rows": [[pooled[("v", i, r, c)] for c in range(len(columns))] for r in range(nrows)]}
        if v["show"] == "summary":
            table["summary"] = _summaries(cohort, col, v, i, services, exact, shown, settings, columns)
        out["tables"].append(table)
    if settings.get("funnel"):
        out["funnel"] = [out["group_sizes"]] + [
            [pooled[("f", s, c)] for c in range(len(columns))] for s in range(1, len(steps))
        ]
    return out


def _column_of(rows: pd.DataFrame, by: str | None, levels: list[str]) -> pd.Series:
    """Each row's column: 1..K its `by` level, K+1 missing (0 without a `by`)."""
    if not by:
        return pd.Series(0, index=rows.index)
    values = rows[by]
    if not isinstance(values.dtype, pd.CategoricalDtype):
        values = values.map(lambda x: None if pd.isna(x) else str(int(x)))
    lookup = {level: j + 1 for j, level in enumerate(levels)}
    return values.astype(object).map(
        lambda x: lookup.get(x, len(levels) + 1) if isinstance(x, str) else len(levels) + 1
    )


def _exact_counts(rows, col, steps, node, service, settings, columns) -> dict:
    out = {}
    width = len(columns)

    def per_column(mask_rows, mask_col):
        counts = [len(mask_rows)] + [int((mask_col == c).sum()) for c in range(1, width)]
        return counts

    for c, n in enumerate(per_column(rows, col)):
        out[("N", c)] = n
    for i, v in enumerate(settings["variables"]):
        values = rows[v["name"]]
        if v["show"] == "counts":
            labels = values.astype(object).map(
                lambda x: None if pd.isna(x) else (x if isinstance(x, str) else str(int(x)))
            )
            row_names = list(v["levels"]) + [None]
        else:
            labels = values.isna().map({False: "recorded", True: None})
            row_names = ["recorded", None]
        for r, name in enumerate(row_names):
            match = labels.isna() if name is None else labels == name
            for c, n in enumerate(per_column(rows[match], col[match])):
                out[("v", i, r, c)] = n
    for s, step in enumerate(steps[1:], start=1):
        part = step[step[node] == service]
        for c, n in enumerate(per_column(part, col.loc[part.index])):
            out[("f", s, c)] = n
    return out


def _relations(settings, columns) -> list:
    """Rows then columns of each variable, the cohort row, each funnel step's row; each
    column's funnel steps (the cohort first) as a chain."""
    width = len(columns)
    groups = list(range(1, width))
    out = []
    for i, v in enumerate(settings["variables"]):
        nrows = len(v["levels"]) + 1 if v["show"] == "counts" else 2
        if groups:
            for r in range(nrows):
                out.append((("v", i, r, 0), [("v", i, r, g) for g in groups]))
        for c in range(width):
            out.append((("N", c), [("v", i, r, c) for r in range(nrows)]))
    if groups:
        out.append((("N", 0), [("N", g) for g in groups]))
        for s in range(1, len(settings.get("funnel", [])) + 1):
            out.append((("f", s, 0), [("f", s, g) for g in groups]))
    n_steps = len(settings.get("funnel", []))
    if n_steps:
        out += [Chain((("N", c), *(("f", s, c) for s in range(1, n_steps + 1)))) for c in range(width)]
    return out


def _step_pairs(n_steps: int, width: int) -> list:
    """Every two funnel steps (the cohort first), per column: earlier, later."""

    def cell(s, c):
        return ("N", c) if s == 0 else ("f", s, c)

    return [(cell(a, c), cell(b, c)) for a in range(n_steps) for b in range(a + 1, n_steps) for c in range(width)]


def _round(n: int, base: int) -> int:
    return 0 if n == 0 else int(math.floor(n / base + 0.5) * base)


def _summaries(cohort, col, v, i, services, exact, shown, settings, columns) -> list[dict]:
    rules = settings["rules"]
    width = len(columns)
    node = settings["node"]
    released = {}
    for s in services:
        ok = []
        for c in range(width):
            rows = cohort[(cohort[node] == s) & ((col == c) | (c == 0))]
            x = rows[v["name"]].dropna().to_numpy(dtype=float)
            off_mode = len(x) - (pd.Series(x).value_counts().max() if len(x) else 0)
            good = (
                shown[s][("v", i, 1, c)] is not None
                and not (0 < len(x) < rules["min_rows"])
                and not (0 < off_mode < rules["min_level_count"])
            )
            ok.append((c, good, len(x)))
        kept = [c for c, good, _ in ok if good]
        sizes = {c: n for c, _, n in ok}
        if width > 1 and sum(c not in kept for c in range(width)) == 1:
            nonzero = [c for c in kept if c != 0 and sizes[c] > 0]
            kept.remove(min(nonzero, key=lambda c: (sizes[c], c)) if nonzero else 0)
        released[s] = set(kept)
    out = []
    for c in range(width):
        x = cohort.loc[(col == c) | (c == 0), v["name"]].dropna().to_numpy(dtype=float)
        if not all(c in released[s] for s in services):
            out.append({"suppressed": True})
            continue
        entry = {
            "suppressed": False,
            "n": len(x),
            "mean": float(np.mean(x)) if len(x) else None,
            "sd": float(np.std(x, ddof=1)) if len(x) > 1 else None,
            "quantiles": {},
        }
        if v.get("resolution") and len(x):
            snapped = _snap(x, v["origin"], v["resolution"])
            for p in v["quantiles"]:
                entry["quantiles"][p] = float(np.quantile(snapped, p))
        out.append(entry)
    return out


def _snap(x: np.ndarray, origin: float, step: float) -> np.ndarray:
    """Each value rounded up to the grid: the smallest origin + i * step at or above it."""
    i = np.ceil((x - origin) / step)
    i = np.where(origin + i * step < x, i + 1, i)
    i = np.where(origin + (i - 1) * step >= x, i - 1, i)
    return origin + i * step


def settings_for_study(study: dict, schema, rules: dict, node: str = "service") -> dict:
    """The reference's settings for a study TOML (as a dict) on a dataset schema: levels and
    grids as the study's parse gives them (the computation above stays independent)."""
    from iaptnet.protocol.kinds.describe import grid_of
    from iaptnet.protocol.study import parse_study

    spec, plan = parse_study(study, schema, "study")
    lay = plan.layout
    variables = []
    for v in lay.variables:
        if v.show == "counts":
            variables.append({"name": v.name, "show": "counts", "levels": list(v.rows[:-1])})
        else:
            origin = grid_of(v, schema)[0] if v.resolution else 0.0
            variables.append(
                {
                    "name": v.name,
                    "show": "summary",
                    "resolution": v.resolution,
                    "origin": origin,
                    "quantiles": list(v.quantiles),
                }
            )
    return {
        "node": node,
        "where": study.get("where"),
        "by": lay.by,
        "by_levels": list(lay.by_levels),
        "variables": variables,
        "funnel": [f if isinstance(f, str) else f["where"] for f in study.get("funnel", [])],
        "rules": rules,
    }

"""The coordinator half of an access study: referral rates per 100,000 and Poisson rate ratios.

One round: every node returns its referrals per level of each grouping variable (exact, model
statistics) and the same as a count table under its small-number rules (node/access.py). The
coordinator holds the population denominators (protocol/population.py), so from those margins
alone it computes, exactly as on the pooled referral rows:

- `rates`: for each level of each grouping variable, referrals, population, person-years and
  the rate per 100,000 per year with an exact Poisson 95% CI, and the crude rate ratio against
  the variable's first level (from the Poisson GLM `referrals ~ variable`); with a need table
  (protocol/prevalence.py) the population is of people with need, so all of this is against
  need;
- `terms`: the adjusted Poisson GLM `referrals ~ by... [+ area]` with offset
  log(population x years) (coordinator/loglinear.py), as term rows (rate ratios; docs/reference/design.md#results-contract);
- `area_rates`: the same per node, displayed from the node's own rounded/suppressed counts.

The displayed counts follow the small-number rules (protocol/sdc.py): each node's counts as
its policy released them, network sums under the NHS rule, then complementary suppression over
every area x level table with its totals (each node's referrals, shared by all the tables; the
network row; the network total, which `n` gives exactly), audited on the exact margins so that
no suppressed count follows from the counts shown; a rate is shown only beside a shown count.
Model outputs (rate ratios, CIs) are not small-number controlled (docs/reference/domain.md#small-numbers).
"""

from __future__ import annotations

import numpy as np
from scipy import stats
from statsmodels.stats.rates import confint_poisson

from ..protocol.errors import NetworkError, SpecError
from ..protocol.families import get_family
from ..protocol.kinds.access import PER, TASK, margins_key
from ..protocol.sdc import ROUND_TO, SUPPRESS_MAX, Relation, round_count, suppress
from ..report import words
from ..report.words import p_phrase, p_value
from . import loglinear
from .glm import ModelFit
from .replies import check_replies
from .results import node_lines, provenance, term_rows, term_text
from .runner import node_status
from .session import Session

KEY = "m0"
ALL = "all"
COUNT_KEYS = ("n_used", "n_cohort", "n_missing", "n_no_population")


def run_study(grid, study, *, engine: str, progress=None, timeout=300.0, poll_interval=0.0) -> dict:
    spec, access = study.spec, study.parsed
    session = Session(
        grid, spec.hash, min_nodes=spec.min_nodes, timeout=timeout, poll_interval=poll_interval, progress=progress
    )
    replies = session.ask(TASK, {"models": {KEY: spec.to_wire()}})
    check_replies(replies)
    names = [r.node for r in replies]
    margins, totals, counts = {}, {}, {}
    for reply in replies:
        session.node_named(reply.node).data_version = str(reply.payload.get("data_version", ""))
        margins[reply.node], totals[reply.node] = _margins(reply, access)
        counts[reply.node] = reply.payload.get("counts", {}).get(KEY, {})
    cells = cell_table(access, names, spec.source)
    analysis = analyse(spec, access, cells, margins, totals, counts)
    status = node_status(session, {node: {k: counts[node].get(k) for k in COUNT_KEYS} for node in names})
    return build_results(spec, access, analysis, engine=engine, node_status=status, rounds=session.round)


def _margins(reply, access) -> tuple[dict[str, np.ndarray], float]:
    try:
        n = float(reply.payload["access"][KEY]["n_used"])
        out = {var: np.asarray(reply.arrays[margins_key(KEY, var)], dtype=float) for var in access.by}
    except (KeyError, TypeError, ValueError):
        raise NetworkError(f"node {reply.node} sent a reply without the study's counts.") from None
    for var, values in out.items():
        if values.shape != (len(access.levels[var]),) or not np.all(values >= 0) or values.sum() != n:
            raise NetworkError(f"node {reply.node} sent counts that do not match the study's levels of {var}.")
    return out, n


def cell_table(access, nodes: list[str], source: str) -> loglinear.CellTable:
    """The cells (node x groups) of the contributing nodes with a population, and their
    person-years (the nodes left out the referrals of groups without population)."""
    table = access.population
    groups = table.groups()
    area_of, cells, person_years = [], [], []
    for k, node in enumerate(nodes):
        population = table.area_population(access.areas.get(node, [node]), node, source)
        for group, p in zip(groups, population):
            if p > 0:
                area_of.append(k)
                cells.append(group)
                person_years.append(p * access.years)
    for j, var in enumerate(access.by):
        for level in access.levels[var]:
            if not any(g[j] == level for g in cells):
                raise SpecError(
                    f"{table.source}: the population table (field 'population' of {source}) has no "
                    f"population for {var} '{level}' in the areas of the contributing nodes; merge that "
                    "level with another or leave the variable out of field 'by'."
                )
    return loglinear.CellTable(
        list(nodes), access.by, access.levels, np.asarray(area_of), cells, np.asarray(person_years, dtype=float)
    )


def model_terms(access, cells: loglinear.CellTable) -> list[str]:
    """The adjusted model: every grouping variable, and area when asked for (and > 1 area)."""
    return list(access.by) + (["area"] if access.area_effects and len(cells.areas) > 1 else [])


def analyse(spec, access, cells, margins, totals, counts) -> dict:
    """Fit the adjusted and crude models and build the displayed rate tables."""
    models = {"adjusted": model_terms(access, cells)}
    models.update({f"crude {var}": [var] for var in access.by})
    fits = {}
    for name, terms in models.items():
        dsg = loglinear.design(cells, terms)
        xty = loglinear.sufficient_statistics(dsg, margins, access.levels, totals)
        fitted = loglinear.fit(dsg, cells.person_years, xty, f"{spec.name}: {name}")
        total = float(xty[0])
        lr = 2.0 * (loglinear.null_objective(cells.person_years, total) - fitted.objective)
        df = len(fitted.names) - 1
        fits[name] = {
            "name": name,
            "formula": "referrals ~ " + " + ".join(terms),
            "terms": term_rows(_model_fit(spec, fitted)),
            "iterations": fitted.iterations,
            "lr_statistic": lr,
            "lr_df": df,
            "lr_p_value": float(stats.chi2.sf(lr, df)) if df else None,
        }
    rates, area_rates, secondary = rate_tables(access, cells, margins, totals, counts, fits)
    return {
        "fits": fits,
        "rates": rates,
        "area_rates": area_rates,
        "secondary": secondary,
        "n": int(sum(totals.values())),
        "cells": len(cells.groups),
    }


def _model_fit(spec, fitted: loglinear.LoglinearFit) -> ModelFit:
    p = len(fitted.names)
    return ModelFit(
        KEY,
        spec,
        get_family("poisson"),
        names=fitted.names,
        active=np.ones(p, dtype=bool),
        beta=fitted.beta,
        cov=fitted.cov,
        converged=True,
        iterations=fitted.iterations,
    )


def fill_rates(rows: list[dict], exact: list[float]) -> None:
    """Rate per 100,000 per year and its exact (Garwood) Poisson 95% CI, beside shown counts."""
    shown = [k for k, row in enumerate(rows) if row["referrals"] is not None]
    if not shown:
        return
    y = np.array([exact[k] for k in shown], dtype=float)
    py = np.array([rows[k]["person_years"] for k in shown], dtype=float)
    low, high = confint_poisson(y, py, method="exact-c")
    for k, r, lo, hi in zip(shown, PER * y / py, PER * np.asarray(low), PER * np.asarray(high)):
        rows[k].update(rate=float(r), rate_low=float(lo), rate_high=float(hi))


def rate_tables(access, cells, margins, totals, counts, fits):
    """Network and per-node rates; counts as displayed under the small-number rules."""
    nodes = cells.areas
    py = cells.person_years
    grand_n = float(sum(totals.values()))
    exact, cell_py, shown = {}, {}, {}
    for j, var in enumerate(access.by):
        levels = access.levels[var]
        exact[var] = np.array([margins[node][var] for node in nodes])
        level_of = np.array([g[j] for g in cells.groups], dtype=object)
        cell_py[var] = np.array(
            [[py[(cells.area_of == k) & (level_of == level)].sum() for level in levels] for k in range(len(nodes))]
        )
        # The displayed table: nodes' own released counts (their policy), then network sums
        # under the network rule; the last column holds the totals every table shares.
        shown[var] = [
            [counts[node].get(f"{var}={level}") for level in levels] + [counts[node].get("n_used")] for node in nodes
        ]
        shown[var].append([round_count(v) for v in exact[var].sum(axis=0)] + [round_count(grand_n)])
    primary, hidden, secondary = display_suppression(access, nodes, exact, totals, shown)
    for var, r, c in hidden:
        shown[var][r][c] = None
    primary = {var: {(r, c) for v, r, c in primary if v == var} for var in access.by}
    rates, area_rates, exact_rates, exact_area = [], [], [], []
    for var in access.by:
        levels = access.levels[var]
        crude = {t["term"]: t for t in fits[f"crude {var}"]["terms"]}
        for r, node in enumerate(nodes + [ALL]):
            for i, level in enumerate(levels):
                n = exact[var][r, i] if node != ALL else exact[var][:, i].sum()
                person_years = cell_py[var][r, i] if node != ALL else cell_py[var][:, i].sum()
                row = _rate_row(var, level, shown[var][r][i], (r, i) in primary[var], person_years, access.years)
                if node == ALL:
                    rates.append({**row, **_ratio(crude, var, level, i == 0)})
                    exact_rates.append(n)
                else:
                    area_rates.append({"area": node, **row})
                    exact_area.append(n)
    first = access.by[0]
    totals_col = len(access.levels[first])
    for r, node in enumerate(nodes + [ALL]):
        n = totals[node] if node != ALL else grand_n
        person_years = float(py[cells.area_of == r].sum()) if node != ALL else float(py.sum())
        row = _rate_row(
            ALL, ALL, shown[first][r][totals_col], (r, totals_col) in primary[first], person_years, access.years
        )
        if node == ALL:
            rates.append(row)
            exact_rates.append(n)
        else:
            area_rates.append({"area": node, **row})
            exact_area.append(n)
    fill_rates(rates, exact_rates)
    fill_rates(area_rates, exact_area)
    return rates, area_rates, secondary


def display_suppression(access, nodes: list[str], exact: dict, totals: dict, shown: dict) -> tuple[set, set, int]:
    """Which displayed counts are small and which to hide, as (variable, row, column) of the
    `shown` tables (a row per node then the network; the last column the totals, the same
    cells in every table), and how many counts are hidden to protect others. Relations:
    each node's levels add up to its total, each level's nodes to the network's count, the
    levels and the nodes' totals to the network total, which results.json gives exactly
    (`n`), so it is known, never hidden (rule d). Exact margins give the audit the true
    counts."""
    grand = len(nodes)
    values: dict = {("total", k): float(totals[node]) for k, node in enumerate(nodes)}
    values[("total", grand)] = float(sum(totals.values()))
    small: set = set()
    relations: list = [Relation(("total", grand), tuple(("total", k) for k in range(grand)), implicit=True)]
    for var in access.by:
        levels = range(len(access.levels[var]))
        for k in range(grand + 1):
            for i in levels:
                values[(var, k, i)] = float(exact[var][k, i] if k < grand else exact[var][:, i].sum())
        relations += [(("total", k), [(var, k, i) for i in levels]) for k in range(grand)]
        relations.append(Relation(("total", grand), tuple((var, grand, i) for i in levels), implicit=True))
        relations += [((var, grand, i), [(var, k, i) for k in range(grand)]) for i in levels]
        for k, row in enumerate(shown[var]):
            small |= {(var, k, i) for i in levels if row[i] is None}
            if row[-1] is None:
                small.add(("total", k))
    hidden = suppress(values, small, relations)

    def cells(keys):  # ("total", k) is the last column of every table
        out = set()
        for key in keys:
            if key[0] == "total":
                out |= {(var, key[1], len(access.levels[var])) for var in access.by}
            else:
                out.add(key)
        return out

    return cells(small), cells(hidden), len(hidden - small)


def _rate_row(var, level, shown, is_primary, person_years, years) -> dict:
    """A displayed row; its rate is filled in (fill_rates) only beside a shown count."""
    row = {
        "variable": var,
        "level": level,
        "referrals": shown,
        "population": float(person_years / years),
        "person_years": float(person_years),
        "rate": None,
        "rate_low": None,
        "rate_high": None,
        "suppressed": None,
    }
    if shown is None:
        row["suppressed"] = "small number" if is_primary else "secondary"
    return row


def _ratio(crude: dict, var: str, level: str, is_reference: bool) -> dict:
    if is_reference:
        return {"rate_ratio": 1.0, "rate_ratio_low": None, "rate_ratio_high": None}
    term = crude[f"{var}[T.{level}]"]
    return {"rate_ratio": term["ratio"], "rate_ratio_low": term["ratio_low"], "rate_ratio_high": term["ratio_high"]}


def build_results(spec, access, analysis: dict, *, engine: str, node_status: list[dict], rounds: int) -> dict:
    adjusted = analysis["fits"]["adjusted"]
    terms = adjusted["terms"]
    contributed = [n for n in node_status if n.get("contributed")]
    n_missing = sum(int(n.get("n_missing") or 0) for n in contributed)
    n_no_population = sum(int(n.get("n_no_population") or 0) for n in contributed)
    table = access.population
    return {
        "study": spec.name,
        "title": spec.title,
        "study_hash": spec.hash,
        "kind": "access",
        "family": "poisson",
        "link": "log",
        "ratio_name": "rate ratio",
        "formula": adjusted["formula"],
        "offset": "log(population * prevalence * years)" if access.need else "log(population * years)",
        "where": spec.where,
        "merge": spec.merge or None,
        "by": list(access.by),
        "period": {"first": access.period[0], "last": access.period[1], "years": access.years},
        "per": PER,
        "population": {
            "source": access.population_label,
            "file": table.source,
            "sha256": table.digest,
            "areas": {n["name"]: access.areas.get(n["name"], [n["name"]]) for n in node_status if n.get("contributed")},
        },
        # With a need table, `population` and `person_years` in the rates are of people with
        # need (population x prevalence), and rates are per 100,000 of them.
        "need": (
            {
                "source": access.need_label,
                "file": access.need.source,
                "sha256": access.need.digest,
                "by": list(access.need.vars),
            }
            if access.need
            else None
        ),
        "exposure": spec.exposure,
        "exposure_term": next((t for t in terms if t["term"] == spec.exposure), None),
        "n": analysis["n"],
        "n_missing": n_missing,
        "n_no_population": n_no_population,
        "n_cohort": analysis["n"] + n_missing + n_no_population,
        "cells": analysis["cells"],
        "converged": True,
        "iterations": adjusted["iterations"],
        "rounds": rounds,
        "lr_statistic": adjusted["lr_statistic"],
        "lr_df": adjusted["lr_df"],
        "lr_p_value": adjusted["lr_p_value"],
        # These need every cell of the cross-classification, which nodes do not release.
        "deviance": None,
        "null_deviance": None,
        "llf": None,
        "aic": None,
        "terms": terms,
        "models": list(analysis["fits"].values()),
        "rates": analysis["rates"],
        "area_rates": analysis["area_rates"],
        "suppression": {
            "network_rule": f"1-{SUPPRESS_MAX} suppressed, others rounded to {ROUND_TO}",
            "node_counts": "as each node's policy released them",
            "secondary": analysis["secondary"],
        },
        "nodes": node_status,
        **provenance(spec, engine),
    }


# --------------------------------------------------------------------------- the report


def render(result: dict) -> str:
    """Rates per 100,000 per year with crude rate ratios, then the adjusted rate ratios; groups
    and terms in the report's words (`age group: 65+`, report/words.py), not as codes."""

    title = result.get("title") or result["study"]
    period = result["period"]
    need = result.get("need")
    offset = "population x prevalence x years" if need else "population x years"
    against = (
        (
            f"people with need: population '{result['population']['source']}' x prevalence "
            f"'{need['source']}' by {', '.join(map(words.column_label, need['by']))} "
            f"(sha256 {result['population']['sha256'][:12]}, "
            f"{need['sha256'][:12]})"
        )
        if need
        else f"population '{result['population']['source']}' (sha256 {result['population']['sha256'][:12]})"
    )
    lines = [
        f"{title}  [access: Poisson, offset log({offset})]  study {result['study_hash'][:12]}",
        f"  referrals {period['first']}..{period['last']} ({period['years']:g} years) against {against}",
        f"  n = {result['n']:,} referrals counted ({result['n_missing']:,} left out for a missing group); "
        f"{result['cells']} cells",
    ]
    lines.extend(node_lines(result))
    rate = "per 100,000 with need/yr" if need else "rate per 100,000/yr"
    width = 34 if need else 30
    # Each group as the report's rates table and figure name it (report/sections.py access_section).
    with words.services_of(result):
        groups = [
            "all referrals"
            if row["variable"] == ALL
            else f"{words.column_label(row['variable'])}: {words.level_label(row['variable'], row['level'])}"
            for row in result["rates"]
        ]
    group_width = max([30, *map(len, groups)])
    lines.append(
        f"  {'group':<{group_width}} {'referrals':>10} {'with need' if need else 'population':>12}   "
        f"{rate + ' (95% CI)':<{width}} crude rate ratio (95% CI)"
    )
    for row, group in zip(result["rates"], groups):
        count = "*" if row["referrals"] is None else f"{row['referrals']:,}"
        shown = "*" if row["rate"] is None else f"{row['rate']:.1f} ({row['rate_low']:.1f}-{row['rate_high']:.1f})"
        ratio = ""
        if row.get("rate_ratio") is not None:
            ratio = (
                "1 (reference)"
                if row["rate_ratio_low"] is None
                else f"{row['rate_ratio']:.3f} ({row['rate_ratio_low']:.3f}-{row['rate_ratio_high']:.3f})"
            )
        lines.append(f"  {group:<{group_width}} {count:>10} {row['population']:>12,.0f}   {shown:<{width}} {ratio}")
    p = result["lr_p_value"]
    lines.append(
        f"  adjusted: {result['formula']}; likelihood ratio vs no groups {result['lr_statistic']:.1f} "
        f"on {result['lr_df']} df" + (f", {p_phrase(p)}" if p is not None else "")
    )
    # Terms as the report's terms table and the GLM output name them (`area: barnet`).
    names = [term_text(t["term"], result) for t in result["terms"]]
    term_width = max([34, *map(len, names)])
    lines.append(
        f"  {'term':<{term_width}} {'estimate':>10} {'std err':>9} {'z':>8} {'p':>9}   {'rate ratio (95% CI)':>26}"
    )
    for t, name in zip(result["terms"], names):
        row = (
            f"  {name:<{term_width}} {t['estimate']:>10.4f} {t['std_error']:>9.4f} {t['statistic']:>8.2f} "
            f"{p_value(t['p_value']):>9}   {t['ratio']:>8.3f} ({t['ratio_low']:.3f}-{t['ratio_high']:.3f})"
        )
        if t["term"] == result.get("exposure"):
            row += "  <- exposure"
        lines.append(row)
    suppressed = sum(1 for r in result["rates"] + result["area_rates"] if r["referrals"] is None)
    if suppressed:
        lines.append(
            f"  * suppressed under the small-number rules ({suppressed} counts, "
            f"{result['suppression']['secondary']} of them to protect others)"
        )
    return "\n".join(lines)

"""One section of the report per study, built from its results.json alone: a figure with a
plain-English caption, the numbers behind it as tables, and where they came from.

Each table cell keeps the raw value from results.json beside the text the page shows, so
the CSV and XLSX files carry full precision and a test can check the page against results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from . import figures
from . import words as w


@dataclass
class Cell:
    value: object  # the raw value (a number, a string or None), as in results.json
    text: str  # what the page shows

    @property
    def numeric(self) -> bool:
        if isinstance(self.value, list):  # an interval [low, high]
            return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.value)
        return isinstance(self.value, (int, float)) and not isinstance(self.value, bool)


@dataclass
class Table:
    name: str  # unique in the report: the CSV file's stem and (shortened) the sheet's name
    title: str
    header: list[str]
    rows: list[list[Cell]]
    note: str = ""


@dataclass
class Section:
    id: str
    title: str
    kind: str
    summary: list[str] = field(default_factory=list)
    figures: list[figures.Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    provenance: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def c(value, text: str | None = None) -> Cell:
    if text is None:
        text = w.MISSING if value is None else str(value)
    return Cell(value, text)


def num(value, decimals=2) -> Cell:
    return Cell(value, w.number(value, decimals))


def cnt(value) -> Cell:
    return Cell(value, w.count(value))


def pval(value) -> Cell:
    return Cell(value, w.p_value(value))


def pct(value) -> Cell:
    return Cell(value, w.percent(value))


def outcome_of(result: dict) -> str:
    formula = result.get("formula") or ""
    return w.column_label(formula.split("~")[0].strip()) if "~" in formula else "the outcome"


def ratio_word(result: dict) -> str:
    return result.get("ratio_name") or "ratio"


# --- provenance -------------------------------------------------------------------------


def provenance(result: dict) -> list[tuple[str, str]]:
    software = result.get("software") or {}
    items = [
        ("study", result.get("study", "")),
        ("study hash", result.get("study_hash", "")),
        ("engine", result.get("engine", "")),
        ("software", ", ".join(f"{k} {v}" for k, v in software.items())),
        ("run at", result.get("created_at", "")),
    ]
    if result.get("where"):
        items.append(("cohort", result["where"]))
    return [(k, str(v)) for k, v in items if v]


def nodes_table(result: dict, name: str) -> Table | None:
    nodes = result.get("nodes") or []
    if not nodes:
        return None
    rows = []
    for node in nodes:
        contributed = bool(node.get("contributed"))
        rows.append(
            [
                c(node.get("name"), w.service_name(node.get("name", ""))),
                c("yes" if contributed else "no"),
                c(node.get("data_version"), (node.get("data_version") or w.MISSING)[:12]),
                _audit_head(node.get("audit_head")),
                c(node.get("reason"), node.get("reason") or ""),
            ]
        )
    return Table(
        f"{name}-nodes",
        "Services asked: who contributed, on which data version, and why any did not",
        ["service", "contributed", "data version", "audit log entry", "reason not contributed"],
        rows,
        note=(
            "The audit log entry is the node's record of this study (its sequence number and hash): "
            "`iaptnet node audit --verify --against results.json` at the Trust checks its log still holds it."
        ),
    )


def _audit_head(head) -> Cell:
    if not isinstance(head, dict) or head.get("hash") is None:
        return Cell(None, w.MISSING)
    return Cell(f"{head.get('seq')}:{head['hash']}", f"#{head.get('seq')} {str(head['hash'])[:12]}")


# --- findings ---------------------------------------------------------------------------


def findings_section(rows: list[dict], results: list[dict], *, secondary: bool) -> Section:
    by_finding = {(r.get("reference") or {}).get("finding"): r for r in results}
    sid = "secondary" if secondary else "findings"
    if secondary:
        title = "Secondary findings beside the published estimates"
    else:
        title = ("The six findings" if len(rows) == 6 else "Findings") + " beside the published estimates"
    forest_rows, table_rows = [], []
    for row in rows:
        result = by_finding.get(row["finding"], {})
        label = result.get("title") or row["finding"]
        forest_rows.append(
            {
                "label": _short(label),
                "ratio": row["ratio"],
                "low": row["ratio_low"],
                "high": row["ratio_high"],
                "paper": row["paper_ratio"],
                "paper_low": row["paper_low"],
                "paper_high": row["paper_high"],
            }
        )
        inside = row["paper_low"] <= row["ratio"] <= row["paper_high"] if row["paper_low"] is not None else None
        table_rows.append(
            [
                c(row["finding"], label),
                c(row["term"], w.term_label(row["term"])),
                num(row["ratio"]),
                c([row["ratio_low"], row["ratio_high"]], w.interval(row["ratio_low"], row["ratio_high"])),
                num(row["paper_ratio"]),
                c([row["paper_low"], row["paper_high"]], w.interval(row["paper_low"], row["paper_high"])),
                cnt(result.get("n")),
                c(inside, w.MISSING if inside is None else ("yes" if inside else "no")),
            ]
        )
    figure = figures.forest(
        f"{sid}-forest",
        forest_rows,
        xlabel="odds ratio (log scale)",
        caption=(
            "Each finding's odds ratio with its 95% confidence interval: iaptnet's federated estimate "
            "(filled squares) beside the one the source study published (hollow circles). A ratio above 1 "
            "means higher odds of the outcome; the dashed line marks no difference."
        ),
        published=True,
    )
    table = Table(
        sid,
        title,
        ["finding", "term", "OR", "95% CI", "published OR", "published 95% CI", "referrals", "published OR inside CI"],
        table_rows,
    )
    summary = [
        f"{sum(1 for r in table_rows if r[-1].value)} of {len(table_rows)} published odds ratios lie inside "
        "iaptnet's 95% confidence interval."
    ]
    return Section(sid, title, "findings", summary=summary, figures=[figure], tables=[table])


def _short(text: str, limit: int = 48) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


# --- glm --------------------------------------------------------------------------------


def terms_table(name: str, title: str, terms: list[dict], ratio_name: str | None, exposure: str | None) -> Table:
    # CR2 terms are t statistics on their own Satterthwaite degrees of freedom.
    with_df = any(t.get("df") is not None for t in terms)
    header = ["term", "estimate", "std. error", *(["t", "df"] if with_df else ["z"]), "p"]
    if ratio_name:
        header += [ratio_name, "95% CI"]
    rows = []
    for t in terms:
        label = w.term_label(t["term"]) + ("  (exposure)" if t["term"] == exposure else "")
        row = [
            c(t["term"], label),
            num(t["estimate"], 4),
            num(t["std_error"], 4),
            num(t["statistic"], 2),
            *([num(t.get("df"), 1)] if with_df else []),
            pval(t["p_value"]),
        ]
        if ratio_name:
            row += [
                num(t.get("ratio"), 3),
                c([t.get("ratio_low"), t.get("ratio_high")], w.interval(t.get("ratio_low"), t.get("ratio_high"), 3)),
            ]
        rows.append(row)
    return Table(name, title, header, rows)


def _forest_rows(terms: list[dict], *, skip=("Intercept",), skip_prefix=("service_id",)) -> list[dict]:
    rows = []
    for t in terms:
        if t["term"] in skip or t["term"].startswith(skip_prefix) or t.get("ratio") is None:
            continue
        rows.append(
            {"label": w.term_label(t["term"]), "ratio": t["ratio"], "low": t["ratio_low"], "high": t["ratio_high"]}
        )
    return rows


def _random_intercept(result: dict) -> str:
    """A random-intercept model's variance between groups, in a sentence."""
    group, *rest = result["variance_components"]
    if result["family"] == "gaussian":
        how = "restricted maximum likelihood (REML)" if result.get("reml") else "maximum likelihood"
    else:
        nagq = result.get("nagq", 1)
        how = "the Laplace approximation" if nagq == 1 else f"adaptive Gauss-Hermite quadrature with {nagq} points"
    text = (
        f"With an intercept for each of the {w.count(result.get('n_groups'))} groups of "
        f"{w.column_label(group['group'])}, fitted by {how} as lme4 does: the variance between groups is "
        f"{w.significant(group['variance'])} (standard deviation {w.significant(group['std_dev'])})"
    )
    if rest:
        text += f", the residual variance {w.significant(rest[0]['variance'])}"
    return text + "."


def glm_section(result: dict) -> Section:
    name = result["study"]
    ratio = result.get("ratio_name")
    section = Section(name, result.get("title") or name, "glm", provenance=provenance(result))
    cov = {
        "nonrobust": "model-based",
        "HC0": "robust (HC0)",
        "cluster": "cluster-robust",
        "CR2": "small-sample cluster-robust (CR2)",
    }.get(result.get("cov_type"), result.get("cov_type"))
    section.summary.append(
        f"A {result['family']} regression of {outcome_of(result)} on {w.count(result['n'])} referrals "
        f"({w.count(result.get('n_missing'))} left out for a missing value), fitted in "
        f"{result.get('iterations')} Newton rounds with {cov} standard errors: formula `{result['formula']}`."
    )
    if result.get("variance_components"):
        section.summary.append(_random_intercept(result))
    term = result.get("exposure_term")
    if term and ratio:
        section.summary.append(
            f"Exposure {w.term_label(term['term'])}: {ratio} "
            f"{w.ratio_with_ci(term['ratio'], term['ratio_low'], term['ratio_high'])}, {w.p_phrase(term['p_value'])}."
        )
    rows = _forest_rows(result["terms"])
    if ratio and rows:
        section.figures.append(
            figures.forest(
                f"{name}-forest",
                rows,
                xlabel=f"{ratio} (log scale)",
                caption=(
                    f"The {ratio}s of {outcome_of(result)} for every term of the model (the services' own "
                    "intercepts left out), with 95% confidence intervals; the dashed line marks no difference."
                ),
            )
        )
    section.tables.append(terms_table(f"{name}-terms", "Model terms", result["terms"], ratio, result.get("exposure")))
    if result.get("theta") is not None:
        section.summary.append(
            f"Over-dispersion: theta {w.number(result['theta'], 3)} (standard error "
            f"{w.number(result.get('theta_std_error'), 3)}); alpha = 1/theta {w.number(result.get('alpha'), 4)}."
        )
    if result.get("marginal"):
        section.tables.append(marginal_table(f"{name}-marginal", result["marginal"]))
    if result.get("sensitivity") and term:
        section.tables.append(
            Table(
                f"{name}-sensitivity",
                "The exposure's estimate with the services handled three ways",
                SENSITIVITY_HEADER,
                sensitivity_rows(result),
            )
        )
    for d in result.get("dropped_terms") or []:
        section.notes.append(f"Term {w.term_label(d['term'])} was left out: {d['reason']}.")
    nodes = nodes_table(result, name)
    if nodes:
        section.tables.append(nodes)
    return section


# --- sensitivity analyses (protocol/sensitivity.py) ---------------------------------------

#: How each analysis handles the services, in words.
SENSITIVITY_WAYS = {
    "main": "services as fixed effects (the main estimate)",
    "cr2": "services as clusters: small-sample cluster-robust standard errors (CR2)",
    "random_intercept": "services as a random intercept",
}
SENSITIVITY_HEADER = ["finding", "analysis", "ratio", "95% CI", "df", "p", "referrals", "what else it estimates"]


def _sensitivity_terms(result: dict) -> list[tuple[str, dict, dict]]:
    """(analysis, exposure term, entry) for the main estimate and each companion model."""
    out = [("main", result["exposure_term"], {"n": result.get("n")})]
    for entry in result.get("sensitivity") or []:
        if entry["analysis"] in SENSITIVITY_WAYS and entry.get("term"):
            out.append((entry["analysis"], entry["term"], entry))
    return out


def _sensitivity_note(analysis: str, entry: dict) -> str:
    if analysis == "cr2":
        return f"{w.count(entry.get('n_clusters'))} clusters of {w.column_label(entry.get('cluster') or '')}"
    if analysis == "random_intercept":
        vc = (entry.get("variance_components") or [{}])[0]
        return f"between-service standard deviation {w.significant(vc.get('std_dev'))} (log-odds scale)"
    return ""


def sensitivity_rows(result: dict) -> list[list[Cell]]:
    finding = (result.get("reference") or {}).get("finding") or result["study"]
    label = result.get("title") or finding
    rows = []
    for analysis, t, entry in _sensitivity_terms(result):
        rows.append(
            [
                c(finding, label),
                c(analysis, SENSITIVITY_WAYS[analysis]),
                num(t.get("ratio"), 3),
                c([t.get("ratio_low"), t.get("ratio_high")], w.interval(t.get("ratio_low"), t.get("ratio_high"), 3)),
                num(t.get("df"), 1),
                pval(t.get("p_value")),
                cnt(entry.get("n")),
                c(_sensitivity_note(analysis, entry)),
            ]
        )
    return rows


def sensitivity_section(results: list[dict]) -> Section | None:
    """The findings' sensitivity analyses together: each exposure's ratio with the services as
    fixed effects, as clusters (CR2) and as a random intercept, and its risk difference."""
    chosen = [r for r in results if r.get("sensitivity") and r.get("exposure_term")]
    if not chosen:
        return None
    title = "Sensitivity analyses of the findings"
    section = Section("sensitivity", title, "findings")
    section.summary.append(
        "Each finding's model adjusts for the service with a fixed effect per service. With eight services a "
        "reviewer asks whether the interval is honest when the referrals of one service are alike: the same "
        "model fitted with the services as clusters (the CR2 small-sample cluster-robust standard errors with "
        "Satterthwaite degrees of freedom, as the R package clubSandwich computes them) and with a random "
        "intercept per service (as lme4's glmer). Both replace the services' fixed effects, so their estimates "
        "differ a little from the main one."
    )
    forest_rows, table_rows, risk_rows = [], [], []
    short = {"main": "fixed", "cr2": "CR2", "random_intercept": "random"}
    for result in chosen:
        finding = (result.get("reference") or {}).get("finding") or result["study"]
        for analysis, t, _ in _sensitivity_terms(result):
            forest_rows.append(
                {
                    "label": f"{_short(finding, 30)}: {short[analysis]}",
                    "ratio": t.get("ratio"),
                    "low": t.get("ratio_low"),
                    "high": t.get("ratio_high"),
                }
            )
        table_rows += sensitivity_rows(result)
        risk_rows += [e["term"] for e in result["sensitivity"] if e["analysis"] == "marginal"]
    section.figures.append(
        figures.forest(
            "sensitivity-forest",
            forest_rows,
            xlabel="odds ratio (log scale)",
            caption=(
                "Each finding's odds ratio with its 95% confidence interval, with the services as fixed effects "
                "(the main estimate), as clusters with small-sample cluster-robust intervals (CR2) and as a random "
                "intercept; the dashed line marks no difference."
            ),
        )
    )
    section.tables.append(
        Table("sensitivity", "The findings with the services handled three ways", SENSITIVITY_HEADER, table_rows)
    )
    if risk_rows:
        section.summary.append(
            "The risk difference: the share with the outcome if everyone were exposed minus the share if no one "
            "were (for a count or a grouping, if everyone had the first value compared minus if everyone had the "
            "second), standardised over the finding's referrals (g-computation), on the scale a commissioner reads."
        )
        section.tables.append(marginal_table("sensitivity-risk-difference", risk_rows))
    return section


def marginal_label(m: dict) -> str:
    """A `marginal` row's exposure in words: a binary term's label, or a contrast's column
    with its two values (`imd quintile: 5 (least deprived) vs 1 (most deprived)`)."""
    if not m.get("compare") or not m.get("exposure"):
        return w.term_label(m["term"])
    column = m["exposure"]
    first, second = (w.level_label(column, v) if isinstance(v, str) else f"{v:g}" for v in m["compare"])
    return f"{w.column_label(column)}: {first} vs {second}"


def marginal_table(name: str, rows: list[dict]) -> Table:
    """Standardised risks with the exposure set to 1 and to 0 for everyone (a contrast: to its
    first and to its second value), their difference and ratio: the scale a commissioner reads."""
    out = []
    for m in rows:
        out.append(
            [
                c(m["term"], marginal_label(m)),
                Cell(m.get("risk_exposed"), w.share(m.get("risk_exposed"))),
                Cell(m.get("risk_unexposed"), w.share(m.get("risk_unexposed"))),
                Cell(m.get("risk_difference"), w.share(m.get("risk_difference"))),
                c(
                    [m.get("rd_low"), m.get("rd_high")],
                    f"{w.share(m.get('rd_low'))} to {w.share(m.get('rd_high'))}",
                ),
                num(m.get("risk_ratio"), 3),
                c([m.get("rr_low"), m.get("rr_high")], w.interval(m.get("rr_low"), m.get("rr_high"), 3)),
            ]
        )
    return Table(
        name,
        "Standardised risks (everyone exposed, everyone unexposed; for a contrast, everyone at the first value "
        "and everyone at the second), their difference and ratio",
        [
            "exposure",
            "risk if exposed",
            "risk if unexposed",
            "risk difference",
            "95% CI",
            "risk ratio",
            "95% CI (ratio)",
        ],
        out,
    )


# --- table (Table 1 and funnels) --------------------------------------------------------


def _count_cell(cell: dict, percent_key: str = "percent") -> Cell:
    if cell.get("suppressed"):
        return Cell(None, "suppressed")
    return Cell(cell.get("count"), w.count_with_percent(cell.get("count"), cell.get(percent_key)))


def table_section(result: dict) -> Section:
    name = result["study"]
    section = Section(name, result.get("title") or name, "table", provenance=provenance(result))
    labels = w.table_column_labels(result)
    header = ["", *labels]
    sizes = [_count_cell(g, "none") for g in result.get("group_sizes") or []]
    rows = [[c("n", "referrals"), *sizes]] if sizes else []
    for table in result.get("tables") or []:
        variable = table["variable"]
        rows.append([c(variable, table.get("label") or w.column_label(variable)), *[c(None, "") for _ in labels]])
        if table.get("summary"):
            rows.append([c(f"{variable} mean (SD)", "  mean (SD)"), *[_mean_sd(s) for s in table["summary"]]])
            rows.append([c(f"{variable} median [IQR]", "  median [IQR]"), *[_median_iqr(s) for s in table["summary"]]])
            missing = next((r for r in table["rows"] if r["row"] == "missing"), None)
            if missing:
                rows.append([c(f"{variable} missing", "  missing"), *[_count_cell(x) for x in missing["cells"]]])
        else:
            for row in table["rows"]:
                level = row["row"]
                shown = w.table_row_label(table, level)
                rows.append([c(f"{variable}={level}", f"  {shown}"), *[_count_cell(x) for x in row["cells"]]])
    if rows:
        section.tables.append(Table(f"{name}-table", section.title, header, rows, note=result.get("disclosure") or ""))
    funnel = result.get("funnel")
    if funnel:
        steps = funnel["steps"]
        overall = [s["cells"][0] for s in steps]
        section.figures.append(
            figures.horizontal_bars(
                f"{name}-funnel",
                [s["label"] for s in steps],
                [None if x.get("suppressed") else x.get("count") for x in overall],
                xlabel="referrals",
                caption=(
                    "The patient funnel: how many referrals reach each step, from referral to the analysed "
                    "cohort (all services together; counts rounded to the nearest 5 by each service)."
                ),
            )
        )
        frows = []
        for s in steps:
            frows.append([c(s["label"]), *[_count_cell(x, "percent_of_previous") for x in s["cells"]]])
        section.tables.append(
            Table(
                f"{name}-funnel",
                "Funnel (percentages: of the step before)",
                ["step", *labels],
                frows,
                note=result.get("disclosure") or "",
            )
        )
    withheld = sorted(
        {
            rule
            for t in result.get("tables") or []
            for s in t.get("summary") or []
            for rule in s.get("withheld_by") or []
        }
    )
    if withheld:
        section.notes.append(
            "Rules of the services' policies that withheld a statistic here: " + ", ".join(withheld) + "."
        )
    suppressed = sum(
        1 for t in result.get("tables") or [] for r in t["rows"] for x in r["cells"] if x.get("suppressed")
    )
    if suppressed:
        section.notes.append(f"{suppressed} cells are suppressed under the small-number rules (shown as 'suppressed').")
    nodes = nodes_table(result, name)
    if nodes:
        section.tables.append(nodes)
    return section


def _mean_sd(s: dict) -> Cell:
    if s.get("suppressed") or s.get("mean") is None:
        return Cell(None, "suppressed" if s.get("suppressed") else w.MISSING)
    return Cell(s["mean"], w.mean_sd(s))


def _median_iqr(s: dict) -> Cell:
    text = None if s.get("suppressed") else w.median_iqr(s)
    if text is None:
        return Cell(None, w.MISSING)
    median = next(x for x in s["quantiles"] if round(x["p"], 4) == 0.5)
    return Cell(median.get("value"), text)


# --- psm / iptw -------------------------------------------------------------------------


def propensity_section(result: dict) -> Section:
    name = result["study"]
    kind = result["kind"]
    section = Section(name, result.get("title") or name, kind, provenance=provenance(result))
    term = result["exposure_term"]
    how = "matching on the propensity score" if kind == "psm" else "inverse probability of treatment weighting"
    section.summary.append(
        f"The effect of {w.term_label(term['term'])} on {w.column_label(result.get('outcome', ''))} after {how}: "
        f"{ratio_word(result)} {w.ratio_with_ci(term['ratio'], term['ratio_low'], term['ratio_high'])}, "
        f"{w.p_phrase(term['p_value'])}, on {w.count(result.get('n'))} referrals."
    )
    summary = result.get("balance_summary") or {}
    threshold = summary.get("threshold", 0.1)
    balance = result.get("balance") or []
    love_rows = [
        {
            "label": w.term_label(b["term"]) if b["term"] != "ps_logit" else "propensity score (logit)",
            "before": b.get("smd_before"),
            "after": b.get("smd_after"),
        }
        for b in balance
    ]
    if love_rows:
        section.figures.append(
            figures.love_plot(
                f"{name}-love",
                love_rows,
                threshold=threshold,
                caption=(
                    "Balance of every covariate between the exposed and the comparison group, as the absolute "
                    f"standardised mean difference (SMD) before (hollow) and after (filled) {how}; the dashed line "
                    f"marks {threshold:g}, below which a covariate is usually taken as balanced."
                ),
            )
        )
    section.tables.append(
        Table(
            f"{name}-effect",
            "Effect of the exposure",
            ["term", ratio_word(result), "95% CI", "p", "std. error (log scale)"],
            [
                [
                    c(term["term"], w.term_label(term["term"])),
                    num(term["ratio"], 3),
                    c([term["ratio_low"], term["ratio_high"]], w.interval(term["ratio_low"], term["ratio_high"], 3)),
                    pval(term["p_value"]),
                    num(term["std_error"], 4),
                ]
            ],
        )
    )
    section.tables.append(
        Table(
            f"{name}-balance",
            "Standardised mean differences before and after",
            ["term", "SMD before", "SMD after"],
            [
                [c(b["term"], r["label"]), num(b.get("smd_before"), 3), num(b.get("smd_after"), 3)]
                for b, r in zip(balance, love_rows)
            ],
        )
    )
    if summary:
        section.summary.append(
            f"Largest absolute SMD {w.number(summary.get('max_abs_smd_before'), 3)} before and "
            f"{w.number(summary.get('max_abs_smd_after'), 3)} after"
            + (
                "; every covariate is balanced."
                if summary.get("balanced")
                else "; still above the threshold: "
                + ", ".join(w.term_label(t) for t in summary.get("imbalanced_terms") or [])
                + "."
            )
        )
    matching = result.get("matching")
    if matching:
        section.summary.append(
            f"{w.count(matching.get('pairs'))} matched pairs from {w.count(matching.get('exposed'))} exposed and "
            f"{w.count(matching.get('controls'))} comparison referrals ({w.count(matching.get('exposed_unmatched'))} "
            "exposed left unmatched); matched within each service."
        )
    weighting = result.get("weighting")
    if weighting:
        section.summary.append(
            f"Estimand {weighting.get('estimand')}; effective sample sizes {w.number((weighting.get('exposed') or {}).get('effective_n'), 0)} "
            f"exposed and {w.number((weighting.get('control') or {}).get('effective_n'), 0)} comparison."
        )
    nodes = nodes_table(result, name)
    if nodes:
        section.tables.append(nodes)
    return section


# --- access -----------------------------------------------------------------------------


def access_section(result: dict) -> Section:
    name = result["study"]
    section = Section(name, result.get("title") or name, "access", provenance=provenance(result))
    per = result.get("per") or 100_000
    period = result.get("period") or {}
    section.summary.append(
        f"Referrals per {per:,} people a year, {period.get('first')} to {period.get('last')}, against the "
        f"population ({(result.get('population') or {}).get('source', '')}); {w.count(result.get('n'))} referrals counted."
    )
    rows = []
    table_rows = []
    for r in result.get("rates") or []:
        label = (
            "all referrals"
            if r["variable"] == "all"
            else f"{w.column_label(r['variable'])}: {w.level_label(r['variable'], r['level'])}"
        )
        rows.append({"label": label, "rate": r.get("rate"), "low": r.get("rate_low"), "high": r.get("rate_high")})
        table_rows.append(
            [
                c(r["variable"], w.column_label(r["variable"])),
                c(r["level"], w.level_label(r["variable"], r["level"])),
                cnt(r.get("referrals")) if not r.get("suppressed") else c(None, "suppressed"),
                cnt(r.get("population")),
                num(r.get("rate"), 1),
                c([r.get("rate_low"), r.get("rate_high")], w.interval(r.get("rate_low"), r.get("rate_high"), 1)),
                num(r.get("rate_ratio"), 3),
                c(
                    [r.get("rate_ratio_low"), r.get("rate_ratio_high")],
                    "reference"
                    if r.get("rate_ratio") == 1.0 and r.get("rate_ratio_low") is None
                    else w.interval(r.get("rate_ratio_low"), r.get("rate_ratio_high"), 3),
                ),
            ]
        )
    if rows:
        section.figures.append(
            figures.rates(
                f"{name}-rates",
                rows,
                xlabel=f"referrals per {per:,} people a year",
                caption=(
                    f"Referral rates per {per:,} people a year by group, with 95% confidence intervals: how often "
                    "people of each group are referred, against the number of such people living in the services' areas."
                ),
            )
        )
    section.tables.append(
        Table(
            f"{name}-rates",
            "Rates by group and crude rate ratios",
            [
                "variable",
                "group",
                "referrals",
                "population",
                f"rate per {per:,}/yr",
                "95% CI",
                "crude rate ratio",
                "95% CI (ratio)",
            ],
            table_rows,
        )
    )
    for model in result.get("models") or []:
        section.tables.append(
            terms_table(
                f"{name}-{model['name']}",
                f"Model '{model['name']}': {model['formula']}",
                model["terms"],
                result.get("ratio_name"),
                result.get("exposure"),
            )
        )
    suppression = result.get("suppression") or {}
    if suppression:
        section.notes.append(
            f"Small numbers: {suppression.get('network_rule')}; node counts {suppression.get('node_counts')}; "
            f"{suppression.get('secondary', 0)} further cells hidden so that a suppressed one cannot be worked out."
        )
    nodes = nodes_table(result, name)
    if nodes:
        section.tables.append(nodes)
    return section


# --- meta -------------------------------------------------------------------------------


def meta_section(result: dict) -> Section:
    name = result["study"]
    ratio = ratio_word(result)
    section = Section(name, result.get("title") or name, "meta", provenance=provenance(result))
    rows, table_rows = [], []
    for node in result.get("per_node") or []:
        label = w.service_name(node["node"])
        rows.append(
            {"label": label, "ratio": node.get("ratio"), "low": node.get("ratio_low"), "high": node.get("ratio_high")}
        )
        table_rows.append(
            [
                c(node["node"], label),
                num(node.get("ratio"), 3),
                c(
                    [node.get("ratio_low"), node.get("ratio_high")],
                    w.interval(node.get("ratio_low"), node.get("ratio_high"), 3),
                ),
                pct(100 * (node.get("weights") or {}).get("random_reml", math.nan)),
            ]
        )
    pooled = [
        ("fixed", "pooled, fixed effect"),
        ("random_dl", "pooled, random effects (DerSimonian-Laird)"),
        ("random_reml", "pooled, random effects (REML)"),
    ]
    for key, label in pooled:
        entry = result.get(key)
        if not entry:
            continue
        rows.append(
            {
                "label": label,
                "ratio": entry.get("ratio"),
                "low": entry.get("ratio_low"),
                "high": entry.get("ratio_high"),
                "pooled": True,
            }
        )
        table_rows.append(
            [
                c(key, label),
                num(entry.get("ratio"), 3),
                c(
                    [entry.get("ratio_low"), entry.get("ratio_high")],
                    w.interval(entry.get("ratio_low"), entry.get("ratio_high"), 3),
                ),
                c(None, ""),
            ]
        )
    reml = result.get("random_reml") or {}
    if reml.get("ci") == "hksj":
        section.summary.append(
            f"The REML interval is the Hartung-Knapp-Sidik-Jonkman (HKSJ) one, on a t distribution with "
            f"{reml.get('df')} degrees of freedom."
        )
    ci = result.get("tau2_ci")
    if ci:
        lo, hi = ci.get("lower_sign") or "", ci.get("upper_sign") or ""
        section.summary.append(
            f"95% confidence interval (Q-profile) for tau² {lo}{w.significant(ci.get('tau2_low'))} to "
            f"{hi}{w.significant(ci.get('tau2_high'))}, for I² {lo}{w.share(ci.get('I2_low'))} to {hi}{w.share(ci.get('I2_high'))}."
        )
    section.summary.append(
        f"Each service's own estimate of {w.term_label(result.get('exposure') or '')} and their combination "
        f"across {result.get('k')} services. Heterogeneity: I² {w.share(reml.get('I2'))}, tau² "
        f"{w.significant(reml.get('tau2'))} (REML); Cochran's Q {w.number(reml.get('Q'), 1)} on {reml.get('Q_df')} "
        f"degrees of freedom, {w.p_phrase(reml.get('Q_p_value'))}."
    )
    section.figures.append(
        figures.forest(
            f"{name}-forest",
            rows,
            xlabel=f"{ratio} (log scale)",
            caption=(
                f"Each service's {ratio} with its 95% confidence interval, and the pooled estimates below them. "
                "I² is the share of the variation between services beyond chance; tau² is the between-service variance."
            ),
        )
    )
    section.tables.append(
        Table(
            f"{name}-services",
            "Per-service and pooled estimates",
            ["service", ratio, "95% CI", "weight (REML)"],
            table_rows,
        )
    )
    nodes = nodes_table(result, name)
    if nodes:
        section.tables.append(nodes)
    return section


# --- its --------------------------------------------------------------------------------


def its_section(result: dict, time_max: float | None) -> Section:
    name = result["study"]
    section = Section(name, result.get("title") or name, "its", provenance=provenance(result))
    by_group = {s["group"]: s for s in result.get("segments") or []}
    denominator = " + ".join(w.column_label(d) for d in result.get("denominator") or [])
    ylabel = f"{w.column_label(result.get('outcome', ''))} per {denominator}"
    changes = [ch["change_time"] for ch in result.get("changes") or []]
    end = time_max if time_max is not None else (max(changes) + 24 if changes else 24)
    panels, table_rows = [], []
    for entry in result.get("per_service") or []:
        segment = by_group.get(entry["group"], {})
        label = _group_name(result, segment, entry["group"])
        change = entry["change_time"]
        row = [c(entry["group"], label), c(entry.get("change_date"))]
        if entry.get("fitted"):
            coef = {t["term"]: t["estimate"] for t in entry["terms"]}
            months = list(range(0, int(end) + 1))
            fitted = [
                math.exp(
                    coef.get("Intercept", 0.0)
                    + coef.get(result["time"], 0.0) * m
                    + (
                        coef.get("after_change", 0.0) + coef.get("time_after_change", 0.0) * (m - change)
                        if m >= change
                        else 0.0
                    )
                )
                for m in months
            ]
            observed = [(m["time"], m["rate"]) for m in segment.get("months") or [] if m.get("rate") is not None]
            panels.append({"label": label, "months": months, "fitted": fitted, "change": change, "observed": observed})
            level, slope = entry.get("level_change") or {}, entry.get("slope_change") or {}
            row += [
                num(level.get("ratio"), 3),
                c(
                    [level.get("ratio_low"), level.get("ratio_high")],
                    w.interval(level.get("ratio_low"), level.get("ratio_high"), 3),
                ),
                num(slope.get("ratio_per_12"), 3),
                c("fitted"),
            ]
        else:
            row += [c(None), c(None), c(None), c(entry.get("reason"), f"not fitted: {entry.get('reason')}")]
        table_rows.append(row)
    pooled_level, pooled_slope = result.get("level_change") or {}, result.get("slope_change") or {}
    table_rows.append(
        [
            c("pooled", "all services (pooled model)"),
            c(None, ""),
            num(pooled_level.get("ratio"), 3),
            c(
                [pooled_level.get("ratio_low"), pooled_level.get("ratio_high")],
                w.interval(pooled_level.get("ratio_low"), pooled_level.get("ratio_high"), 3),
            ),
            num(pooled_slope.get("ratio_per_12"), 3),
            c("fitted"),
        ]
    )
    section.summary.append(
        f"Each service's series of {ylabel} around its own change date, fitted as a segmented Poisson regression "
        f"with robust standard errors. Pooled: the level changes by a rate ratio of "
        f"{w.ratio_with_ci(pooled_level.get('ratio'), pooled_level.get('ratio_low'), pooled_level.get('ratio_high'), 3)} "
        f"at the change, {w.p_phrase(pooled_level.get('p_value'))}."
    )
    if panels:
        section.figures.append(
            figures.its_panels(
                f"{name}-series",
                panels,
                ylabel=ylabel,
                caption=(
                    "Each service's observed rate month by month (grey points), the segmented regression's fitted "
                    "rate (line) and the month of its change (dashed line). A month whose counts are suppressed "
                    "under the small-number rules has no point."
                ),
            )
        )
    section.tables.append(
        Table(
            f"{name}-changes",
            "Change at each service",
            [
                "service",
                "change",
                "level change (rate ratio)",
                "95% CI",
                "slope change per 12 months (rate ratio)",
                "status",
            ],
            table_rows,
        )
    )
    nodes = nodes_table(result, name)
    if nodes:
        section.tables.append(nodes)
    return section


def _group_name(result: dict, segment: dict, group: str) -> str:
    """A group named by its service: the node that holds all its referrals."""
    holders = segment.get("nodes") or []
    if len(holders) == 1:
        return w.service_name(holders[0])
    return f"{w.column_label(result.get('group', 'group'))} {group}"


BUILDERS = {
    "glm": glm_section,
    "table": table_section,
    "psm": propensity_section,
    "iptw": propensity_section,
    "access": access_section,
    "meta": meta_section,
}

"""The terminal says what the report says: codes as the schema's words (report/words.py),
services by their nodes, and one percentage format, while results.json (and `--json`) keep
the codes a program reads."""

from __future__ import annotations

import copy
import json
import re

import pytest

from iaptnet.coordinator.describe import render as render_table
from iaptnet.coordinator.results import render_report
from iaptnet.report import words

CODED_TERM = re.compile(r"\[T\.[^\]]*\]")
PERCENT = re.compile(r"\(([^()]*%)\)")


def _term(name, estimate=0.1):
    return {
        "term": name,
        "estimate": estimate,
        "std_error": 0.05,
        "statistic": estimate / 0.05,
        "df": 6.5,
        "p_value": 0.04,
        "conf_low": estimate - 0.1,
        "conf_high": estimate + 0.1,
        "ratio": 1.1,
        "ratio_low": 1.0,
        "ratio_high": 1.2,
    }


def glm_result() -> dict:
    terms = [
        "Intercept",
        "employment[T.02]",
        "imd_quintile[T.5]",
        "problem[T.gad]",
        "C(referral_source_group)[T.self]",
        "older_adult:sex[T.male]",
        "service_id[T.ZN2]",
        "n_treat",
    ]
    return {
        "study": "coded",
        "title": "Coded levels",
        "study_hash": "ab" * 32,
        "kind": "glm",
        "family": "binomial",
        "link": "logit",
        "ratio_name": "odds ratio",
        "exposure": "employment[T.02]",
        "n": 1000,
        "n_missing": 10,
        "n_cohort": 1010,
        "deviance": 1.0,
        "null_deviance": 2.0,
        "aic": 3.0,
        "iterations": 4,
        "cov_type": "CR2",
        "cluster": "service_id",
        "n_clusters": 8,
        "service_column": "service_id",
        "services": {"ZN1": "camden_islington", "ZN2": "barnet"},
        "nodes": [{"name": "barnet", "contributed": True}, {"name": "camden_islington", "contributed": True}],
        "terms": [_term(t) for t in terms],
        "dropped_terms": [{"term": "employment[T.07]", "reason": "no rows at any node"}],
        "marginal": [
            {
                "term": "imd_quintile[T.5]",
                "risk_exposed": 0.5,
                "risk_unexposed": 0.4,
                "risk_difference": 0.1,
                "rd_low": 0.05,
                "rd_high": 0.15,
                "risk_ratio": 1.25,
                "rr_low": 1.1,
                "rr_high": 1.4,
            }
        ],
    }


def _cell(count, percent):
    return {"count": count, "suppressed": count is None, "percent": percent}


def table_result() -> dict:
    """A Table 1 by older_adult with coded levels, a binary, a summary, and percentages as the
    coordinator rounds them: to one decimal of a large denominator, whole of a small one."""
    return {
        "study": "t1",
        "title": "Table 1",
        "study_hash": "cd" * 32,
        "kind": "table",
        "where": None,
        "n": 5030,
        "by": "older_adult",
        "service_column": "service_id",
        "services": {"ZN2": "barnet"},
        "nodes": [{"name": "barnet", "contributed": True}],
        "columns": [
            {"column": 0, "label": "Overall", "level": None},
            {"column": 1, "label": "18-64", "level": "0"},
            {"column": 2, "label": "65+", "level": "1"},
            {"column": 3, "label": "older_adult missing", "level": None},
        ],
        "group_sizes": [_cell(5030, None), _cell(4800, None), _cell(230, None), _cell(0, None)],
        "tables": [
            {
                "variable": "employment",
                "label": "employment status",
                "type": "categorical",
                "show": "counts",
                "rows": [
                    {"row": "01", "cells": [_cell(1750, 34.8), _cell(1670, 34.8), _cell(80, 35.0), _cell(0, None)]},
                    {"row": "02", "cells": [_cell(3280, 65.2), _cell(None, None), _cell(None, None), _cell(0, None)]},
                    {"row": "03", "cells": [_cell(0, 0.0), _cell(0, 0.0), _cell(0, 0.0), _cell(0, None)]},
                    {"row": "missing", "cells": [_cell(0, 0.0), _cell(0, 0.0), _cell(0, 0.0), _cell(0, None)]},
                ],
            },
            {
                "variable": "imd_quintile",
                "label": "IMD quintile",
                "type": "categorical",
                "show": "counts",
                "rows": [
                    {"row": "1", "cells": [_cell(30, 0.6), _cell(25, 0.5), _cell(5, 2.0), _cell(0, None)]},
                    {"row": "5", "cells": [_cell(5000, 99.4), _cell(4775, 99.5), _cell(225, 98.0), _cell(0, None)]},
                ],
            },
            {
                "variable": "ltc",
                "label": "long-term condition",
                "type": "binary",
                "show": "counts",
                "rows": [
                    {"row": "0", "cells": [_cell(4000, 79.5), _cell(3800, 79.2), _cell(200, 87.0), _cell(0, None)]},
                    {"row": "1", "cells": [_cell(1030, 20.5), _cell(1000, 20.8), _cell(30, 13.0), _cell(0, None)]},
                ],
            },
            {
                "variable": "phq9_first",
                "label": "PHQ-9 at first contact",
                "type": "integer",
                "show": "summary",
                "summary": [
                    {
                        "suppressed": False,
                        "mean": 14.94,
                        "sd": 5.31,
                        "quantiles": [
                            {"p": 0.25, "exact": True, "value": 11},
                            {"p": 0.5, "exact": True, "value": 15},
                            {"p": 0.75, "exact": False, "value": None, "low": 18, "high": 19},
                        ],
                    },
                    {"suppressed": True},
                    {"suppressed": True},
                    {"suppressed": False, "mean": None, "quantiles": []},
                ],
                "rows": [{"row": "recorded", "cells": [_cell(5030, 100.0)] * 3 + [_cell(0, None)]}],
            },
        ],
        "funnel": {
            "steps": [
                {"label": "referred", "cells": [{"count": n, "suppressed": False} for n in (9000, 8570, 430, 0)]},
                {
                    "label": "analysed",
                    "cells": [
                        {"count": 5030, "suppressed": False, "percent_of_previous": 55.9},
                        {"count": 4800, "suppressed": False, "percent_of_previous": 56.0},
                        {"count": 230, "suppressed": False, "percent_of_previous": 25.0},
                        {"count": 0, "suppressed": False, "percent_of_previous": None},
                    ],
                },
            ]
        },
    }


def _percentages(text: str) -> list[str]:
    return PERCENT.findall(text)


def test_the_terminal_shows_model_terms_in_the_report_s_words():
    result = glm_result()
    text = render_report(result)
    assert not CODED_TERM.search(text), text
    for line in (
        "employment: unemployed, seeking work (02)",
        "imd quintile: 5 (least deprived)",
        "problem: generalised anxiety disorder",
        "referral source group: self-referral",
        "older adult × sex: male",
        "service id: Barnet (ZN2)",
        "n treat",
    ):
        assert line in text, line
    # A label is never cut short to fit the column.
    (exposure,) = [line for line in text.splitlines() if line.endswith("<- exposure")]
    assert "employment: unemployed, seeking work (02) " in exposure
    # Dropped terms, CR2's degrees of freedom and the standardised risks name terms alike.
    assert "dropped employment: unpaid voluntary work (07): no rows at any node" in text
    assert "employment: unemployed, seeking work (02) 6.5" in text
    assert "standardised imd quintile: 5 (least deprived): 0.5000" in text
    # The same words as the report's page.
    with words.services_of(result):
        for term in result["terms"]:
            assert words.term_label(term["term"]) in text


def test_the_terminal_table_shows_levels_as_words_and_one_percentage_format():
    text = render_table(table_result())
    assert "unemployed, seeking work (02)" in text and "employed (01)" in text and "student (03)" in text
    assert "1 (most deprived)" in text and "5 (least deprived)" in text
    rows = [line.strip() for line in text.splitlines()]
    assert not any(re.match(r"(0[1-8]|[01])\s\s", row) for row in rows), text  # no bare codes as row labels
    assert any(row.startswith("no ") for row in rows) and any(row.startswith("yes ") for row in rows)
    percentages = _percentages(text)
    assert {"34.8%", "35.0%", "0.0%", "2.0%", "25.0%"} <= set(percentages)
    assert all(re.fullmatch(r"\d{1,3}\.\d%", p) for p in percentages), percentages
    # Each percentage as the report formats it, with its count.
    assert "1,750 (34.8%)" in text and "80 (35.0%)" in text and "0 (0.0%)" in text
    assert words.count_with_percent(80, 35.0) == "80 (35.0%)"
    # Suppressed counts and withheld statistics are marked; summaries as the report rounds them.
    assert "*" in text and "(counts rounded to 5 per service, * suppressed)" in text
    assert "14.9 (5.3)" in text and "15.0 [11.0, 18.0..19.0]" in text
    assert "funnel (n, % of the step before)" in text and "5,030 (55.9%)" in text
    # The by column's missing group, empty here, is left out.
    assert "older adult missing" not in text and "older_adult" not in text


def test_the_terminal_table_heads_name_the_by_column_in_words():
    result = table_result()
    result["by"] = "age_group"
    result["columns"] = [
        {"column": 0, "label": "Overall", "level": None},
        {"column": 1, "label": "age_group 18-64", "level": "18-64"},
        {"column": 2, "label": "age_group 65+", "level": "65+"},
        {"column": 3, "label": "age_group missing", "level": None},
    ]
    text = render_table(result)
    assert "age group 18-64" in text and "age group 65+" in text and "age_group" not in text
    assert words.table_column_labels(result)[1:3] == ["age group 18-64", "age group 65+"]


@pytest.mark.parametrize("make", [glm_result, table_result])
def test_rendering_leaves_the_machine_readable_results_alone(make):
    """`--json` prints results as they are: rendering for the terminal changes nothing in them."""
    result = make()
    before = copy.deepcopy(result)
    render_report(result)
    assert result == before
    if result["kind"] == "glm":
        assert "employment[T.02]" in json.dumps(result)
    else:
        assert '"row": "02"' in json.dumps(result)


def test_a_run_s_terminal_output_says_the_words_of_its_report(report_run):
    """The studies of a real run (tests/reportcase.py) as `iaptnet run` prints them."""
    results = {p.parent.name: json.loads(p.read_text()) for p in report_run.glob("*/results.json")}
    table = render_report(results["t1_table1_older_adults"])
    assert "unemployed, seeking work (02)" in table and "generalised anxiety disorder" in table
    assert not re.search(r"^\s+0[1-8]\s", table, re.MULTILINE)
    percentages = _percentages(table)
    assert percentages and all(re.fullmatch(r"\d{1,3}\.\d%", p) for p in percentages), percentages
    glm = render_report(results["d4_older_adults"])
    assert "service id: Barnet (ZN2)" in glm and "sex: male" in glm and not CODED_TERM.search(glm)
    contributed = next(line for line in glm.splitlines() if "contributed (" in line)
    assert "Barnet" in contributed and "Camden Islington" in contributed and "_" not in contributed
    # results.json keeps the codes.
    assert any(CODED_TERM.search(t["term"]) for t in results["d4_older_adults"]["terms"])


# --- the other kinds: access, propensity (psm/iptw), meta and its --------------------------
# Each hand-built result has the shape its coordinator writes (coordinator/<kind>.py
# build_results; see a run's results.json), with coded levels the schema has words for.

NODES = [{"name": "barnet", "contributed": True}, {"name": "camden_islington", "contributed": True}]
SERVICES = {"service_column": "service_id", "services": {"ZN1": "camden_islington", "ZN2": "barnet"}}


def _header(kind: str, **fields) -> dict:
    return {
        "study": f"coded_{kind}",
        "title": f"Coded {kind}",
        "study_hash": "ef" * 32,
        "kind": kind,
        "nodes": NODES,
        **SERVICES,
        **fields,
    }


def _rate(variable, level, referrals, rate, ratio=None):
    row = {
        "variable": variable,
        "level": level,
        "referrals": referrals,
        "population": 10_000.0,
        "person_years": 80_000.0,
        "rate": rate,
        "rate_low": None if rate is None else rate - 10,
        "rate_high": None if rate is None else rate + 10,
        "suppressed": None if referrals is not None else "small number",
    }
    if ratio is not None:
        low = None if ratio == 1.0 else ratio - 0.1
        row.update(rate_ratio=ratio, rate_ratio_low=low, rate_ratio_high=None if low is None else ratio + 0.1)
    return row


def access_result() -> dict:
    terms = [_term(t) for t in ("Intercept", "age_group[T.65+]", "employment[T.02]", "area[T.barnet]")]
    return _header(
        "access",
        family="poisson",
        link="log",
        ratio_name="rate ratio",
        formula="referrals ~ age_group + employment + area",
        by=["age_group", "employment"],
        period={"first": "2012-04-01", "last": "2020-03-31", "years": 8},
        per=100_000,
        population={"source": "synthetic", "file": "population.csv", "sha256": "12" * 32, "areas": {}},
        need=None,
        exposure="age_group[T.65+]",
        exposure_term=terms[1],
        n=1200,
        n_missing=10,
        n_no_population=0,
        n_cohort=1210,
        cells=8,
        iterations=4,
        lr_statistic=120.5,
        lr_df=3,
        lr_p_value=1e-9,
        terms=terms,
        models=[{"name": "adjusted", "formula": "referrals ~ age_group + employment + area", "terms": terms}],
        rates=[
            _rate("age_group", "18-64", 1000, 500.0, 1.0),
            _rate("age_group", "65+", 200, 150.0, 0.3),
            _rate("employment", "01", 900, 450.0, 1.0),
            _rate("employment", "02", None, None, 1.4),
            _rate("all", "all", 1200, 480.0),
        ],
        area_rates=[{"area": "barnet", **_rate("age_group", "65+", 100, 140.0)}],
        suppression={
            "network_rule": "1-7 suppressed, others rounded to 5",
            "node_counts": "as released",
            "secondary": 1,
        },
    )


def _balance(term, before, after):
    return {"term": term, "smd_before": before, "smd_after": after}


def propensity_result(kind: str = "psm") -> dict:
    terms = [_term("Intercept"), _term("older_adult")]
    result = _header(
        kind,
        family="binomial",
        link="logit",
        ratio_name="odds ratio",
        formula="reliable_recovery ~ older_adult",
        outcome="reliable_recovery",
        exposure="older_adult",
        exposure_term=terms[1],
        n=4548,
        terms=terms,
        propensity_model={"n": 35737, "exposed": 2298.0, "iterations": 4, "terms": [_term("Intercept")] * 5},
        propensity_score={"logit_sd": 0.469},
        balance=[
            _balance("ps_logit", 0.479, 0.001),
            _balance("employment[T.02]", 0.31, 0.12),
            _balance("service_id[T.ZN2]", 0.15, 0.02),
            _balance("phq9_first", -0.36, 0.037),
            _balance("sex[T.male]", 0.04, 0.02),
        ],
        balance_summary={
            "threshold": 0.1,
            "max_abs_smd_before": 0.479,
            "max_abs_smd_after": 0.12,
            "balanced": False,
            "imbalanced_terms": ["employment[T.02]"],
        },
    )
    if kind == "psm":
        result["matching"] = {
            "caliper_sd": 0.2,
            "caliper": 0.0938,
            "exposed": 2298,
            "controls": 33439,
            "pairs": 2274,
            "exposed_unmatched": 24,
            "nodes": [{"name": "barnet", "pairs": 240}, {"name": "camden_islington", "pairs": None}],
        }
    else:
        result["weighting"] = {
            "estimand": "ATT",
            "stabilized": False,
            "exposed": {"n": 2298, "effective_n": 2298.0},
            "control": {"n": 33439, "effective_n": 25747.8},
        }
    return result


def _pooled(method=None, **fields):
    entry = {
        "estimate": 0.09,
        "std_error": 0.0025,
        "statistic": 37.1,
        "p_value": 1e-9,
        "conf_low": 0.087,
        "conf_high": 0.097,
        "k": 2,
        "Q": 3.76,
        "Q_df": 1,
        "Q_p_value": 0.052,
        "I2": 0.734,
        "ratio": 1.096,
        "ratio_low": 1.091,
        "ratio_high": 1.102,
        **fields,
    }
    if method:
        entry.update(
            method=method,
            ci="normal",
            df=None,
            tau2=0.0021,
            tau=0.046,
            H2=3.8,
            prediction_low=0.01,
            prediction_high=0.17,
            prediction_ratio_low=1.01,
            prediction_ratio_high=1.19,
        )
    return entry


def meta_result() -> dict:
    def node(name, ratio, weight):
        return {
            "node": name,
            "estimate": 0.09,
            "std_error": 0.007,
            "conf_low": 0.076,
            "conf_high": 0.104,
            "ratio": ratio,
            "ratio_low": ratio - 0.015,
            "ratio_high": ratio + 0.015,
            "dropped_terms": ["service_id[T.ZN2]"],
            "weights": {"fixed": weight, "random_dl": weight, "random_reml": weight},
        }

    one_stage = {"exposure_term": _term("employment[T.02]"), "n": 35737, "iterations": 3}
    return _header(
        "meta",
        family="binomial",
        link="logit",
        ratio_name="odds ratio",
        formula="reliable_recovery ~ employment + n_treat",
        exposure="employment[T.02]",
        k=2,
        n=35737,
        per_node=[
            node("barnet", 1.103, 0.45),
            node("camden_islington", 1.090, 0.55),
            {"node": "newham", "estimate": None, "std_error": None, "reason": "has no rows in the study's cohort"},
        ],
        fixed=_pooled(),
        random_dl=_pooled("DerSimonian-Laird"),
        random_reml=_pooled("REML"),
        tau2_ci={
            "tau2_low": 0.0,
            "tau2_high": 6.4e-05,
            "tau_low": 0.0,
            "tau_high": 0.008,
            "I2_low": 0.0,
            "I2_high": 0.563,
            "H2_low": 1.0,
            "H2_high": 2.29,
            "lower_sign": "",
            "upper_sign": "",
            "note": None,
        },
        one_stage=one_stage,
        one_stage_service_fe=one_stage,
    )


def _change(ratio):
    level = {"term": "after_change", "estimate": -0.28, "p_value": 0.001, "ratio": ratio}
    level.update(ratio_low=ratio - 0.1, ratio_high=ratio + 0.1)
    slope = {"term": "time_after_change", "ratio_per_12": 1.019, "ratio_per_12_low": 0.957, "ratio_per_12_high": 1.085}
    return {"level_change": level, "slope_change": slope}


def its_result() -> dict:
    def segment(group, nodes, before, after):
        return {
            "group": group,
            "nodes": nodes,
            "change_date": "2016-01",
            "before": {"referrals": before, "rate": 0.249},
            "after": {"referrals": after, "rate": None if after is None else 0.161},
            "months": [],
        }

    def service(group, fitted):
        entry = {"group": group, "change_time": 45, "change_date": "2016-01", "fitted": fitted}
        if fitted:
            entry.update(n=11918, terms=[{"term": "Intercept", "estimate": -1.4}], **_change(0.756))
        else:
            entry["reason"] = "no referral in the cohort falls before the change"
        return entry

    return _header(
        "its",
        outcome="n_dna",
        denominator=["n_treat"],
        group="service_id",
        time="referral_month",
        cov_type="HC0",
        changes=[{"group": "ZN1", "change_time": 45}],
        segments=[
            segment("ZN1", ["camden_islington"], 5625, 6295),
            segment("ZN9", ["barnet", "camden_islington"], 4415, None),
        ],
        per_service=[service("ZN1", True), service("ZN9", False)],
        pooled={"n": 69908, "iterations": 3, **_change(0.761)},
        level_change=_change(0.761)["level_change"],
        slope_change=_change(0.761)["slope_change"],
        level_change_meta={
            "random_dl": _pooled("DerSimonian-Laird"),
            "random_reml": _pooled("REML"),
            "groups": ["ZN1", "ZN9"],
        },
    )


def _report_texts(section, column: int = 0) -> set[str]:
    """The texts a column of the report section's tables shows (its nodes table left out)."""
    return {
        row[column].text.replace("  (exposure)", "")
        for table in section.tables
        if not table.name.endswith("-nodes")
        for row in table.rows
    }


def test_the_terminal_access_output_names_groups_and_terms_in_the_report_s_words():
    from iaptnet.report import sections

    result = access_result()
    text = render_report(result)
    assert not CODED_TERM.search(text), text
    assert "age_group" not in text.replace("referrals ~ age_group", "")  # only the formula keeps names
    for words_shown in (
        "age group: 18-64",
        "age group: 65+",
        "employment: employed (01)",
        "employment: unemployed, seeking work (02)",
        "area: barnet",
        "all referrals",
    ):
        assert words_shown in text, words_shown
    (exposure,) = [line for line in text.splitlines() if line.endswith("<- exposure")]
    assert exposure.strip().startswith("age group: 65+ ")
    # Every group and term the report's tables name is named so on the terminal.
    with words.services_of(result):
        section = sections.access_section(result)
    rates = next(t for t in section.tables if t.name.endswith("-rates"))
    for row in rates.rows:
        if row[0].value != "all":  # the figure's and the terminal's 'all referrals'
            assert f"{row[0].text}: {row[1].text}" in text
    terms = next(t for t in section.tables if t.name.endswith("-adjusted"))
    for row in terms.rows:
        assert row[0].text.replace("  (exposure)", "") in text


@pytest.mark.parametrize("kind", ["psm", "iptw"])
def test_the_terminal_propensity_output_names_terms_in_the_report_s_words(kind):
    from iaptnet.report import sections

    result = propensity_result(kind)
    text = render_report(result)
    assert not CODED_TERM.search(text), text
    assert "ps_logit" not in text and "phq9_first" not in text and "reliable_recovery" not in text
    for words_shown in (
        "propensity score (logit)",
        "employment: unemployed, seeking work (02)",
        "service id: Barnet (ZN2)",
        "phq9 first",
        "outcome model of reliable recovery on older adult",
        "at or above 0.1 after: employment: unemployed, seeking work (02)",
    ):
        assert words_shown in text, words_shown
    assert "older adult" in [line for line in text.splitlines() if line.endswith("<- exposure")][0]
    if kind == "psm":  # services by the names the report gives them
        assert "pairs per node (rounded): Barnet 240, Camden Islington" in text, text
        assert "camden_islington" not in text
    # The balance rows as the report's balance table (and Love plot) label them.
    with words.services_of(result):
        section = sections.propensity_section(result)
    balance = next(t for t in section.tables if t.name.endswith("-balance"))
    shown = [row[0].text for row in balance.rows if row[0].value != "sex[T.male]"]  # balanced: not listed
    assert shown and all(label in text for label in shown)


def test_the_terminal_meta_output_names_the_exposure_in_the_report_s_words():
    result = meta_result()
    text = render_report(result)
    assert not CODED_TERM.search(text), text
    assert "meta-analysis of employment: unemployed, seeking work (02)," in text
    with words.services_of(result):
        assert words.term_label(result["exposure"]) in text
    # I² and tau² as the report and its glossary write them.
    assert "I² = 73.4%" in text and "tau² = 0.0021" in text and "I² 0.0% to 56.3%" in text
    assert not re.search(r"\b(I2|tau2|H2)\b", text), text
    # Services by the names the report gives them, never a node's file-system name.
    assert "Newham" in text and "not pooled: has no rows" in text and "newham" not in text


def test_the_terminal_its_output_names_the_series_in_the_report_s_words():
    from iaptnet.report import sections

    result = its_result()
    text = render_report(result)
    assert "n_dna" not in text and "n_treat" not in text and "service_id" not in text, text
    with words.services_of(result):
        section = sections.its_section(result, 48)
    # The series as the report's axis and caption name it.
    assert "n dna per n treat" in section.summary[0]
    assert "poisson/log of n dna per n treat]" in text and "n dna per n treat before/after" in text
    # A group held by one node by that service's name; one held by several as the report
    # names it.
    assert "  Camden Islington " in text and "camden_islington" not in text
    assert "service id ZN9" in text and "service id ZN9" in _report_texts(section)
    assert "tau² = 0.0021, I² = 73.4%" in text and not re.search(r"\b(I2|tau2)\b", text)


@pytest.mark.parametrize(
    "make, code",
    [
        (access_result, "area[T.barnet]"),
        (propensity_result, "employment[T.02]"),
        (lambda: propensity_result("iptw"), "employment[T.02]"),
        (meta_result, "employment[T.02]"),
        (its_result, "n_dna"),
    ],
)
def test_rendering_the_other_kinds_leaves_their_results_alone(make, code):
    """`--json` and results.json keep the codes of every kind: rendering changes nothing."""
    result = make()
    before = copy.deepcopy(result)
    render_report(result)
    assert result == before
    assert code in json.dumps(result)


def test_a_run_s_other_kinds_say_the_words_of_its_report(report_run):
    """The access, propensity, meta and its studies of a real run as `iaptnet run` prints them."""
    results = {p.parent.name: json.loads(p.read_text()) for p in report_run.glob("*/results.json")}
    access = render_report(results["a1_access_older_adults"])
    assert "age group: 65+" in access and "area: barnet" in access and not CODED_TERM.search(access)
    for name in ("p3_older_adults_psm", "p4_older_adults_iptw"):
        text = render_report(results[name])
        assert "propensity score (logit)" in text and "ps_logit" not in text and not CODED_TERM.search(text)
    meta = render_report(results["h1_heterogeneity_sessions"])
    assert "meta-analysis of n treat," in meta and "I² = " in meta and not CODED_TERM.search(meta)
    its = render_report(results["s1_reminders_its"])
    assert "of n dna per n treat]" in its and "n_dna" not in its
    # results.json keeps the codes.
    assert any(CODED_TERM.search(t["term"]) for t in results["a1_access_older_adults"]["terms"])

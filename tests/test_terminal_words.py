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
    # results.json keeps the codes.
    assert any(CODED_TERM.search(t["term"]) for t in results["d4_older_adults"]["terms"])

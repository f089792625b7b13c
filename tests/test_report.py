"""The HTML report of a run (iaptnet/report): written by `iaptnet run --out`, rendered again
by `iaptnet report` from the results alone, its numbers those of results.json, its tables the
same in the page, the CSV files and the workbook, and nothing on the page fetched from
anywhere. The page in a real browser: tests/test_report_browser.py."""

from __future__ import annotations

import csv
import json
import math
import re
import tomllib

import pytest
from openpyxl import load_workbook
from reportcase import STUDIES, page_tables

from iaptnet.cli import main
from iaptnet.coordinator.outputs import safe_filename
from iaptnet.report import words


@pytest.fixture(scope="module")
def run_out(report_run):
    return report_run


@pytest.fixture(scope="module")
def page(run_out):
    return (run_out / "report.html").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def results(run_out):
    return {p.parent.name: json.loads(p.read_text()) for p in run_out.glob("*/results.json")}


def test_every_study_has_a_section_and_every_kind_a_figure(page, results):
    assert set(results) == set(STUDIES)
    for name in results:
        assert f'data-study="{name}"' in page, name
    parsed = page_tables(page)
    figures = parsed.figures
    # One figure per kind at least: forest (glm, meta, findings), funnel, love plots, rates, series.
    assert {"d4_older_adults-forest", "h1_heterogeneity_sessions-forest", "findings-forest"} <= set(figures)
    assert {"t2_funnel-funnel", "p3_older_adults_psm-love", "p4_older_adults_iptw-love"} <= set(figures)
    assert {"a1_access_older_adults-rates", "s1_reminders_its-series"} <= set(figures)
    meta = results["h1_heterogeneity_sessions"]
    assert figures["h1_heterogeneity_sessions-forest"]["points"] == len(meta["per_node"]) + 3
    assert figures["t2_funnel-funnel"]["bars"] == len(results["t2_funnel"]["funnel"]["steps"])
    its = results["s1_reminders_its"]
    fitted = {s["group"] for s in its["per_service"] if s["fitted"]}
    observed = [m for s in its["segments"] if s["group"] in fitted for m in s["months"] if m["rate"] is not None]
    assert len(observed) > 24 * len(fitted)  # the series month by month
    assert figures["s1_reminders_its-series"]["points"] == len(observed)


def test_the_numbers_on_the_page_are_those_of_results_json(page, results):
    tables = page_tables(page).tables
    result = results["d4_older_adults"]
    rows = tables["d4_older_adults-terms"]
    assert len(rows) == len(result["terms"])
    for row, term in zip(rows, result["terms"]):
        with words.services_of(result):
            assert row[0][1] is None and words.term_label(term["term"]) in row[0][0]
        assert json.loads(row[1][1]) == term["estimate"]  # the raw value, exactly
        assert row[1][0] == f"{term['estimate']:,.4f}"
        assert row[4][0] == words.p_value(term["p_value"])
        assert row[5][0] == f"{term['ratio']:.3f}"
        assert row[6][0] == f"{term['ratio_low']:.3f} to {term['ratio_high']:.3f}"
    # The finding beside its published estimate, to two decimals.
    assert len(tables["findings"]) == 2  # d1 and d4 name a published finding
    (finding,) = [row for row in tables["findings"] if row[0][0] == result["title"]]
    exposure = result["exposure_term"]
    assert finding[2][0] == f"{exposure['ratio']:.2f}"
    assert finding[4][0] == f"{result['reference']['ratio']:.2f}"
    # p-values as journals print them; percentages in one format.
    assert all(re.fullmatch(r"<0\.001|[01]\.\d{3}|–", r[4][0]) for r in rows)
    funnel = tables["t2_funnel-funnel"]
    step = results["t2_funnel"]["funnel"]["steps"][1]["cells"][0]
    assert funnel[1][1][0] == f"{step['count']:,} ({step['percent_of_previous']:.1f}%)"


def test_codes_are_shown_as_words(page, results):
    tables = page_tables(page).tables
    labels = [row[0][0].strip() for row in tables["t1_table1_older_adults-table"]]
    assert "unemployed, seeking work (02)" in labels and "02" not in labels
    assert "generalised anxiety disorder" in labels
    # Services by name, not by service_id level.
    services = [row[0][0] for row in tables["s1_reminders_its-changes"]]
    assert "Camden Islington" in services and not any(s.strip().isdigit() for s in services)
    # A service's term too: the node that holds it, beside its code (results carry the network's).
    d4 = results["d4_older_adults"]
    assert d4["service_column"] == "service_id" and d4["services"]["ZN2"] == "barnet"
    terms = [row[0][0] for row in tables["d4_older_adults-terms"]]
    assert "service id: Barnet (ZN2)" in terms


def test_csv_and_xlsx_hold_the_tables_of_the_page(run_out, page):
    tables = page_tables(page).tables
    book = load_workbook(run_out / "tables.xlsx", read_only=True)
    contents = list(book["contents"].iter_rows(values_only=True))[1:]
    assert len(contents) == len(tables)
    for (sheet, _title), (name, rows) in zip(contents, tables.items()):
        with open(run_out / "tables" / f"{safe_filename(name)}.csv", encoding="utf-8", newline="") as fh:
            lines = list(csv.reader(fh))
        assert len(lines) == len(rows) + 1, name  # a header row, then the page's rows
        values = list(book[sheet].iter_rows(values_only=True))[1 : len(rows) + 1]
        for page_row, csv_row, xlsx_row in zip(rows, lines[1:], values):
            for (text, raw), in_csv, in_xlsx in zip(page_row, csv_row, xlsx_row):
                if raw is None or raw.startswith("["):
                    continue
                number = json.loads(raw)
                # The CSV keeps every digit; a workbook cell keeps Excel's 15 significant ones.
                assert float(in_csv) == number and in_xlsx == pytest.approx(number, rel=1e-14), (name, text)


def test_the_page_fetches_nothing_and_runs_no_script(page):
    assert "<script" not in page.lower()
    assert "<link" not in page.lower()
    assert "@import" not in page and not re.search(r"url\((?!#)", page)  # only the SVG's own clip paths
    # The only addresses are XML namespace names (never fetched).
    addresses = re.findall(r'(\w[\w:-]*)="(?:https?:)?//[^"]*"', page)
    assert addresses and all(attr.startswith("xmlns") for attr in addresses)
    assert "default-src 'none'" in page  # and the browser is told not to fetch anything


def test_report_renders_the_same_page_again_from_results_alone(run_out, page, tmp_path, capsys):
    out = tmp_path / "again.html"
    assert main(["report", str(run_out), "--out", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == page
    assert str(out) in capsys.readouterr().out
    assert (tmp_path / "tables.xlsx").exists() and len(list((tmp_path / "tables").glob("*.csv"))) > 10


@pytest.mark.parametrize(
    "make, expect",
    [
        (lambda d: None, "holds no <study>/results.json"),
        (lambda d: (d / "a").mkdir() or (d / "a" / "results.json").write_text("{not json"), "cannot be read as JSON"),
        (lambda d: (d / "a").mkdir() or (d / "a" / "results.json").write_text("[1, 2]"), "not a study's results"),
        (
            lambda d: (d / "a").mkdir() or (d / "a" / "results.json").write_text('{"study": "a", "kind": "glm"}'),
            "not results the report can read",
        ),
        (
            lambda d: (d / "a").mkdir() or (d / "a" / "results.json").write_text('{"study": "a", "kind": "x"}'),
            "does not know this kind",
        ),
    ],
)
def test_a_folder_without_results_is_one_sentence(tmp_path, capsys, make, expect):
    make(tmp_path)
    assert main(["report", str(tmp_path)]) != 0
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "report.html").exists() and not (tmp_path / "tables").exists()


def test_no_progress_when_output_is_not_a_terminal(run_out, tmp_path, capsys):
    """Progress shows only on a terminal; under pytest stdout is a pipe."""
    assert main(["report", str(run_out), "--out", str(tmp_path / "r.html")]) == 0
    assert capsys.readouterr().err == ""


def test_words_format_as_analysts_read():
    assert words.p_value(0.0004) == "<0.001" and words.p_value(0.0123) == "0.012"
    assert words.p_phrase(1e-9) == "p < 0.001" and words.p_phrase(0.5) == "p = 0.500"
    assert words.percent(12.345) == "12.3%" and words.share(0.5) == "50.0%"
    assert words.term_label("employment[T.02]") == "employment: unemployed, seeking work (02)"
    assert words.term_label("problem[T.gad]") == "problem: generalised anxiety disorder"
    assert words.term_label("older_adult:sex[T.male]") == "older adult × sex: male"
    assert words.number(math.nan) == words.MISSING


def _schema(columns: str):
    from iaptnet.protocol.schema import Schema

    return Schema.from_dict(tomllib.loads(columns), "s.toml")


def test_schema_labels_are_checked_and_leave_the_fingerprint_alone():
    from iaptnet.protocol.errors import SpecError

    plain = '[columns.x]\ntype = "categorical"\nlevels = ["a", "b"]\n'
    labelled = _schema(plain + '[columns.x.labels]\nb = "the b group"\n')
    assert labelled.columns["x"].label("b") == "the b group" and labelled.columns["x"].label("a") is None
    assert labelled.fingerprint == _schema(plain).fingerprint
    with pytest.raises(SpecError, match="names 'c', which is not one of the column's levels"):
        _schema(plain + '[columns.x.labels]\nc = "no such level"\n')
    with pytest.raises(SpecError, match="only allowed for categorical"):
        _schema('[columns.y]\ntype = "numeric"\n[columns.y.labels]\n1 = "one"\n')
    with pytest.raises(SpecError, match="must be a table"):
        _schema(plain + "[columns.x.labels]\nb = 3\n")


def test_the_its_terminal_report_names_services_not_codes(results):
    from iaptnet.coordinator.its import render

    result = results["s1_reminders_its"]
    text = render(result)
    for segment in result["segments"]:
        (node,) = segment["nodes"]
        # by the service's name as the report gives it (`camden_islington` -> `Camden Islington`)
        assert f"  {words.service_name(node)} " in text and f"service_id {segment['group']} " not in text
        assert f"  {node} " not in text


def test_terms_of_art_are_explained_where_they_appear():
    html = str(words.explain("REML beside DerSimonian-Laird, REML again, <b> & HC0"))
    assert html.count("<abbr") == 3  # each term once, the first time it appears
    assert html.index(">REML</abbr>") < html.index(">DerSimonian-Laird</abbr>")
    assert "&lt;b&gt; &amp;" in html  # the text itself is escaped
    # A title never holds another term's mark-up.
    assert all("<abbr" not in part.split(">")[0] for part in html.split('title="')[1:])


def test_the_meta_section_states_heterogeneity_as_results_json_holds_it(page, results):
    result = results["h1_heterogeneity_sessions"]
    reml, ci = result["random_reml"], result["tau2_ci"]
    text = re.sub(r"<[^>]+>", "", page)  # the words as read (terms of art are marked up)
    assert f"I² {words.share(reml['I2'])}" in text and f"tau² {words.significant(reml['tau2'])} (REML)" in text
    assert f"{words.significant(ci['tau2_high'])}, for I²" in text


def test_marginal_risks_are_shown_on_the_scale_a_commissioner_reads(page, results):
    (marginal,) = results["d4_older_adults"]["marginal"]
    (row,) = page_tables(page).tables["d4_older_adults-marginal"]
    assert [cell[0] for cell in row[1:4]] == [
        words.share(marginal["risk_exposed"]),
        words.share(marginal["risk_unexposed"]),
        words.share(marginal["risk_difference"]),
    ]
    assert json.loads(row[3][1]) == marginal["risk_difference"] and row[5][0] == f"{marginal['risk_ratio']:.3f}"


def test_each_node_s_audit_entry_is_shown_beside_its_service(page, results):
    result = results["d4_older_adults"]
    rows = page_tables(page).tables["d4_older_adults-nodes"]
    assert len(rows) == len(result["nodes"])
    for row, node in zip(rows, result["nodes"]):
        head = node["audit_head"]
        assert row[3][0] == f"#{head['seq']} {head['hash'][:12]}"


def _section(page: str, study: str) -> str:
    """The HTML of one study's section of the page."""
    start = page.index(f'data-study="{study}"')
    return page[start : page.index("</section>", start)]


def test_every_study_section_lists_its_services(page, results):
    """Who contributed or refused, on which data version, with the audit entry: in every
    study's own section, the meta-analysis's included."""
    for name, result in results.items():
        rows = page_tables(_section(page, name)).tables.get(f"{name}-nodes")
        assert rows is not None, name
        assert [row[0][0] for row in rows] == [words.service_name(node["name"]) for node in result["nodes"]], name
    meta = results["h1_heterogeneity_sessions"]
    rows = page_tables(_section(page, "h1_heterogeneity_sessions")).tables["h1_heterogeneity_sessions-nodes"]
    for row, node in zip(rows, meta["nodes"]):
        assert row[1][0] == ("yes" if node["contributed"] else "no")
        assert row[2][0] == node["data_version"][:12]
        assert row[3][0] == f"#{node['audit_head']['seq']} {node['audit_head']['hash'][:12]}"


def test_suppressed_table_cells_are_marked_and_the_disclosure_rules_shown(page, results):
    import html

    name = "t1_table1_older_adults"
    result = results[name]
    cells = [cell for t in result["tables"] for row in t["rows"] for cell in row["cells"]]
    suppressed = [cell for cell in cells if cell["suppressed"]]
    assert suppressed  # the run exercises the small-number rules
    rows = page_tables(page).tables[f"{name}-table"]
    shown = [cell for row in rows for cell in row[1:] if cell[0] == "suppressed"]
    assert shown and all(raw is None for _, raw in shown)
    text = html.unescape(_section(page, name))
    assert result["disclosure"] in text
    assert f"{len(suppressed)} cells are suppressed under the small-number rules" in text

"""`iaptnet demo` as `make demo` runs it, at the paper's scale: it ends by printing the path of
its report, which holds the six findings beside the published odds ratios (two decimals) and
a figure for every kind of the catalogue, and opens cleanly in Chromium with the network off."""

from __future__ import annotations

import json

import pytest
from reportcase import open_report, page_tables

from iaptnet.cli import main

pytestmark = [pytest.mark.paper_scale, pytest.mark.browser]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    import contextlib
    import io

    folder = tmp_path_factory.mktemp("demo")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["demo", "--out", str(folder / "out"), "--cache", str(folder / "cache")]) == 0
    return folder / "out", stdout.getvalue()


def test_the_demo_ends_with_the_path_of_its_report(demo):
    out, printed = demo
    assert printed.rstrip().splitlines()[-1] == f"report: {out / 'report.html'}"


def test_the_report_holds_the_six_findings_and_a_figure_for_every_kind(demo):
    out, _ = demo
    page = (out / "report.html").read_text(encoding="utf-8")
    parsed = page_tables(page)
    summary = json.loads((out / "summary.json").read_text())
    rows = parsed.tables["findings"]
    assert len(rows) == len(summary) == 6
    for row, finding in zip(rows, summary):
        assert row[2][0] == f"{finding['ratio']:.2f}" and row[4][0] == f"{finding['paper_ratio']:.2f}"
    assert parsed.figures["findings-forest"]["points"] == 12  # ours and the published one, each
    kinds = {json.loads(p.read_text())["kind"]: p.parent.name for p in out.glob("*/results.json")}
    assert set(kinds) == {"glm", "table", "psm", "iptw", "access", "meta", "its"}
    for kind, study in kinds.items():
        assert any(f.startswith(study) for f in parsed.figures) or kind == "table", kind
    assert "t2_funnel-funnel" in parsed.figures


def test_the_demo_report_opens_in_chromium_offline(demo, browser):
    out, _ = demo
    context, page, seen = open_report(browser, out / "report.html")
    try:
        assert seen["errors"] == [] and seen["requests"] == []
        drawn = page.evaluate("document.querySelectorAll('figure svg').length")
        assert drawn == page.evaluate("document.querySelectorAll('figure').length") >= 20
    finally:
        context.close()

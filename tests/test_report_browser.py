"""The report in a real browser: headless Chromium (Debian's package, driven by Playwright),
with the network off. The page opens without a console or page error and fetches nothing;
every figure is drawn, with as many points or bars as its results hold; the numbers shown are
those of results.json; it reads the same with JavaScript off, on a phone's width, and printed
on A4. A screenshot of each section is left in the test's temporary folder."""

from __future__ import annotations

import json
import re

import pytest
from reportcase import open_report

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def results(report_run):
    return {p.parent.name: json.loads(p.read_text()) for p in report_run.glob("*/results.json")}


def open_page(browser, report_run, *, javascript=True, width=1100):
    return open_report(browser, report_run / "report.html", javascript=javascript, width=width)


def figure_counts(page) -> dict[str, dict]:
    """Per figure: its drawn SVG's size, and the points and bars it holds, counted in the DOM."""
    return page.evaluate(
        """() => Array.from(document.querySelectorAll('figure')).map(f => {
             const svg = f.querySelector('svg');
             const box = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
             return {id: f.id, width: box.width, height: box.height,
                     points: f.querySelectorAll(`g[id^="${f.id}-point-"]`).length,
                     bars: f.querySelectorAll(`g[id^="${f.id}-bar-"]`).length,
                     declared: [Number(f.dataset.points), Number(f.dataset.bars)]};
           })"""
    )


def test_the_report_opens_offline_without_errors_and_every_figure_is_drawn(browser, report_run, results, tmp_path):
    context, page, seen = open_page(browser, report_run)
    try:
        assert seen["errors"] == [] and seen["requests"] == []
        figures = {f["id"]: f for f in figure_counts(page)}
        assert len(figures) >= 9
        for f in figures.values():
            assert f["width"] > 200 and f["height"] > 60, f
            assert [f["points"], f["bars"]] == f["declared"] and f["points"] + f["bars"] > 0, f
        meta = results["h1_heterogeneity_sessions"]
        assert figures["h1_heterogeneity_sessions-forest"]["points"] == len(meta["per_node"]) + 3
        assert figures["t2_funnel-funnel"]["bars"] == len(results["t2_funnel"]["funnel"]["steps"])
        balance = results["p3_older_adults_psm"]["balance"]
        assert figures["p3_older_adults_psm-love"]["points"] == 2 * len(balance)
        rates = [r for r in results["a1_access_older_adults"]["rates"] if r["rate"] is not None]
        assert figures["a1_access_older_adults-rates"]["points"] == len(rates)
        # A screenshot of each section, to look at when something fails.
        for section in page.query_selector_all("section.study"):
            name = section.get_attribute("data-study")
            section.screenshot(path=str(tmp_path / f"{name}.png"))
            assert (tmp_path / f"{name}.png").stat().st_size > 5_000
    finally:
        context.close()


def test_the_numbers_shown_are_those_of_results_json(browser, report_run, results):
    context, page, _ = open_page(browser, report_run)
    try:
        result = results["d4_older_adults"]
        exposure = result["exposure_term"]
        row = page.locator("table[data-table='findings'] tr", has_text=result["title"])
        cells = row.locator("td").all_inner_texts()
        assert cells[2] == f"{exposure['ratio']:.2f}"
        assert cells[3] == f"{exposure['ratio_low']:.2f} to {exposure['ratio_high']:.2f}"
        assert cells[4] == f"{result['reference']['ratio']:.2f}"
        shown = page.locator("table[data-table='d4_older_adults-terms'] tbody tr").all()
        assert len(shown) == len(result["terms"])
        for tr, term in zip(shown, result["terms"]):
            cells = tr.locator("td")
            assert cells.nth(1).inner_text() == f"{term['estimate']:,.4f}"
            assert json.loads(cells.nth(1).get_attribute("data-value")) == term["estimate"]
        its = results["s1_reminders_its"]["level_change"]
        text = page.locator("section[data-study='s1_reminders_its'] p").first.inner_text()
        assert f"{its['ratio']:.3f} ({its['ratio_low']:.3f} to {its['ratio_high']:.3f})" in text
    finally:
        context.close()


def test_the_page_works_without_javascript(browser, report_run):
    context, page, seen = open_page(browser, report_run)
    with_js = (figure_counts(page), page.inner_text("main"))
    context.close()
    context, page, seen = open_page(browser, report_run, javascript=False)
    try:
        assert seen["errors"] == [] and seen["requests"] == []
        assert (figure_counts(page), page.inner_text("main")) == with_js
    finally:
        context.close()


def test_the_page_fits_a_phone_and_prints_on_a4(browser, report_run, tmp_path):
    context, page, _ = open_page(browser, report_run, width=390)
    try:
        # Wide tables scroll inside their own box; the page itself never scrolls sideways.
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        widths = page.evaluate(
            "Array.from(document.querySelectorAll('svg.figure')).map(s => s.getBoundingClientRect().width)"
        )
        assert widths and max(widths) <= 390
        page.screenshot(path=str(tmp_path / "phone.png"))
    finally:
        context.close()
    context, page, _ = open_page(browser, report_run)
    try:
        pdf = page.pdf(format="A4", path=str(tmp_path / "report.pdf"))
        pages = len(re.findall(rb"/Type\s*/Page(?!s)", pdf))
        assert pdf.startswith(b"%PDF") and pages >= len(page.query_selector_all("section.study"))  # a page each
    finally:
        context.close()

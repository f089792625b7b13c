"""A run of every kind for the report's tests: catalogue studies with their covariates cut to
a few (so that 100,000 synthetic referrals hold every level the policy needs), run through
`iaptnet run --out` as a user runs them. Also a reader for the page's tables."""

from __future__ import annotations

import shutil
import tomllib
from html.parser import HTMLParser
from pathlib import Path

import tomli_w

from iaptnet import synth
from iaptnet.cli import main
from iaptnet.coordinator.catalogue import catalogue_paths

SHORT = "n_treat + sex + phq9_first + service_id"
STUDIES = {
    "d1_sessions": {"formula": f"reliable_recovery ~ {SHORT}"},
    # (its [sensitivity] adds the CR2 and random-intercept companions and the risk difference)
    "d4_older_adults": {"formula": f"reliable_recovery ~ older_adult + {SHORT}"},
    "t1_table1_older_adults": {},
    "t2_funnel": {},
    "h1_heterogeneity_sessions": {"formula": f"reliable_recovery ~ {SHORT}"},
    "p3_older_adults_psm": {"covariates": SHORT},
    "p4_older_adults_iptw": {"covariates": SHORT},
    "a1_access_older_adults": {},
    "s1_reminders_its": {},
}


def study_files(folder: Path) -> list[Path]:
    by_name = {p.stem: p for p in catalogue_paths()}
    paths = []
    for name, changes in STUDIES.items():
        data = tomllib.loads(by_name[name].read_text())
        data.update(changes)
        if "covariates" in changes or "formula" in changes:
            data.pop("merge", None)
        path = folder / f"{name}.toml"
        path.write_text(tomli_w.dumps(data))
        paths.append(path)
    return paths


def run_every_kind(tmp: Path, capsys=None) -> Path:
    network = synth.generate_network(tmp / "network", patients=100_000)
    out = tmp / "out"
    studies = study_files(tmp)
    code = main(["run", *map(str, studies), "--network", str(network), "--out", str(out)])
    assert code == 0
    return out


class PageTables(HTMLParser):
    """Every <table data-table=NAME> of a page as rows of (text, data-value or None), and
    every <figure> with its data-points and data-bars."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[tuple[str, str | None]]]] = {}
        self.figures: dict[str, dict] = {}
        self._table = None
        self._cell = None
        self._in_body = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and "data-table" in a:
            self._table = a["data-table"]
            self.tables[self._table] = []
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._table and self._in_body:
            self.tables[self._table].append([])
        elif tag == "td" and self._table and self._in_body:
            self._cell = ["", a.get("data-value")]
        elif tag == "figure":
            self.figures[a["id"]] = {"points": int(a["data-points"]), "bars": int(a["data-bars"])}

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.tables[self._table][-1].append((self._cell[0], self._cell[1]))
            self._cell = None
        elif tag == "tbody":
            self._in_body = False
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[0] += data


def page_tables(html: str) -> PageTables:
    parser = PageTables()
    parser.feed(html)
    return parser


# --- the page in a browser ----------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As root in a container, without the background services that would try the network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def open_report(browser, path: Path, *, javascript: bool = True, width: int = 1100):
    """The page in a fresh offline browser context; every request other than the page itself,
    and every console or page error, is recorded in `seen`. Returns (context, page, seen)."""
    context = browser.new_context(
        java_script_enabled=javascript, offline=True, viewport={"width": width, "height": 900}
    )
    page = context.new_page()
    seen = {"requests": [], "errors": []}
    url = Path(path).as_uri()
    page.on("request", lambda r: r.url != url and seen["requests"].append(r.url))
    page.on("console", lambda m: m.type == "error" and seen["errors"].append(m.text))
    page.on("pageerror", lambda e: seen["errors"].append(str(e)))
    page.goto(url, wait_until="load")
    return context, page, seen

"""The HTML report of a run: one self-contained page, its tables as CSV and XLSX.

`write_report(folder)` reads every `folder/<study>/results.json` (and the demo's
`summary.json` and `secondary.json` when present) and writes, beside them:

- `report.html`: one file that opens offline (figures inline as SVG, styles inline, no
  scripts, no fonts or anything else fetched), readable printed on A4 and on a phone;
- `tables/<table>.csv`: every table of the page, UTF-8 with a header row, raw values;
- `tables.xlsx`: the same tables, a sheet each.

Nothing is asked of any node: the report is a view of the results files, so `iaptnet report
DIR` renders the same page again at any time. Every file is written beside its target and
renamed into place, so a failure leaves the previous report (or none), never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..protocol.errors import SpecError

KIND_ORDER = ("table", "glm", "psm", "iptw", "access", "meta", "its")
KIND_TITLES = {
    "table": "The cohort",
    "glm": "Regressions",
    "psm": "Propensity scores: matching",
    "iptw": "Propensity scores: weighting",
    "access": "Access against the population",
    "meta": "Differences between services",
    "its": "Service changes over time",
}


@dataclass
class ReportFiles:
    html: Path
    tables: list[Path]
    xlsx: Path


def load_results(folder: Path) -> tuple[list[dict], list[dict] | None, list[dict] | None]:
    """The results of every study in `folder` (one sub-folder each), and the demo's summary
    rows; SpecError (one sentence naming the file) for a folder without results or a
    results file that is not what `iaptnet run` writes."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SpecError(f"{folder}: not a folder of results (expected the --out folder of iaptnet run or demo).")
    results = []
    # One study's run writes folder/results.json; several, folder/<study>/results.json.
    for path in sorted(folder.glob("results.json")) + sorted(folder.glob("*/results.json")):
        data = _read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("study"), str) or "kind" not in data:
            raise SpecError(f"{path}: not a study's results (expected the fields 'study' and 'kind').")
        data["_path"] = str(path.relative_to(folder))
        results.append(data)
    if not results:
        raise SpecError(f"{folder}: holds no <study>/results.json; give the --out folder of iaptnet run or demo.")
    summaries = []
    for name in ("summary.json", "secondary.json"):
        path = folder / name
        data = _read_json(path) if path.exists() else None
        if data is not None and not (
            isinstance(data, list) and all(isinstance(r, dict) and "ratio" in r for r in data)
        ):
            raise SpecError(f"{path}: not the demo's list of findings (each with 'finding' and 'ratio').")
        summaries.append(data)
    return results, summaries[0], summaries[1]


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpecError(f"{path}: cannot be read as JSON ({exc.__class__.__name__}).") from None


def build_sections(results: list[dict], summary: list | None, secondary: list | None) -> list:
    from . import sections as s
    from .words import services_of

    out = []
    if summary is None and secondary is None:
        # A run's own studies that name a published estimate (a demo writes these files).
        from ..coordinator.demo import summarise

        summary, secondary = summarise(results), summarise(results, secondary=True)
    if summary:
        out.append(s.findings_section(summary, results, secondary=False))
    sensitivity = s.sensitivity_section(results)
    if sensitivity:
        out.append(sensitivity)
    if secondary:
        out.append(s.findings_section(secondary, results, secondary=True))
    unknown = sorted({str(r.get("kind")) for r in results} - set(KIND_ORDER))
    if unknown:
        raise SpecError(f"results of kind {unknown[0]!r}: the report does not know this kind.")
    time_max = _time_max(results)
    for kind in KIND_ORDER:
        for result in results:
            if result.get("kind", "glm") != kind:
                continue
            try:
                with services_of(result):
                    if kind == "its":
                        section = s.its_section(result, time_max.get(result.get("time")))
                    else:
                        section = s.BUILDERS[kind](result)
            except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
                raise SpecError(
                    f"{result['_path']}: not results the report can read ({exc.__class__.__name__}: {exc}); "
                    "render only results.json files that iaptnet wrote."
                ) from None
            section.path = result["_path"]
            out.append(section)
    return out


def _time_max(results) -> dict:
    """The last period of each time column an its study uses, from the schema iaptnet ships
    (the series is drawn to there); none for columns it does not know."""
    from ..protocol.iapt_schema import iapt_analysis_schema

    schema = iapt_analysis_schema()
    out = {}
    for r in results:
        column = r.get("time")
        if column and column in schema.columns and schema.columns[column].max is not None:
            out[column] = schema.columns[column].max
    return out


def render_html(results: list[dict], sections: list, *, folder: Path) -> str:
    import jinja2

    from . import words

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("iaptnet.report", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["slug"] = lambda text: "".join(ch if ch.isalnum() or ch in "_-" else "-" for ch in str(text))
    env.filters["explain"] = words.explain
    template = env.get_template("report.html.j2")
    from .. import __version__

    groups = []
    for kind in ("findings", *KIND_ORDER):
        members = [s for s in sections if s.kind == kind]
        if members:
            title = "Findings" if kind == "findings" else KIND_TITLES[kind]
            groups.append((title, members))
    first = results[0]
    created = max(r.get("created_at", "") for r in results)
    return template.render(
        groups=groups,
        folder=str(folder),
        studies=len(results),
        created=created,
        software=first.get("software") or {"iaptnet": __version__},
        glossary=words.GLOSSARY,
    )


def write_report(folder: Path, out: Path | None = None) -> ReportFiles:
    """Render the report of the results in `folder` to `out` (default folder/report.html),
    with its tables beside the page (tables/ and tables.xlsx)."""
    from .spreadsheets import file_stems, write_csv, write_xlsx

    folder = Path(folder)
    results, summary, secondary = load_results(folder)
    sections = build_sections(results, summary, secondary)
    html = render_html(results, sections, folder=folder)
    out = Path(out) if out else folder / "report.html"
    if out.exists() and out.is_dir():
        raise SpecError(f"{out}: --out names a folder; give the report's file name (e.g. report.html).")
    target = out.parent
    target.mkdir(parents=True, exist_ok=True)
    tables = [t for s in sections for t in s.tables]
    # The tables go to a fresh folder renamed over the old one, then the workbook, then the
    # page: each step replaces a whole file or folder.
    staging = Path(tempfile.mkdtemp(prefix=".tables-", dir=target))
    try:
        csv_paths = [write_csv(staging / f"{stem}.csv", t) for stem, t in zip(file_stems(tables), tables)]
        final_tables = target / "tables"
        if final_tables.exists():
            shutil.rmtree(final_tables)
        os.replace(staging, final_tables)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    xlsx = write_xlsx(target / "tables.xlsx", tables)
    _write_text_atomic(out, html)
    return ReportFiles(out, [final_tables / p.name for p in csv_paths], xlsx)


def readable_mode() -> int:
    """The mode a plain new file gets under this process's umask (mkstemp's files are 0600,
    which would hide a report from the colleagues it is for)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, readable_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

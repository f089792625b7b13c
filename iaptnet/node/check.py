"""`iaptnet node check`: tell a Trust whether its table is fit to serve, and if not, where.

The text holds counts, column names and schema limits only, so it can be pasted anywhere.
Unreadable files and bad schema files raise DataError/SpecError for the CLI to print.
"""

from __future__ import annotations

from pathlib import Path

from .dataset import NOT_USABLE, AppointmentSource, load_dataset


def run_check(
    data: str | Path,
    schema: str | Path | None = None,
    *,
    table: str | None = None,
    query: str | None = None,
    appointments: str | Path | None = None,
    appointments_table: str | None = None,
    appointments_query: str | None = None,
    services: tuple[str, ...] | None = None,
) -> tuple[str, bool]:
    """(report text ending in a one-line verdict, whether the data is usable for studies).
    With an appointment table, its report comes first, then the extract's (whose pathway
    columns were computed from it). `services`: the codes the node declares (node.toml)."""
    source = AppointmentSource(str(appointments), appointments_table, appointments_query) if appointments else None
    dataset = load_dataset(data, schema, table=table, query=query, appointments=source, services=services)
    reports = [r for r in (dataset.appointments_report, dataset.report) if r is not None]
    lines = [text for r in reports for text in (r.render(), "")]
    lines += [f"data version: sha256 {dataset.data_version}", ""]
    if dataset.usable:
        report = dataset.report
        n_columns = sum(c.present for c in report.columns)
        lines.append(f"OK: {report.n_rows:,} rows, {n_columns} columns valid")
    else:
        problems = []
        for report in reports:
            where = f" in {report.source}" if len(reports) > 1 else ""
            if report.invalid_columns:
                problems.append(
                    _count(len(report.invalid_columns), "column has", "columns have") + f" invalid values{where}"
                )
            if report.missing_required:
                problems.append(
                    _count(len(report.missing_required), "required column is", "required columns are")
                    + f" missing{where}"
                )
        lines.append(" and ".join(problems) + ": see above (not usable for studies)")
        reason = dataset.unusable_reason()
        if reason != NOT_USABLE:
            lines.append(reason[0].upper() + reason[1:])
    return "\n".join(lines), dataset.usable


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"

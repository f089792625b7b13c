"""`iaptnet node check`: tell a Trust whether its table is fit to serve, and if not, where.

The text holds counts, column names and schema limits only, so it can be pasted anywhere.
Unreadable files and bad schema files raise DataError/SpecError for the CLI to print.
"""

from __future__ import annotations

from pathlib import Path

from .dataset import load_dataset


def run_check(
    data: str | Path,
    schema: str | Path | None = None,
    *,
    table: str | None = None,
    query: str | None = None,
) -> tuple[str, bool]:
    """(report text ending in a one-line verdict, whether the data is usable for studies)."""
    dataset = load_dataset(data, schema, table=table, query=query)
    report = dataset.report
    lines = [report.render(), f"data version: sha256 {dataset.data_version}", ""]
    if report.ok:
        n_columns = sum(c.present for c in report.columns)
        lines.append(f"OK: {report.n_rows:,} rows, {n_columns} columns valid")
    else:
        problems = []
        if report.invalid_columns:
            problems.append(_count(len(report.invalid_columns), "column has", "columns have")
                            + " invalid values")
        if report.missing_required:
            problems.append(_count(len(report.missing_required), "required column is",
                                   "required columns are") + " missing")
        lines.append(" and ".join(problems) + ": see above (not usable for studies)")
    return "\n".join(lines), report.ok


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"

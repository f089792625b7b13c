"""The node's view of its data: read, validate, derive, once, at node start.

Without a schema file the table is the IAPT extract: it is validated against the built-in
extract schema and the derived variables are added, so studies see
`iapt_analysis_schema()`. With a schema file the table is served as validated, no derivation.
A table that fails validation still loads (so `node check` can show why), but is not usable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..protocol.iapt_schema import iapt_analysis_schema, iapt_extract_schema
from ..protocol.schema import Schema
from .iapt import consistency_notes, derive
from .sources import read_table
from .validate import ValidationReport, validate


@dataclass(frozen=True)
class Dataset:
    """`frame` holds every column of `schema` except identifiers, typed per `node.validate`
    (dates stay for cohort filters); identifiers are checked for repeats, then dropped."""

    frame: pd.DataFrame
    schema: Schema
    report: ValidationReport
    data_version: str  # sha256 hex of the source file, or of the query result
    source: str

    @property
    def n_rows(self) -> int:
        return len(self.frame)

    @property
    def usable(self) -> bool:
        """False when validation found invalid values or missing required columns."""
        return self.report.ok


def load_dataset(
    source: str | Path,
    schema_path: str | Path | None = None,
    *,
    table: str | None = None,
    query: str | None = None,
) -> Dataset:
    """Load a CSV/Parquet file or an SQLAlchemy URL (with `table` or `query`)."""
    raw = read_table(source, table=table, query=query)
    if schema_path is None:
        typed, report = validate(raw.frame, iapt_extract_schema(), raw.source)
        report = report.with_notes(consistency_notes(typed))
        return Dataset(derive(typed), iapt_analysis_schema(), report, raw.version, raw.source)
    schema = Schema.load(schema_path)
    typed, report = validate(raw.frame, schema, raw.source)
    served = [name for name, col in schema.columns.items() if col.type != "identifier"]
    return Dataset(typed[served], schema, report, raw.version, raw.source)

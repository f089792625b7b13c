"""The node's view of its data: read, validate, derive, once, at node start.

Without a schema file the table is the IAPT extract: it is validated against the built-in
extract schema and the derived variables are added, so studies see
`iapt_analysis_schema()`. With a schema file the table is served as validated, no derivation.
A table that fails validation still loads (so `node check` can show why), but is not usable.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..protocol.errors import DataError
from ..protocol.iapt_schema import (
    iapt_analysis_schema,
    iapt_appointments_schema,
    iapt_extract_schema,
)
from ..protocol.schema import Schema
from .iapt import consistency_notes, derive
from .iapt.appointments import PATHWAY_COLUMNS, summarise
from .sources import read_table
from .validate import ValidationReport, identifier_text, validate


@dataclass(frozen=True)
class Dataset:
    """`frame` holds every column of `schema` except identifiers, typed per `node.validate`
    (dates stay for cohort filters); identifiers are checked for repeats, then dropped."""

    frame: pd.DataFrame
    schema: Schema
    report: ValidationReport
    data_version: str  # sha256 hex of the source file, or of the query result (and appointments)
    source: str
    appointments_report: ValidationReport | None = None  # the appointment table's, when there is one

    @property
    def n_rows(self) -> int:
        return len(self.frame)

    @property
    def usable(self) -> bool:
        """False when validation found invalid values or missing required columns."""
        return self.report.ok and (self.appointments_report is None or self.appointments_report.ok)


def _with_appointments(raw, where: AppointmentSource):
    """The extract's rows with the pathway columns computed from the appointment table; the
    data version digests both tables; the appointment table's validation report; notes."""
    contacts = read_table(where.data, table=where.table, query=where.query)
    clash = [c for c in PATHWAY_COLUMNS if c in raw.frame.columns]
    if clash:
        raise DataError(
            f"{raw.source}: column '{clash[0]}' is computed from the appointment table "
            f"{contacts.source}; remove it from the extract, or leave out the appointment table."
        )
    typed, report = validate(contacts.frame, iapt_appointments_schema(), contacts.source)
    ids = raw.frame["pathway_id"] if "pathway_id" in raw.frame else pd.Series([None] * len(raw.frame))
    summary, notes = summarise(typed, identifier_text(ids))
    frame = raw.frame.reset_index(drop=True).assign(**{c: summary[c] for c in PATHWAY_COLUMNS})
    version = hashlib.sha256(f"{raw.version}:{contacts.version}".encode()).hexdigest()
    return frame, version, report, notes


@dataclass(frozen=True)
class AppointmentSource:
    """Where a node's appointment table is: a CSV/Parquet path, or an SQLAlchemy URL with
    `table` or `query` (node/iapt/appointments.py says what is computed from it)."""

    data: str
    table: str | None = None
    query: str | None = None


def load_dataset(
    source: str | Path,
    schema_path: str | Path | None = None,
    *,
    table: str | None = None,
    query: str | None = None,
    appointments: AppointmentSource | None = None,
) -> Dataset:
    """Load a CSV/Parquet file or an SQLAlchemy URL (with `table` or `query`); for the IAPT
    extract, optionally with the appointment table its pathway columns are computed from."""
    raw = read_table(source, table=table, query=query)
    if schema_path is None:
        frame, version, contacts, notes = raw.frame, raw.version, None, []
        if appointments is not None:
            frame, version, contacts, notes = _with_appointments(raw, appointments)
        typed, report = validate(frame, iapt_extract_schema(), raw.source)
        report = report.with_notes(notes + consistency_notes(typed))
        return Dataset(derive(typed), iapt_analysis_schema(), report, version, raw.source, contacts)
    if appointments is not None:
        raise DataError(
            f"{schema_path}: an appointment table goes with the IAPT extract only, not with a "
            "table described by a schema file; leave out 'appointments'."
        )
    schema = Schema.load(schema_path)
    typed, report = validate(raw.frame, schema, raw.source)
    served = [name for name, col in schema.columns.items() if col.type != "identifier"]
    return Dataset(typed[served], schema, report, raw.version, raw.source)

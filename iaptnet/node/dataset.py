"""The node's view of its data: read, validate, derive, once, at node start.

Without a schema file the table is the IAPT extract: it is validated against the built-in
extract schema and the derived variables are added, so studies see
`iapt_analysis_schema()`. With a schema file the table is served as validated, no derivation.
A table that fails validation still loads (so `node check` can show why), but is not usable.

The service column (the IAPT extract's `service_id`, whose levels are the network's) is
validated against the services the node declares: a row of any other service makes the table
unusable, with one sentence saying so. A node that declares none serves the codes its rows
hold. A study carries the network's codes (`StudySpec.levels`); `Dataset.for_study` gives the
rows and schema with those levels, so every node builds the same design columns.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..protocol.errors import DataError, SpecError
from ..protocol.iapt_schema import (
    iapt_analysis_schema,
    iapt_appointments_schema,
    iapt_extract_schema,
)
from ..protocol.schema import Schema
from .iapt import consistency_notes, derive
from .iapt.appointments import PATHWAY_COLUMNS, summarise
from .sources import read_table
from .validate import UNKNOWN_LEVEL, ValidationReport, identifier_text, validate

NOT_USABLE = "this node's data does not pass validation; its operator can run 'iaptnet node check' to see why."


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
    # The services this node declares (None: it declares none and serves the codes it holds).
    services: tuple[str, ...] | None = None
    _views: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def n_rows(self) -> int:
        return len(self.frame)

    @property
    def usable(self) -> bool:
        """False when validation found invalid values or missing required columns."""
        return self.report.ok and (self.appointments_report is None or self.appointments_report.ok)

    def unusable_reason(self) -> str:
        """Why the node cannot serve this table, in one sentence (never a value from a row)."""
        column = self.schema.network_column
        undeclared = next((c for c in self.report.columns if c.name == column and c.invalid.get(UNKNOWN_LEVEL)), None)
        if undeclared is not None and self.services is not None:
            return (
                f"this node's data holds referrals of a service it does not declare in '{column}' (it declares "
                f"{', '.join(self.services)}); declare every service whose referrals it holds, or leave their rows out."
            )
        return NOT_USABLE

    def for_study(self, spec) -> Dataset:
        """The rows and schema a study runs on: the service column's levels set to the ones the
        study carries (the network's codes), the same at every node. Refuses (SpecError) a
        study without them, or one whose services leave out this node's own."""
        column = self.schema.network_column
        if column is None:
            return self
        codes = (spec.levels or {}).get(column)
        if not codes:
            raise SpecError(
                f"the study carries no service codes for '{column}' (the coordinator takes them from the network's "
                "nodes); run it through 'iaptnet run' on the network."
            )
        key = tuple(codes)
        view = self._views.get(key)
        if view is None:
            own = [c for c in self.schema[column].levels if c not in set(codes)]
            if own:
                raise SpecError(
                    f"the study's services leave out this node's own ({', '.join(own)}), so its rows would not "
                    "count; the coordinator must run it on a network that lists this node's services."
                )
            schema = self.schema.with_services(codes)
            levels = list(schema[column].levels)
            if levels != list(codes):
                raise SpecError(f"the study's service codes for '{column}' are not the network's, in sorted order.")
            frame = self.frame.assign(**{column: self.frame[column].cat.set_categories(levels)})
            view = Dataset(
                frame, schema, self.report, self.data_version, self.source, self.appointments_report, self.services
            )
            self._views.clear()  # one network at a time: keep only its view
            self._views[key] = view
        return view


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
    services: tuple[str, ...] | None = None,
) -> Dataset:
    """Load a CSV/Parquet file or an SQLAlchemy URL (with `table` or `query`); for the IAPT
    extract, optionally with the appointment table its pathway columns are computed from.
    `services`: the codes of the services whose referrals the node declares it holds."""
    raw = read_table(source, table=table, query=query)
    if schema_path is None:
        frame, version, contacts, notes = raw.frame, raw.version, None, []
        if appointments is not None:
            frame, version, contacts, notes = _with_appointments(raw, appointments)
        extract = iapt_extract_schema().with_services(services) if services else iapt_extract_schema()
        typed, report = validate(frame, extract, raw.source)
        report = report.with_notes(notes + consistency_notes(typed))
        schema = served_schema(iapt_analysis_schema(), typed)
        return Dataset(derive(typed), schema, report, version, raw.source, contacts, services)
    if appointments is not None:
        raise DataError(
            f"{schema_path}: an appointment table goes with the IAPT extract only, not with a "
            "table described by a schema file; leave out 'appointments'."
        )
    schema = Schema.load(schema_path)
    if services:
        schema = schema.with_services(services)
    typed, report = validate(raw.frame, schema, raw.source)
    schema = served_schema(schema, typed)
    served = [name for name, col in schema.columns.items() if col.type != "identifier"]
    return Dataset(typed[served], schema, report, raw.version, raw.source, services=services)


def served_schema(schema: Schema, typed: pd.DataFrame) -> Schema:
    """The schema with its service column's levels this node's own codes (those it declares,
    or without a declaration those its rows hold): the categories of the typed column. A row
    of an undeclared service is an unknown level, which makes the table unusable."""
    column = schema.network_column
    if column is None or column not in typed.columns:
        return schema
    codes = [str(c) for c in typed[column].cat.categories]
    return schema.with_services(codes) if codes else schema

"""The built-in IAPT schemas, read from the TOML files beside the protocol.

The coordinator validates a study against `iapt_analysis_schema()` without seeing any data, and
each node serves exactly these columns, so both sides read the same files through these
functions. Pure: no pandas, no data.
"""

from __future__ import annotations

from functools import cache

from .schema import Schema, builtin_schema_path

#: Name of the merged schema a node serves for the IAPT extract (part of the fingerprint).
IAPT_SCHEMA_NAME = "iapt"
#: The low-intensity therapy types (docs/reference/domain.md#therapy-types, NHSE's LI/HI classification); the others
#: are high intensity.
LOW_INTENSITY_THERAPIES = (
    "GSH_BOOK",
    "NGSH_BOOK",
    "GSH_COMP",
    "NGSH_COMP",
    "PHYS_ACT",
    "PSYED_PEER",
    "OTHER_LI",
    "SIGNPOST",
    "MINDFUL",
    "BA_LI",
)
#: The extract's pathway columns, which a node may compute from an appointment table instead
#: (node/iapt/appointments.py); an extract served with one must not also have them.
PATHWAY_COLUMNS = (
    "n_treat",
    "n_dna",
    "n_cancel_pt",
    "n_cancel_prov",
    "first_treatment_date",
    "intensity",
    "primary_therapy",
)


@cache
def iapt_extract_schema() -> Schema:
    """The raw flat per-referral extract a Trust writes (docs/reference/domain.md#record-schema)."""
    return Schema.load(builtin_schema_path("iapt_extract"))


@cache
def iapt_derived_schema() -> Schema:
    """The variables the node derives from the extract (docs/reference/domain.md#derived-variables)."""
    return Schema.load(builtin_schema_path("iapt_derived"))


@cache
def iapt_appointments_schema() -> Schema:
    """The optional appointment table (one row per scheduled contact) beside the extract."""
    return Schema.load(builtin_schema_path("iapt_appointments"))


@cache
def iapt_analysis_schema() -> Schema:
    """Extract columns followed by derived columns: what studies on IAPT data may use."""
    extract, derived = iapt_extract_schema(), iapt_derived_schema()
    clash = set(extract.columns) & set(derived.columns)
    if clash:  # a packaging mistake, not a user's: the derived value would hide the raw one
        raise RuntimeError(f"iapt_derived.toml redefines extract columns: {sorted(clash)}")
    return extract.merged(derived, name=IAPT_SCHEMA_NAME)

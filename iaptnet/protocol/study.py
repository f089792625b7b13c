"""The study spec: what an analyst asks the network to compute, and its identity (hash).

A study TOML names a family, a formula, an optional cohort filter (`where`), an optional
offset column and the exposure term it is about. The coordinator validates it against the
dataset schema before any node is asked anything; the sha256 of its canonical form is the
study's identity, which Trusts approve and which every result and audit entry carries.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from . import cohort_filter
from .errors import SpecError
from .families import FAMILIES
from .formula_check import ParsedFormula, check_formula
from .schema import Schema

STUDY_KEYS = {
    "name", "kind", "title", "description", "family", "formula", "where", "offset", "exposure",
    "schema", "min_nodes", "reference",
}
KINDS = ("glm",)


@dataclass(frozen=True)
class StudySpec:
    name: str
    family: str
    formula: str
    where: str | None = None  # canonical rendering of the parsed filter
    offset: str | None = None
    exposure: str | None = None
    kind: str = "glm"
    title: str = ""
    description: str = ""
    min_nodes: int | None = None  # None: every node of the cohort must contribute
    reference: dict = field(default_factory=dict)
    dataset: str = "iapt"  # schema name
    schema_fingerprint: str = ""
    source: str = "study"

    def canonical(self) -> dict:
        """What is computed; presentation-only fields (title, description, reference) are left out."""
        return {
            "kind": self.kind,
            "name": self.name,
            "dataset": self.dataset,
            "schema": self.schema_fingerprint,
            "family": self.family,
            "formula": " ".join(self.formula.split()),
            "where": self.where,
            "offset": self.offset,
            "exposure": self.exposure,
            "min_nodes": self.min_nodes,
        }

    @property
    def hash(self) -> str:
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def where_tree(self) -> tuple | None:
        return cohort_filter.parse(self.where) if self.where else None

    def to_wire(self) -> dict:
        return self.canonical()

    @classmethod
    def from_wire(cls, data: dict, source: str = "task") -> "StudySpec":
        try:
            return cls(
                name=str(data["name"]), family=str(data["family"]), formula=str(data["formula"]),
                where=data.get("where"), offset=data.get("offset"), exposure=data.get("exposure"),
                kind=str(data.get("kind", "glm")), min_nodes=data.get("min_nodes"),
                dataset=str(data.get("dataset", "iapt")), schema_fingerprint=str(data.get("schema", "")),
                source=source,
            )
        except (KeyError, TypeError) as exc:
            raise SpecError(f"{source}: the study is missing field {exc}.") from None


def read_study_file(path: str | Path) -> dict:
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: study file not found.") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: not a valid TOML file ({exc}).") from None


def parse_study(data: dict, schema: Schema, source: str) -> tuple[StudySpec, ParsedFormula]:
    """Validate a study dict against a schema; raise SpecError naming the field."""
    unknown = set(data) - STUDY_KEYS
    if unknown:
        raise SpecError(f"{source}: unknown field '{sorted(unknown)[0]}' (expected {', '.join(sorted(STUDY_KEYS))}).")
    for key in ("name", "family", "formula"):
        if key not in data:
            raise SpecError(f"{source}: field '{key}' is required.")
        if not isinstance(data[key], str) or not data[key].strip():
            raise SpecError(f"{source}: field '{key}' must be a non-empty string.")
    kind = data.get("kind", "glm")
    if kind not in KINDS:
        raise SpecError(f"{source}: field 'kind' must be one of {', '.join(KINDS)}, got {kind!r}.")
    family = data["family"]
    if family not in FAMILIES:
        raise SpecError(f"{source}: field 'family' must be one of {', '.join(FAMILIES)}, got {family!r}.")
    parsed = check_formula(data["formula"], schema, family, source)
    where = None
    if data.get("where") is not None:
        if not isinstance(data["where"], str):
            raise SpecError(f"{source}: field 'where' must be a string.")
        try:
            tree = cohort_filter.parse(data["where"])
        except SpecError as exc:
            raise SpecError(f"{source}: field 'where': {exc}") from None
        cohort_filter.check_against_schema(tree, schema, source)
        where = cohort_filter.render(tree)
    offset = data.get("offset")
    if offset is not None:
        if not isinstance(offset, str) or offset not in schema:
            raise SpecError(f"{source}: field 'offset' must name a column of the dataset '{schema.name}'.")
        if schema[offset].type not in ("numeric", "integer"):
            raise SpecError(f"{source}: field 'offset' names the {schema[offset].type} column '{offset}'; an offset must be numeric (already on the link scale, e.g. log person-years).")
        if family == "binomial":
            raise SpecError(f"{source}: field 'offset' is not supported for a binomial model.")
    min_nodes = data.get("min_nodes")
    if min_nodes is not None and (isinstance(min_nodes, bool) or not isinstance(min_nodes, int) or min_nodes < 1):
        raise SpecError(f"{source}: field 'min_nodes' must be a whole number of at least 1.")
    reference = data.get("reference", {})
    if not isinstance(reference, dict):
        raise SpecError(f"{source}: field 'reference' must be a table.")
    exposure = data.get("exposure")
    if exposure is not None and not isinstance(exposure, str):
        raise SpecError(f"{source}: field 'exposure' must be a term name, e.g. \"n_treat\".")
    spec = StudySpec(
        name=data["name"].strip(),
        family=family,
        formula=data["formula"],
        where=where,
        offset=offset,
        exposure=exposure,
        kind=kind,
        title=str(data.get("title", "")),
        description=str(data.get("description", "")),
        min_nodes=min_nodes,
        reference=reference,
        dataset=schema.name,
        schema_fingerprint=schema.fingerprint,
        source=source,
    )
    return spec, parsed

"""Dataset schemas: the column contract every node of a network serves.

A schema fixes each column's type and, for categorical columns, the full list of levels in
order (the first is the reference). Levels come from the schema, never from local data, so
every node builds the same design columns in the same order even when a level is absent
locally. The schema's fingerprint is part of a study's identity.

One categorical column may take its levels from the network instead (`levels = "network"`,
the IAPT extract's `service_id`): each node declares the service codes whose rows it holds,
the coordinator binds the column to all of the network's codes in sorted order
(`with_services`) and sends them with the study, so every node still builds the same columns,
and the bound schema's fingerprint (so the study's hash) covers the codes used.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import SpecError
from .tomlfile import read_toml

#: Types a user may declare in a schema TOML. `date` and `identifier` columns are read and
#: validated but cannot appear in a formula.
COLUMN_TYPES = ("numeric", "integer", "binary", "categorical", "date", "identifier")
MODEL_TYPES = ("numeric", "integer", "binary", "categorical")
#: `levels = "network"`: the column's levels are the network's service codes.
NETWORK_LEVELS = "network"
#: A service code as a node declares it: an ODS organisation code (letters and digits).
SERVICE_CODE = re.compile(r"^[A-Z0-9]{1,12}$")
MAX_SERVICES = 10_000


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    levels: tuple[str, ...] = ()
    min: float | None = None
    max: float | None = None
    optional: bool = False
    description: str = ""
    source: str | None = None  # the column's header in the file, when it is not a valid name
    unique: bool = False  # identifier columns only: every value must differ (a row key)
    # Categorical columns: words for codes ("02" -> "unemployed, seeking work"), shown wherever
    # a report shows the code. Presentation only: not part of as_dict, so no hash changes.
    labels: tuple[tuple[str, str], ...] = ()
    # Categorical columns whose levels are the network's service codes (`levels = "network"`):
    # () until the schema is bound to a network (Schema.with_services).
    network: bool = False

    def label(self, level: str) -> str | None:
        """The words for one level, or None where the schema gives none."""
        return dict(self.labels).get(str(level))

    @property
    def is_categorical(self) -> bool:
        return self.type == "categorical"

    @property
    def in_models(self) -> bool:
        return self.type in MODEL_TYPES

    def as_dict(self) -> dict:
        out: dict = {"type": self.type}
        if self.network:
            out["levels"] = list(self.levels) if self.levels else NETWORK_LEVELS
            out["network"] = True
        elif self.levels:
            out["levels"] = list(self.levels)
        if self.min is not None:
            out["min"] = self.min
        if self.max is not None:
            out["max"] = self.max
        if self.optional:
            out["optional"] = True
        if self.source:
            out["source"] = self.source
        if self.unique:
            out["unique"] = True
        return out


@dataclass(frozen=True)
class Schema:
    """An ordered set of columns with a stable fingerprint."""

    name: str
    columns: dict[str, Column] = field(default_factory=dict)

    def __contains__(self, name: str) -> bool:
        return name in self.columns

    def __getitem__(self, name: str) -> Column:
        return self.columns[name]

    def names(self) -> list[str]:
        return list(self.columns)

    def canonical(self) -> dict:
        return {"name": self.name, "columns": {n: c.as_dict() for n, c in self.columns.items()}}

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of the canonical JSON form: two nodes serve the same dataset iff equal."""
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def network_column(self) -> str | None:
        """The column whose levels come from the network (the service), or None."""
        return next((n for n, c in self.columns.items() if c.network), None)

    def with_services(self, codes) -> Schema:
        """This schema with its network column's levels set to the network's service codes,
        sorted (so the order does not depend on how the network file lists its nodes); the
        schema itself when it has no such column."""
        column = self.network_column
        if column is None:
            return self
        levels = tuple(sorted(check_service_codes(codes, "the network's services")))
        return Schema(self.name, {**self.columns, column: replace(self.columns[column], levels=levels)})

    def network_levels(self) -> dict[str, list[str]]:
        """{network column: its bound levels}, or {} (no such column, or not bound)."""
        column = self.network_column
        if column is None or not self.columns[column].levels:
            return {}
        return {column: list(self.columns[column].levels)}

    def merged(self, other: Schema, name: str | None = None) -> Schema:
        cols = dict(self.columns)
        cols.update(other.columns)
        return Schema(name or self.name, cols)

    @classmethod
    def from_dict(cls, data: dict, source: str, name: str | None = None) -> Schema:
        columns = data.get("columns")
        if not isinstance(columns, dict) or not columns:
            raise SpecError(f"{source}: expected a [columns.NAME] table for each column, found none.")
        parsed: dict[str, Column] = {}
        for raw_name, spec in columns.items():
            col_name = str(raw_name).strip()
            where = f"{source}: column '{col_name}'"
            if not col_name.isidentifier():
                raise SpecError(
                    f"{where}: a column name must be a Python-style identifier (letters, digits, _); name it so and give the file's header as 'source'."
                )
            if col_name in parsed:
                raise SpecError(f"{where}: declared twice.")
            if not isinstance(spec, dict):
                raise SpecError(f"{where}: expected a table with at least 'type'.")
            keys = ("type", "levels", "labels", "min", "max", "optional", "description", "source", "unique")
            unknown = set(spec) - set(keys)
            if unknown:
                raise SpecError(f"{where}: unknown key '{sorted(unknown)[0]}' (expected {', '.join(keys)}).")
            ctype = spec.get("type")
            if ctype not in COLUMN_TYPES:
                raise SpecError(f"{where}: 'type' must be one of {', '.join(COLUMN_TYPES)}, got {ctype!r}.")
            levels = spec.get("levels", [])
            network = levels == NETWORK_LEVELS
            if network:
                if ctype != "categorical":
                    raise SpecError(f'{where}: levels = "network" is only allowed for a categorical column.')
                if any(c.network for c in parsed.values()):
                    raise SpecError(f"{where}: only one column of a schema may take its levels from the network.")
                if spec.get("labels") is not None:
                    raise SpecError(f"{where}: a column whose levels come from the network has no 'labels'.")
                levels = []
            elif ctype == "categorical":
                if not isinstance(levels, list) or len(levels) < 2:
                    raise SpecError(
                        f"{where}: a categorical column needs 'levels' = a list of at least two values (the first is the reference), "
                        'or levels = "network" for the service column.'
                    )
                levels = [str(v).strip() for v in levels]
                if len(set(levels)) != len(levels):
                    raise SpecError(f"{where}: 'levels' lists a value twice.")
            elif levels != []:  # 0 or "" too: not a list of levels
                raise SpecError(f"{where}: 'levels' is only allowed for categorical columns.")
            labels = () if network else _labels(spec.get("labels"), levels if ctype == "categorical" else None, where)
            lo, hi = spec.get("min"), spec.get("max")
            for key, val in (("min", lo), ("max", hi)):
                if val is not None and (isinstance(val, bool) or not isinstance(val, (int, float))):
                    raise SpecError(f"{where}: '{key}' must be a number.")
            if (lo is not None or hi is not None) and ctype not in ("numeric", "integer"):
                raise SpecError(f"{where}: 'min'/'max' apply only to numeric and integer columns.")
            if lo is not None and hi is not None and lo > hi:
                raise SpecError(f"{where}: 'min' is greater than 'max'.")
            source_name = spec.get("source")
            if source_name is not None and (not isinstance(source_name, str) or not source_name.strip()):
                raise SpecError(f"{where}: 'source' must be the column's header in the file.")
            if spec.get("unique") and ctype != "identifier":
                raise SpecError(f"{where}: 'unique' applies only to identifier columns.")
            parsed[col_name] = Column(
                name=col_name,
                type=ctype,
                levels=tuple(levels),
                min=None if lo is None else float(lo),
                max=None if hi is None else float(hi),
                optional=bool(spec.get("optional", False)),
                description=str(spec.get("description", "")),
                source=source_name.strip() if source_name else None,
                unique=bool(spec.get("unique", False)),
                labels=labels,
                network=network,
            )
        return cls(name or str(data.get("name", Path(source).stem)), parsed)

    @classmethod
    def load(cls, path: str | Path) -> Schema:
        path = Path(path)
        data = read_toml(path, "schema file")
        return cls.from_dict(data, str(path))


def check_service_codes(codes, where: str) -> list[str]:
    """Service codes as declared (ODS organisation codes: capital letters and digits, each
    once); raises SpecError naming `where`."""
    if isinstance(codes, str) or not isinstance(codes, (list, tuple)) or not codes or len(codes) > MAX_SERVICES:
        raise SpecError(f'{where}: expected a list of service codes (ODS organisation codes), e.g. ["RRP"].')
    out = []
    for code in codes:
        if not isinstance(code, str) or not SERVICE_CODE.match(code):
            raise SpecError(
                f"{where}: {code!r} is not a service code; an ODS organisation code is 1-12 capital letters "
                'and digits, e.g. "RRP".'
            )
        if code in out:
            raise SpecError(f"{where}: lists the service code '{code}' twice.")
        out.append(code)
    return out


def builtin_schema_path(name: str) -> Path:
    return Path(__file__).with_name("schemas") / f"{name}.toml"


def _labels(raw, levels: list | None, where: str) -> tuple[tuple[str, str], ...]:
    """A categorical column's `labels = { "02" = "unemployed, seeking work", ... }`: each key
    one of its levels, each value a short text (levels without one are shown as the code)."""
    if raw is None:
        return ()
    if levels is None:
        raise SpecError(f"{where}: 'labels' is only allowed for categorical columns.")
    if not isinstance(raw, dict) or not all(isinstance(v, str) and v.strip() for v in raw.values()):
        raise SpecError(f"{where}: 'labels' must be a table of level = \"words\" (text for each level it names).")
    unknown = [str(k) for k in raw if str(k).strip() not in levels]
    if unknown:
        raise SpecError(f"{where}: 'labels' names '{unknown[0]}', which is not one of the column's levels.")
    return tuple((str(k).strip(), str(v).strip()) for k, v in raw.items())

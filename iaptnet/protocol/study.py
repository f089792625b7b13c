"""The study spec: what an analyst asks the network to compute, and its identity (hash).

A study TOML names a family, a formula, an optional cohort filter (`where`), an optional
offset column, the exposure term it is about, and optional level merges:

    [merge.problem]
    ocd = ["ocd", "bdd"]          # the new level "ocd" holds the rows of ocd and bdd

Merges are applied identically at every node before the design is built (the filter still
sees the schema's own levels). The merged level takes the place, in the column's level order,
of the first level of its list, so `[merge.x] a = ["a", ...]` with the reference level `a`
first keeps the reference; term names then use the merged level (`problem[T.ocd]`). The coordinator validates it against the
dataset schema before any node is asked anything; the sha256 of its canonical form is the
study's identity, which Trusts approve and which every result and audit entry carries.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from . import cohort_filter
from .errors import SpecError
from .families import GLM_FAMILIES
from .formula_check import ParsedFormula, check_expression, check_formula
from .schema import Column, Schema
from .tomlfile import read_toml, reject_unknown

#: Fields every kind of study may have (besides its own).
COMMON_KEYS = {"name", "kind", "title", "description", "where", "schema", "min_nodes", "reference", "merge", "exposure"}
#: The fields of a GLM study (`kind = "glm"`, the default).
STUDY_KEYS = COMMON_KEYS | {"family", "formula", "offset", "weights", "cov_type", "cluster", "marginal"}
#: Covariance of the estimates, as statsmodels names them: model-based, robust (sandwich,
#: HC0) and cluster-robust (with statsmodels' small-sample correction; clusters must not span
#: nodes, e.g. services or matched pairs); and "CR2", clubSandwich's bias-reduced cluster
#: sandwich with Satterthwaite degrees of freedom per coefficient (few clusters).
COV_TYPES = ("nonrobust", "HC0", "cluster", "CR2")
#: The families CR2 is computed for (canonical links; validated against clubSandwich).
CR2_FAMILIES = ("binomial", "poisson", "gaussian")


@dataclass(frozen=True)
class StudySpec:
    name: str
    family: str = ""  # GLM kinds; "" for kinds without a single model
    formula: str = ""
    where: str | None = None  # canonical rendering of the parsed filter
    offset: str | None = None
    exposure: str | None = None
    kind: str = "glm"
    title: str = ""
    description: str = ""
    min_nodes: int | None = None  # None: every node of the cohort must contribute
    reference: dict = field(default_factory=dict)
    merge: dict = field(default_factory=dict)  # column -> {new level: [schema levels]}
    weights: str | None = None  # a column of prior weights (statsmodels' var_weights)
    cov_type: str = "nonrobust"
    cluster: str | None = None  # the cluster column for cov_type = "cluster" or "CR2"
    # Exposures whose standardised (g-computation) risks the results report: binary columns
    # (set to 1 and to 0), and contrasts {"exposure": column, "compare": [A, B]} (set to A and B).
    marginal: tuple = ()
    # Columns a node computed for this study from an earlier step of it (e.g. matched pairs
    # of a propensity-score study): {"state": key at the node, "columns": {name: type}}.
    augment: dict | None = None
    # Kind-specific settings of the non-GLM kinds (protocol/kinds/<kind>.py), canonical JSON.
    params: dict = field(default_factory=dict)
    dataset: str = "iapt"  # schema name
    schema_fingerprint: str = ""
    source: str = "study"
    # The levels the network gave its schema's network column (the services' codes, sorted):
    # {column: [codes]}; they travel with the study so every node builds the same columns.
    levels: dict = field(default_factory=dict)

    def canonical(self) -> dict:
        """What is computed; presentation-only fields (title, description, reference) are left out."""
        out = {
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
        if self.merge:  # only when present, so hashes of studies without merges are unchanged
            out["merge"] = {
                col: {new: list(levels) for new, levels in groups.items()} for col, groups in self.merge.items()
            }
        # Likewise the estimation options, only when they differ from the defaults.
        if self.weights:
            out["weights"] = self.weights
        if self.cov_type != "nonrobust":
            out["cov_type"] = self.cov_type
        if self.cluster:
            out["cluster"] = self.cluster
        if self.marginal:
            out["marginal"] = list(self.marginal)
        if self.augment:
            out["augment"] = {
                "state": str(self.augment["state"]),
                "columns": dict(sorted(self.augment["columns"].items())),
            }
        if self.params:
            out["params"] = self.params
        if self.levels:  # only for a schema bound to a network: others' hashes are unchanged
            out["levels"] = {col: list(codes) for col, codes in self.levels.items()}
        return out

    def schema_with_augment(self, schema: Schema) -> Schema:
        """The dataset schema as this study sees it: its service column's levels the study's
        (the network's codes it carries), plus the columns a node computed for this study."""
        column = schema.network_column
        codes = self.levels.get(column) if column and isinstance(self.levels, dict) else None
        if codes and list(schema[column].levels) != list(codes):
            schema = schema.with_services(codes)
        return augmented_schema(schema, self.augment)

    @property
    def hash(self) -> str:
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def where_tree(self) -> tuple | None:
        return cohort_filter.parse(self.where) if self.where else None

    def to_wire(self) -> dict:
        return self.canonical()

    @classmethod
    def from_wire(cls, data: dict, source: str = "task") -> StudySpec:
        merge = data.get("merge") if isinstance(data, dict) else None
        if merge is not None and not _merge_shaped(merge):
            raise SpecError(f"{source}: field 'merge' must map columns to tables of level lists.")
        levels = data.get("levels") if isinstance(data, dict) else None
        if levels is not None and not _levels_shaped(levels):
            raise SpecError(f"{source}: field 'levels' must map the service column to the network's service codes.")
        try:
            return cls(
                name=str(data["name"]),
                family=str(data.get("family", "")),
                formula=str(data.get("formula", "")),
                where=data.get("where"),
                offset=data.get("offset"),
                exposure=data.get("exposure"),
                kind=str(data.get("kind", "glm")),
                min_nodes=data.get("min_nodes"),
                merge=data.get("merge") or {},
                weights=data.get("weights"),
                cov_type=str(data.get("cov_type", "nonrobust")),
                cluster=data.get("cluster"),
                marginal=tuple(data.get("marginal") or ()),
                augment=data.get("augment"),
                params=data.get("params") or {},
                dataset=str(data.get("dataset", "iapt")),
                schema_fingerprint=str(data.get("schema", "")),
                source=source,
                levels=levels or {},
            )
        except (KeyError, TypeError) as exc:
            raise SpecError(f"{source}: the study is missing field {exc}.") from None


def approval_hash(spec: StudySpec) -> str:
    """The hash under which a Trust's approval of `spec` is looked up: its own; or, for a model
    derived from a study of another kind (`params["derived_from"]`, e.g. the propensity model of
    a PSM study), that study's hash, once the kind's module (`parent_of(spec)`) has checked that
    the study derives exactly this model. Raises SpecError for a derivation that does not hold."""
    link = spec.params.get("derived_from") if isinstance(spec.params, dict) else None
    if link is None:
        return spec.hash
    from importlib import import_module

    from .kinds import MODULES

    kind = link.get("kind") if isinstance(link, dict) else None
    module = import_module(f"{__package__}.kinds.{MODULES[kind]}") if kind in MODULES else None
    check = getattr(module, "parent_of", None)
    if check is None:
        raise SpecError(f"{spec.source}: the model '{spec.name}' claims to belong to a study that derives no models.")
    return check(spec).hash


def read_study_file(path: str | Path) -> dict:
    path = Path(path)
    data = read_toml(path, "study file")
    return embed_files(data, path)


MAX_EMBEDDED_BYTES = 20_000_000


def embed_files(data: dict, path: Path) -> dict:
    """Read the files a study names (a kind module's FILES, e.g. an access study's population
    table, relative to the study file) into the study's data, so that the study carries them
    wherever it is parsed again (the Flower hub, a Trust's approve) and hashes alike."""
    from .kinds import MODULES

    kind = data.get("kind")
    if not isinstance(kind, str) or kind not in MODULES:
        return data
    from importlib import import_module

    files = getattr(import_module(f"{__package__}.kinds.{MODULES[kind]}"), "FILES", {})
    for field_name, (target, builtins) in files.items():
        value = data.get(field_name)
        if not isinstance(value, str) or not value.strip() or target in data:
            continue
        file = builtins.get(value.strip()) or path.parent / value.strip()
        try:
            if file.stat().st_size > MAX_EMBEDDED_BYTES:
                raise SpecError(
                    f"{path}: field '{field_name}' names {file}, which is larger than "
                    f"{MAX_EMBEDDED_BYTES // 1_000_000} MB."
                )
            text = file.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            raise SpecError(
                f"{path}: field '{field_name}' names {value!r}, which does not exist (looked for {file})."
            ) from None
        except UnicodeDecodeError:
            raise SpecError(f"{path}: field '{field_name}' names {file}, which is not UTF-8 text.") from None
        except OSError as exc:
            raise SpecError(
                f"{path}: field '{field_name}' names {file}, which cannot be read ({exc.strerror})."
            ) from None
        data = {**data, target: {"source": str(file), "text": text}}
    return data


def parse_study(data: dict, schema: Schema, source: str):
    """Validate a study dict against a schema; raise SpecError naming the field.

    Returns (spec, parsed): for `kind = "glm"` (the default) `parsed` is the formula's
    ParsedFormula; other kinds are parsed by their module in protocol/kinds/ and return what
    their coordinator half needs."""
    from .kinds import MODULES, parse_kind

    kind = data.get("kind", "glm")
    if not isinstance(kind, str) or kind not in MODULES:
        raise SpecError(f"{source}: field 'kind' must be one of {', '.join(MODULES)}, got {kind!r}.")
    return parse_kind(kind, data, schema, source)


def parse_glm_study(data: dict, schema: Schema, source: str) -> tuple[StudySpec, ParsedFormula]:
    """The GLM study: the common fields, then family, formula and the estimation options."""
    common = common_fields(data, schema, source, STUDY_KEYS)
    for key in ("family", "formula"):
        if key not in data:
            raise SpecError(f"{source}: field '{key}' is required.")
        if not isinstance(data[key], str) or not data[key].strip():
            raise SpecError(f"{source}: field '{key}' must be a non-empty string.")
    family = data["family"]
    if family not in GLM_FAMILIES:
        raise SpecError(f"{source}: field 'family' must be one of {', '.join(GLM_FAMILIES)}, got {family!r}.")
    parsed = check_formula(data["formula"], schema, family, source)
    offset = data.get("offset")
    if offset is not None:
        check_offset(offset, schema, source)
        if family == "binomial":
            raise SpecError(f"{source}: field 'offset' is not supported for a binomial model.")
    weights, cov_type, cluster = check_estimation(data, schema, source)
    if cov_type == "CR2" and family not in CR2_FAMILIES:
        raise SpecError(
            f"{source}: field 'cov_type' = \"CR2\" is available for the {', '.join(CR2_FAMILIES)} families, "
            f"not {family}."
        )
    marginal = check_marginal(data.get("marginal"), data["formula"], schema, source, common["merge"])
    spec = StudySpec(
        family=family,
        formula=data["formula"],
        offset=offset,
        weights=weights,
        cov_type=cov_type,
        cluster=cluster,
        marginal=marginal,
        **common,
    )
    return spec, parsed


MAX_MARGINAL = 10
#: The keys of a contrast in `marginal`: {exposure = "column", compare = [value, value]}.
CONTRAST_KEYS = ("exposure", "compare")


def marginal_contrast(entry) -> tuple[str, tuple]:
    """(column, (first value, second value)) of one `marginal` entry: a binary column's name
    stands for the column set to 1 and to 0; a contrast for its two values."""
    if isinstance(entry, str):
        return entry, (1, 0)
    return entry["exposure"], tuple(entry["compare"])


def value_text(value) -> str:
    """A compared value as the study gave it: a level as written, a whole number without .0."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


def marginal_label(entry) -> str:
    """The name of one `marginal` entry in a round's request and in the results: the binary
    column's name, or `column A vs B` for a contrast (e.g. `imd_quintile 5 vs 1`)."""
    if isinstance(entry, str):
        return entry
    column, (first, second) = marginal_contrast(entry)
    return f"{column} {value_text(first)} vs {value_text(second)}"


def check_marginal(
    marginal, formula: str, schema: Schema, source: str, merge: dict | None = None
) -> tuple[str | dict, ...]:
    """Validate `marginal = [...]`: each entry a binary column the formula uses bare (set to 1
    and to 0), or a contrast `{exposure = "column", compare = [A, B]}` (the column set to A and
    to B on every row: two levels of a categorical column, two values of a numeric or integer
    one within its declared range, 0 and 1 of a binary one), whose column the formula uses bare
    (a categorical one also as C(column)); each interaction of an exposure beside the terms it
    multiplies (so that setting the exposure makes no design column that the model lacks).
    Returns the canonical entries: the names, and the contrasts as {exposure, compare} with
    levels as strings and numbers as floats (binary: 0 and 1)."""
    if marginal is None:
        return ()
    field_name = f"{source}: field 'marginal'"
    expect = (
        f"{field_name} must be a list of binary columns that the formula uses as terms, or of contrasts "
        '{exposure = "column", compare = [value, value]}, e.g. marginal = ["treated", '
        '{exposure = "imd_quintile", compare = ["5", "1"]}]'
    )
    if not isinstance(marginal, list) or not marginal or len(marginal) > MAX_MARGINAL:
        raise SpecError(f"{expect} (at most {MAX_MARGINAL}).")
    from .formula_check import parse_formula

    terms = parse_formula(formula, source).rhs_terms
    factor_sets = [frozenset(str(f.expr).replace(" ", "") for f in term.factors) for term in terms]
    out: list = []
    labels: list[str] = []
    for entry in marginal:
        if isinstance(entry, dict):
            column = entry.get("exposure")
            entry = _check_contrast(
                entry, field_name, schema, (merge or {}).get(column) if isinstance(column, str) else None
            )
            name = entry["exposure"]
        else:
            name = entry
            if not isinstance(name, str):
                raise SpecError(f"{expect}; {name!r} is neither a column name nor a contrast.")
            if name not in schema or schema[name].type != "binary":
                raise SpecError(
                    f"{expect}; '{name}' is not a binary (0/1) column of the dataset '{schema.name}' (for another "
                    f'column name the two values to compare: {{exposure = "{name}", compare = [value, value]}}).'
                )
        label = marginal_label(entry)
        if label in labels:
            raise SpecError(f"{field_name} lists '{label}' twice.")
        bare = {name, f"C({name})"} if schema[name].is_categorical else {name}
        own = next((f for f in bare if frozenset([f]) in factor_sets), None)
        if own is None:
            how = f"'{name}' or 'C({name})'" if schema[name].is_categorical else f"'{name}' (the column bare)"
            raise SpecError(f"{field_name} lists '{label}', but the formula has no term {how}.")
        for factors in factor_sets:
            if own in factors and len(factors) > 1 and factors - {own} not in factor_sets:
                rest = ":".join(sorted(factors - {own}))
                raise SpecError(
                    f"{field_name} lists '{label}', whose interaction with '{rest}' needs the term "
                    f"'{rest}' in the formula too (setting '{name}' turns the interaction into it)."
                )
        labels.append(label)
        out.append(entry)
    return tuple(out)


def _check_contrast(entry: dict, field_name: str, schema: Schema, groups: dict | None) -> dict:
    """One contrast of `marginal`, canonical: {"exposure": column, "compare": [A, B]}."""
    example = '{exposure = "column", compare = [value, value]}'
    unknown = sorted(set(entry) - set(CONTRAST_KEYS))
    if unknown or set(entry) != set(CONTRAST_KEYS):
        what = f"has unknown key '{unknown[0]}'" if unknown else "lacks 'exposure' or 'compare'"
        raise SpecError(f"{field_name} has a contrast that {what}; a contrast is {example}.")
    name, values = entry["exposure"], entry["compare"]
    if not isinstance(name, str) or name not in schema:
        raise SpecError(
            f"{field_name} has a contrast of {name!r}, which is not a column of the dataset '{schema.name}'."
        )
    col = schema[name]
    if not col.in_models:
        raise SpecError(f"{field_name} has a contrast of the {col.type} column '{name}', which a model cannot use.")
    where = f"{field_name} contrast of '{name}'"
    if not isinstance(values, list) or len(values) != 2:
        raise SpecError(f"{where} must compare two values, e.g. compare = {_example_values(col)}.")
    if col.is_categorical:
        levels = merged_levels(col.levels, groups)[0] if groups else list(col.levels)
        for v in values:
            if not isinstance(v, str):
                raise SpecError(
                    f"{where} must compare two of its levels as text, e.g. compare = {_example_values(col)}, not {v!r}."
                )
            if v not in levels:
                merged = " (after the study's merges)" if groups else ""
                raise SpecError(
                    f"{where} compares '{v}', which is not a level of '{name}'{merged}; its levels are {', '.join(levels)}."
                )
        canonical = [str(v) for v in values]
    else:
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise SpecError(f"{where} must compare two numbers, e.g. compare = {_example_values(col)}, not {v!r}.")
        if col.type == "binary":
            if sorted(values) != [0, 1]:
                raise SpecError(f"{where} must compare 1 with 0 (or 0 with 1), the binary column's two values.")
            canonical = [int(v) for v in values]
        else:
            for v in values:
                if (col.min is not None and v < col.min) or (col.max is not None and v > col.max):
                    low = "-inf" if col.min is None else value_text(col.min)
                    high = "inf" if col.max is None else value_text(col.max)
                    raise SpecError(f"{where} compares {v!r}, outside the column's declared range {low} to {high}.")
                if col.type == "integer" and not float(v).is_integer():
                    raise SpecError(f"{where} compares {v!r}, but '{name}' is an integer column: give whole numbers.")
            canonical = [float(v) for v in values]
    if canonical[0] == canonical[1]:
        raise SpecError(f"{where} compares {values[0]!r} with itself; give two different values.")
    return {"exposure": name, "compare": canonical}


def _example_values(col: Column) -> str:
    if col.is_categorical and len(col.levels) >= 2:
        return f'["{col.levels[-1]}", "{col.levels[0]}"]'
    if col.type == "binary":
        return "[1, 0]"
    return "[2, 1]"


def common_fields(data: dict, schema: Schema, source: str, allowed: set[str]) -> dict:
    """Validate the fields every kind shares; return them as StudySpec keyword arguments.

    `allowed` is the kind's full set of fields (common ones included): anything else is an
    unknown field. A kind module then adds its own `params` (and family/formula if any)."""
    reject_unknown(data, allowed, source)
    if not isinstance(data.get("name"), str) or not data["name"].strip():
        raise SpecError(f"{source}: field 'name' is required and must be a non-empty string.")
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
    min_nodes = data.get("min_nodes")
    if min_nodes is not None and (isinstance(min_nodes, bool) or not isinstance(min_nodes, int) or min_nodes < 1):
        raise SpecError(f"{source}: field 'min_nodes' must be a whole number of at least 1.")
    reference = data.get("reference", {})
    if not isinstance(reference, dict):
        raise SpecError(f"{source}: field 'reference' must be a table.")
    exposure = data.get("exposure")
    if exposure is not None and not isinstance(exposure, str):
        raise SpecError(f"{source}: field 'exposure' must be a string.")
    return {
        "name": data["name"].strip(),
        "kind": data.get("kind", "glm"),
        "where": where,
        "exposure": exposure,
        "title": str(data.get("title", "")),
        "description": str(data.get("description", "")),
        "min_nodes": min_nodes,
        "reference": reference,
        "merge": check_merges(data.get("merge"), schema, source),
        "dataset": schema.name,
        "schema_fingerprint": schema.fingerprint,
        "source": source,
        "levels": schema.network_levels(),
    }


MAX_MERGED_COLUMNS = 50


def _merge_shaped(merge) -> bool:
    """{column: {new level: [level, ...]}} with strings throughout (structure only)."""
    return (
        isinstance(merge, dict)
        and len(merge) <= MAX_MERGED_COLUMNS
        and all(
            isinstance(col, str)
            and isinstance(groups, dict)
            and all(
                isinstance(new, str)
                and isinstance(levels, list)
                and len(levels) <= 1000
                and all(isinstance(v, str) for v in levels)
                for new, levels in groups.items()
            )
            for col, groups in merge.items()
        )
    )


def _levels_shaped(levels) -> bool:
    """{column: [code, ...]}: one column, its codes as strings (structure only; a node checks
    the codes themselves when it binds its schema)."""
    return (
        isinstance(levels, dict)
        and len(levels) <= 1
        and all(
            isinstance(col, str) and isinstance(codes, list) and all(isinstance(c, str) for c in codes)
            for col, codes in levels.items()
        )
    )


def check_merges(merge, schema: Schema, source: str) -> dict:
    """Validate `[merge.COLUMN] new = ["level", ...]` tables; return their canonical form."""
    if merge is None or merge == {}:
        return {}
    if not isinstance(merge, dict) or len(merge) > MAX_MERGED_COLUMNS:
        raise SpecError(f'{source}: field \'merge\' must be tables like [merge.problem] ocd = ["ocd", "bdd"].')
    out = {}
    for column, groups in merge.items():
        where = f"{source}: field 'merge.{column}'"
        if not isinstance(column, str) or column not in schema:
            raise SpecError(
                f"{source}: field 'merge' names column '{column}', which the dataset '{schema.name}' does not have."
            )
        col = schema[column]
        if not col.is_categorical:
            raise SpecError(
                f"{where} merges levels of the {col.type} column '{column}'; only categorical columns have levels to merge."
            )
        if not isinstance(groups, dict) or not groups:
            raise SpecError(
                f'{where} must map a new level name to the levels it merges, e.g. {column}.other = ["{col.levels[-1]}", ...].'
            )
        used: dict[str, str] = {}
        canonical = {}
        for new, levels in groups.items():
            if not isinstance(new, str) or not new.strip() or len(new) > 60 or not new.isprintable():
                raise SpecError(f"{where}: a merged level needs a short printable name.")
            if not isinstance(levels, list) or len(levels) < 2 or not all(isinstance(v, str) for v in levels):
                raise SpecError(f"{where}.{new} must list at least two levels of '{column}' to merge.")
            for level in levels:
                if level not in col.levels:
                    raise SpecError(
                        f"{where}.{new} lists '{level}', which is not a level of '{column}'; its levels are {', '.join(col.levels)}."
                    )
                if level in used:
                    raise SpecError(f"{where}: level '{level}' is merged twice (into '{used[level]}' and '{new}').")
                used[level] = new
            if new in col.levels and new not in levels:
                raise SpecError(
                    f"{where}.{new}: the merged level's name is already a level of '{column}' that it does not include."
                )
            canonical[new] = list(levels)
        names = merged_levels(col.levels, canonical)[0]
        if len(names) < 2:
            raise SpecError(f"{where} leaves '{column}' with a single level; drop the term instead.")
        if len(set(names)) != len(names):
            raise SpecError(f"{where}: two merged levels share a name.")
        out[column] = canonical
    return out


def merged_levels(levels: tuple[str, ...] | list[str], groups: dict) -> tuple[list[str], dict[str, str]]:
    """(new level order, old level -> new level) for one column's merges."""
    mapping = {old: new for new, olds in groups.items() for old in olds}
    first = {olds[0]: new for new, olds in groups.items()}
    order = []
    for level in levels:
        if level in first:
            order.append(first[level])
        elif level not in mapping:
            order.append(level)
    return order, mapping


def check_offset(offset, schema: Schema, source: str) -> frozenset[str]:
    """An offset is a numeric column or an allowed expression of columns (e.g. log(days)),
    on the link scale; returns the columns it reads."""
    if isinstance(offset, str) and offset in schema and schema[offset].type not in ("numeric", "integer"):
        raise SpecError(
            f"{source}: field 'offset' names the {schema[offset].type} column '{offset}'; an offset must be numeric (on the link scale, e.g. log(person_years))."
        )
    columns = check_expression(offset, schema, source, "offset")
    for name in columns:
        if schema[name].type not in ("numeric", "integer", "binary"):
            raise SpecError(
                f"{source}: field 'offset' uses the {schema[name].type} column '{name}'; an offset must be numeric."
            )
    return columns


def check_estimation(data: dict, schema: Schema, source: str) -> tuple[str | None, str, str | None]:
    """Validate `weights`, `cov_type` and `cluster`."""
    weights = data.get("weights")
    if weights is not None:
        if not isinstance(weights, str) or weights not in schema or schema[weights].type not in ("numeric", "integer"):
            raise SpecError(
                f"{source}: field 'weights' must name a numeric column of the dataset '{schema.name}' (non-negative prior weights)."
            )
        if schema[weights].min is not None and schema[weights].min < 0:
            raise SpecError(
                f"{source}: field 'weights' names '{weights}', which may be negative; weights must be zero or more."
            )
    cov_type = data.get("cov_type", "nonrobust")
    if cov_type not in COV_TYPES:
        raise SpecError(f"{source}: field 'cov_type' must be one of {', '.join(COV_TYPES)}, got {cov_type!r}.")
    cluster = data.get("cluster")
    if cov_type in ("cluster", "CR2"):
        if (
            not isinstance(cluster, str)
            or cluster not in schema
            or schema[cluster].type not in ("categorical", "integer", "binary")
        ):
            named = f", not {cluster!r}" if isinstance(cluster, str) else ""
            raise SpecError(
                f"{source}: field 'cluster' must name a categorical or integer column (clusters must not span nodes) when cov_type = \"{cov_type}\"{named}."
            )
    elif cluster is not None:
        raise SpecError(f'{source}: field \'cluster\' applies only with cov_type = "cluster" or "CR2".')
    return weights, cov_type, cluster


#: Types of columns a node computes for a study; "positive" is a numeric column the node
#: guarantees above 0 (an its study's denominator, whose rows at 0 are left out), so that
#: log() of it passes the transform whitelist.
AUGMENT_TYPES = ("numeric", "integer", "binary", "positive")


def augmented_schema(schema: Schema, augment: dict | None) -> Schema:
    """`schema` plus columns a node computed for a study (checked: names, types)."""
    if not augment:
        return schema
    if (
        not isinstance(augment, dict)
        or not isinstance(augment.get("state"), str)
        or not isinstance(augment.get("columns"), dict)
    ):
        raise SpecError("the study's computed columns are not described properly.")
    extra = {}
    for name, kind in augment["columns"].items():
        if not isinstance(name, str) or not name.isidentifier() or name in schema or kind not in AUGMENT_TYPES:
            raise SpecError("the study's computed columns clash with the dataset or have an unknown type.")
        extra[name] = (
            Column(name=name, type="numeric", min=math.ulp(0.0)) if kind == "positive" else Column(name=name, type=kind)
        )
    return schema.merged(Schema(schema.name, extra))


def check_at_node(spec: StudySpec, schema: Schema) -> None:
    """A node re-checks what arrives from the coordinator: filter, offset, merges and the
    estimation options."""
    schema = spec.schema_with_augment(schema)
    if spec.where:
        try:
            tree = cohort_filter.parse(spec.where)
        except SpecError as exc:
            raise SpecError(f"{spec.source}: field 'where': {exc}") from None
        cohort_filter.check_against_schema(tree, schema, spec.source)
    if spec.offset is not None:
        check_offset(spec.offset, schema, spec.source)
    check_estimation({"weights": spec.weights, "cov_type": spec.cov_type, "cluster": spec.cluster}, schema, spec.source)
    if spec.marginal and spec.kind == "glm":
        if list(check_marginal(list(spec.marginal), spec.formula, schema, spec.source, spec.merge)) != list(
            spec.marginal
        ):
            raise SpecError(f"{spec.source}: field 'marginal' is not in canonical form.")
    if spec.merge:
        if check_merges(spec.merge, schema, spec.source) != spec.merge:
            raise SpecError(f"{spec.source}: field 'merge' is not in canonical form.")

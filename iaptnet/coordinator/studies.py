"""Loading study files and validating them against their dataset's schema, before any node
is asked anything. A study names its dataset schema with `schema = "path.toml"` (relative to
the study file); without it, the network's own schema is used (all nodes must share one), and
without that, the built-in IAPT dataset (the extract's columns and the derived variables).

A schema whose service column takes its levels from the network (the IAPT extract's
`service_id`) is bound to the network's service codes first (`services`: what the nodes
declare), so the study is checked against, and its hash covers, the levels every node will
build its columns with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..protocol.errors import SpecError
from ..protocol.formula_check import ParsedFormula
from ..protocol.iapt_schema import iapt_analysis_schema
from ..protocol.kinds import glm as glm_protocol
from ..protocol.schema import Schema
from ..protocol.sensitivity import parse_with_companions
from ..protocol.study import StudySpec, read_study_file


@dataclass(frozen=True)
class LoadedStudy:
    spec: StudySpec
    parsed: ParsedFormula
    path: Path | None
    #: The sensitivity analyses the study asks for (protocol/sensitivity.py): (analysis, study).
    companions: tuple[tuple[str, LoadedStudy], ...] = ()


def parse_loaded(data: dict, schema: Schema, source: str, path: Path | None) -> LoadedStudy:
    """A study and the companion studies of its [sensitivity] table, each validated."""
    (spec, parsed), companions = parse_with_companions(data, schema, source)
    loaded = tuple((analysis, LoadedStudy(*parsed_companion, path)) for analysis, parsed_companion in companions)
    return LoadedStudy(spec, parsed, path, loaded)


def resolve_schema(study_data: dict, study_path: Path | None, network_schemas: set[str | None]) -> Schema:
    if "schema" in study_data and (not isinstance(study_data["schema"], str) or not study_data["schema"].strip()):
        raise SpecError(f"{study_path or 'study'}: field 'schema' must be the path of a schema TOML file.")
    if study_data.get("schema"):
        base = study_path.parent if study_path else Path.cwd()
        return Schema.load(base / str(study_data["schema"]))
    custom = {s for s in network_schemas if s}
    if len(custom) > 1 or (custom and None in network_schemas):
        raise SpecError(
            f"{study_path or 'study'}: the network's nodes serve different schemas; name the study's schema with 'schema = \"...\"'."
        )
    if custom:
        return Schema.load(next(iter(custom)))
    return iapt_analysis_schema()


def load_study(path: str | Path, network_schemas: set[str | None] = frozenset({None}), services=None) -> LoadedStudy:
    """`services`: the network's service codes (Network.services); None leaves a service
    column unbound (a study checked without a network)."""
    path = Path(path)
    data = read_study_file(path)
    schema = bind_services(resolve_schema(data, path, set(network_schemas)), services, path)
    return parse_loaded(data, schema, str(path), path)


def bind_services(schema: Schema, services, where) -> Schema:
    """`schema` with its service column's levels set to the network's codes; unchanged
    without a service column or without codes (None). A network that declares no services
    for a schema that needs them is refused."""
    if services is None or schema.network_column is None:
        return schema
    if not services:
        raise SpecError(
            f"{where}: the dataset's '{schema.network_column}' takes its levels from the network, but the network "
            "lists no services (each node's 'services' in the network file, or [services] in hub.toml)."
        )
    return schema.with_services(list(services))


def batch_hash(specs: list[StudySpec]) -> str:
    """Identity of a batch of studies run together (protocol/kinds/glm.py), in order."""
    return glm_protocol.batch_hash([s.hash for s in specs])


def check_min_nodes(studies: list[LoadedStudy], n_nodes: int, network: str) -> None:
    """A study whose `min_nodes` is above the network's size is refused before anything runs;
    `network` says what the network has ("the network network.toml has 4 node(s)")."""
    for study in studies:
        wanted = study.spec.min_nodes
        if wanted is not None and wanted > n_nodes:
            raise SpecError(
                f"{study.path or study.spec.source}: field 'min_nodes' is {wanted}, but {network}; "
                f"set it to at most {n_nodes}."
            )

"""The `network.toml` contract: the nodes of a network for the in-process engine or the
local launcher. Each `[[node]]` has `name`, `data` (a CSV or Parquet path relative to the file,
or an SQLAlchemy URL with `table` or `query`), optional `schema` and optional `policy`; for the
IAPT extract, optional `appointments` (a path, or a URL with `appointments_table` or
`appointments_query`). A node serving the IAPT extract (or any schema whose service column
takes its levels from the network) declares `services`: the ODS codes of the services whose
referrals it holds; the network's codes, sorted, are the levels of `service_id` in every study
run on it (protocol/schema.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..protocol.errors import SpecError
from ..protocol.schema import check_service_codes
from ..protocol.tomlfile import read_toml, reject_unknown

NODE_KEYS = {
    "name",
    "data",
    "schema",
    "policy",
    "table",
    "query",
    "appointments",
    "appointments_table",
    "appointments_query",
    "services",
}
STATE_FOLDER = ".iaptnet-state"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


@dataclass(frozen=True)
class Network:
    path: Path
    nodes: list[dict]

    @property
    def schema_paths(self) -> set[str | None]:
        return {n.get("schema") for n in self.nodes}

    @property
    def services(self) -> dict[str, str]:
        """Service code -> the name of the node that holds its referrals, in code order; {}
        when no node declares services (a network of custom tables without a service column)."""
        out = {code: n["name"] for n in self.nodes for code in node_services(n)}
        return dict(sorted(out.items()))


def name_services(results: list[dict], services: dict[str, str], column: str | None) -> list[dict]:
    """Each result gains `service_column` (the column whose levels are the network's services)
    and `services` (each code -> the node holding it), so that reports name a service (a
    `service_id` term or group) by its node."""
    if services and column:
        for result in results:
            result["service_column"] = column
            result["services"] = dict(services)
    return results


def node_services(node: dict) -> tuple[str, ...]:
    """The service codes a node entry declares (kept as one comma-separated string, as
    Flower's node config holds scalars)."""
    text = node.get("services") or ""
    return tuple(code for code in str(text).split(",") if code)


def load_network(path: str | Path) -> Network:
    path = Path(path)
    data = read_toml(path, "network file")
    raw_nodes = data.get("node")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise SpecError(f"{path}: expected one or more [[node]] tables.")
    base = path.parent
    nodes, seen = [], set()
    for i, raw in enumerate(raw_nodes, 1):
        where = f"{path}: [[node]] number {i}"
        if not isinstance(raw, dict):
            raise SpecError(f"{where} is not a table; write each node as a [[node]] table with 'name' and 'data'.")
        reject_unknown(raw, NODE_KEYS, where)
        name = raw.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise SpecError(f"{where}: field 'name' must be a short name of letters, digits, '_', '-' or '.'.")
        if name in seen:
            raise SpecError(f"{where}: field 'name' repeats '{name}'; node names must be unique.")
        seen.add(name)
        data_ref = raw.get("data")
        if not isinstance(data_ref, str) or not data_ref:
            raise SpecError(f"{where} ({name}): field 'data' must be a file path or an SQLAlchemy URL.")
        # A node without a policy file keeps its audit log and release memory beside the
        # network file (node/runtime.py: state_folder).
        node = {"name": name, "data": resolve_path(base, data_ref), "state": str(base / STATE_FOLDER)}
        if "://" in data_ref:
            if not (raw.get("table") or raw.get("query")):
                raise SpecError(f"{where} ({name}): an SQL source needs 'table' or 'query'.")
        elif not _exists(node["data"]):
            raise SpecError(f"{where} ({name}): field 'data' names {data_ref}, which does not exist.")
        for key in ("schema", "policy"):
            if raw.get(key) is not None:
                value = resolve_path(base, str(raw[key]))
                if not _exists(value):
                    raise SpecError(f"{where} ({name}): field '{key}' names {raw[key]}, which does not exist.")
                node[key] = value
        for key in ("table", "query", "appointments_table", "appointments_query"):
            if raw.get(key) is not None:
                node[key] = str(raw[key])
        appointments = raw.get("appointments")
        if appointments is not None:
            if not isinstance(appointments, str) or not appointments:
                raise SpecError(f"{where} ({name}): field 'appointments' must be a file path or an SQLAlchemy URL.")
            if raw.get("schema") is not None:
                raise SpecError(
                    f"{where} ({name}): field 'appointments' goes with the IAPT extract only, not with 'schema'."
                )
            node["appointments"] = resolve_path(base, appointments)
            if "://" in appointments:
                if not (raw.get("appointments_table") or raw.get("appointments_query")):
                    raise SpecError(
                        f"{where} ({name}): an SQL appointment table needs 'appointments_table' or "
                        "'appointments_query'."
                    )
            elif not _exists(node["appointments"]):
                raise SpecError(f"{where} ({name}): field 'appointments' names {appointments}, which does not exist.")
        if raw.get("services") is not None:
            node["services"] = ",".join(check_service_codes(raw["services"], f"{where} ({name}): field 'services'"))
        elif _needs_services(node.get("schema")):
            raise SpecError(
                f"{where} ({name}): field 'services' is required: the ODS codes of the services whose referrals "
                'the node holds (its service_id values), e.g. services = ["RRP"].'
            )
        nodes.append(node)
    _check_services_unique(path, nodes)
    return Network(path, nodes)


def _needs_services(schema_path: str | None) -> bool:
    """Whether a node's schema (None: the IAPT extract) has a column whose levels are the
    network's service codes."""
    if schema_path is None:
        return True
    from ..protocol.schema import Schema

    return Schema.load(schema_path).network_column is not None


def _check_services_unique(path: Path, nodes: list[dict]) -> None:
    holder: dict[str, str] = {}
    for node in nodes:
        for code in node_services(node):
            if code in holder:
                raise SpecError(
                    f"{path}: the service '{code}' is declared by both '{holder[code]}' and '{node['name']}'; "
                    "a service's referrals are held by one node."
                )
            holder[code] = node["name"]


def _exists(value: str) -> bool:
    """Whether a file exists; False for a name the system refuses (too long, a NUL byte)."""
    try:
        return Path(value).exists()
    except (OSError, ValueError):
        return False


def resolve_path(base: Path, value: str) -> str:
    """A data or schema path relative to the file that names it (URLs pass through)."""
    if "://" in value:
        return value
    path = Path(value)
    return str(path if path.is_absolute() else (base / path))

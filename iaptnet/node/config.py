"""`node.toml`: how a Trust's node daemon finds its hub, its keys and its data.

    name     = "trust-a"                          # the node's name in studies and results
    hub      = "hub.example.nhs.uk:443"           # the hub's address (host:port); TLS always
    ca_cert  = "/etc/iaptnet/ca.crt"              # the network CA certificate
    key      = "/etc/iaptnet/trust-a.key"         # the node's authentication private key
    data     = "postgresql+psycopg://iaptnet@db/iapt"   # or a CSV / Parquet path
    table    = "iapt_extract"                     # for a database: a table, or query = "SELECT ..."
    appointments = "appointments.parquet"         # optional, IAPT extract only: the appointment table the
                                                  # pathway columns are computed from (a database: a URL
                                                  # with appointments_table or appointments_query)
    services = ["RRP"]                            # the IAPT extract: the ODS codes of the services
                                                  # whose referrals the table holds (its service_id);
                                                  # a row of any other service makes the node refuse
                                                  # (without it, the node serves the codes its rows hold)
    schema   = "schema.toml"                      # optional (default: the built-in IAPT extract)
    policy   = "/etc/iaptnet/policy.toml"         # the Trust's disclosure policy (required)
    state_dir = "/var/lib/iaptnet-node"           # approved app hashes, Flower's private home
    approved_apps = "/etc/iaptnet/approved-apps.txt"   # optional (default: <state_dir>/approved-apps.txt)

    [tuning]                                      # optional
    poll_idle = 1.0      # seconds between polls of the hub while no study runs
    poll_active = 0.25   # ... while a study runs (for 120 s after the last message)
    runtime_port = 0     # the SuperNode's Runtime API port on 127.0.0.1 (0: any free port)
    stall_limit = 300    # the watchdog ends the daemon (exit 75) when its loop makes no progress this long
    task_limit = 900     # ... or when one task runs longer than this (seconds)

Relative paths are relative to the folder of node.toml. Every mistake is reported as one
sentence naming the file and the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..protocol.errors import SpecError
from ..protocol.tomlfile import read_toml, reject_unknown

KEYS = {
    "name",
    "hub",
    "ca_cert",
    "key",
    "data",
    "table",
    "query",
    "schema",
    "policy",
    "state_dir",
    "approved_apps",
    "tuning",
    "appointments",
    "appointments_table",
    "appointments_query",
    "services",
}
TUNING_KEYS = {"poll_idle", "poll_active", "runtime_port", "stall_limit", "task_limit"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")
HASH = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class NodeFile:
    path: Path
    name: str
    hub: str
    ca_cert: Path
    key: Path
    data: str
    table: str | None
    query: str | None
    schema: str | None
    policy: str | None
    state_dir: Path
    approved_apps: Path
    appointments: str | None = None
    appointments_table: str | None = None
    appointments_query: str | None = None
    services: tuple[str, ...] = ()  # the ODS codes of the services whose referrals it holds
    poll_idle: float = 1.0
    poll_active: float = 0.25
    runtime_port: int = 0
    stall_limit: float = 300.0  # the watchdog's limits (flower/supernode.py's Watchdog)
    task_limit: float = 900.0
    extra: dict = field(default_factory=dict)

    def node_config(self) -> dict:
        """The mapping `iaptnet.node.runtime.NodeConfig.from_mapping` reads."""
        out = {"name": self.name, "data": self.data}
        for key in ("schema", "policy", "table", "query", "appointments", "appointments_table", "appointments_query"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.services:
            out["services"] = ",".join(self.services)
        # Without a policy file (local networks only) the audit log and release memory still
        # live on disk, under the daemon's state folder.
        out["state"] = str(self.state_dir / "governance")
        return out

    @property
    def hub_host(self) -> str:
        return self.hub.rsplit(":", 1)[0].strip("[]")


def _resolve(base: Path, value: str) -> str:
    if "://" in value:
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p))


def load_node_file(path: str | Path) -> NodeFile:
    path = Path(path)
    raw = read_toml(path, "node configuration file")
    base = path.parent.resolve()
    reject_unknown(raw, KEYS, path)

    def text(key: str, required: bool = True) -> str | None:
        value = raw.get(key)
        if value is None:
            if required:
                raise SpecError(f"{path}: field '{key}' is required.")
            return None
        if not isinstance(value, str) or not value.strip():
            raise SpecError(f"{path}: field '{key}' must be a non-empty string.")
        return value.strip()

    def existing_file(key: str, what: str, required: bool = True) -> str | None:
        value = text(key, required)
        if value is None:
            return None
        resolved = Path(_resolve(base, value))
        if not resolved.is_file():
            raise SpecError(f"{path}: field '{key}' names {value}, which is not a readable file ({what}).")
        return str(resolved)

    name = text("name")
    if not _NAME.match(name):
        raise SpecError(f"{path}: field 'name' must be a short name of letters, digits, '_', '-' or '.'.")
    hub = text("hub")
    match = _ADDRESS.match(hub)
    if not match or not 0 < int(match.group(2)) < 65536:
        raise SpecError(f"{path}: field 'hub' must be the hub's address as host:port, e.g. \"hub.example.nhs.uk:443\".")
    ca_cert = existing_file("ca_cert", "the network CA certificate; TLS is mandatory")
    from ..keys import check_node_private_key, load_certificate

    load_certificate(ca_cert, f"CA certificate named by {path} field 'ca_cert'")
    key = existing_file("key", "the node's authentication private key")
    check_node_private_key(key, f"{path}: field 'key'")
    data = text("data")
    table, query = text("table", False), text("query", False)
    if "://" in data:
        if (table is None) == (query is None):
            raise SpecError(f"{path}: a database in field 'data' needs exactly one of 'table' or 'query'.")
    else:
        if table is not None or query is not None:
            raise SpecError(f"{path}: fields 'table' and 'query' apply only when 'data' is a database URL.")
        data = existing_file("data", "the Trust's extract as CSV or Parquet")
    appointments = text("appointments", False)
    appointments_table, appointments_query = text("appointments_table", False), text("appointments_query", False)
    if appointments is not None and "://" in appointments:
        if (appointments_table is None) == (appointments_query is None):
            raise SpecError(
                f"{path}: a database in field 'appointments' needs exactly one of 'appointments_table' "
                "or 'appointments_query'."
            )
    elif appointments_table is not None or appointments_query is not None:
        raise SpecError(
            f"{path}: fields 'appointments_table' and 'appointments_query' apply only when "
            "'appointments' is a database URL."
        )
    elif appointments is not None:
        appointments = existing_file("appointments", "the Trust's appointment table as CSV or Parquet")
    schema = existing_file("schema", "a dataset schema TOML", required=False)
    if appointments is not None and schema is not None:
        raise SpecError(f"{path}: field 'appointments' goes with the IAPT extract only, not with 'schema'.")
    services = ()
    if raw.get("services") is not None:
        from ..protocol.schema import check_service_codes

        services = tuple(check_service_codes(raw["services"], f"{path}: field 'services'"))
    policy = existing_file("policy", "the Trust's disclosure policy TOML", required=False)
    state_dir = Path(_resolve(base, text("state_dir", False) or "state"))
    approved = text("approved_apps", False)
    approved_apps = Path(_resolve(base, approved)) if approved else state_dir / "approved-apps.txt"

    tuning = raw.get("tuning", {})
    if not isinstance(tuning, dict):
        raise SpecError(f"{path}: [tuning] must be a table.")
    reject_unknown(tuning, TUNING_KEYS, path, "tuning.")

    def number(key: str, default: float, lo: float, hi: float) -> float:
        value = tuning.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
            raise SpecError(f"{path}: field 'tuning.{key}' must be a number from {lo:g} to {hi:g}.")
        return float(value)

    port = tuning.get("runtime_port", 0)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536:
        raise SpecError(f"{path}: field 'tuning.runtime_port' must be a port number (0 picks a free one).")
    return NodeFile(
        path=path,
        name=name,
        hub=hub,
        ca_cert=Path(ca_cert),
        key=Path(key),
        data=data,
        table=table,
        query=query,
        schema=schema,
        policy=policy,
        state_dir=state_dir,
        approved_apps=approved_apps,
        appointments=appointments,
        appointments_table=appointments_table,
        appointments_query=appointments_query,
        services=services,
        poll_idle=number("poll_idle", 1.0, 0.05, 3.0),
        poll_active=number("poll_active", 0.25, 0.01, 3.0),
        runtime_port=port,
        stall_limit=number("stall_limit", 300.0, 10.0, 86400.0),
        task_limit=number("task_limit", 900.0, 10.0, 86400.0),
    )


# --------------------------------------------------------------------------------------------
# The approved app bundles (one sha256 per line, '#' starts a comment)


def read_approved(path: Path) -> set[str]:
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return set()
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the approved app list ({exc.strerror}).") from None
    out = set()
    for number, line in enumerate(lines, 1):
        entry = line.split("#", 1)[0].strip().lower()
        if not entry:
            continue
        if not HASH.match(entry):
            raise SpecError(f"{path}: line {number} is not a sha256 app hash (64 hexadecimal characters).")
        out.add(entry)
    return out


def approve(path: Path, fab_hash: str, note: str = "") -> bool:
    """Add `fab_hash` to the approved list; False if it was already there."""
    fab_hash = fab_hash.strip().lower()
    if not HASH.match(fab_hash):
        raise SpecError(
            f"'{fab_hash[:80]}' is not an app hash; expected the 64 hexadecimal characters printed by 'iaptnet app-hash'."
        )
    if fab_hash in read_approved(path):
        return False
    import time

    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    note = " ".join(note.split())  # one line
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fh.write(f"{fab_hash}  # approved {stamp}{' ' + note if note else ''}\n")
    except OSError as exc:
        raise SpecError(f"{path}: cannot write the approved app list ({exc.strerror}).") from None
    return True

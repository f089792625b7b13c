"""The Flower ServerApp: runs a batch of studies on the hub's real Grid.

The analyst's `iaptnet run --engine flower` puts the studies (each study's TOML content and,
for a custom dataset, its schema's TOML text) into the run config key `studies`, as base64 of
JSON. The ServerApp validates them again against the same schema (the study hash must come out
the same as on the analyst's machine), calls `run_batch` on the Grid it is given, exactly as the
in-process engine does, and reports back through its log stream, the only channel Flower gives
a ServerApp: one line per event, `@@iaptnet:<base64 JSON>:@@`, written in one write so that it
is never split. Events are progress (`kind`, `round`, `answered`, `expected`), the results (the
JSON of `results.json`, in chunks; JSON keeps every float64 exactly), errors (`type`,
`message`, `exit_code`), notes (`text`) and, after every round of a GLM batch, its checkpoint
(`key`, `seq`, in chunks: coordinator/checkpoint.py), which a run submitted again brings back
in the run config key `resume` (base64 of JSON, {key: state}). Nothing in them carries a row value: progress is counts, errors are the
sentences the session and the nodes write for the analyst, results are aggregates.

On the way, the Grid is wrapped so that each task travels as one record (`FramedGrid`,
flower/frame.py), a node that never answered is named by the name its key is registered
under at the hub (`name_nodes`), and flwr's reply pulls retry quickly and time out with the
study's node timeout (`install_serverapp_adaptations` in flower/serverapp.py, the one module
that patches flwr).
"""

from __future__ import annotations

import base64
import json
import re
import sys
import time
import tomllib

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

MARK_OPEN, MARK_CLOSE = "@@iaptnet:", ":@@"
CHUNK = 3000
WIRE_VERSION = 1

app = ServerApp()


def encode_event(event: dict) -> str:
    blob = base64.b64encode(json.dumps(event, allow_nan=True, separators=(",", ":")).encode()).decode()
    return f"{MARK_OPEN}{blob}{MARK_CLOSE}"


def emit(event: dict) -> None:
    event = {**event, "t": time.time()}
    sys.stdout.write(encode_event(event) + "\n")
    sys.stdout.flush()


def encode_studies(entries: list[dict]) -> str:
    return base64.b64encode(json.dumps({"version": WIRE_VERSION, "studies": entries}, sort_keys=True).encode()).decode()


def decode_studies(blob: str) -> list[dict]:
    from ..protocol.errors import SpecError

    try:
        data = json.loads(base64.b64decode(blob.encode(), validate=True))
    except (ValueError, TypeError):
        raise SpecError("the run config key 'studies' is not what 'iaptnet run --engine flower' sends.") from None
    if not isinstance(data, dict) or data.get("version") != WIRE_VERSION or not data.get("studies"):
        raise SpecError(
            "the run carries no studies (or studies from another iaptnet release); submit them with 'iaptnet run --engine flower'."
        )
    return data["studies"]


def load_wire_study(entry: dict):
    """A study as the analyst's machine loaded it: same schema, same hash."""
    from ..protocol.errors import SpecError
    from ..protocol.iapt_schema import iapt_analysis_schema
    from ..protocol.schema import Schema
    from .studies import parse_loaded

    source = str(entry["source"])
    schema_entry = entry.get("schema")
    if schema_entry:
        try:
            schema = Schema.from_dict(tomllib.loads(schema_entry["text"]), str(schema_entry["source"]))
        except (tomllib.TOMLDecodeError, RecursionError) as exc:
            raise SpecError(f"{schema_entry['source']}: not a valid TOML file ({exc}).") from None
    else:
        schema = iapt_analysis_schema()
    services = entry.get("services")
    if services and schema.network_column is not None:
        schema = schema.with_services(services)
    loaded = parse_loaded(dict(entry["data"]), schema, source, None)
    if entry.get("hash") and loaded.spec.hash != entry["hash"]:
        raise SpecError(
            f"{source}: the hub computes a different study hash from the analyst's machine; are both on the same iaptnet release?"
        )
    return loaded


class FramedGrid(Grid):
    """The hub's Grid, sending each task as one record (see flower/frame.py)."""

    def __init__(self, grid: Grid):
        self._grid = grid

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self):
        return self._grid.get_node_ids()

    def get_nodes(self):
        return self._grid.get_nodes()

    def push_messages(self, messages):
        from ..flower.frame import pack

        messages = list(messages)
        for msg in messages:
            if msg.has_content():
                msg.content = pack(msg.content)
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids):
        from ..flower.frame import unpack

        replies = list(self._grid.pull_messages(message_ids))
        for msg in replies:
            if msg.has_content():
                try:
                    msg.content = unpack(msg.content)
                except (ValueError, KeyError, TypeError):
                    pass  # left as is: the session reports a reply it cannot read
        return replies

    def send_and_receive(self, messages, *, timeout=None):
        raise NotImplementedError("iaptnet's session pushes and pulls itself")

    @property
    def run(self):
        return self._grid.run

    def set_run(self, run) -> None:
        self._grid.set_run(run)


def registered_names(grid: Grid) -> dict[int, str]:
    """Node id -> the name the hub's operator registered the node's key under."""
    try:
        return {int(n.node_id): str(n.name) for n in grid.get_nodes() if getattr(n, "name", "")}
    except Exception:  # noqa: BLE001 - names only improve messages; never fail a study for them
        return {}


_NODE_ID = re.compile(r"\bnode (\d+)\b")


def name_nodes(text: str, names: dict[int, str]) -> str:
    """Replace "node <id>" (a node that never answered, so never told its name) by the name its
    key is registered under at the hub."""
    return _NODE_ID.sub(lambda m: names.get(int(m.group(1)), m.group(0)), text)


def emit_chunked(event: dict, blob: str) -> None:
    """An event whose `data` is `blob`, in parts of CHUNK characters (a log line stays short)."""
    parts = [blob[i : i + CHUNK] for i in range(0, len(blob), CHUNK)] or [""]
    for i, part in enumerate(parts):
        emit({**event, "part": i, "parts": len(parts), "data": part})


def decode_resume(blob: str) -> dict:
    """The run config's `resume` (checkpoints the analyst's machine kept), or {}."""
    if not blob:
        return {}
    try:
        data = json.loads(base64.b64decode(blob.encode(), validate=True))
    except (ValueError, TypeError):
        return {}
    return data if isinstance(data, dict) else {}


class _Checkpoints:
    """The hub's checkpoints: given with the run, sent on as events after every round."""

    def __init__(self, resume: dict):
        from .checkpoint import EmittedCheckpoints

        self.seq = 0
        self.store = EmittedCheckpoints(resume, self._emit)

    def _emit(self, key: str, state: dict) -> None:
        self.seq += 1
        emit_chunked({"event": "checkpoint", "key": key, "seq": self.seq}, json.dumps(state, allow_nan=True))


def _progress(kind: str, round_no: int, answered: int, expected: int) -> None:
    emit({"event": "progress", "kind": kind, "round": round_no, "answered": answered, "expected": expected})


@app.main()
def main(grid: Grid, context: Context) -> None:
    from ..protocol.errors import IaptnetError
    from .runner import run_batch

    cfg = context.run_config
    timeout = float(cfg.get("node-timeout", 300.0))
    # flwr's reply pulls back off for seconds when a reply is seen before its upload ends. The
    # fix patches a flwr internal, so it lives with all the others in iaptnet/flower/.
    from ..flower.serverapp import install_serverapp_adaptations

    install_serverapp_adaptations(max_time=timeout)
    names: dict[int, str] = {}
    try:
        studies = [load_wire_study(e) for e in decode_studies(str(cfg.get("studies", "")))]
        names = registered_names(grid)
        emit({"event": "start", "studies": [s.spec.name for s in studies], "hashes": [s.spec.hash for s in studies]})
        results = run_batch(
            FramedGrid(grid),
            studies,
            engine="flower",
            progress=_progress,
            timeout=timeout,
            poll_interval=float(cfg.get("poll-interval", 0.25)),
            announce=lambda text: emit({"event": "note", "text": text}),
            checkpoints=_Checkpoints(decode_resume(str(cfg.get("resume", "")))).store,
        )
    except IaptnetError as exc:
        message = name_nodes(str(exc), names)
        emit({"event": "error", "type": type(exc).__name__, "exit_code": exc.exit_code, "message": message})
        raise RuntimeError(message) from None
    for result in results:
        for entry in result.get("nodes", []):
            entry["name"] = name_nodes(entry["name"], names)
            if entry.get("reason"):
                entry["reason"] = name_nodes(entry["reason"], names)
        for entry in result.get("dropped_terms", []):
            entry["reason"] = name_nodes(entry["reason"], names)
    blob = json.dumps(results, allow_nan=True)
    parts = [blob[i : i + CHUNK] for i in range(0, len(blob), CHUNK)] or [""]
    for i, part in enumerate(parts):
        emit({"event": "result", "part": i, "parts": len(parts), "data": part})
    emit({"event": "done"})

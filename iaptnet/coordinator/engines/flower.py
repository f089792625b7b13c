"""The Flower deployment engine, seen from the analyst's machine: submit, follow, collect.

`iaptnet run STUDY.toml --engine flower --hub hub.toml`:

1. validates every study here first (same checks, same hash as the in-process engine);
2. submits the installed iaptnet release as a Flower app bundle, the studies travelling in
   the run config (`studies`, base64 JSON; see coordinator/serverapp.py), through the hub's
   Control API from this process (flower/control.py: what `flwr run` does, without a `flwr`
   process);
3. follows the run's log stream, turning the ServerApp's event lines into progress (rounds,
   nodes answered) and collecting its results;
4. without whole results, asks the hub for the run's final status (what `flwr ls` shows),
   because the log stream ends the same way whether the ServerApp succeeded or crashed: a
   failed run raises the error the ServerApp reported (or the hub's status details), so the
   command exits non-zero with the reason.

`hub.toml` (written by `iaptnet network up`, or by the hub's operator for analysts):

    address  = "hub.example.nhs.uk:9093"  # the hub's Control API (behind the operator's proxy/VPN)
    ca_cert  = "ca.crt"                   # the network CA certificate
    schema   = "schema.toml"              # optional: the network's dataset schema (default: IAPT)
    node_timeout = 300                    # optional: seconds a round waits for a node
    poll_interval = 0.25                  # optional: seconds between the ServerApp's pulls
    run_timeout = 3600                    # optional: seconds to wait for the whole run

    [services]                            # the IAPT extract: each service's ODS code and its node
    RRP = "trust-a"                       # (the levels of service_id in every study run here)
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ...protocol import errors
from ...protocol.errors import NetworkError, SpecError
from ...protocol.tomlfile import read_toml, reject_unknown
from ..serverapp import MARK_CLOSE, MARK_OPEN, encode_studies
from ..session import ProgressFn

HUB_KEYS = {"address", "ca_cert", "schema", "node_timeout", "poll_interval", "run_timeout", "services"}
_EVENT = re.compile(re.escape(MARK_OPEN) + r"([A-Za-z0-9+/=]+)" + re.escape(MARK_CLOSE))
StatusFn = Callable[[str], None]


@dataclass(frozen=True)
class HubFile:
    path: Path
    address: str
    ca_cert: Path
    schema: Path | None = None
    node_timeout: float = 300.0
    poll_interval: float = 0.25
    run_timeout: float = 3600.0
    services: dict = field(default_factory=dict)  # service code -> node name, in code order


def load_hub_file(path: str | Path) -> HubFile:
    from ...keys import load_certificate

    path = Path(path)
    raw = read_toml(path, "hub file")
    reject_unknown(raw, HUB_KEYS, path)
    base = path.parent.resolve()
    address = raw.get("address")
    if not isinstance(address, str) or not re.match(r"^[^\s:]+:\d{1,5}$|^\[[0-9A-Fa-f:.]+\]:\d{1,5}$", address):
        raise SpecError(f"{path}: field 'address' must be the hub's address as host:port.")
    ca = raw.get("ca_cert")
    if not isinstance(ca, str) or not ca:
        raise SpecError(f"{path}: field 'ca_cert' is required (the network CA certificate).")
    ca_path = Path(ca) if Path(ca).is_absolute() else base / ca
    load_certificate(ca_path, f"CA certificate named by {path} field 'ca_cert'")
    schema = raw.get("schema")
    schema_path = None
    if schema is not None:
        if not isinstance(schema, str) or not schema:
            raise SpecError(f"{path}: field 'schema' must be a path to the network's schema TOML.")
        schema_path = Path(schema) if Path(schema).is_absolute() else base / schema
        if not schema_path.is_file():
            raise SpecError(f"{path}: field 'schema' names {schema}, which does not exist.")

    def seconds(key: str, default: float, lo: float, hi: float) -> float:
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
            raise SpecError(f"{path}: field '{key}' must be a number of seconds from {lo:g} to {hi:g}.")
        return float(value)

    return HubFile(
        path=path,
        address=address,
        ca_cert=ca_path,
        schema=schema_path,
        node_timeout=seconds("node_timeout", 300.0, 1.0, 86400.0),
        poll_interval=seconds("poll_interval", 0.25, 0.01, 10.0),
        run_timeout=seconds("run_timeout", 3600.0, 10.0, 7 * 86400.0),
        services=_services(raw.get("services"), path),
    )


def _services(raw, path: Path) -> dict[str, str]:
    """hub.toml's [services]: each service's ODS code = the name of the node holding it."""
    if raw is None:
        return {}
    from ...protocol.schema import check_service_codes

    if not isinstance(raw, dict) or not all(isinstance(v, str) and v for v in raw.values()):
        raise SpecError(
            f"{path}: [services] must map each service's ODS code to its node's name, e.g. RRP = \"trust-a\"."
        )
    check_service_codes(list(raw), f"{path}: [services]")
    return dict(sorted(raw.items()))


def study_entries(study_paths: list[str | Path], hub: HubFile) -> list[dict]:
    """Validate each study here, and package it (with its schema's text) for the hub."""
    from ...protocol.study import read_study_file
    from ..studies import load_study

    entries = []
    network_schemas = {str(hub.schema) if hub.schema else None}
    for p in study_paths:
        path = Path(p)
        data = read_study_file(path)
        loaded = load_study(path, network_schemas, list(hub.services))
        schema_path = None
        if data.get("schema"):
            schema_path = path.parent / str(data["schema"])
        elif hub.schema:
            schema_path = hub.schema
        try:
            json.dumps(data)
        except (TypeError, ValueError):
            raise SpecError(
                f"{path}: holds values (dates or times) that a study cannot carry; use strings and numbers."
            ) from None
        entries.append(
            {
                "source": str(path),
                "data": data,
                "hash": loaded.spec.hash,
                "schema": {"source": str(schema_path), "text": schema_path.read_text()} if schema_path else None,
                "services": list(hub.services),
            }
        )
    return entries


class FlowerRun:
    """One submission to a hub, followed to its end, through the hub's Control API
    (flower/control.py: what `flwr run --stream`, `flwr ls` and `flwr stop` do, in this
    process)."""

    def __init__(self, hub: HubFile):
        self.hub = hub
        self.run_id: str | None = None
        self.results: list | None = None
        self.error: dict | None = None
        self.log_lines: list[str] = []
        self.on_checkpoint: Callable[[str, dict], None] | None = None  # (key, state)
        self.on_note: Callable[[str], None] | None = None
        self.resume: dict[str, dict] = {}  # checkpoints to continue from, by key
        self.stream_ended = False  # the log stream ended without the run's results

    def _control(self):
        from ...flower.control import ControlClient

        return ControlClient(self.hub.address, self.hub.ca_cert)

    def submit_and_follow(
        self, entries: list[dict], progress: ProgressFn | None = None, on_run_id: Callable[[str], None] | None = None
    ) -> None:
        """Submit the release with the studies, then read the run's log stream until the run
        finishes (or `run_timeout` passes), collecting its events."""
        from ...flower.bundle import release_fab
        from ...flower.control import HubUnreachable

        config: dict[str, str | float] = {
            "studies": encode_studies(entries),
            "node-timeout": float(self.hub.node_timeout),
            "poll-interval": float(self.hub.poll_interval),
        }
        if self.resume:
            config["resume"] = encode_resume(self.resume)
        parts: dict[int, str] = {}
        n_parts = None
        checkpoint_parts: dict[tuple[str, int], dict[int, str]] = {}
        with self._control() as control:
            run_id = control.start_run(release_fab()[0], config)
            self.run_id = str(run_id)
            if on_run_id:
                on_run_id(self.run_id)
            deadline = time.monotonic() + self.hub.run_timeout
            try:
                for line in control.log_lines(run_id):
                    self.log_lines.append(line)
                    for blob in _EVENT.findall(line):
                        event = json.loads(base64.b64decode(blob))
                        kind = event.get("event")
                        if kind == "progress" and progress:
                            progress(event["kind"], event["round"], event["answered"], event["expected"])
                        elif kind == "result":
                            parts[int(event["part"])] = event["data"]
                            n_parts = int(event["parts"])
                        elif kind == "error":
                            self.error = event
                        elif kind == "note" and self.on_note:
                            self.on_note(str(event.get("text", "")))
                        elif kind == "checkpoint":
                            self._checkpoint_part(event, checkpoint_parts)
                    if n_parts is not None and len(parts) == n_parts:
                        break  # the ServerApp's last act: no need to follow its stream to the end
                    if time.monotonic() > deadline:
                        self.stop()
                        raise NetworkError(
                            f"run {self.run_id} did not finish within {self.hub.run_timeout:g} s (hub.toml 'run_timeout'); it was stopped."
                        )
            except HubUnreachable:
                pass  # the stream broke off: `status` finds out why
        if n_parts is not None and len(parts) == n_parts:
            self.results = json.loads("".join(parts[i] for i in range(n_parts)))
        else:
            self.stream_ended = True

    def _checkpoint_part(self, event: dict, pending: dict) -> None:
        """Collect a checkpoint's parts; a whole one goes to `on_checkpoint`."""
        key, seq = str(event.get("key", "")), int(event.get("seq", 0))
        got = pending.setdefault((key, seq), {})
        got[int(event["part"])] = event["data"]
        if len(got) == int(event["parts"]):
            del pending[(key, seq)]
            if self.on_checkpoint:
                self.on_checkpoint(key, json.loads("".join(got[i] for i in range(len(got)))))

    def outcome(self) -> tuple[str, str]:
        """(status, details) of the finished run. The ServerApp sends its results as its very
        last act, after every study finished, so whole results are the run's success; only
        without them is the hub asked."""
        if self.results is not None and not self.error:
            return "finished:completed", ""
        return self.status()

    def status(self) -> tuple[str, str]:
        """(status, details) of the run at the hub, e.g. ('finished:completed', ''), once it
        has finished. A hub that no longer knows the run (it restarted, its state in memory)
        lost it: RunLost."""
        from ...flower.control import HubUnreachable

        unreachable_since = None
        status = ""
        with self._control() as control:
            for _ in range(50):
                try:
                    status, details = control.status(int(self.run_id))
                except HubUnreachable as exc:
                    # The hub may be restarting. Ask again for a minute.
                    unreachable_since = unreachable_since or time.monotonic()
                    if time.monotonic() - unreachable_since > 60:
                        raise RunLost(
                            self.run_id, f"the connection to the hub broke off and the hub did not answer ({exc})"
                        ) from None
                    time.sleep(2.0)
                    continue
                except NetworkError as exc:
                    if _run_unknown(str(exc)):
                        raise RunLost(
                            self.run_id, "the hub no longer knows it: the hub restarted while it ran"
                        ) from None
                    raise NetworkError(f"could not read the status of run {self.run_id}: {exc}") from None
                if status.startswith("finished"):
                    return status, "" if details == "N/A" else details
                time.sleep(0.2)
        return status, ""

    def stop(self) -> None:
        if self.run_id:
            try:
                with self._control() as control:
                    control.stop(int(self.run_id))
            except NetworkError:
                pass


class RunLost(NetworkError):
    """The hub lost a run (it restarted while the run was in progress)."""

    def __init__(self, run_id: str | None, why: str, resumable: str = ""):
        self.run_id, self.why = run_id, why
        super().__init__(self._text(resumable))

    def _text(self, resumable: str) -> str:
        again = (
            f" Its GLM studies' last completed round is kept in {resumable}: run the same command again "
            "once the nodes are back, and they continue from it."
            if resumable
            else " Run it again (with --out, a run keeps a checkpoint after every round and continues from it)."
        )
        return f"run {self.run_id} was lost: {self.why}.{again}"

    def with_checkpoint(self, where: str) -> RunLost:
        return RunLost(self.run_id, self.why, where)


def _run_unknown(said: str) -> bool:
    text = said.lower()
    return "not found" in text or "does not exist" in text or "no run" in text or "unknown run" in text


def encode_resume(states: dict[str, dict]) -> str:
    return base64.b64encode(json.dumps(states, allow_nan=True).encode()).decode()


def _raise_reported(error: dict, run_id: str) -> None:
    cls = getattr(errors, str(error.get("type", "")), None)
    if not (isinstance(cls, type) and issubclass(cls, errors.IaptnetError)):
        cls = NetworkError
    raise cls(str(error.get("message", f"run {run_id} failed on the hub.")))


def run_flower(
    study_paths: list[str | Path],
    hub_path: str | Path,
    *,
    progress: ProgressFn | None = None,
    status: StatusFn | None = None,
    out: str | Path | None = None,
) -> list[dict]:
    """Run studies on a deployed network; return the same result dicts as the in-process engine.

    With `out` (the run's --out folder) the hub sends the GLM batch's checkpoint after every
    round and it is kept there; a run submitted again sends it back and continues from it
    (coordinator/checkpoint.py). A run the hub lost raises RunLost, saying so."""
    from ..checkpoint import FileCheckpoints, glm_batch_key

    hub = load_hub_file(hub_path)
    entries = study_entries(study_paths, hub)
    store = FileCheckpoints(out) if out else None
    key = glm_batch_key([(str(e["data"].get("kind", "glm")), e["hash"]) for e in entries])
    run = FlowerRun(hub)
    if store is not None and key is not None:
        saved = store.load(key)
        if saved is not None:
            run.resume = {key: saved}
            if status:
                status(f"found the checkpoint of round {saved.get('round')} in {store.folder}")
        run.on_checkpoint = store.save
    run.on_note = status
    if status:
        status(f"submitting to the hub at {hub.address}")

    def submitted(run_id: str) -> None:
        if status:
            status(f"run {run_id} submitted; waiting for the hub")

    try:
        run.submit_and_follow(entries, progress, on_run_id=submitted)
    except KeyboardInterrupt:
        run.stop()
        raise
    try:
        state, details = run.outcome()
    except RunLost as lost:
        if store is not None and key is not None and store.load(key) is not None:
            raise lost.with_checkpoint(str(store.folder)) from None
        raise
    if store is not None and key is not None and state == "finished:completed" and not run.error:
        store.done(key)
    run_id = run.run_id
    if run.error:
        _raise_reported(run.error, run_id)
    if state != "finished:completed":
        raise NetworkError(
            f"run {run_id} {state.replace('finished:', '') or 'ended'} on the hub: {details or 'no reason given'}."
        )
    if run.results is None:
        raise NetworkError(
            f"run {run_id} completed on the hub but sent no results; see 'flwr log {run_id}' at the hub."
        )
    from ...protocol.iapt_schema import iapt_analysis_schema
    from ...protocol.schema import Schema
    from ..network import name_services

    column = (Schema.load(hub.schema) if hub.schema else iapt_analysis_schema()).network_column
    return name_services(run.results, hub.services, column)

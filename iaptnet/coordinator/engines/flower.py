"""The Flower deployment engine, seen from the analyst's machine: submit, follow, collect.

`iaptnet run STUDY.toml --engine flower --hub hub.toml`:

1. validates every study here first (same checks, same hash as the in-process engine);
2. stages the installed iaptnet release as a Flower app and submits it with
   `flwr run --stream`, the studies travelling in the run config (`studies`, base64 JSON; see
   coordinator/serverapp.py);
3. follows the run's log stream, turning the ServerApp's event lines into progress (rounds,
   nodes answered) and collecting its results;
4. asks the hub for the run's final status (`flwr ls`), because `flwr run` and the log stream
   end the same way whether the ServerApp succeeded or crashed: a failed run raises the error the
   ServerApp reported (or the hub's status details), so the command exits non-zero with the
   reason.

`hub.toml` (written by `iaptnet network up`, or by the hub's operator for analysts):

    address  = "hub.example.nhs.uk:9093"  # the hub's Control API (behind the operator's proxy/VPN)
    ca_cert  = "ca.crt"                   # the network CA certificate
    schema   = "schema.toml"              # optional: the network's dataset schema (default: IAPT)
    node_timeout = 300                    # optional: seconds a round waits for a node
    poll_interval = 0.25                  # optional: seconds between the ServerApp's pulls
    run_timeout = 3600                    # optional: seconds to wait for the whole run
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ...protocol import errors
from ...protocol.errors import NetworkError, SpecError
from ...protocol.tomlfile import read_toml, reject_unknown
from ..hub import CONNECTION, FlwrCli, flwr_error, flwr_plain, write_connection
from ..serverapp import MARK_CLOSE, MARK_OPEN, encode_studies
from ..session import ProgressFn

HUB_KEYS = {"address", "ca_cert", "schema", "node_timeout", "poll_interval", "run_timeout"}
_EVENT = re.compile(re.escape(MARK_OPEN) + r"([A-Za-z0-9+/=]+)" + re.escape(MARK_CLOSE))
_STARTED = re.compile(r"Successfully started run (\d+)")
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
    )


def study_entries(study_paths: list[str | Path], hub: HubFile) -> list[dict]:
    """Validate each study here, and package it (with its schema's text) for the hub."""
    from ...protocol.study import read_study_file
    from ..studies import load_study

    entries = []
    network_schemas = {str(hub.schema) if hub.schema else None}
    for p in study_paths:
        path = Path(p)
        data = read_study_file(path)
        loaded = load_study(path, network_schemas)
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
            }
        )
    return entries


class FlowerRun:
    """One submission to a hub, followed to its end."""

    def __init__(self, hub: HubFile, workdir: Path):
        self.hub = hub
        self.workdir = Path(workdir)
        home = self.workdir / "flwr-home"
        write_connection(home, hub.address, hub.ca_cert)
        self.cli = FlwrCli(home)
        self.run_id: str | None = None
        self.results: list | None = None
        self.error: dict | None = None
        self.log_lines: list[str] = []

    def submit_and_follow(
        self, entries: list[dict], progress: ProgressFn | None = None, on_run_id: Callable[[str], None] | None = None
    ) -> None:
        """`flwr run --stream`: submit the release with the studies, then read the run's log
        stream until the run finishes (or `run_timeout` passes), collecting its events."""
        from ...flower.bundle import stage_release

        app = stage_release(self.workdir)
        config = self.workdir / "run-config.toml"
        config.write_text(
            f'studies = "{encode_studies(entries)}"\n'
            f"node-timeout = {self.hub.node_timeout!r}\n"
            f"poll-interval = {self.hub.poll_interval!r}\n"
        )
        parts: dict[int, str] = {}
        n_parts = None
        cmd = self.cli.command("run", str(app), CONNECTION, "-c", str(config), "--stream")
        proc = subprocess.Popen(
            cmd, env=self.cli.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        deadline = time.monotonic() + self.hub.run_timeout
        try:
            for line in proc.stdout:
                self.log_lines.append(line.rstrip("\n"))
                if self.run_id is None:
                    found = _STARTED.search(line)
                    if found:
                        self.run_id = found.group(1)
                        if on_run_id:
                            on_run_id(self.run_id)
                    continue
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
                if n_parts is not None and len(parts) == n_parts:
                    break  # the ServerApp's last act: no need to follow its stream to the end
                if time.monotonic() > deadline:
                    self.stop()
                    raise NetworkError(
                        f"run {self.run_id} did not finish within {self.hub.run_timeout:g} s (hub.toml 'run_timeout'); it was stopped."
                    )
        finally:
            if proc.poll() is None:
                proc.terminate()
            proc.wait(timeout=30)
        if self.run_id is None:
            said = [ln for ln in self.log_lines if ln.strip() and not ln.startswith("Using SuperLink")]
            raise NetworkError(
                f"the hub at {self.hub.address} did not accept the run: {flwr_plain(said[-4:])[:400] or 'no answer'}"
            )
        if n_parts is not None and len(parts) == n_parts:
            self.results = json.loads("".join(parts[i] for i in range(n_parts)))

    def outcome(self) -> tuple[str, str]:
        """(status, details) of the finished run. The ServerApp sends its results as its very
        last act, after every study finished, so whole results are the run's success; only
        without them is the hub asked (a `flwr ls`, ~1.5 s)."""
        if self.results is not None and not self.error:
            return "finished:completed", ""
        return self.status()

    def status(self) -> tuple[str, str]:
        """(status, details) of the run at the hub, e.g. ('finished:completed', '')."""
        for _ in range(50):
            data = self.cli.json("ls", CONNECTION, "--run-id", self.run_id)
            if not data.get("success"):
                raise NetworkError(f"could not read the status of run {self.run_id}: {flwr_error(data)}")
            run = data["runs"][0]
            status = str(run.get("status", ""))
            if status.startswith("finished"):
                details = str(run.get("status-details", ""))
                return status, "" if details == "N/A" else details
            time.sleep(0.2)
        return status, ""

    def stop(self) -> None:
        if self.run_id:
            try:
                self.cli.json("stop", self.run_id, CONNECTION, timeout=60)
            except NetworkError:
                pass


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
) -> list[dict]:
    """Run studies on a deployed network; return the same result dicts as the in-process engine."""
    hub = load_hub_file(hub_path)
    entries = study_entries(study_paths, hub)
    with tempfile.TemporaryDirectory(prefix="iaptnet-run-") as tmp:
        run = FlowerRun(hub, Path(tmp))
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
        state, details = run.outcome()
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
    return run.results

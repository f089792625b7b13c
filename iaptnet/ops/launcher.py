"""A network in a box: a hub and one node daemon per `[[node]]` of a network file, on this
machine, with TLS and node authentication, exactly as a deployment runs them.

`network up NETWORK.toml`:
  * keeps everything in `.iaptnet-network/` beside the network file: a fresh CA, the hub's
    certificate, one key pair per node, the hub's state, each node's state and node.toml,
    the processes' logs (`logs/`), and `processes.json` (what `down` stops);
  * starts the hub (`iaptnet coordinator start`), registers every node's public key, approves
    the installed release's app hash at every node, starts one `iaptnet node start` per node
    (nodes without a `policy` in the network file run exploratory: local networks only);
  * returns once every node is connected, after writing `hub.toml` beside the network file.

`network down NETWORK.toml` stops exactly the processes `up` recorded (each is checked to be
still the iaptnet process that was started, by its command line, before it is signalled).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..protocol.errors import NetworkError, SpecError

STATE_DIR = ".iaptnet-network"
PROCESSES = "processes.json"
CONNECTED = "SuperNode ID:"  # what flwr's SuperNode logs once the hub has activated it


@dataclass
class NetworkPaths:
    network: Path

    @property
    def root(self) -> Path:
        return self.network.parent / STATE_DIR

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def processes(self) -> Path:
        return self.root / PROCESSES

    @property
    def hub_toml(self) -> Path:
        return self.network.parent / "hub.toml"

    @property
    def coordinator_toml(self) -> Path:
        return self.root / "coordinator.toml"

    def node_dir(self, name: str) -> Path:
        return self.root / "nodes" / name


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "iaptnet.cli", *args]


def _toml_str(value: str) -> str:
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def _spawn(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        return subprocess.Popen(
            cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            close_fds=True,
        )


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int, marker: str) -> bool:
    """True if `pid` runs and is still the process we started (its command line has `marker`)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X"):  # exited, not yet reaped
        return False
    return marker in _cmdline(pid)


def _wait_ready(address: str, ca_cert: Path, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    from ..coordinator.hub import wait_for_hub

    if wait_for_hub(address, ca_cert, proc, timeout):
        return
    if proc.poll() is not None:
        raise NetworkError(f"the hub exited during start-up (exit {proc.returncode}); see {log}.")
    raise NetworkError(f"the hub did not start within {timeout:g} s; see {log}.")


def _common_schema(nodes: list[dict]) -> str | None:
    schemas = {n.get("schema") for n in nodes}
    if len(schemas) == 1:
        return next(iter(schemas))
    return None


def up(
    network_path: str | Path,
    *,
    port: int | None = None,
    timeout: float = 180.0,
    node_timeout: float = 300.0,
    poll_idle: float | None = None,
    poll_active: float | None = None,
    start_nodes: bool = True,
    echo=print,
) -> dict:
    """Start the hub and the nodes; return the processes record. Cleans up if anything fails.

    With `start_nodes=False` only the hub starts, with every node's key made and registered
    (in `.iaptnet-network/nodes/NAME/`): for stand-ins that speak Flower's node protocol
    themselves (bench/bench_hub.py).

    `poll_active` (the nodes' polling interval during a study) defaults to 0.1 s for up to
    3 nodes (D1: 8.9 s on the hub against 9.6 s at 0.25 s, bench/bench_latency.py) and N/8 s,
    at most 1 s, beyond: every process shares this machine, and with 8 nodes polling every
    0.25 s the polls themselves slowed a round (3.63 s a round against 2.87 s at 1 s).
    `poll_idle` (between studies) defaults to 0.25 s for up to 3 nodes and 1 s beyond: a
    study's first message waits for the last node's idle poll."""
    from .. import keys as pki
    from ..coordinator.hub import load_hub_config, node_statuses, register_node
    from ..coordinator.network import load_network
    from ..flower.bundle import release_hash
    from ..node.config import approve

    network_path = Path(network_path).resolve()
    network = load_network(network_path)
    if poll_active is None:
        poll_active = default_poll_active(len(network.nodes))
    elif not 0.01 <= poll_active <= 3.0:
        raise SpecError(f"--poll-active {poll_active:g}: the nodes' polling interval must be from 0.01 to 3 seconds.")
    if poll_idle is None:
        poll_idle = default_poll_idle(len(network.nodes))
    elif not 0.05 <= poll_idle <= 3.0:
        raise SpecError(f"--poll-idle {poll_idle:g}: the nodes' idle polling interval must be from 0.05 to 3 seconds.")
    paths = NetworkPaths(network_path)
    if paths.processes.exists():
        record = json.loads(paths.processes.read_text())
        if any(_alive(p["pid"], p["marker"]) for p in record.get("processes", [])):
            raise SpecError(
                f"{network_path}: the network is already up; run 'iaptnet network down {network_path}' first."
            )
    # A fresh network each time: new keys, empty hub and node state.
    import shutil

    if paths.root.exists():
        shutil.rmtree(paths.root)
    paths.root.mkdir(parents=True)
    port = port or _free_port()
    address = f"127.0.0.1:{port}"

    pki.init_ca(paths.pki)
    pki.issue_certificate(paths.pki, paths.pki, ["localhost", "127.0.0.1"], name="hub")
    (paths.coordinator_toml).write_text(
        f'host = "127.0.0.1"\nport = {port}\nca_cert = "pki/ca.crt"\ncert = "pki/hub.crt"\n'
        f'key = "pki/hub.key"\nstate_dir = "hub"\n'
    )
    hub_cfg = load_hub_config(paths.coordinator_toml)
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH")]))
    record = {"network": str(network_path), "address": address, "processes": []}
    started: list[tuple[subprocess.Popen, str]] = []

    def remember(proc: subprocess.Popen, role: str, name: str, marker: str) -> None:
        started.append((proc, marker))
        record["processes"].append({"role": role, "name": name, "pid": proc.pid, "marker": marker})
        paths.processes.write_text(json.dumps(record, indent=2))

    try:
        echo(f"starting the hub on {address} (TLS, node authentication)")
        hub_log = paths.logs / "hub.log"
        hub = _spawn(_cli("coordinator", "start", "--config", str(paths.coordinator_toml)), hub_log, env)
        # Every process of this network names a file under its private folder on its command line.
        remember(hub, "hub", "hub", str(paths.root))
        _wait_ready(address, hub_cfg.ca_cert, hub, hub_log, timeout)

        fab_hash = release_hash()
        node_files = {}
        for node in network.nodes:
            name = node["name"]
            ndir = paths.node_dir(name)
            key, pub = pki.node_key(ndir, name)
            lines = [
                f"name = {_toml_str(name)}",
                f"hub = {_toml_str(address)}",
                f"ca_cert = {_toml_str(hub_cfg.ca_cert)}",
                f"key = {_toml_str(key)}",
                f"data = {_toml_str(node['data'])}",
                f"state_dir = {_toml_str(ndir / 'state')}",
            ]
            for field in (
                "table",
                "query",
                "schema",
                "policy",
                "appointments",
                "appointments_table",
                "appointments_query",
            ):
                if node.get(field):
                    lines.append(f"{field} = {_toml_str(node[field])}")
            if node.get("services"):
                codes = ", ".join(_toml_str(code) for code in node["services"].split(","))
                lines.append(f"services = [{codes}]")
            lines += ["", "[tuning]", f"poll_idle = {poll_idle!r}", f"poll_active = {poll_active!r}"]
            (ndir / "node.toml").write_text("\n".join(lines) + "\n")
            approve(ndir / "state" / "approved-apps.txt", fab_hash, "network up: the installed release")
            node_files[name] = (ndir / "node.toml", pub)

        echo(f"registering {len(node_files)} node keys")
        with ThreadPoolExecutor(max_workers=4) as pool:
            ids = dict(
                zip(node_files, pool.map(lambda item: register_node(hub_cfg, item[0], item[1][1]), node_files.items()))
            )
        for name, (node_toml, _) in node_files.items() if start_nodes else ():
            proc = _spawn(
                _cli("node", "start", "--config", str(node_toml), "--local-network"), paths.logs / f"{name}.log", env
            )
            remember(proc, "node", name, str(node_toml))

        echo(f"waiting for {len(ids)} nodes to connect" if start_nodes else f"{len(ids)} node keys registered")
        deadline = time.monotonic() + timeout
        wanted = {str(i): name for name, i in ids.items()}
        while start_nodes:
            for proc, _marker in started:
                if proc.poll() is not None:
                    who = next(p for p in record["processes"] if p["pid"] == proc.pid)
                    raise NetworkError(
                        f"{who['role']} {who['name']} exited during start-up (exit {proc.returncode}); see {paths.logs / (who['name'] + '.log')}."
                    )
            # Each SuperNode logs its id once the hub has accepted it: ask the hub only then
            # (every `flwr` command costs a second or two of CPU).
            logged = [name for name in node_files if CONNECTED in _read(paths.logs / f"{name}.log")]
            missing = sorted(set(node_files) - set(logged))
            if not missing:
                statuses = node_statuses(hub_cfg.flwr_home)
                missing = sorted(wanted[i] for i in wanted if statuses.get(i) != "online")
                if not missing:
                    break
            if time.monotonic() > deadline:
                raise NetworkError(
                    f"nodes {', '.join(missing)} did not connect within {timeout:g} s; see their logs in {paths.logs}."
                )
            time.sleep(0.3)

        schema = _common_schema(network.nodes)
        hub_lines = [f"address = {_toml_str(address)}", f"ca_cert = {_toml_str(hub_cfg.ca_cert)}"]
        if schema:
            hub_lines.append(f"schema = {_toml_str(schema)}")
        hub_lines.append(f"node_timeout = {float(node_timeout)!r}")
        if network.services:  # the levels of service_id in every study run on this hub
            hub_lines += ["", "[services]"] + [f"{code} = {_toml_str(n)}" for code, n in network.services.items()]
        paths.hub_toml.write_text(
            "# Written by 'iaptnet network up': the local hub and the CA to trust.\n" + "\n".join(hub_lines) + "\n"
        )
        record["hub_toml"] = str(paths.hub_toml)
        record["flwr_home"] = str(hub_cfg.flwr_home)
        record["node_ids"] = ids
        paths.processes.write_text(json.dumps(record, indent=2))
        connected = f"{len(ids)} nodes connected" if start_nodes else "no node started"
        echo(f"network up: hub {address}, {connected}; hub file {paths.hub_toml}")
        return record
    except BaseException:
        _stop(record)
        paths.processes.unlink(missing_ok=True)
        raise


def default_poll_active(nodes: int) -> float:
    """The nodes' polling interval during a study when all of them share one machine."""
    return 0.1 if nodes <= 3 else min(1.0, nodes / 8)


def default_poll_idle(nodes: int) -> float:
    """The nodes' polling interval between studies when all of them share one machine: a
    few nodes polling 4 times a second cost the hub little, and a study's first message no
    longer waits up to a second for the last of them (node.toml's own default is 1 s)."""
    return 0.25 if nodes <= 3 else 1.0


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[-1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        out.setdefault(ppid, []).append(int(entry.name))
    return out


def _descendants(pid: int, tree: dict[int, list[int]]) -> list[int]:
    found, todo = [], list(tree.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(tree.get(child, []))
    return found


def _stop(record: dict, grace: float = 10.0) -> list[str]:
    """SIGTERM each recorded process group that is still ours, then any of their helpers
    (Flower's SuperExec and ServerApp processes) left behind; SIGKILL what outlives `grace`."""
    stopped = []
    live = [p for p in record.get("processes", []) if _alive(p["pid"], p["marker"])]
    tree = _children()
    root = str(Path(record["network"]).parent / STATE_DIR)
    helpers = [{"pid": c, "marker": root} for p in live for c in _descendants(p["pid"], tree)]
    # Nodes first (they deactivate at the hub), then the hub.
    live.sort(key=lambda p: p["role"] == "hub")
    for p in live:
        try:
            os.killpg(p["pid"], signal.SIGTERM)
        except ProcessLookupError:
            continue
        except PermissionError:
            os.kill(p["pid"], signal.SIGTERM)
        stopped.append(f"{p['role']} {p['name']}")
    deadline = time.monotonic() + grace
    for p in live:
        while _alive(p["pid"], p["marker"]) and time.monotonic() < deadline:
            _reap(p["pid"])
            time.sleep(0.1)
        if _alive(p["pid"], p["marker"]):
            try:
                os.killpg(p["pid"], signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        _reap(p["pid"])
    for h in helpers:
        if _alive(h["pid"], h["marker"]):
            try:
                os.kill(h["pid"], signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                continue
    deadline = time.monotonic() + 5.0
    for h in helpers:
        while _alive(h["pid"], h["marker"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(h["pid"], h["marker"]):
            try:
                os.kill(h["pid"], signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    return stopped


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def down(network_path: str | Path, echo=print) -> list[str]:
    paths = NetworkPaths(Path(network_path).resolve())
    if not paths.processes.exists():
        raise SpecError(f"{network_path}: no local network is up for this file (no {STATE_DIR}/{PROCESSES}).")
    record = json.loads(paths.processes.read_text())
    stopped = _stop(record)
    paths.processes.unlink(missing_ok=True)
    echo(f"network down: stopped {len(stopped)} processes" + (f" ({', '.join(stopped)})" if stopped else ""))
    return stopped

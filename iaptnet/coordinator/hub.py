"""The coordinator's hub: Flower's SuperLink with TLS and SuperNode authentication.

`coordinator.toml`:

    host      = "127.0.0.1"          # listen address (Fleet, Control and Runtime APIs share one port)
    port      = 9092
    ca_cert   = "pki/ca.crt"         # the network CA certificate
    cert      = "pki/hub.crt"        # the hub's certificate (iaptnet pki issue)
    key       = "pki/hub.key"
    state_dir = "/var/lib/iaptnet-hub"   # node registry, Flower's private home (and database)
    database  = "memory"             # or "sqlite": Flower's own state in <state_dir>/state.db
    log_file  = "/var/log/iaptnet/hub.log"   # optional (default: standard output)

Flower's Control API (submitting runs, registering nodes) has no authentication in the
open-source edition and shares the hub's port with the Fleet API the nodes use: listen on
127.0.0.1 and put a reverse proxy in front that passes only `/v1/fleet/` (docs/operator/index.md).

The hub runs `flower-superlink` (with its middleware scoped, flower/superlink.py) with `--enable-supernode-auth`, TLS, runtime dependency
installation off, telemetry and update checks off and a private FLWR_HOME under `state_dir`,
and beside it the warm ServerApp (flower/warm_serverapp.py), which serves every run's ServerApp
from one process that has imported everything already, and only the hub's own release.
The state that must outlive a restart is the registered node keys: the hub keeps them in its own
registry (`<state_dir>/nodes.json`, public keys only). With `database = "memory"` (the default)
Flower keeps its working state (runs, messages) in memory, twice as fast a round as its SQLite
store, and `coordinator start` registers every key of the registry again each time the SuperLink
starts; with `database = "sqlite"` Flower keeps everything (also run history and logs) in
`<state_dir>/state.db`. The operator's commands that talk to the Control API (`register-node`,
`unregister-node`, `nodes`) go through Flower's own `flwr` CLI with a private FLWR_HOME that names this hub;
the flower engine speaks to it from the analyst's process (flower/control.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..flower.pins import stock_timing
from ..protocol.errors import NetworkError, SpecError
from ..protocol.tomlfile import read_toml, reject_unknown

KEYS = {"host", "port", "ca_cert", "cert", "key", "state_dir", "database", "log_file", "control_address"}
DATABASES = ("memory", "sqlite")
CONNECTION = "hub"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def flower_env(flwr_home: Path, extra: dict | None = None) -> dict:
    """The environment every Flower process we start gets: no telemetry, private home."""
    env = dict(os.environ)
    env.update(
        {
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_HOME": str(flwr_home),
            "PYTHONUNBUFFERED": "1",
        }
    )
    bindir = str(Path(sys.executable).parent)
    if bindir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.update(extra or {})
    return env


def flwr_executable(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


@dataclass(frozen=True)
class HubConfig:
    path: Path
    host: str
    port: int
    ca_cert: Path
    cert: Path
    key: Path
    state_dir: Path
    log_file: Path | None
    control_address: str
    database_kind: str = "memory"

    @property
    def flwr_home(self) -> Path:
        return self.state_dir / "flwr-home"

    @property
    def database(self) -> Path:
        return self.state_dir / "state.db"

    @property
    def registry(self) -> Path:
        return self.state_dir / "nodes.json"

    @property
    def runtime_address(self) -> str:
        """Where the warm ServerApp reaches the SuperLink's Runtime API: this machine, the
        hub's own port (as flwr's SuperExec does)."""
        local = "127.0.0.1" if self.host in ("0.0.0.0", "localhost") else "[::1]" if self.host == "::" else self.host
        return f"{local}:{self.port}"


def _resolve(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def load_hub_config(path: str | Path) -> HubConfig:
    from ..keys import check_pem_private_key, load_certificate

    path = Path(path)
    raw = read_toml(path, "coordinator configuration file")
    base = path.parent.resolve()
    reject_unknown(raw, KEYS, path)
    for key in ("ca_cert", "cert", "key", "state_dir"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise SpecError(f"{path}: field '{key}' is required (a path).")
    host = raw.get("host", "127.0.0.1")
    if not isinstance(host, str) or not host.strip():
        raise SpecError(f"{path}: field 'host' must be the address to listen on, e.g. \"127.0.0.1\".")
    port = raw.get("port", 9092)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise SpecError(f"{path}: field 'port' must be a port number.")
    files = {}
    for key, what in (
        ("ca_cert", "the network CA certificate"),
        ("cert", "the hub's certificate"),
        ("key", "the hub's private key"),
    ):
        files[key] = _resolve(base, raw[key])
        if not files[key].is_file():
            raise SpecError(f"{path}: field '{key}' names {raw[key]}, which is not a readable file ({what}).")
    load_certificate(files["ca_cert"], f"CA certificate named by {path} field 'ca_cert'")
    load_certificate(files["cert"], f"hub certificate named by {path} field 'cert'")
    check_pem_private_key(files["key"], f"{path}: field 'key'")
    local = "127.0.0.1" if host.strip() in ("0.0.0.0", "::", "localhost") else host.strip()
    control = raw.get("control_address", f"{local}:{port}")
    if not isinstance(control, str) or ":" not in control:
        raise SpecError(f"{path}: field 'control_address' must be host:port.")
    log_file = raw.get("log_file")
    database = raw.get("database", "memory")
    if database not in DATABASES:
        raise SpecError(f'{path}: field \'database\' must be "memory" or "sqlite".')
    return HubConfig(
        path=path,
        host=host.strip(),
        port=port,
        ca_cert=files["ca_cert"],
        cert=files["cert"],
        key=files["key"],
        state_dir=_resolve(base, raw["state_dir"]),
        log_file=_resolve(base, log_file) if log_file else None,
        control_address=control,
        database_kind=database,
    )


def superlink_command(cfg: HubConfig, warm: bool = True) -> list[str]:
    """The SuperLink. With `warm`, `--isolation process`: no SuperExec, the hub's warm
    ServerApp serves the runs (`warm_serverapp_command`)."""
    cmd = [
        sys.executable,  # flwr's flower-superlink, with the hub's adaptation (flower/superlink.py)
        "-m",
        "iaptnet.flower.superlink",
        "--ssl-ca-certfile",
        str(cfg.ca_cert),
        "--ssl-certfile",
        str(cfg.cert),
        "--ssl-keyfile",
        str(cfg.key),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--host",
        cfg.host,
        "--port",
        str(cfg.port),
    ]
    if warm:
        cmd += ["--isolation", "process"]
    if cfg.database_kind == "sqlite":
        cmd += ["--database", str(cfg.database)]
    if cfg.log_file:
        cmd += ["--log-file", str(cfg.log_file)]
    return cmd


def warm_serverapp_command(cfg: HubConfig, parent_pid: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "iaptnet.flower.warm_serverapp",
        "--runtime-api-address",
        cfg.runtime_address,
        "--root-certificates",
        str(cfg.ca_cert),
        "--parent-pid",
        str(parent_pid),
    ]


def prepare_state(cfg: HubConfig) -> None:
    try:
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        cfg.flwr_home.mkdir(parents=True, exist_ok=True)
        write_connection(cfg.flwr_home, cfg.control_address, cfg.ca_cert)
    except OSError as exc:
        raise SpecError(
            f"{cfg.path}: field 'state_dir' names {cfg.state_dir}, which cannot be written ({exc.strerror})."
        ) from None
    if cfg.log_file:
        try:
            cfg.log_file.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SpecError(
                f"{cfg.path}: field 'log_file' names {cfg.log_file}, whose folder cannot be written ({exc.strerror})."
            ) from None


def start_hub(cfg: HubConfig) -> int:
    """Run the SuperLink and the warm ServerApp until the SuperLink stops. This process stays
    as their parent: it registers the registry's node keys once the SuperLink answers (with
    Flower's state in memory), starts the warm ServerApp again if it dies, forwards SIGTERM and
    SIGINT to both, and exits with the SuperLink's exit code. With stock Flower
    (IAPTNET_STOCK_FLOWER_TIMING=1, benchmarks) the SuperLink's own SuperExec starts a
    ServerApp process per run, and with its state in SQLite this process becomes the SuperLink."""
    import signal

    prepare_state(cfg)
    warm = not stock_timing()  # the warm ServerApp, unless a benchmark asks for stock Flower
    env = flower_env(cfg.flwr_home)
    cmd = superlink_command(cfg, warm)
    sys.stdout.flush()
    sys.stderr.flush()
    if cfg.database_kind == "sqlite" and not warm:
        os.execvpe(cmd[0], cmd, env)
    proc = subprocess.Popen(cmd, env=env)
    worker = _WarmServerApp(cfg, env) if warm else None
    stopping = []

    def forward(signum, _frame):
        stopping.append(signum)
        for p in (proc, worker.proc if worker else None):
            if p is not None and p.poll() is None:
                p.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    try:
        if worker is not None:
            worker.start()
        if wait_healthy(cfg, proc, timeout=120.0) and cfg.database_kind == "memory":
            replay_registrations(cfg)
        while proc.poll() is None:
            if worker is not None and not stopping:
                worker.keep_alive()
            time.sleep(0.5)
        return proc.returncode
    finally:
        for p in (proc, worker.proc if worker else None):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()


class _WarmServerApp:
    """The warm ServerApp process, started again (after 1 s, doubling to 60 s) if it dies."""

    def __init__(self, cfg: HubConfig, env: dict):
        self.cfg, self.env = cfg, env
        self.proc: subprocess.Popen | None = None
        self.delay, self.not_before, self.started = 1.0, 0.0, 0.0

    def start(self) -> None:
        self.proc = subprocess.Popen(warm_serverapp_command(self.cfg, os.getpid()), env=self.env)
        self.started = time.monotonic()

    def keep_alive(self) -> None:
        if self.proc is None or self.proc.poll() is None:
            return
        now = time.monotonic()
        if not self.not_before:
            if now - self.started > 300:
                self.delay = 1.0
            print(
                f"iaptnet hub: the warm ServerApp ended (exit {self.proc.returncode}); starting it again in {self.delay:g} s",
                file=sys.stderr,
                flush=True,
            )
            self.not_before = now + self.delay
            self.delay = min(self.delay * 2, 60.0)
        elif now >= self.not_before:
            self.not_before = 0.0
            self.start()


def wait_healthy(cfg: HubConfig, proc: subprocess.Popen | None = None, timeout: float = 60.0) -> bool:
    """True once the hub answers on its control address (False if it exited or timed out)."""
    return wait_for_hub(cfg.control_address, cfg.ca_cert, proc, timeout)


def wait_for_hub(address: str, ca_cert: Path, proc: subprocess.Popen | None, timeout: float) -> bool:
    """Poll the SuperLink's /health over TLS (trusting only `ca_cert`) until it answers."""
    import ssl

    import httpx

    context = ssl.create_default_context(cafile=str(ca_cert))
    deadline = time.monotonic() + timeout
    with httpx.Client(verify=context, timeout=2.0) as client:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                return False
            try:
                client.get(f"https://{address}/health")
                return True
            except httpx.HTTPError:
                time.sleep(0.2)
    return False


def replay_registrations(cfg: HubConfig) -> None:
    """Register every key of the hub's registry with a SuperLink that starts with empty state."""
    import logging

    log = logging.getLogger("iaptnet.hub")
    with _registry_locked(cfg):
        registry = read_registry(cfg)
    for name, entry in sorted(registry.items()):
        key = entry.get("public_key")
        if not key:
            log.warning("node %s has no public key in %s; register it again", name, cfg.registry)
            continue
        fd, tmp = tempfile.mkstemp(prefix=".key-", suffix=".pub", dir=cfg.state_dir)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(key.strip() + "\n")
            data = FlwrCli(cfg.flwr_home).json("supernode", "register", tmp, CONNECTION, "--name", name)
        finally:
            Path(tmp).unlink(missing_ok=True)
        if not data.get("success"):
            print(f"iaptnet hub: could not register node {name} again: {flwr_error(data)}", file=sys.stderr, flush=True)
            continue
        with _registry_locked(cfg):
            current = read_registry(cfg)
            if name in current:
                current[name]["node_id"] = str(data["node-id"])
                _write_registry(cfg, current)
    print(f"iaptnet hub: {len(registry)} registered node key(s) loaded", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Talking to the Control API through Flower's own `flwr` CLI


def write_connection(flwr_home: Path, address: str, ca_cert: Path) -> None:
    """The `flwr` CLI's connection file naming this hub as the default SuperLink. Replaced
    whole (never truncated in place): `flwr` commands running meanwhile, such as the
    registrations `network up` makes four at a time, read either file, never a partial one."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    text = (
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{address}"\nroot-certificates = "{Path(ca_cert).resolve()}"\n'
    )
    if path.exists() and path.read_text() == text:
        return
    fd, tmp = tempfile.mkstemp(dir=flwr_home, prefix=".config-", suffix=".toml")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


class FlwrCli:
    """Runs `flwr ...` against one hub with a private FLWR_HOME."""

    def __init__(self, flwr_home: Path):
        self.flwr_home = Path(flwr_home)
        self.env = flower_env(self.flwr_home)

    def command(self, *args: str) -> list[str]:
        return [flwr_executable("flwr"), *args]

    def json(self, *args: str, timeout: float = 120.0) -> dict:
        """Run a `flwr` command with `--format json`; return its JSON (success or not)."""
        try:
            proc = subprocess.run(
                self.command(*args, "--format", "json"), env=self.env, capture_output=True, text=True, timeout=timeout
            )
        except FileNotFoundError:
            raise NetworkError(
                "the 'flwr' command is not installed beside iaptnet; reinstall iaptnet with its dependencies."
            ) from None
        except subprocess.TimeoutExpired:
            raise NetworkError(f"'flwr {args[0]}' did not finish within {timeout:g} s; is the hub reachable?") from None
        out = proc.stdout
        start = out.find("{")
        try:
            data = json.loads(out[start:]) if start >= 0 else None
        except json.JSONDecodeError:
            data = None
        if not isinstance(data, dict):
            tail = (proc.stderr or out).strip().splitlines()[-1:] or ["no output"]
            raise NetworkError(f"'flwr {args[0]}' failed (exit {proc.returncode}): {tail[0][:300]}")
        return data


def flwr_error(data: dict) -> str:
    """A `flwr` JSON error on one line, without the 'Using SuperLink' banner."""
    text = str(data.get("error-message", "unknown error"))
    return flwr_plain(ln for ln in text.splitlines() if not ln.startswith("Using SuperLink")) or text


def flwr_plain(lines) -> str:
    """flwr's console output on one plain line: without its box drawing and padding."""
    import re

    return " ".join(re.sub(r"[\u2500-\u257f]", " ", " ".join(lines)).split())


def register_node(cfg: HubConfig, name: str, public_key: Path) -> int:
    """Register a Trust's node public key under `name`; return Flower's node id."""
    from ..keys import check_node_public_key

    if not _NAME.match(name):
        raise SpecError(f"node name '{name[:60]}' must be a short name of letters, digits, '_', '-' or '.'.")
    key_text = check_node_public_key(public_key)
    prepare_state(cfg)
    if name in read_registry(cfg):
        raise SpecError(
            f"a node named '{name}' is already registered (node id {read_registry(cfg)[name]['node_id']}); unregister it first to rotate its key."
        )
    data = FlwrCli(cfg.flwr_home).json(
        "supernode", "register", str(Path(public_key).resolve()), CONNECTION, "--name", name
    )
    if not data.get("success"):
        raise NetworkError(f"could not register node '{name}' at the hub: {flwr_error(data)}")
    node_id = int(data["node-id"])
    import hashlib

    with _registry_locked(cfg):
        registry = read_registry(cfg)
        registry[name] = {
            "node_id": str(node_id),
            "public_key": key_text.decode().strip(),
            "public_key_sha256": hashlib.sha256(key_text.strip()).hexdigest(),
            "registered_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        _write_registry(cfg, registry)
    return node_id


def unregister_node(cfg: HubConfig, name: str) -> None:
    registry = read_registry(cfg)
    if name not in registry:
        raise SpecError(f"no node named '{name}' is registered at this hub ({cfg.registry}).")
    data = FlwrCli(cfg.flwr_home).json("supernode", "unregister", registry[name]["node_id"], CONNECTION)
    if not data.get("success"):
        raise NetworkError(f"could not unregister node '{name}': {flwr_error(data)}")
    with _registry_locked(cfg):
        registry = read_registry(cfg)
        registry.pop(name, None)
        _write_registry(cfg, registry)


def read_registry(cfg: HubConfig) -> dict:
    try:
        return json.loads(cfg.registry.read_text())
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, OSError):
        raise SpecError(f"{cfg.registry}: the hub's node registry is unreadable.") from None


_REGISTRY_LOCK = threading.Lock()


@contextmanager
def _registry_locked(cfg: HubConfig):
    """One writer at a time, across threads and processes (several register-node at once)."""
    import fcntl

    with _REGISTRY_LOCK, open(cfg.state_dir / "nodes.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write_registry(cfg: HubConfig, registry: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".nodes-", dir=cfg.state_dir)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(registry, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, cfg.registry)


def node_statuses(flwr_home: Path) -> dict[str, str]:
    """Flower's view of the registered nodes: node id -> status (registered/online/offline)."""
    data = FlwrCli(flwr_home).json("supernode", "list", CONNECTION)
    if not data.get("success"):
        raise NetworkError(f"could not list the hub's nodes: {flwr_error(data)}")
    return {str(n["node-id"]): str(n["status"]) for n in data.get("nodes", [])}

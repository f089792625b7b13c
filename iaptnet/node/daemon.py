"""The node daemon: a Flower SuperNode at the Trust whose ClientApp is the installed node package.

`iaptnet node start --config node.toml`:

1. reads node.toml, checks the CA certificate, the node key, the data source and the policy
   (a production node refuses to start without its policy file), and loads and validates the
   extract once (so a bad extract stops the daemon now, not in a study);
2. checks that the installed flwr is the release iaptnet/flower/ was written for;
3. computes the hash of the installed iaptnet release (the only bundle it will serve) and reads
   the Trust's approved hashes (re-read at every run, so `approve-app` needs no restart);
4. runs flwr's SuperNode in this process, with TLS and node authentication, the warm worker and
   the capped sleeps of flower/supernode.py. It connects out to the hub only; its Runtime API
   listens on 127.0.0.1.
5. heals itself: a hub that restarted (and no longer knows the node) is reconnected to with
   backoff, in this process; a reply the warm worker could not store is given up on; and a
   watchdog ends the process with exit code 75 (`EXIT_STALLED`, so that systemd starts it
   again) when its loop stops making progress, a task runs past `tuning.task_limit`, or the
   worker thread died (flower/supernode.py).

Telemetry and update checks are off and Flower's files live under the node's own state folder.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import sys
import threading
from pathlib import Path

from ..protocol.errors import SpecError
from .config import NodeFile, read_approved

log = logging.getLogger("iaptnet.node")


def _flower_environment(state_dir: Path) -> None:
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    os.environ["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    home = state_dir / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    os.environ["FLWR_HOME"] = str(home)
    bindir = str(Path(sys.executable).parent)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_policy(cfg: NodeFile, *, local_network: bool) -> None:
    """A production node needs its policy file; a local demo network may run exploratory."""
    if cfg.policy is None:
        if local_network and is_loopback(cfg.hub_host):
            log.warning("node %s runs without a policy file (exploratory mode, local network only)", cfg.name)
            return
        raise SpecError(
            f"{cfg.path}: field 'policy' is required: a production node refuses to start without the Trust's disclosure policy file."
        )
    try:
        from .policy import load_policy  # issue 4: the Trust's disclosure policy
    except ImportError:
        return
    load_policy(cfg.policy, production=True)


class Gate:
    """Which app bundles this node serves: approved by the Trust and the installed release."""

    def __init__(self, approved_file: Path, release_hash: str):
        self.approved_file = approved_file
        self.release_hash = release_hash
        self._lock = threading.Lock()

    def __call__(self, fab_hash: str) -> str | None:
        with self._lock:
            try:
                approved = read_approved(self.approved_file)
            except SpecError as exc:
                log.error("%s", exc)
                approved = set()
        if fab_hash not in approved:
            return (
                f"the Trust has not approved this app bundle (sha256 {fab_hash[:16]}...); the node's "
                "operator approves a release with 'iaptnet node approve-app HASH'."
            )
        if fab_hash != self.release_hash:
            return (
                f"the app bundle (sha256 {fab_hash[:16]}...) is approved but is not the iaptnet release "
                f"installed at this node (sha256 {self.release_hash[:16]}...); the node runs only its installed release."
            )
        return None


def configure_logging() -> None:
    root = logging.getLogger("iaptnet")
    if not any(getattr(h, "_iaptnet_daemon", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler._iaptnet_daemon = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(os.environ.get("IAPTNET_LOG_LEVEL", "INFO").upper())
    root.propagate = False
    # Flower's own lines get timestamps too (an operator reads one log), and are printed once
    # (not again by a root handler a caller may have installed).
    import flwr.supercore.logger  # noqa: F401 - installs Flower's console handler

    flwr_logger = logging.getLogger("flwr")
    flwr_logger.propagate = False
    for handler in list(flwr_logger.handlers):
        flwr_logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s flwr: %(message)s"))
    handler.setLevel(os.environ.get("FLWR_LOG_LEVEL", "INFO").upper())
    flwr_logger.addHandler(handler)


@contextlib.contextmanager
def daemon_logging():
    """The daemon's log lines while it runs; the loggers are as they were once it returns, so
    a start that fails in-process (a test, a script) leaves no handler or level behind."""
    loggers = [logging.getLogger(name) for name in ("iaptnet", "flwr")]
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    configure_logging()
    try:
        yield
    finally:
        for lg, handlers, level, propagate in saved:
            lg.handlers[:] = handlers
            lg.setLevel(level)
            lg.propagate = propagate


def start(cfg: NodeFile, *, local_network: bool = False) -> int:
    """Run the node daemon until it is stopped (SIGTERM/SIGINT). Returns only on exit."""
    with daemon_logging():
        return _serve(cfg, local_network)


def _serve(cfg: NodeFile, local_network: bool) -> int:
    check_policy(cfg, local_network=local_network)
    try:
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        _flower_environment(cfg.state_dir)
    except OSError as exc:
        raise SpecError(
            f"{cfg.path}: field 'state_dir' names {cfg.state_dir}, which cannot be written ({exc.strerror})."
        ) from None

    from ..flower import pins, supernode

    try:
        pins.check_flwr()
    except pins.FlowerAdaptationError as exc:
        raise SpecError(str(exc)) from None

    # One BLAS thread, as the in-process engine's nodes compute: the same sums in the same order,
    # so both engines give the same numbers bit for bit.
    from threadpoolctl import threadpool_limits

    from ..flower.bundle import release_hash
    from .runtime import NodeConfig, runtime_for

    threadpool_limits(limits=1, user_api="blas")
    node_config = cfg.node_config()
    runtime = runtime_for(NodeConfig.from_mapping(node_config))
    dataset = runtime.dataset  # load and validate now: a bad extract stops the daemon here
    runtime.audit  # noqa: B018 - opens the audit log now, repairing (and recording) what a crash left
    release = release_hash()
    approved = read_approved(cfg.approved_apps)
    log.info(
        "node %s: %s rows, data version %s; release app sha256 %s (%s)",
        cfg.name,
        dataset.n_rows,
        dataset.data_version[:12],
        release,
        "approved" if release in approved else f"NOT approved in {cfg.approved_apps}",
    )

    from .app import app as client_app

    port = cfg.runtime_port or _free_port()
    stock = pins.stock_timing()
    tracker = supernode.TaskTracker()
    worker = supernode.WarmWorker(
        f"127.0.0.1:{port}",
        client_app,
        node_config,
        Gate(cfg.approved_apps, release),
        cfg.name,
        fallback_poll=1.0 if stock else 5.0,
        tracker=tracker,
    )
    if stock:  # benchmarks: flwr's own sleeps and a 1 s dispatch poll, like its SuperExec
        log.warning(
            "node %s runs with flwr's stock timings (%s=1): for benchmarks only", cfg.name, pins.STOCK_TIMING_ENV
        )
        policy, wake = supernode.SleepPolicy.flwr_defaults(), (lambda: None)
    else:
        policy = supernode.SleepPolicy(idle_poll=cfg.poll_idle, active_poll=cfg.poll_active)
        wake = worker.notify
    from .health import STATUS_FILE, Heartbeat

    heartbeat = Heartbeat(cfg.state_dir / STATUS_FILE, cfg.name, dataset.data_version)
    heartbeat.started()  # `iaptnet node status` reads it
    supernode.install_supernode_adaptations(policy, wake, worker.storing, on_contact=heartbeat.seen, tracker=tracker)
    supernode.install_reconnect_adaptations(on_attempt=tracker.beat)
    worker.start()
    watchdog = supernode.Watchdog(
        tracker,
        worker,
        lambda reason: _stalled(cfg.name, reason, heartbeat),
        stall_limit=cfg.stall_limit,
        task_limit=cfg.task_limit,
    )
    watchdog.start()
    log.info("node %s connecting to hub %s (TLS, node authentication)", cfg.name, cfg.hub)
    try:
        supernode.run_supernode(
            [
                "--superlink",
                cfg.hub,
                "--root-certificates",
                str(cfg.ca_cert),
                "--auth-supernode-private-key",
                str(cfg.key),
                "--isolation",
                "process",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            reconnect=True,
            on_attempt=tracker.beat,
        )
    except SystemExit as exc:
        if exc.code not in (0, None):
            log.error(
                "node %s stopped: the hub refused it or could not be reached. Check that the "
                "coordinator registered this node's public key ('iaptnet coordinator register-node "
                "%s %s.pub'), that 'ca_cert' is the network's CA and 'hub' its address. A node "
                "restarted after a crash is accepted again once the hub has marked it offline "
                "(about a minute).",
                cfg.name,
                cfg.name,
                cfg.key.with_suffix(""),
            )
        raise
    finally:
        watchdog.stop()
        heartbeat.stopped()
    return 0


def _stalled(name: str, reason: str, heartbeat) -> None:
    """The watchdog's verdict: the daemon is alive but no longer working. It ends the process
    at once, non-zero, so that systemd (Restart=) starts it again; a stuck thread could hold
    up a graceful exit."""
    from ..flower.supernode import EXIT_STALLED

    log.critical(
        "node %s: the watchdog ends the daemon (exit code %d) so that it is started again: %s.",
        name,
        EXIT_STALLED,
        reason,
    )
    heartbeat.stopped()
    for handler in logging.getLogger("iaptnet").handlers + logging.getLogger("flwr").handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    os._exit(EXIT_STALLED)

"""The hub's warm ServerApp (flwr 1.42.0 exactly; see flower/pins.py): each run's ServerApp is
forked from one long-lived process that has already imported Python's scientific stack,
flwr and iaptnet, instead of a new `flwr-serverapp` process started by flwr's SuperExec.

Stock Flower runs every run's ServerApp in a new process: the SuperExec polls the SuperLink's
Runtime API for work, then starts `flwr-serverapp`, which imports flwr, installs the run's app
bundle (FAB) on disk and imports the app from it: a few seconds before a study's first round.
Here the hub starts the SuperLink with `--isolation process` (no SuperExec) and this worker
beside it (coordinator/hub.py). The worker acquires ServerApp tasks itself and forks a child
per task. The child does what `flwr-serverapp` does (flwr's `run_serverapp`: the task's token,
heartbeat, log stream, pull input, push output and exit status) with two differences:

- **It serves one app only: the installed release's.** The child hashes the bundle it is given
  and runs the ServerApp only if that is this hub's release (the sha256 a Trust approves with
  `iaptnet node approve-app`, flower/bundle.py). So the hub no longer runs whatever code is
  submitted to its Control API, and the code that runs is the installed package's own, which
  the bundle holds byte for byte. Any other bundle fails its run with one sentence that the
  analyst sees, naming both hashes.
- **Nothing is written to disk.** The run config's defaults are read from the bundle in memory.
- **Its pulls of replies are held.** The run's grid asks the hub to hold each empty pull of
  replies until a node's reply is there whole (`hold_reply_pulls`, the hub's side in
  flower/superlink.py), so a round ends when its last reply arrives, not at the next pull.

A child is a process of its own, so runs stay isolated from each other as in stock Flower
(stdout is the run's log stream, flwr keeps per-process globals, a run that crashes takes
nothing else with it), and several run at once. The parent keeps one thread and never runs a
study: it only polls (every `poll` seconds, 0.2 by default), forks and reaps. It ends when the
hub that started it is gone; on SIGTERM it passes the signal to its running children, which
end their runs as flwr's do.

`python -m iaptnet.flower.warm_serverapp --runtime-api-address HOST:PORT --root-certificates
CA.crt [--parent-pid PID] [--poll 0.2]`.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import signal
import sys
import time

log = logging.getLogger("iaptnet.hub.serverapp")

#: What a parent imports before it forks: what every run's ServerApp needs (warm_up() adds
#: every kind's coordinator half and what parsing a study loads).
WARM_MODULES = (
    "iaptnet.coordinator.serverapp",
    "iaptnet.coordinator.runner",
    "iaptnet.coordinator.session",
    "iaptnet.coordinator.glm",
    "iaptnet.coordinator.studies",
    "iaptnet.flower.frame",
    "iaptnet.flower.serverapp",
    "flwr.superlink.grid.http_grid",
    "flwr.supercore.logger",
    "flwr.supercore.heartbeat",
    "flwr.supercore.exit",
    "flwr.common.config",
    "flwr.common.serde",
)


#: Seconds between two uploads of a run's log, when there is something to upload (flwr: 0.2).
LOG_UPLOAD_INTERVAL = 0.05


#: Seconds the run's pulls of replies ask the hub to hold them (flower/superlink.py).
REPLY_PULL_HOLD = 10.0


def hold_reply_pulls(grid) -> None:
    """Have the run's grid ask the hub to hold its empty pulls of replies and answer them when
    a node's reply is there whole. The run's Session sets how long each pull may be held
    (`grid.pull_hold`, never past its round's deadline) and pulls again at once instead of
    waiting between pulls (coordinator/session.py)."""
    from .superlink import HoldRequest

    grid.pull_hold = 0.0  # (the Session's to set, up to REPLY_PULL_HOLD)
    grid.pull_hold_max = REPLY_PULL_HOLD
    client = grid._runtime_client  # (flwr connects on first use)
    hold = HoldRequest(lambda: grid.pull_hold, "/flwr.proto.Runtime/PullMessages")
    client._interceptors = (*client._interceptors, hold)


def refusal_sentence(got: str, serves: str, version: str) -> str:
    return (
        f"the hub serves only the app of its own iaptnet release ({version}, sha256 {serves[:16]}...); "
        f"this run's app is sha256 {got[:16]}...: run the study with the hub's iaptnet release."
    )


# --------------------------------------------------------------------------------------------
# The child: one run's ServerApp


def serve_task(runtime_address: str, root_certificates: bytes, token: str, serves: str) -> None:
    """Run one ServerApp task in this (forked) process, as flwr's `run_serverapp` does, with
    the installed release's ServerApp; ends the process through flwr's `flwr_exit`."""
    from queue import Queue

    import flwr.supercore.logger as flwr_logger
    import httpx
    from flwr.app import RecordDict
    from flwr.common.config import get_fused_config_from_fab
    from flwr.common.constant import SubStatus
    from flwr.common.serde import context_from_proto, context_to_proto, fab_from_proto, run_from_proto
    from flwr.proto.runtime_pb2 import PullTaskInputRequest, PushTaskOutputRequest
    from flwr.server.run_serverapp import run as run_app
    from flwr.supercore.exit import ExitCode, flwr_exit, register_signal_handlers
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.logger import flush_logs, mirror_output_to_queue, start_log_uploader, stop_log_uploader
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType
    from flwr.superlink.grid import HttpGrid

    from .. import __version__
    from ..coordinator import serverapp as iaptnet_serverapp
    from ..protocol.errors import NetworkError

    # The run's log (its progress and results) goes up every LOG_UPLOAD_INTERVAL s when there
    # is any (flwr: 0.2); the analyst's results wait on it.
    flwr_logger.LOG_UPLOAD_INTERVAL = LOG_UPLOAD_INTERVAL
    log_queue: Queue[str | None] = Queue()
    mirror_output_to_queue(log_queue)  # this process's stdout is the run's log stream
    grid = HttpGrid(
        runtime_api_address=runtime_address, insecure=False, root_certificates=root_certificates, token=token
    )
    state = {"uploader": None, "context": None, "sub_status": SubStatus.FAILED, "details": "", "done": False}
    state["details"] = "Task failed with unknown error."
    heartbeat = None

    def on_exit() -> None:
        if state["done"]:
            return
        state["done"] = True
        grid._retry_invoker.max_tries = 1  # as flwr: never block on the way out
        if state["uploader"] is not None:
            flush_logs(log_queue)
        context = state["context"]
        try:
            grid._runtime_client.PushTaskOutput(
                PushTaskOutputRequest(
                    context=context_to_proto(context) if context is not None else None,
                    sub_status=state["sub_status"],
                    details=state["details"],
                )
            )
        except httpx.HTTPError as err:
            log.error("could not push the ServerApp's task output: %s", err)
        if state["uploader"] is not None:
            stop_log_uploader(log_queue, state["uploader"])
        if heartbeat is not None and heartbeat.is_running:
            heartbeat.stop()
        grid.close()

    register_signal_handlers(
        event_type=EventType.FLWR_SERVERAPP_RUN_LEAVE, exit_message="Task stopped by user.", exit_handlers=[on_exit]
    )
    exit_code = ExitCode.SUCCESS
    try:
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(grid._runtime_client))
        heartbeat.start()
        hold_reply_pulls(grid)
        res = grid._runtime_client.PullTaskInput(PullTaskInputRequest())
        TaskIdentity.task_id = res.task_id
        TaskIdentity.run_id = res.run.run_id
        TaskIdentity.node_id = res.context.node_id
        context = context_from_proto(res.context)
        run = run_from_proto(res.run)
        fab = fab_from_proto(res.fab)
        state["context"] = context
        grid.set_run(run)
        state["uploader"] = start_log_uploader(
            log_queue=log_queue, node_id=0, run_id=run.run_id, client=grid._runtime_client
        )
        digest = hashlib.sha256(fab.content).hexdigest()  # the bytes, not the submitter's word
        if digest != serves:
            sentence = refusal_sentence(digest, serves, __version__)
            iaptnet_serverapp.emit(
                {"event": "error", "type": "NetworkError", "exit_code": NetworkError.exit_code, "message": sentence}
            )
            log.error("run %s refused: app sha256 %s is not this hub's release", run.run_id, digest)
            state["details"] = sentence
            exit_code = ExitCode.SERVERAPP_EXCEPTION
        else:
            context.run_config = get_fused_config_from_fab(fab.content, run)
            context = run_app(grid=grid, context=context, server_app_dir=".", loaded_server_app=iaptnet_serverapp.app)
            context.state = RecordDict()  # as flwr: the resulting context goes back without state
            state["context"] = context
            state["sub_status"], state["details"] = SubStatus.COMPLETED, ""
    except Exception as exc:  # noqa: BLE001 - as flwr's run_serverapp: the run fails, with its reason
        log.error("ServerApp raised an exception", exc_info=exc)
        state["details"] = f"ServerApp failed with exception: {exc}"
        exit_code = ExitCode.SERVERAPP_EXCEPTION
    flwr_exit(code=exit_code, event_type=EventType.FLWR_SERVERAPP_RUN_LEAVE, emit_telemetry=False)


def _child(runtime_address: str, root_certificates: bytes, token: str, serves: str) -> None:
    """The forked child's whole life: never returns to the parent's loop."""
    code = 1
    try:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_DFL)
        serve_task(runtime_address, root_certificates, token, serves)
        code = 0
    except SystemExit as exc:  # flwr_exit ends every run this way
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001
        log.exception("the ServerApp child failed")
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)  # not the parent's atexit handlers, not its open connections


# --------------------------------------------------------------------------------------------
# The parent: poll, fork, reap


class WarmServerApp:
    """The long-lived parent: polls the SuperLink for ServerApp tasks and forks a child each."""

    def __init__(self, runtime_address: str, root_certificates_path: str, parent_pid: int | None, poll: float):
        self.runtime_address = runtime_address
        with open(root_certificates_path, "rb") as fh:
            self.root_certificates = fh.read()
        self.parent_pid = parent_pid
        self.poll = poll
        self.children: dict[int, int] = {}  # pid -> run id
        self.stopping = False
        self.serves = ""

    def warm_up(self) -> None:
        import importlib

        from .bundle import release_hash
        from .pins import check_flwr

        check_flwr()
        for name in WARM_MODULES:
            importlib.import_module(name)
        self.serves = release_hash()
        # What a run imports on first use: every kind's coordinator half, and what parsing a
        # study loads (formulaic, pandas: a third of a second or more in every child if not
        # here). Parsing the catalogue's studies loads exactly that.
        from ..coordinator.catalogue import catalogue_paths
        from ..coordinator.kinds import module_for
        from ..coordinator.studies import load_study
        from ..protocol.kinds import MODULES

        for kind in MODULES:
            try:
                module_for(kind)
            except Exception:  # noqa: BLE001 - a kind without a coordinator half is refused per run
                pass
        importlib.import_module("iaptnet.coordinator.glmm")
        for path in catalogue_paths():
            try:
                load_study(path)
            except Exception:  # noqa: BLE001 - some need the network's services: imports are what count
                pass

    def fork(self, task, token: str) -> int:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(self.runtime_address, self.root_certificates, token, self.serves)
        self.children[pid] = int(task.run_id)
        log.info("run %s: ServerApp started (pid %d)", task.run_id, pid)
        return pid

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            run_id = self.children.pop(pid, "?")
            code = os.waitstatus_to_exitcode(status)
            (log.info if code == 0 else log.warning)("run %s: ServerApp ended (exit %d)", run_id, code)

    def orphaned(self) -> bool:
        return self.parent_pid is not None and os.getppid() != self.parent_pid

    def stop(self, signum, _frame) -> None:
        self.stopping = True
        for pid in list(self.children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def loop(self) -> None:
        """Poll until stopped or orphaned; an unreachable SuperLink is asked again, backing off
        to 2 s (it may be starting or restarting)."""
        from flwr.supercore.constant import TaskType

        from .runtime_tasks import acquire_task, runtime_client

        client = runtime_client(self.runtime_address, self.root_certificates)
        wait = self.poll
        try:
            while not self.stopping and not self.orphaned():
                self.reap()
                try:
                    acquired = acquire_task(client, TaskType.SERVER_APP)
                    wait = self.poll
                except Exception:  # noqa: BLE001 - the SuperLink may be starting or restarting
                    log.debug("the SuperLink's Runtime API did not answer", exc_info=True)
                    acquired, wait = None, min(2.0, wait * 2)
                if acquired is not None:
                    self.fork(*acquired)
                    continue  # another run may be waiting
                time.sleep(wait)
        finally:
            client.close()
        deadline = time.monotonic() + 15.0
        while self.children and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m iaptnet.flower.warm_serverapp", description=__doc__.split("\n")[0])
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--root-certificates", required=True)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--poll", type=float, default=0.2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    # One line per HTTP request would fill the hub's log (5 polls a second) and, in a child,
    # feed the run's own log stream: each upload logged, the log never empty, and flwr's
    # flush_logs waiting its full 3 s at the end of every run.
    for quiet in ("httpx", "httpcore"):
        logging.getLogger(quiet).setLevel(logging.WARNING)
    worker = WarmServerApp(args.runtime_api_address, args.root_certificates, args.parent_pid, args.poll)
    worker.warm_up()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, worker.stop)
    log.info("warm ServerApp ready: serves app sha256 %s", worker.serves)
    worker.loop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

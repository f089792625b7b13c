"""The node daemon's SuperNode, adapted (flwr 1.42.0 exactly; see flower/pins.py).

1. **An app allow-list.** A SuperNode runs whatever app bundle (FAB) a run brings; its
   signature check only accepts Flower Hub signatures. Here the node never installs or imports
   a bundle at all: it serves a run only when the bundle's sha256 is on the Trust's approved list
   *and* equals the bundle of the iaptnet release installed at the node, and then runs the
   installed node package. Anything else gets a refusal reply before any of its code could run,
   and the node's log says why (`WarmWorker._serve`, with the daemon's `Gate`).
2. **A warm worker.** In 1.42 every message starts a fresh `flwr-clientapp` process (2-3 s of
   imports, nothing kept in memory). The node daemon runs the SuperNode with
   `--isolation process` and serves its Runtime API itself from one long-lived worker thread
   doing what `flwr.supernode.runtime.run_clientapp` does (acquire the task, pull the
   message, call the ClientApp, push the reply and the task output), so datasets and prepared
   design matrices stay in memory between rounds (`WarmWorker`).
3. **Capped sleeps and backoffs.** The SuperNode sleeps a hard-coded 3 s after an empty poll
   and checks for the ClientApp's reply every 0.5 s (`supernode/start_client_internal.py`);
   pulling a message whose objects are still uploading backs off 1 s, 2 s, 4 s... The
   SuperNode module's `time` is replaced by a proxy whose `sleep` polls fast while a study is
   active and slower when idle and waits for replies in 10 ms steps, the worker is woken the
   moment a message is stored instead of polling, and object pulls retry every 20-250 ms
   (`install_supernode_adaptations`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
import time as _time
from collections.abc import Callable
from dataclasses import dataclass

from .pins import INSTALLED as _INSTALLED

log = logging.getLogger("iaptnet.node.flower")

# --------------------------------------------------------------------------------------------
# Capped sleeps


class _TimeProxy:
    """Stands in for the `time` module inside flwr's SuperNode loop."""

    iaptnet_proxy = True  # (pins.check_flwr accepts it in place of the time module)

    def __init__(self, policy: SleepPolicy):
        self._policy = policy

    def sleep(self, seconds: float) -> None:
        _time.sleep(self._policy.cap(seconds))

    def __getattr__(self, name):
        return getattr(_time, name)


@dataclass
class SleepPolicy:
    """How long the SuperNode loop really sleeps when flwr asks for `seconds`.

    flwr asks for 3 s after an empty poll of the hub: during a study (`active_window` seconds
    after the last message) we poll every `active_poll` seconds, or every tenth of the last
    round's period when rounds are long (many nodes: fewer polls loading the hub), and when idle
    every `idle_poll` seconds. flwr asks for 0.5 s while waiting for the ClientApp's reply (an
    in-memory check): we check every 10 ms.
    """

    idle_poll: float = 1.0
    active_poll: float = 0.25
    active_window: float = 120.0
    reply_poll: float = 0.01
    pull_backoff: float = 0.02  # flwr: 1 s, then doubling to 10 s
    pull_backoff_cap: float = 0.2
    last_activity: float = float("-inf")
    period: float = 0.0  # seconds between the last two messages, during a study
    period_fraction: float = 0.1

    stock: bool = False  # benchmarks only: flwr 1.42's own timings, nothing capped

    @classmethod
    def flwr_defaults(cls) -> SleepPolicy:
        """flwr 1.42 as shipped (the 'before' of bench/bench_latency.py)."""
        return cls(pull_backoff=1.0, pull_backoff_cap=10.0, stock=True)

    def cap(self, seconds: float) -> float:
        if self.stock:
            return seconds
        if seconds >= 1.0:  # the idle poll of the hub
            quiet = _time.monotonic() - self.last_activity
            if quiet >= self.active_window:
                return min(seconds, self.idle_poll)
            poll = max(self.active_poll, min(self.idle_poll, self.period * self.period_fraction))
            return min(seconds, poll)
        return min(seconds, self.reply_poll)

    def touch(self) -> None:
        now = _time.monotonic()
        since = now - self.last_activity
        self.period = since if since < self.active_window else 0.0
        self.last_activity = now


def install_supernode_adaptations(
    policy: SleepPolicy,
    on_message: Callable[[], None],
    storing: threading.Lock,
    on_contact: Callable[[str], None] | None = None,
) -> None:
    """Patch the SuperNode loop (module `flwr.supernode.start_client_internal`):

    * its `time` becomes a `_TimeProxy` (capped sleeps, see `SleepPolicy`);
    * `pull_objects` retries every 20-200 ms instead of after 1 s, 2 s, 4 s... (a message is
      visible to the node before the hub has finished uploading its objects);
    * `_pull_and_store_message` holds `storing` while it runs (flwr creates the task before it
      has pulled the message's objects: a worker claiming the task in that gap would wait out a
      pull backoff), then calls `on_message()` to wake the worker;
    * `_push_messages` logs (debug) how long the reply took to reach the hub;
    * `on_contact(event)`, when given, hears each time the hub answered: "poll" (nothing to
      do), "message" (a task arrived) or "reply" (the answer was delivered); the node
      daemon's status file (node/health.py).
    """
    import flwr.supernode.start_client_internal as sci

    if "sci" in _INSTALLED:
        return
    saved = {name: getattr(sci, name) for name in ("time", "pull_objects", "_pull_and_store_message", "_push_messages")}
    original_pull, original_push = saved["_pull_and_store_message"], saved["_push_messages"]

    @functools.wraps(original_pull)
    def pull_and_store_message(*args, **kwargs):
        with storing:
            t0 = _time.monotonic()
            run_id = original_pull(*args, **kwargs)
        if on_contact is not None:
            on_contact("poll" if run_id is None else "message")
        if run_id is not None:
            log.debug("message stored (%.3f s)", _time.monotonic() - t0)
            policy.touch()
            on_message()
        return run_id

    @functools.wraps(original_push)
    def push_messages(*args, **kwargs):
        t0 = _time.monotonic()
        original_push(*args, **kwargs)
        if on_contact is not None:
            on_contact("reply")
        log.debug("reply sent to the hub (%.3f s after the loop began waiting for it)", _time.monotonic() - t0)

    _INSTALLED["sci"] = saved
    sci.time = _TimeProxy(policy)
    sci.pull_objects = functools.partial(
        saved["pull_objects"], initial_backoff=policy.pull_backoff, backoff_cap=policy.pull_backoff_cap
    )
    sci._pull_and_store_message = pull_and_store_message
    sci._push_messages = push_messages


def uninstall_supernode_adaptations() -> None:
    """Undo `install_supernode_adaptations` (tests)."""
    import flwr.supernode.start_client_internal as sci

    for name, value in _INSTALLED.pop("sci", {}).items():
        setattr(sci, name, value)


# --------------------------------------------------------------------------------------------
# The warm worker: one long-lived thread serving the SuperNode's ClientApp tasks

Gate = Callable[[str], "str | None"]  # FAB sha256 -> None (serve) or a refusal sentence


class WarmWorker(threading.Thread):
    """Serves the SuperNode's ClientApp tasks in this process, one at a time, in order.

    `gate(fab_hash)` decides whether a run's bundle may be served; `client_app` is the node's
    installed ClientApp; `node_config` replaces the Context's node config (so the data source
    never travels through flwr's command line).
    """

    def __init__(
        self,
        runtime_address: str,
        client_app,
        node_config: dict,
        gate: Gate,
        node_name: str,
        fallback_poll: float = 5.0,
    ):
        super().__init__(name="iaptnet-warm-worker", daemon=True)
        self.runtime_address = runtime_address
        self.client_app = client_app
        self.node_config = dict(node_config)
        self.gate = gate
        self.node_name = node_name
        self.fallback_poll = fallback_poll
        self.wake = threading.Event()
        self.storing = threading.Lock()  # held by the SuperNode while it stores a message
        self._stop = threading.Event()
        self.served = 0

    def notify(self) -> None:
        self.wake.set()

    def stop(self) -> None:
        self._stop.set()
        self.wake.set()

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> None:
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        acquirer = RuntimeHttpClient.from_server_address(
            server_address=self.runtime_address,
            insecure=True,
            root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
            retry_invoker=make_simple_http_retry_invoker(),
        )
        try:
            while not self._stop.is_set():
                self.wake.wait(self.fallback_poll)
                self.wake.clear()
                while not self._stop.is_set():
                    try:
                        with self.storing:
                            acquired = self._acquire(acquirer)
                    except Exception:  # noqa: BLE001 - keep serving; the SuperNode may be starting
                        log.debug("could not reach the SuperNode's runtime API yet", exc_info=True)
                        break
                    if acquired is None:
                        break
                    self._serve(*acquired)
        finally:
            acquirer.close()

    @staticmethod
    def _acquire(acquirer):
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        res = acquirer.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        if res.HasField("task") and res.token:
            return res.task, res.token
        return None

    def _serve(self, task, token: str) -> None:
        from flwr.app import Message
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient
        from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

        from .frame import pack, unpack

        client = RuntimeHttpClient.from_server_address(
            server_address=self.runtime_address,
            insecure=True,
            root_certificates=None,
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                RuntimeTokenHttpInterceptor(token),
            ],
            retry_invoker=make_simple_http_retry_invoker(),
        )
        heartbeat = HeartbeatSender(_safe_heartbeat(client))
        heartbeat.start()
        context = None
        sub_status, details = SubStatus.FAILED, "the node could not serve the task"
        t0 = _time.perf_counter()
        try:
            message, context, run, fab = pull_task_input(client)
            t1 = _time.perf_counter()
            digest = hashlib.sha256(fab.content).hexdigest()  # the bytes, not the hub's word
            refusal = self.gate(digest)
            if refusal:
                log.error("REFUSED run %s: app bundle sha256 %s: %s", run.run_id, digest, refusal)
                reply = Message(_refusal_content(self.node_name, refusal), reply_to=message)
                details = "app bundle not approved"
            else:
                context.node_config = dict(self.node_config)
                try:
                    if message.has_content():
                        message.content = unpack(message.content)
                    reply = self.client_app(message=message, context=context)
                    if reply.has_content():
                        reply.content = pack(reply.content)
                    sub_status, details = SubStatus.COMPLETED, ""
                except Exception:  # noqa: BLE001 - the text may carry values: log here only
                    log.exception("the node's ClientApp raised an exception")
                    from flwr.app import Error

                    reply = Message(
                        Error(
                            code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                            reason="the node's app raised an exception; the detail is in the node's own log",
                        ),
                        reply_to=message,
                    )
            t2 = _time.perf_counter()
            push_message(client, reply, context)
            self.served += 1
            log.debug(
                "task served: input %.3f s, app %.3f s, reply %.3f s", t1 - t0, t2 - t1, _time.perf_counter() - t2
            )
        except Exception:  # noqa: BLE001
            log.exception("serving task %s failed", getattr(task, "task_id", "?"))
        finally:
            try:
                push_task_output(client, context, sub_status, details)
            finally:
                if heartbeat.is_running:
                    heartbeat.stop()
                client.close()


def _safe_heartbeat(client) -> Callable[[], bool]:
    """flwr's own task heartbeat raises SIGINT when refused: here that would stop the node."""
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

    def beat() -> bool:
        try:
            return bool(client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success)
        except Exception:  # noqa: BLE001
            return False

    return beat


def _refusal_content(node_name: str, sentence: str):
    from ..protocol import messages as m

    return m.encode_reply(m.Reply(status=m.REFUSED, node=node_name, code="app_not_approved", message=sentence))


# --------------------------------------------------------------------------------------------
# Running the SuperNode in this process


def run_supernode(argv: list[str]) -> None:
    """Run flwr's `flower-supernode` entry point in this process with `argv` (blocks)."""
    import sys

    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *argv]
    flower_supernode()

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
   (`install_supernode_adaptations`). A run whose bundle is the installed release is not
   downloaded again (`local_release_fab`). Each poll asks the hub to hold it while there is nothing
   (`install_pull_hold`; the hub's side is in flower/superlink.py): the node hears of its next
   message the moment it is there, and after a held empty poll polls again at once.
4. **No wait without end.** flwr's loop waits, without limit, for the ClientApp's reply and
   then for each of its objects. When the warm worker's push fails part-way (flwr's
   `ObjectPushError` after the node was suspended past its task token), that reply never
   comes and the node stays online answering nothing. Here the loop gives up on a reply the
   worker ended its task without storing whole (`TaskTracker`, through the same sleeps), drops
   the message, and goes on; the hub counts the node as not answering that task.
5. **Reconnection.** flwr's SuperNode exits when the hub no longer knows it (a restarted hub
   answers 401; the loop and the node heartbeat then send the process SIGINT). Here the
   connection ends instead, and `run_supernode` activates the node again with backoff, in
   the same process: the Runtime API, the warm worker and the node's state stay
   (`install_reconnect_adaptations`).
6. **A watchdog.** `Watchdog` ends the process with `EXIT_STALLED` (so systemd restarts it)
   when the loop stops making progress, a task runs past its limit or the worker thread died,
   never mistaking a suspension (SIGSTOP) for one.
"""

from __future__ import annotations

import contextlib
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

#: The sleep flwr's SuperNode loop takes between checks for the ClientApp's reply and for each
#: of its objects (`_push_messages`; pinned in pins.NEEDS).
REPLY_WAIT = 0.5


class _TimeProxy:
    """Stands in for the `time` module inside flwr's SuperNode loop."""

    iaptnet_proxy = True  # (pins.check_flwr accepts it in place of the time module)

    def __init__(self, policy: SleepPolicy, tracker: TaskTracker | None = None):
        self._policy = policy
        self._tracker = tracker

    def sleep(self, seconds: float) -> None:
        if seconds == REPLY_WAIT and self._tracker is not None:
            self._tracker.waiting()  # (raises ReplyAbandoned when the reply cannot come)
        elif self._tracker is not None:
            self._tracker.beat()
        _time.sleep(self._policy.cap(seconds))

    def __getattr__(self, name):
        return getattr(_time, name)


@dataclass
class SleepPolicy:
    """How long the SuperNode loop really sleeps when flwr asks for `seconds`.

    flwr asks for 3 s after an empty poll of the hub. During a study (`active_window` seconds
    after the last message) we poll every `active_poll` seconds; when rounds are long (many
    nodes) a fifth of the last round apart (the time between two messages of the same run),
    up to `active_poll_cap`; and while a wait goes on (since the node's reply), a fifth of the
    wait so far, up to `idle_poll` (before any round is known, and after a small network's
    study). Each poll is a request the hub serves, and with many nodes the polls of one round
    would otherwise cost the hub more than the round's own messages (bench/bench_hub.py),
    while polls a fifth of a round apart delay it by at most a fifth. A round is never
    measured across two runs (the gap between two studies is not a round), but the last one
    measured stays the pace of the next run's first round: the network's size sets it.
    When idle we poll every `idle_poll` seconds. flwr asks for 0.5 s while waiting for the
    ClientApp's reply (an in-memory check): we check every 10 ms.
    """

    idle_poll: float = 1.0
    active_poll: float = 0.25
    active_window: float = 120.0
    reply_poll: float = 0.01
    pull_backoff: float = 0.02  # flwr: 1 s, then doubling to 10 s
    pull_backoff_cap: float = 0.2
    last_activity: float = float("-inf")  # the last message stored
    last_reply: float = float("-inf")  # the last reply pushed to the hub
    run_id: int | None = None  # the run of the last message
    period: float = 0.0  # the last round: seconds between two messages of the same run
    period_fraction: float = 0.2
    active_poll_cap: float = 5.0

    stock: bool = False  # benchmarks only: flwr 1.42's own timings, nothing capped
    hold: float = 10.0  # seconds the hub is asked to hold an empty poll (superlink.HOLD_HEADER)
    last_poll_held: bool = False  # the last poll was empty after the hub held it

    @classmethod
    def flwr_defaults(cls) -> SleepPolicy:
        """flwr 1.42 as shipped (the 'before' of bench/bench_latency.py)."""
        return cls(pull_backoff=1.0, pull_backoff_cap=10.0, stock=True, hold=0.0)

    def cap(self, seconds: float) -> float:
        if self.stock:
            return seconds
        if seconds >= 1.0:  # the poll of the hub after an empty one
            if self.last_poll_held:
                return 0.0  # the hub held it: the next poll waits there, not here
            now = _time.monotonic()
            if now - self.last_activity >= self.active_window:
                return min(seconds, self.idle_poll)
            waited = now - max(self.last_activity, self.last_reply)
            return max(
                self.active_poll,
                min(self.active_poll_cap, self.period * self.period_fraction),
                min(self.idle_poll, waited * self.period_fraction),
            )
        return min(seconds, self.reply_poll)

    def touch(self, run_id: int | None = None) -> None:
        """A message of run `run_id` was stored."""
        now = _time.monotonic()
        if run_id is not None and run_id == self.run_id:
            self.period = now - self.last_activity
        self.run_id = run_id
        self.last_activity = now

    def replied(self) -> None:
        """The node's reply reached the hub: the wait for the next message starts."""
        self.last_reply = _time.monotonic()

    def polled(self, seconds: float, empty: bool) -> None:
        """A poll of the hub took `seconds` and found nothing (`empty`) or a message. After an
        empty poll the hub held, the next one goes at once; after one answered at once (a hub
        that does not hold polls, or one about to restart) the capped sleeps apply."""
        from .superlink import hub_held

        self.last_poll_held = empty and hub_held(seconds, self.hold, empty)


def install_supernode_adaptations(
    policy: SleepPolicy,
    on_message: Callable[[], None],
    storing: threading.Lock,
    on_contact: Callable[[str], None] | None = None,
    tracker: TaskTracker | None = None,
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
      daemon's status file (node/health.py);
    * `tracker`, when given, hears each message stored and each turn of the loop, and ends
      the loop's wait for a reply the warm worker ended its task without storing whole
      (`TaskTracker.waiting`): the message is dropped and the loop goes on.
    """
    import flwr.supernode.start_client_internal as sci

    if "sci" in _INSTALLED:
        return
    saved = {name: getattr(sci, name) for name in ("time", "pull_objects", "_pull_and_store_message", "_push_messages")}
    original_pull, original_push = saved["_pull_and_store_message"], saved["_push_messages"]

    received: list = []  # the message being stored

    @functools.wraps(original_pull)
    def pull_and_store_message(*args, **kwargs):
        if tracker is not None:
            tracker.beat()
        receive = kwargs.get("receive")
        if receive is not None:
            kwargs["receive"] = _noting_receive(receive, received, policy)
        if kwargs.get("get_fab") is not None:
            kwargs["get_fab"] = local_release_fab(kwargs["get_fab"])
        received.clear()
        try:
            with storing:
                t0 = _time.monotonic()
                run_id = original_pull(*args, **kwargs)
                if run_id is None and received:
                    _drop_ignored(kwargs.get("state"), kwargs.get("object_store"), received[0])
        except Exception as exc:
            if _unauthorized(exc):
                raise HubForgotNode() from None
            raise
        if on_contact is not None:
            on_contact("poll" if run_id is None else "message")
        if run_id is not None:
            log.debug("message stored (%.3f s)", _time.monotonic() - t0)
            if tracker is not None:
                tracker.message_stored(received[0].metadata.message_id if received else None)
            policy.touch(run_id)
            on_message()
        return run_id

    @functools.wraps(original_push)
    def push_messages(*args, **kwargs):
        t0 = _time.monotonic()
        try:
            original_push(*args, **kwargs)
        except ReplyAbandoned as why:
            _drop_unanswered(kwargs.get("state"), kwargs.get("object_store"), tracker.message_id, why)
            return
        finally:
            if tracker is not None:
                tracker.done_waiting()
        policy.replied()
        if on_contact is not None:
            on_contact("reply")
        log.debug("reply sent to the hub (%.3f s after the loop began waiting for it)", _time.monotonic() - t0)

    _INSTALLED["sci"] = saved
    sci.time = _TimeProxy(policy, tracker)
    sci.pull_objects = functools.partial(
        saved["pull_objects"], initial_backoff=policy.pull_backoff, backoff_cap=policy.pull_backoff_cap
    )
    sci._pull_and_store_message = pull_and_store_message
    sci._push_messages = push_messages
    install_pull_hold(policy.hold)


def _noting_receive(receive, received: list, policy: SleepPolicy):
    """flwr's `receive`, noting the message it returns and, for `policy`, how long it took."""

    def noting():
        t0 = _time.monotonic()
        got = receive()
        policy.polled(_time.monotonic() - t0, got is None)
        if got is not None:
            received.append(got[0])
        return got

    return noting


def local_release_fab(get_fab):
    """flwr's `get_fab(fab_hash, run_id)`, answered from the installed release when the run's
    bundle is that release (same sha256) instead of downloading the same bytes again: 1.4 MB a
    node a run, 180 MB of the hub's sending a run at 128 nodes. The node runs its installed
    package whatever the bundle holds (`WarmWorker._serve`), and its gate still checks the hash
    of the bytes it has."""
    from .bundle import release_fab

    def fab(fab_hash: str, run_id: int):
        data, digest = release_fab()
        if fab_hash != digest:
            return get_fab(fab_hash, run_id)
        from flwr.supercore.fab import Fab

        log.debug("run %s brings this node's own release: its bundle is not downloaded", run_id)
        return Fab(hash_str=digest, content=data, verifications={})

    return fab


def install_pull_hold(seconds: float) -> None:
    """Make flwr's fleet connection (`fleet_http_connection.FleetHttpClient`) ask the hub to
    hold each empty poll for `seconds` (0: never ask, as flwr)."""
    import flwr.supernode.fleet_http_connection as fhc

    if "hold" in _INSTALLED or seconds <= 0:
        return
    stock = fhc.FleetHttpClient

    class HoldingFleetHttpClient(stock):
        @classmethod
        def from_server_address(cls, server_address, insecure, root_certificates, interceptors, **kwargs):
            from .superlink import HoldRequest

            interceptors = [*interceptors, HoldRequest(seconds, "/flwr.proto.Fleet/PullMessages")]
            return super().from_server_address(server_address, insecure, root_certificates, interceptors, **kwargs)

    _INSTALLED["hold"] = stock
    fhc.FleetHttpClient = HoldingFleetHttpClient


def uninstall_pull_hold() -> None:
    import flwr.supernode.fleet_http_connection as fhc

    stock = _INSTALLED.pop("hold", None)
    if stock is not None:
        fhc.FleetHttpClient = stock


def _drop_ignored(state, object_store, message) -> None:
    """A message flwr received and then ignored (its run ended while its objects were pulled:
    flwr 1.42 logs "Run ID ... is not in `RUNNING` status. Ignoring message") stays in the
    node's state with a pending task and without its objects: the warm worker would claim that
    task and wait for the objects for ever, and the node answer nothing again (a node frozen
    past the node timeout and thawed met exactly this). Drop the message and end the run's
    pending tasks (the run has ended: none of them can be served), as flwr does for a message
    whose objects it failed to pull."""
    from flwr.common.constant import Status, SubStatus

    if state is None:
        return
    message_id, run_id = message.metadata.message_id, message.metadata.run_id
    try:
        state.delete_messages(message_ids=[message_id])
        if object_store is not None:
            object_store.delete(message_id)
        for task in state.get_tasks(run_ids=[run_id], statuses=[Status.PENDING]):
            state.finish_task(
                task.task_id, sub_status=SubStatus.FAILED, details="the run ended while its message was pulled"
            )
    except Exception:  # noqa: BLE001 - cleaning up only
        log.debug("could not drop the ignored message %s", message_id, exc_info=True)
        return
    log.info("message %s of a run that had ended was dropped with its task", message_id)


def _drop_unanswered(state, object_store, message_id: str | None, why: Exception) -> None:
    """The loop gave up on the reply to `message_id`: drop the message, as flwr drops a reply
    it could not send, and go on."""
    log.warning(
        "no reply to message %s will come: %s; the message is dropped and the hub counts this node as not answering it",
        message_id or "?",
        why,
    )
    if message_id and state is not None:
        try:
            state.delete_messages(message_ids=[message_id])
            if object_store is not None:
                object_store.delete(message_id)
        except Exception:  # noqa: BLE001 - cleaning up only
            log.debug("could not drop message %s", message_id, exc_info=True)


def uninstall_supernode_adaptations() -> None:
    """Undo `install_supernode_adaptations` (tests)."""
    import flwr.supernode.start_client_internal as sci

    for name, value in _INSTALLED.pop("sci", {}).items():
        setattr(sci, name, value)
    uninstall_pull_hold()


# --------------------------------------------------------------------------------------------
# Self-healing: replies that cannot come, reconnection, the watchdog

#: The exit code of a node daemon its watchdog ended (systemd's Restart= starts it again).
EXIT_STALLED = 75
#: The longest wait between two tries to reach the hub (seconds).
RETRY_CAP = 5


class ReplyAbandoned(Exception):
    """Raised in flwr's reply wait when the reply cannot come (see `TaskTracker.waiting`)."""


class HubForgotNode(Exception):
    """The hub no longer knows this node (it answered 401): the connection ends and
    `run_supernode` activates the node again."""

    def __str__(self) -> str:
        return "the hub no longer knows this node (it restarted, or dropped the node's session); reconnecting"


class TaskTracker:
    """What the SuperNode loop and the warm worker tell each other, and the watchdog.

    The loop stores a message (`message_stored`), then waits in flwr's `_push_messages` for the
    worker's reply and each of its objects, sleeping `REPLY_WAIT` between checks
    (`waiting`, from `_TimeProxy.sleep`). The worker marks each task it serves
    (`task_started`, `task_finished(message_id, replied)`). A wait ends with `ReplyAbandoned`
    when the worker ended the task for that message without storing its reply whole and
    `grace` seconds have passed, or when the loop has waited `idle_limit` seconds while the
    worker was serving nothing. Every call is also a sign of life for the watchdog
    (`progress`)."""

    def __init__(self, grace: float = 2.0, idle_limit: float = 30.0, clock: Callable[[], float] = _time.monotonic):
        self.grace = grace
        self.idle_limit = idle_limit
        self.clock = clock
        self._lock = threading.Lock()
        self.progress = clock()  # the loop's last sign of life
        self.message_id: str | None = None  # the message the loop stored last
        self.waiting_since: float | None = None
        self.busy_since: float | None = None  # the worker serves a task since then
        self.idle_since = float("-inf")  # ... or it ended its last task then
        self.unanswered: dict[str, float] = {}  # message id -> when the worker ended it without a reply
        self.abandoned = 0

    # -- the loop
    def beat(self) -> None:
        self.progress = self.clock()

    def message_stored(self, message_id: str | None) -> None:
        with self._lock:
            self.message_id = message_id
            self.waiting_since = None
        self.beat()

    def waiting(self) -> None:
        now = self.clock()
        self.progress = now
        with self._lock:
            if self.waiting_since is None:
                self.waiting_since = now
            ended = self.unanswered.get(self.message_id or "")
            if ended is not None and now - ended >= self.grace:
                why = (
                    "the warm worker ended its task without storing the reply whole (its push to the SuperNode failed)"
                )
            elif self.busy_since is None and now - max(self.waiting_since, self.idle_since) >= self.idle_limit:
                why = f"the loop waited {now - self.waiting_since:.0f} s, the warm worker serving nothing"
            else:
                return
            self.waiting_since = None
            self.abandoned += 1
        raise ReplyAbandoned(why)

    def done_waiting(self) -> None:
        with self._lock:
            self.waiting_since = None
        self.beat()

    # -- the worker
    def task_started(self) -> None:
        self.busy_since = self.clock()

    def task_finished(self, message_id: str | None, replied: bool) -> None:
        now = self.clock()
        with self._lock:
            self.busy_since = None
            self.idle_since = now
            if message_id and not replied:
                self.unanswered = {k: t for k, t in self.unanswered.items() if now - t < 3600.0}
                self.unanswered[message_id] = now

    # -- the watchdog
    def resumed(self) -> None:
        """The process was suspended: every clock starts again from now."""
        now = self.clock()
        with self._lock:
            self.progress = now
            if self.waiting_since is not None:
                self.waiting_since = now
            if self.busy_since is not None:
                self.busy_since = now


class Watchdog(threading.Thread):
    """Ends the node daemon, with `EXIT_STALLED`, when it is alive but no longer working:

    * the SuperNode loop made no progress (no poll, no retry, no wait for a reply) for
      `stall_limit` seconds;
    * one task has been served for more than `task_limit` seconds;
    * the warm worker thread stopped.

    It checks every `tick` seconds. A gap of more than `suspend_gap` seconds between two checks
    means the whole process was suspended (SIGSTOP, a paused virtual machine): its clocks start
    again, and nothing is judged on time that did not pass for it. `on_stall(reason)` ends the
    process (the daemon's: log, status file, `os._exit(EXIT_STALLED)`)."""

    def __init__(
        self,
        tracker: TaskTracker,
        worker: threading.Thread,
        on_stall: Callable[[str], None],
        *,
        stall_limit: float = 300.0,
        task_limit: float = 900.0,
        tick: float = 1.0,
        suspend_gap: float = 5.0,
        clock: Callable[[], float] = _time.monotonic,
    ):
        super().__init__(name="iaptnet-watchdog", daemon=True)
        self.tracker = tracker
        self.worker = worker
        self.on_stall = on_stall
        self.stall_limit = stall_limit
        self.task_limit = task_limit
        self.tick = tick
        self.suspend_gap = suspend_gap
        self.clock = clock
        self.suspensions = 0
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        last = self.clock()
        while not self._stop_event.wait(self.tick):
            now = self.clock()
            reason = self.check(now, now - last)
            last = now
            if reason:
                self.on_stall(reason)
                return

    def check(self, now: float, since_last: float) -> str | None:
        """The reason to end the process, or None. `since_last`: seconds since the last check."""
        if since_last > self.suspend_gap:
            self.suspensions += 1
            log.warning("the node was suspended for about %.0f s; its watchdog's clocks start again", since_last)
            self.tracker.resumed()
            return None
        if not self.worker.is_alive():
            return "the warm worker thread has stopped"
        busy = self.tracker.busy_since
        if busy is not None and now - busy > self.task_limit:
            return f"one task has been served for {now - busy:.0f} s (the limit is {self.task_limit:g} s)"
        if busy is None and now - self.tracker.progress > self.stall_limit:
            return f"the SuperNode loop has made no progress for {now - self.tracker.progress:.0f} s"
        return None


class _Link:
    """The node's session at the hub: whether it was ever accepted, and whether it is now."""

    def __init__(self):
        self.connected_once = False
        self.active = False
        self.on_attempt: Callable[[], None] | None = None  # each connection attempt or retry


_LINK = _Link()


def _unauthorized(exc: BaseException) -> bool:
    import httpx

    return isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == httpx.codes.UNAUTHORIZED


class _OsProxy:
    """Stands in for `os` in flwr's fleet connection module: its node heartbeat sends the
    process SIGINT when the hub answers 401. Once the node has been accepted, that ends the
    connection instead (the loop's next request meets the same 401): the node reconnects."""

    iaptnet_proxy = True

    def kill(self, pid: int, sig: int) -> None:
        import os
        import signal

        if pid == os.getpid() and sig == signal.SIGINT and _LINK.connected_once:
            log.info("the hub no longer knows this node's session (heartbeat refused); the node will reconnect")
            return
        os.kill(pid, sig)

    def __getattr__(self, name):
        import os

        return getattr(os, name)


def _quiet_heartbeat_sender():
    """flwr's HeartbeatSender whose heartbeat failures, whatever they are, are retried with
    its backoff: flwr's lets an HTTP 401 or an unrecognised-node error end its thread with a
    traceback in the node's log."""
    from flwr.supercore.heartbeat import HeartbeatFailure, HeartbeatSender

    class QuietHeartbeatSender(HeartbeatSender):
        def _heartbeat(self) -> None:
            if self._stop_event.is_set():
                return
            try:
                ok = self.heartbeat_fn()
            except Exception:  # noqa: BLE001 - the connection loop sees the same failure
                ok = False
            if not ok:
                raise HeartbeatFailure

    return QuietHeartbeatSender


def install_reconnect_adaptations(on_attempt: Callable[[], None] | None = None) -> None:
    """Patch flwr's fleet connection (`flwr.supernode.fleet_http_connection`) and the
    SuperNode's `_init_connection` so that a hub that no longer knows the node ends the
    connection instead of the process:

    * its retry invoker gives up on HTTP 401 while the node is connected (the request raises,
      the connection ends: `run_supernode` connects again), retries 401 with backoff while a
      node that was connected before activates again (any HTTP error: a restarted hub answers
      412 until it has loaded the node keys again), and keeps flwr's behaviour (exit) at the first start, when
      401 means an unregistered key; it waits at most `RETRY_CAP` seconds between tries
      (flwr: 20 s); every retry is a sign of life (`on_attempt`);
    * its node heartbeat no longer sends the process SIGINT (`_OsProxy`) nor ends its thread
      with a traceback (`_quiet_heartbeat_sender`)."""
    import flwr.supernode.fleet_http_connection as fhc
    import flwr.supernode.start_client_internal as sci
    import httpx
    from flwr.supercore.retry import exponential

    if "fhc" in _INSTALLED:
        return
    saved_fhc = {name: getattr(fhc, name) for name in ("make_simple_http_retry_invoker", "HeartbeatSender", "os")}
    saved_sci = {"_init_connection": sci._init_connection}
    make_invoker = saved_fhc["make_simple_http_retry_invoker"]
    original_init = saved_sci["_init_connection"]
    _LINK.on_attempt = on_attempt

    @functools.wraps(make_invoker)
    def make_invoker_patched():
        invoker = make_invoker()
        flwr_giveup, flwr_backoff = invoker.should_giveup, invoker.on_backoff

        def should_giveup(exc: Exception) -> bool:
            if _unauthorized(exc) and _LINK.active:
                return True
            if _LINK.connected_once and not _LINK.active and isinstance(exc, httpx.HTTPStatusError):
                # A restarted hub answers 412 until it has loaded the node keys again.
                log.warning(
                    "the hub does not accept this node yet (HTTP %s; it may be starting again); retrying",
                    exc.response.status_code,
                )
                return False
            return flwr_giveup(exc) if flwr_giveup is not None else False

        def on_backoff(state) -> None:
            if _LINK.on_attempt is not None:
                _LINK.on_attempt()
            if flwr_backoff is not None:
                flwr_backoff(state)

        invoker.should_giveup, invoker.on_backoff = should_giveup, on_backoff
        # Retries of an unreachable hub every 5 s at most (flwr: 20 s), so that nodes are back
        # within seconds of a restarted hub.
        invoker.wait_gen_factory = lambda: exponential(max_delay=RETRY_CAP)
        return invoker

    @functools.wraps(original_init)
    @contextlib.contextmanager
    def init_connection(*args, **kwargs):
        with original_init(*args, **kwargs) as conn:
            _LINK.active = _LINK.connected_once = True
            try:
                yield conn
            finally:
                _LINK.active = False

    _INSTALLED["fhc"] = (saved_fhc, saved_sci)
    fhc.make_simple_http_retry_invoker = make_invoker_patched
    fhc.HeartbeatSender = _quiet_heartbeat_sender()
    fhc.os = _OsProxy()
    sci._init_connection = init_connection


def uninstall_reconnect_adaptations() -> None:
    """Undo `install_reconnect_adaptations` (tests)."""
    import flwr.supernode.fleet_http_connection as fhc
    import flwr.supernode.start_client_internal as sci

    saved = _INSTALLED.pop("fhc", None)
    if saved is None:
        return
    for module, values in zip((fhc, sci), saved):
        for name, value in values.items():
            setattr(module, name, value)
    _LINK.__init__()


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
        tracker: TaskTracker | None = None,
    ):
        super().__init__(name="iaptnet-warm-worker", daemon=True)
        self.tracker = tracker
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
        from flwr.supercore.constant import TaskType

        from .runtime_tasks import acquire_task, runtime_client

        acquirer = runtime_client(self.runtime_address)
        try:
            while not self._stop.is_set():
                self.wake.wait(self.fallback_poll)
                self.wake.clear()
                while not self._stop.is_set():
                    try:
                        with self.storing:
                            acquired = acquire_task(acquirer, TaskType.CLIENT_APP)
                    except Exception:  # noqa: BLE001 - keep serving; the SuperNode may be starting
                        log.debug("could not reach the SuperNode's runtime API yet", exc_info=True)
                        break
                    if acquired is None:
                        break
                    self._serve(*acquired)
        finally:
            acquirer.close()

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
        message_id, replied = None, False
        if self.tracker is not None:
            self.tracker.task_started()
        t0 = _time.perf_counter()
        try:
            message, context, run, fab = pull_task_input(client)
            message_id = message.metadata.message_id
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
            replied = True
            self.served += 1
            log.debug(
                "task served: input %.3f s, app %.3f s, reply %.3f s", t1 - t0, t2 - t1, _time.perf_counter() - t2
            )
        except Exception as exc:  # noqa: BLE001
            if _hub_gone(exc):
                log.warning(
                    "task %s ended without its reply: the hub no longer takes it (%s; it may have restarted "
                    "or ended the run)",
                    getattr(task, "task_id", "?"),
                    type(exc).__name__,
                )
            else:
                log.exception("serving task %s failed", getattr(task, "task_id", "?"))
        finally:
            try:
                push_task_output(client, context, sub_status, details)
            except Exception:  # noqa: BLE001 - the task is over either way
                log.warning("could not report the end of task %s to the SuperNode", getattr(task, "task_id", "?"))
            finally:
                if heartbeat.is_running:
                    heartbeat.stop()
                client.close()
                if self.tracker is not None:
                    self.tracker.task_finished(message_id, replied)


def _hub_gone(exc: BaseException) -> bool:
    """Whether serving failed because the hub (or the SuperNode's session with it) went away:
    an expected event on a restart, reported in one line, not a traceback."""
    import httpx
    from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, ObjectPushError, ObjectUnavailableError

    return isinstance(exc, (ObjectPushError, ObjectPullError, ObjectUnavailableError, httpx.TransportError)) or (
        isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code in (401, 404, 412, 502, 503)
    )


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


def run_supernode(
    argv: list[str],
    *,
    reconnect: bool = False,
    backoff: tuple[float, float] = (1.0, 60.0),
    on_attempt: Callable[[], None] | None = None,
) -> None:
    """Run flwr's `flower-supernode` entry point in this process with `argv` (blocks).

    With `reconnect`, what `flower_supernode` does (the Runtime API, then the connection loop)
    with the connection loop run again, after `backoff` seconds (doubling up to the second
    value), each time it ends because the hub no longer knows the node
    (`install_reconnect_adaptations`). A stop signal ends it as before (flwr's handlers raise
    SystemExit)."""
    import importlib
    import sys

    fs = importlib.import_module("flwr.supernode.cli.flower_supernode")  # (the package exports the function)
    sys.argv = ["flower-supernode", *argv]
    if not reconnect:
        fs.flower_supernode()
        return
    from flwr.supercore.constant import HTTP_SERVER_SHUTDOWN_TIMEOUT

    log.info("starting the SuperNode (it reconnects by itself if the hub forgets it)")
    config = fs._parse_supernode_lifespan_config()
    state_factory = fs.NodeStateFactory(objectstore_factory=fs.ObjectStoreFactory())
    http_server, http_thread = fs._start_supernode_http_api(config, state_factory)
    runtime_host = f"[{config.host}]" if ":" in config.host else config.host

    def stop_http_server() -> None:
        http_server.should_exit = True
        http_thread.join(timeout=HTTP_SERVER_SHUTDOWN_TIMEOUT)
        if http_thread.is_alive():
            http_server.force_exit = True

    fs.add_exit_handler(stop_http_server)
    delay = backoff[0]
    while True:
        started = _time.monotonic()
        fs.start_client_internal(
            state_factory=state_factory,
            server_address=config.server_address,
            root_certificates=config.root_certificates,
            insecure=config.insecure,
            authentication_keys=config.authentication_keys,
            max_retries=config.max_retries,
            max_wait_time=config.max_wait_time,
            node_config=config.node_config,
            isolation=config.isolation,
            runtime_api_address=f"{runtime_host}:{config.port}",
            runtime_certificates=config.runtime_certificates,
            runtime_root_certificates_path=config.runtime_root_certificates_path,
            health_server_address=config.health_server_address,
            trusted_entities=config.trusted_entities,
            superexec_auth_secret=config.superexec_auth_secret,
            runtime_dependency_install=config.runtime_dependency_install,
        )
        if _time.monotonic() - started > 10 * backoff[1]:
            delay = backoff[0]  # it had been connected a long while: a fresh start
        log.warning("the connection to the hub ended; connecting again in %.0f s", delay)
        deadline = _time.monotonic() + delay
        while _time.monotonic() < deadline:
            if on_attempt is not None:
                on_attempt()
            _time.sleep(min(1.0, max(0.0, deadline - _time.monotonic())))
        delay = min(delay * 2.0, backoff[1])

"""The node daemon's self-healing parts (iaptnet/flower/supernode.py), without processes:

* the SuperNode loop gives up on a reply the warm worker ended its task without storing whole
  (flwr 1.42 waits for it forever: a node frozen past its task token came back online and
  answering nothing), whether the reply itself or one of its objects is missing, and drops
  the message; it waits as long as the worker serves the task;
* the watchdog ends a node whose loop stopped, whose task overran or whose worker died, and
  never counts time the process spent suspended;
* a hub that no longer knows the node ends the connection, not the process: flwr's retry
  invoker gives up on 401 while connected and retries it while reconnecting, and the node
  heartbeat neither sends SIGINT nor dies with a traceback.

The network tests (tests/test_flower_network.py) restart the hub and freeze nodes for real."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import httpx
import pytest

from iaptnet.flower import pins, supernode


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


# --------------------------------------------------------------------------- TaskTracker


def test_a_reply_the_worker_ended_without_storing_is_given_up_after_the_grace():
    clock = Clock()
    tracker = supernode.TaskTracker(grace=2.0, idle_limit=30.0, clock=clock)
    tracker.message_stored("m1")
    tracker.task_started()
    for _ in range(50):  # served for a long time: the loop waits
        clock.t += 1.0
        tracker.waiting()
    tracker.task_finished("m1", replied=False)
    clock.t += 1.0
    tracker.waiting()  # within the grace: the reply may still be arriving
    clock.t += 1.5
    with pytest.raises(supernode.ReplyAbandoned, match="ended its task without storing the reply whole"):
        tracker.waiting()
    assert tracker.abandoned == 1


def test_a_stored_reply_is_waited_for_and_another_message_is_not_confused_with_it():
    clock = Clock()
    tracker = supernode.TaskTracker(grace=2.0, idle_limit=30.0, clock=clock)
    tracker.message_stored("m1")
    tracker.task_started()
    tracker.task_finished("m1", replied=True)
    tracker.task_started()
    tracker.task_finished("m0", replied=False)  # an earlier message's task
    for _ in range(10):
        clock.t += 1.0
        tracker.waiting()  # not given up: m1's reply was stored


def test_a_wait_with_no_task_served_is_given_up_after_the_idle_limit():
    clock = Clock()
    tracker = supernode.TaskTracker(grace=2.0, idle_limit=30.0, clock=clock)
    tracker.message_stored("m1")
    tracker.waiting()
    clock.t += 29.0
    tracker.waiting()
    clock.t += 2.0
    with pytest.raises(supernode.ReplyAbandoned, match="serving nothing"):
        tracker.waiting()


# --------------------------------------------------------------------------- the loop's waits


class FakeState:
    def __init__(self, replies=()):
        self.replies = list(replies)
        self.deleted: list[str] = []

    def get_messages_legacy(self, *, is_reply=None, **_):
        out, self.replies = self.replies, []
        return out

    def delete_messages(self, *, message_ids=None):
        self.deleted.extend(message_ids or [])

    def get_message_processing_duration(self, message_id):
        return 0.0


class FakeStore:
    def __init__(self, tree=None):
        self.tree = tree
        self.deleted: list[str] = []

    def get_object_tree(self, message_id):
        return self.tree

    def get(self, object_id):
        return b""  # the worker's object push failed: the content never comes

    def delete(self, object_id):
        self.deleted.append(object_id)


@pytest.fixture
def patched_loop():
    import flwr.supernode.start_client_internal as sci

    tracker = supernode.TaskTracker(grace=0.05, idle_limit=5.0)
    supernode.install_supernode_adaptations(supernode.SleepPolicy(), lambda: None, threading.Lock(), tracker=tracker)
    try:
        yield sci, tracker
    finally:
        supernode.uninstall_supernode_adaptations()


def test_the_loop_gives_up_a_reply_that_was_never_stored(patched_loop, caplog):
    sci, tracker = patched_loop
    state, store = FakeState(), FakeStore()
    tracker.message_stored("m1")
    tracker.task_started()
    tracker.task_finished("m1", replied=False)  # e.g. its push raised ObjectPushError
    done = threading.Event()

    def push():
        sci._push_messages(state=state, object_store=store, send=None, push_object=None)
        done.set()

    with caplog.at_level(logging.WARNING, logger="iaptnet.node.flower"):
        threading.Thread(target=push, daemon=True).start()
        assert done.wait(10), "flwr's loop still waits for the reply"
    assert state.deleted == ["m1"] and store.deleted == ["m1"]
    assert "no reply to message m1 will come" in caplog.text


def test_the_loop_gives_up_a_reply_whose_objects_were_never_stored(patched_loop, caplog):
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.inflatable.inflatable_object import get_object_tree
    from flwr.supercore.task_identity import TaskIdentity

    sci, tracker = patched_loop
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    incoming = Message(RecordDict({"c": ConfigRecord({"a": 1})}), dst_node_id=1, message_type="query.task")
    incoming.metadata.__dict__["_message_id"] = incoming.object_id
    reply = Message(RecordDict({"c": ConfigRecord({"b": 2})}), reply_to=incoming)
    reply.metadata.__dict__["_message_id"] = reply.object_id
    tree = get_object_tree(reply)
    state, store = FakeState([reply]), FakeStore(tree)
    tracker.message_stored(incoming.metadata.message_id)
    tracker.task_finished(incoming.metadata.message_id, replied=False)
    sent = []

    def send(message, object_tree, runtime):
        sent.append(message.metadata.message_id)
        return {tree.object_id}, "session"

    done = threading.Event()

    def push():
        sci._push_messages(state=state, object_store=store, send=send, push_object=lambda *a: None)
        done.set()

    threading.Thread(target=push, daemon=True).start()
    assert done.wait(10), "flwr's loop still waits for the reply's objects"
    assert sent == [reply.metadata.message_id]
    # flwr's own handler dropped the reply and its objects
    assert reply.metadata.message_id in state.deleted and reply.metadata.message_id in store.deleted


# --------------------------------------------------------------------------- the watchdog


class FakeWorker:
    alive = True

    def is_alive(self):
        return self.alive


def watchdog(clock, worker=None, **limits):
    tracker = supernode.TaskTracker(clock=clock)
    stalls = []
    dog = supernode.Watchdog(tracker, worker or FakeWorker(), stalls.append, clock=clock, **limits)
    return tracker, dog


def test_watchdog_ends_a_node_whose_loop_stopped_or_whose_task_overran():
    clock = Clock()
    tracker, dog = watchdog(clock, stall_limit=60.0, task_limit=120.0)
    for _ in range(59):
        clock.t += 1.0
        assert dog.check(clock.t, 1.0) is None
    clock.t += 2.0
    assert "no progress for 61 s" in dog.check(clock.t, 1.0)
    tracker.beat()
    tracker.task_started()  # serving a task: the loop waits on it, the task limit applies
    clock.t += 100.0
    assert dog.check(clock.t, 1.0) is None
    clock.t += 30.0
    assert "served for 130 s (the limit is 120 s)" in dog.check(clock.t, 1.0)


def test_watchdog_ends_a_node_whose_worker_died():
    clock = Clock()
    worker = FakeWorker()
    _, dog = watchdog(clock, worker)
    assert dog.check(clock.t, 1.0) is None
    worker.alive = False
    assert dog.check(clock.t, 1.0) == "the warm worker thread has stopped"


def test_watchdog_does_not_count_time_the_process_was_suspended(caplog):
    clock = Clock()
    tracker, dog = watchdog(clock, stall_limit=60.0, task_limit=120.0)
    tracker.task_started()
    clock.t += 600.0  # SIGSTOP for ten minutes, then SIGCONT
    with caplog.at_level(logging.WARNING, logger="iaptnet.node.flower"):
        assert dog.check(clock.t, 600.0) is None
    assert dog.suspensions == 1 and "suspended for about 600 s" in caplog.text
    clock.t += 60.0
    assert dog.check(clock.t, 1.0) is None  # the task's clock started again at the thaw
    clock.t += 61.0
    assert "served for 121 s" in dog.check(clock.t, 1.0)


def test_watchdog_thread_calls_on_stall():
    tracker = supernode.TaskTracker()
    stalls = []
    dog = supernode.Watchdog(tracker, FakeWorker(), stalls.append, stall_limit=0.05, tick=0.02)
    tracker.progress -= 1.0
    dog.start()
    dog.join(5)
    assert stalls and "no progress" in stalls[0]


# --------------------------------------------------------------------------- reconnection


def _http_error(code: int) -> httpx.HTTPStatusError:
    request = httpx.Request("POST", "https://hub/v1/fleet/pull-messages")
    return httpx.HTTPStatusError("refused", request=request, response=httpx.Response(code, request=request))


@pytest.fixture
def reconnecting():
    import flwr.supernode.fleet_http_connection as fhc

    attempts = []
    supernode.install_reconnect_adaptations(on_attempt=lambda: attempts.append(1))
    try:
        yield fhc, attempts
    finally:
        supernode.uninstall_reconnect_adaptations()


def test_a_hub_that_forgot_the_node_ends_the_connection_not_the_process(reconnecting):
    fhc, attempts = reconnecting
    invoker = fhc.make_simple_http_retry_invoker()
    link = supernode._LINK
    link.connected_once = link.active = True
    assert invoker.should_giveup(_http_error(401)) is True  # the request raises: connect again
    link.active = False
    assert invoker.should_giveup(_http_error(401)) is False  # activating again: retry with backoff
    assert invoker.should_giveup(_http_error(412)) is False  # (a hub that has not loaded the keys yet)
    assert invoker.should_giveup(_http_error(503)) is False  # flwr's own rule otherwise
    invoker.on_backoff(type("State", (), {"exception": None})())
    assert attempts == [1]  # every retry is a sign of life for the watchdog
    pins.check_flwr()  # the patched module still passes the pins


def test_the_node_heartbeat_neither_stops_the_process_nor_dies_loudly(reconnecting):
    fhc, _ = reconnecting
    supernode._LINK.connected_once = True
    received = []
    previous = signal.signal(signal.SIGINT, lambda *_: received.append("SIGINT"))
    try:
        fhc.os.kill(os.getpid(), signal.SIGINT)  # what flwr's heartbeat does on 401
        time.sleep(0.05)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert received == []

    def refused() -> bool:
        raise _http_error(401)

    sender = fhc.HeartbeatSender(refused)
    from flwr.supercore.heartbeat import HeartbeatFailure

    with pytest.raises(HeartbeatFailure):  # retried with backoff by its own invoker, no traceback
        sender._heartbeat()


def test_reconnect_adaptations_are_undone():
    import flwr.supernode.fleet_http_connection as fhc
    import flwr.supernode.start_client_internal as sci

    before = (fhc.make_simple_http_retry_invoker, fhc.HeartbeatSender, fhc.os, sci._init_connection)
    supernode.install_reconnect_adaptations()
    assert fhc.os is not before[2] and sci._init_connection is not before[3]
    supernode.uninstall_reconnect_adaptations()
    assert (fhc.make_simple_http_retry_invoker, fhc.HeartbeatSender, fhc.os, sci._init_connection) == before


def test_a_message_whose_run_ended_while_it_was_pulled_leaves_no_task_behind(patched_loop, caplog):
    """flwr 1.42 creates the task and stores the message before pulling its objects; a run that
    ends meanwhile (the hub answers RunNotRunning: here a node thawed after the study went on
    without it) makes it log "Ignoring message" and return, leaving a pending task whose
    objects never come. The warm worker claimed that task and waited for them for ever: the
    node, online, answered nothing again (bench/bench_freeze.py, frozen after a reply). The
    adaptation drops the message and ends its task."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID, Status
    from flwr.supercore.inflatable.inflatable_object import get_object_tree
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run, RunNotRunningException
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supernode.nodestate import NodeStateFactory

    sci, _ = patched_loop
    stores = ObjectStoreFactory()
    store, state = stores.store(), NodeStateFactory(stores).state()
    state.set_node_id(7)
    run = Run.create_empty(run_id=42)
    run.fab_hash = "f" * 64
    state.store_run(run)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 42, SUPERLINK_NODE_ID
    message = Message(RecordDict({"c": ConfigRecord({"a": 1})}), dst_node_id=7, message_type="query.task")
    message.metadata.__dict__["_message_id"] = message.object_id
    message.metadata.__dict__["_run_id"] = 42
    tree = get_object_tree(message)
    given = [(message, tree)]

    def pull_object(run_id, object_id):
        raise RunNotRunningException()

    with caplog.at_level(logging.INFO):
        got = sci._pull_and_store_message(
            state=state,
            object_store=store,
            node_config={},
            receive=lambda: given.pop() if given else None,
            get_run=None,
            get_fab=None,
            pull_object=pull_object,
            confirm_message_received=lambda *a: None,
            trusted_entities=None,
        )
    assert got is None and "Ignoring message" in caplog.text
    assert "was dropped with its task" in caplog.text
    tasks = state.get_tasks(run_ids=[42])
    assert tasks and all(t.status.status == Status.FINISHED for t in tasks)  # nothing left to claim
    assert not state.get_messages_legacy(run_ids=[42], is_reply=False)


# --------------------------------------------------------------------------- serving a task


class _Served:
    """Stands in for flwr's runtime client, task heartbeat and task input/output functions
    around `WarmWorker._serve`, with a reply push that fails as `push_error` says."""

    def __init__(self, monkeypatch, push_error: Exception):
        import types

        import flwr.supercore.heartbeat as heartbeat
        import flwr.supercore.runtime as runtime
        import flwr.supernode.runtime.run_clientapp as run_clientapp

        self.ended: list = []
        message = types.SimpleNamespace(metadata=types.SimpleNamespace(message_id="m1"), has_content=lambda: False)
        run = types.SimpleNamespace(run_id=7)
        fab = types.SimpleNamespace(content=b"bundle")

        class Client:
            def close(self):
                pass

        class Beat:
            is_running = False

            def __init__(self, fn):
                pass

            def start(self):
                pass

        def push_message(client, reply, context):
            raise push_error

        monkeypatch.setattr(runtime.RuntimeHttpClient, "from_server_address", staticmethod(lambda **kw: Client()))
        monkeypatch.setattr(heartbeat, "HeartbeatSender", Beat)
        monkeypatch.setattr(
            run_clientapp, "pull_task_input", lambda client: (message, types.SimpleNamespace(node_config={}), run, fab)
        )
        monkeypatch.setattr(run_clientapp, "push_message", push_message)
        monkeypatch.setattr(
            run_clientapp, "push_task_output", lambda c, ctx, status, details: self.ended.append(status)
        )
        reply = types.SimpleNamespace(has_content=lambda: False)
        self.tracker = supernode.TaskTracker()
        self.worker = supernode.WarmWorker(
            "127.0.0.1:1",
            client_app=lambda message, context: reply,
            node_config={},
            gate=lambda digest: None,
            node_name="site0",
            tracker=self.tracker,
        )


def test_a_reply_the_restarted_hub_no_longer_takes_is_one_warning_not_a_traceback(monkeypatch, caplog):
    from flwr.supercore.inflatable.inflatable_utils import ObjectPushError

    served = _Served(monkeypatch, ObjectPushError("4beef8", 14872519394250361968, "d0ea170b"))
    with caplog.at_level(logging.WARNING, logger="iaptnet.node.flower"):
        served.worker._serve(types_task(), "token")
    (record,) = [r for r in caplog.records if "task" in r.getMessage()]
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert "the hub no longer takes it (ObjectPushError" in record.getMessage()
    assert served.ended, "the end of the task is still reported to the SuperNode"
    assert served.worker.served == 0


def test_a_failure_that_is_not_the_hub_going_away_keeps_its_traceback(monkeypatch, caplog):
    served = _Served(monkeypatch, KeyError("a bug"))
    with caplog.at_level(logging.WARNING, logger="iaptnet.node.flower"):
        served.worker._serve(types_task(), "token")
    (record,) = [r for r in caplog.records if "failed" in r.getMessage()]
    assert record.levelno == logging.ERROR and record.exc_info is not None


def types_task():
    import types

    return types.SimpleNamespace(task_id="t1")

"""The coordinator's round exchange (coordinator/session.py) against replies as Flower's hub
delivers them when something goes wrong: an error put in place of a reply by the hub itself
(its sender is the hub, not the node), a pull that blocks past the deadline on a dead node's
upload, a node that never answers. A fake Grid plays the hub, so each case is deterministic."""

from __future__ import annotations

import time

import pytest
from flwr.app import Error, Message
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from iaptnet.coordinator.session import Session
from iaptnet.protocol import messages as m
from iaptnet.protocol.errors import NetworkError

HUB_NODE_ID = 0  # the sender of errors that Flower's hub makes up
NAMES = {1: "site0", 2: "site1", 3: "site2", 4: "site3"}


class ScriptedHub:
    """A Grid whose pulls follow a script: `script[k]` lists, for the k-th pull, which nodes'
    answers become visible and how (`"ok"`, or a Flower error code), after `delays[k]` s."""

    def __init__(self, script: list[dict[int, object]], delays: list[float] | None = None):
        self.script = script
        self.delays = delays or [0.0] * len(script)
        self.pulls = 0
        self.sent: dict[str, Message] = {}
        # Messages read their sender's identity from here, as in Flower's ServerApp runtime.
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID

    def get_node_ids(self):
        return list(NAMES)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg_id = f"task-{msg.metadata.dst_node_id}"
            msg.metadata.__dict__["_message_id"] = msg_id
            self.sent[msg_id] = msg
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids):
        k = min(self.pulls, len(self.script) - 1)
        self.pulls += 1
        time.sleep(self.delays[k] if self.pulls <= len(self.delays) else 0.0)
        out = []
        for node_id, how in self.script[k].items():
            msg = self.sent[f"task-{node_id}"]
            if msg.metadata.message_id not in message_ids:
                continue
            if how == "ok":
                task = m.decode_task(msg.content)
                reply = m.Reply(status=m.OK, node=NAMES[node_id], task_id=task.task_id)
                out.append(Message(m.encode_reply(reply), reply_to=msg))
            else:
                err = Message(Error(code=int(how), reason="made up by the hub"), reply_to=msg)
                err.metadata.__dict__["_src_node_id"] = HUB_NODE_ID
                out.append(err)
        return out


def session(hub, **options) -> Session:
    return Session(hub, "f" * 64, timeout=options.pop("timeout", 0.3), poll_interval=0.01, **options)


def test_replies_that_arrive_while_a_pull_waits_on_a_dead_upload_are_not_lost():
    # Pull 1 blocks past the deadline fetching site2's half-uploaded reply and returns the
    # hub's MESSAGE_UNAVAILABLE error for it; site0's and site1's replies arrived meanwhile.
    hub = ScriptedHub([{3: ErrorCode.MESSAGE_UNAVAILABLE}, {1: "ok", 2: "ok"}], delays=[0.5, 0.0])
    s = session(hub, min_nodes=2)
    replies = s.ask("glm.prepare")
    assert [r.node for r in replies] == ["site0", "site1"]
    dropped = {n.node_id: n.dropped_reason for n in s.nodes.values() if not n.contributed}
    assert dropped == {3: "did not answer within 0.3 s", 4: "did not answer within 0.3 s"}


def test_hub_made_errors_are_charged_to_the_node_they_stand_for():
    hub = ScriptedHub([{1: "ok", 2: "ok", 3: "ok", 4: ErrorCode.NODE_UNAVAILABLE}])
    with pytest.raises(NetworkError) as err:
        session(hub).ask("glm.prepare")
    # Named by the task it stands for (node 4), not by its sender (the hub's own id).
    assert "node 4 failed: it went offline before answering" in str(err.value)
    assert "node 0" not in str(err.value)


def test_an_expired_task_counts_as_no_answer():
    hub = ScriptedHub([{1: "ok", 2: "ok", 3: "ok", 4: ErrorCode.REPLY_MESSAGE_UNAVAILABLE}])
    s = session(hub, min_nodes=3)
    assert [r.node for r in s.ask("glm.prepare")] == ["site0", "site1", "site2"]
    assert s.nodes[4].dropped_reason == "did not answer within 0.3 s"


def test_without_a_timeout_the_exchange_waits_for_every_node():
    hub = ScriptedHub([{}, {2: "ok"}, {}, {1: "ok", 3: "ok", 4: "ok"}])
    replies = session(hub, timeout=None).ask("glm.prepare")
    assert [r.node for r in replies] == ["site0", "site1", "site2", "site3"]
    assert hub.pulls == 4


def test_a_round_is_pulled_soon_after_its_replies_and_a_long_one_no_more_often_than_poll_interval():
    from iaptnet.coordinator.session import pull_wait

    assert pull_wait(0.0, 0.25) == pytest.approx(0.02)  # a short round is seen ending at once
    assert pull_wait(0.5, 0.25) == pytest.approx(0.1)  # a fifth of the round so far
    assert pull_wait(30.0, 0.25) == 0.25  # never more often than before on a long round
    assert pull_wait(30.0, 0.0) == 0.0  # in-process: the grid answers at once
    assert pull_wait(0.0, 0.25, last_round=20.0) == 0.25  # many nodes: no burst of early pulls
    assert pull_wait(0.0, 0.25, last_round=0.4) == pytest.approx(0.04)


def test_the_coordinator_waits_between_pulls_as_pull_wait_says(monkeypatch):
    # Replies appear at the fourth pull; the waits before it start at 20 ms, not at the hub's
    # poll_interval (0.25 s) as they did.
    import iaptnet.coordinator.session as session_module

    waits = []
    monkeypatch.setattr(session_module.time, "sleep", waits.append)
    hub = ScriptedHub([{}, {}, {}, {1: "ok", 2: "ok", 3: "ok", 4: "ok"}])
    s = Session(hub, "f" * 64, timeout=5.0, poll_interval=0.25)
    assert len(s.ask("glm.prepare")) == 4
    waits = [w for w in waits if w > 0]  # (the scripted hub's own zero delays)
    assert len(waits) == 3 and waits[0] == pytest.approx(0.02) and max(waits) < 0.25


def test_with_a_hub_that_holds_pulls_the_round_is_pulled_again_at_once(monkeypatch):
    import sys

    import iaptnet.coordinator.session as session_module

    clock, slept = [0.0], []

    class Clock:  # one clock for the session and the hub: the hub's holds take its time
        def __init__(self, record: bool):
            self.record = record

        def monotonic(self):
            return clock[0]

        def sleep(self, seconds):
            clock[0] += seconds
            if self.record:
                slept.append(seconds)

    monkeypatch.setattr(session_module, "time", Clock(record=True))
    monkeypatch.setattr(sys.modules[__name__], "time", Clock(record=False))  # ScriptedHub's delays
    # A holding hub: an empty pull comes back after the hold (0.4 s asked, 0.4 s taken).
    holding = ScriptedHub([{2: "ok"}, {}, {1: "ok", 3: "ok", 4: "ok"}], delays=[0.0, 0.4, 0.0])
    holding.pull_hold_max = 0.4
    replies = session(holding, timeout=None).ask("glm.prepare")
    assert len(replies) == 4 and holding.pulls == 3 and slept == []
    # A hub that answers an empty pull at once (an earlier release's): the session waits between.
    quick = ScriptedHub([{2: "ok"}, {}, {1: "ok", 3: "ok", 4: "ok"}])
    quick.pull_hold_max = 0.4
    replies = session(quick, timeout=None).ask("glm.prepare")
    assert len(replies) == 4 and quick.pulls == 3 and len(slept) == 1  # after the empty pull only


def test_a_held_pull_is_never_asked_to_outlast_the_round_s_deadline():
    class Recording(ScriptedHub):
        asked: list = []

        def pull_messages(self, message_ids):
            self.asked.append(self.pull_hold)
            return super().pull_messages(message_ids)

    hub = Recording([{}], delays=[0.0])
    hub.pull_hold_max = 10.0
    s = session(hub, timeout=0.3, min_nodes=0)
    s.ask("glm.prepare")
    assert hub.asked and all(0.0 <= a <= 0.3 for a in hub.asked)  # not the hub's 10 s

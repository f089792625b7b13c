"""A study's conversation with its nodes over a Flower `Grid`.

The session pins the study's cohort of nodes when it starts (a node that connects or
reconnects later does not join as a stranger), sends one task per node per round, waits for
the replies, and returns them ordered by node name so that every pooled sum is taken in the
same order whatever order the replies arrived in. Refusals and errors stop the study, unless
the study allows a minimum number of nodes and enough remain; dropped nodes are recorded.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Message
from flwr.common.constant import ErrorCode
from flwr.serverapp.grid import Grid

from ..flower.superlink import hub_held
from ..protocol import messages as m
from ..protocol.errors import NetworkError
from . import refusals

ProgressFn = Callable[[str, int, int, int], None]  # (task kind, round, answered, expected)


@dataclass
class NodeStatus:
    node_id: int
    name: str = ""
    contributed: bool = True
    dropped_reason: str = ""
    dropped_at: str = ""  # the task it left the study at, e.g. "glm.round (round 3)"
    data_version: str = ""
    payload: dict = field(default_factory=dict)
    refusals: list[dict] = field(default_factory=list)  # structured reasons, if it refused
    audit_hash: str = ""  # the node's audit head (hash, sequence number) after its last reply
    audit_seq: int = 0


#: Errors that the hub, not the node, puts in place of a reply: the task expired or vanished
#: before the node answered, or the node's reply could not be fetched whole (it died while
#: uploading it). Each means the node did not answer.
_NO_REPLY = (ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE)


class Session:
    def __init__(
        self,
        grid: Grid,
        study_hash: str,
        *,
        min_nodes: int | None = None,
        timeout: float | None = 300.0,
        poll_interval: float = 0.0,
        progress: ProgressFn | None = None,
    ):
        self.grid = grid
        self.study_hash = study_hash
        self.min_nodes = min_nodes
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.progress = progress
        self.round = 0
        self.last_round = 0.0  # seconds the last round took, push to last reply
        node_ids = sorted(grid.get_node_ids())
        if not node_ids:
            raise NetworkError("no nodes are connected to the network.")
        if min_nodes is not None and len(node_ids) < min_nodes:
            raise NetworkError(
                f"the study needs at least {min_nodes} nodes (its 'min_nodes') and {len(node_ids)} are connected."
            )
        self.nodes: dict[int, NodeStatus] = {nid: NodeStatus(nid) for nid in node_ids}

    @property
    def active(self) -> list[NodeStatus]:
        return [n for n in self.nodes.values() if n.contributed]

    def ask(self, kind: str, payload: dict | None = None, arrays: dict | None = None) -> list[m.Reply]:
        """One round: the same task to every active node; ok replies ordered by node name."""
        self.round += 1
        task_ids = {}
        messages = []
        for node in self.active:
            task = m.Task(
                kind=kind, study_hash=self.study_hash, payload=payload or {}, arrays=arrays or {}, round=self.round
            )
            task_ids[node.node_id] = task.task_id
            messages.append(
                Message(
                    m.encode_task(task), node.node_id, m.MESSAGE_TYPE, group_id=f"{self.study_hash[:16]}:{self.round}"
                )
            )
        replies = self._exchange(kind, messages)
        ok: list[tuple[str, m.Reply]] = []
        problems = []
        for node in list(self.active):
            reply = replies.get(node.node_id)
            if reply is None:
                problems.append((node, f"did not answer within {self.timeout or 0:g} s"))
                continue
            if reply.node and node.name and reply.node != node.name:
                problems.append((node, "changed its name during the study"))
                continue
            node.name = node.name or reply.node
            if reply.audit_hash:
                node.audit_hash, node.audit_seq = reply.audit_hash, reply.audit_seq
            if reply.status == m.REFUSED:
                node.refusals = refusals.refusals_of(reply)
                problems.append((node, f"refused: {refusals.describe(reply)}"))
                continue
            if reply.status != m.OK:
                problems.append((node, f"failed: {reply.message}"))
                continue
            if reply.task_id != task_ids[node.node_id]:
                problems.append((node, "answered a different task"))
                continue
            if not _all_finite(reply):
                problems.append((node, "sent a statistic that is not a finite number"))
                continue
            ok.append((node.name, reply))
        if problems:
            self._drop(problems, kind)
            ok = [(name, r) for name, r in ok if self._is_active(name)]
        return [r for _, r in sorted(ok, key=lambda pair: pair[0])]

    def node_named(self, name: str) -> NodeStatus:
        return next(n for n in self.nodes.values() if n.name == name)

    def _is_active(self, name: str) -> bool:
        return any(n.name == name for n in self.active)

    def _drop(self, problems, kind):
        # Nodes with the same reason are named together, so a rare level refused by five
        # nodes reads as one sentence.
        grouped: dict[str, list[str]] = {}
        for node, why in problems:
            grouped.setdefault(why.rstrip("."), []).append(node.name or f"node {node.node_id}")
        described = "; ".join(f"{_names(names)} {why}" for why, names in grouped.items())
        remaining = len(self.active) - len(problems)
        if self.min_nodes is None or remaining < self.min_nodes:
            need = (
                ""
                if self.min_nodes is None
                else f" (the study needs at least {self.min_nodes} nodes; {remaining} remain)"
            )
            raise NetworkError(f"the study stopped at {kind}: {described}{need}.")
        for node, why in problems:
            node.contributed = False
            node.dropped_reason = why
            node.dropped_at = f"{kind} (round {self.round})"

    def left(self, names) -> str:
        """Why nodes left the study, one clause each: "site2 left at glm.round (round 3): did
        not answer within 10 s"."""
        clauses = []
        for name in names:
            node = next((n for n in self.nodes.values() if (n.name or f"node {n.node_id}") == name), None)
            if node is None or node.contributed:
                continue
            clauses.append(f"{name} left at {node.dropped_at}: {node.dropped_reason}")
        return "; ".join(clauses)

    @property
    def lost(self) -> list[str]:
        """Names of the nodes that left the study (min_nodes let it go on without them)."""
        return [n.name or f"node {n.node_id}" for n in self.nodes.values() if not n.contributed]

    def _exchange(self, kind: str, messages: list[Message]) -> dict[int, m.Reply]:
        """Push one round and collect the replies until every node answered or the timeout.

        Replies are matched to nodes by the task they answer, not by their sender: a reply that
        Flower's hub could not fetch whole (the node died while uploading it) comes back as an
        error from the hub itself. Such a reply counts as no answer. A pull can wait on that
        upload for up to the timeout, so the replies that arrived meanwhile are collected by
        one more pull once the deadline has passed."""
        expected = len(messages)
        if self.progress:
            self.progress(kind, self.round, 0, expected)
        ids = list(self.grid.push_messages(messages))
        pushed = time.monotonic()
        node_of = {msg_id: msg.metadata.dst_node_id for msg_id, msg in zip(ids, messages)}
        pending = set(ids)
        out: dict[int, m.Reply] = {}
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        overdue = False
        # A hub that holds pulls (flower/warm_serverapp.py) is asked to hold each up to
        # `pull_hold_max` seconds, never past the round's deadline.
        hold_max = getattr(self.grid, "pull_hold_max", 0.0)
        while pending:
            asked = time.monotonic()
            hold = hold_max if deadline is None else min(hold_max, max(0.0, deadline - asked))
            if hold_max:
                self.grid.pull_hold = hold
            got = list(self.grid.pull_messages(list(pending)))
            held = hub_held(time.monotonic() - asked, hold, empty=not got)
            for msg in got:
                msg_id = msg.metadata.reply_to_message_id
                if msg_id not in pending:
                    continue
                pending.discard(msg_id)
                if msg.has_error() and msg.error.code in _NO_REPLY:
                    continue  # the node's reply never arrived (whole): it did not answer
                out[node_of[msg_id]] = self._decode(msg)
                if self.progress:
                    self.progress(kind, self.round, len(out), expected)
            if not pending or overdue:
                break
            overdue = deadline is not None and time.monotonic() > deadline
            # A hub that holds pulls answers the next one when a reply is there: pull again at
            # once. (One that answered an empty pull at once does not hold them: wait first.)
            if not overdue and not held:
                time.sleep(pull_wait(time.monotonic() - pushed, self.poll_interval, self.last_round))
        self.last_round = time.monotonic() - pushed
        return out

    @staticmethod
    def _decode(msg: Message) -> m.Reply:
        if msg.has_error() and msg.error.code == ErrorCode.NODE_UNAVAILABLE:
            return m.Reply(
                status=m.ERROR, node="", code=f"flower_{msg.error.code}", message="it went offline before answering"
            )
        if msg.has_error():
            # Flower's own error (the node app crashed or vanished); its text is not shown
            # because it could echo local detail.
            return m.Reply(
                status=m.ERROR,
                node="",
                code=f"flower_{msg.error.code}",
                message=f"the node's app failed (Flower error code {msg.error.code})",
            )
        try:
            return m.decode_reply(msg.content)
        except (KeyError, ValueError, TypeError, RecursionError):  # RecursionError: JSON nested too deep
            return m.Reply(
                status=m.ERROR, node="", code="bad_reply", message="sent a reply the coordinator cannot read"
            )


#: The shortest wait between two pulls of a round's replies, and the fraction of the round so
#: far that the wait grows to (up to the hub's `poll_interval`).
FIRST_PULL_WAIT = 0.02
PULL_FRACTION = 0.2
LAST_ROUND_FRACTION = 0.1


def pull_wait(elapsed: float, poll_interval: float, last_round: float = 0.0) -> float:
    """Seconds to wait before the next pull of a round's replies, `elapsed` seconds after its
    tasks were pushed: a fifth of the round so far, and at least a tenth of the last round,
    from 20 ms up to `poll_interval`. A short round (a few nodes) is seen to end within a few
    hundredths of a second, while a long one (many nodes) is pulled no more often than every
    `poll_interval` and seen at most a fifth late. With `poll_interval` 0 (the in-process
    engine, whose grid answers at once) there is no wait."""
    if poll_interval <= 0:
        return 0.0
    return min(poll_interval, max(FIRST_PULL_WAIT, PULL_FRACTION * elapsed, LAST_ROUND_FRACTION * last_round))


def _all_finite(reply: m.Reply) -> bool:
    """Every number in a reply's arrays and payload is finite. Checked here, once, for every
    task kind: a NaN or an infinity from one node would otherwise pass through the pooled sums
    into a solver or a results file."""
    for value in reply.arrays.values():
        try:
            if not np.all(np.isfinite(np.asarray(value, dtype=float))):
                return False
        except (TypeError, ValueError):
            return False
    stack = [reply.payload]
    while stack:  # iterative: a payload may nest as deep as JSON allows
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, (int, float)):
            try:
                if not math.isfinite(item):
                    return False
            except OverflowError:  # an integer beyond any float: infinite once converted
                return False
    return True


def _names(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]

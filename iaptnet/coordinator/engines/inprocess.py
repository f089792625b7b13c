"""The in-process engine: a Flower `Grid` whose nodes are ClientApps in this process.

Messages are serialised to Flower's protobuf and back on the way in and out, exactly as the
deployment engine carries them, so a study behaves the same on both engines. No ports, no
processes: used by `iaptnet demo`, most tests, and analysts trying a study on synthetic data.
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from flwr.app import Context, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611
from flwr.serverapp.grid import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

COORDINATOR_NODE_ID = 0


@functools.cache
def _blas_controller():
    """threadpoolctl's view of the loaded BLAS libraries, found once (the search costs ~5 ms).
    numpy's and scipy's BLAS builds are both loaded first, so that both are limited."""
    import numpy  # noqa: F401
    import scipy.linalg  # noqa: F401
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _wire(message: Message) -> Message:
    """Round-trip through Flower's wire format."""
    data = message_to_proto(message).SerializeToString()
    proto = ProtoMessage()
    proto.ParseFromString(data)
    return message_from_proto(proto)


class InProcessGrid(Grid):
    """Hands each message to the destination node's ClientApp, synchronously.

    Nodes of one push run in parallel threads (numpy and the BLAS release the GIL), each with a
    single BLAS thread: many small matrix products from several threaded BLAS calls at once
    run many times slower than single-threaded ones on a small machine.
    """

    def __init__(self, node_configs: list[dict], client_app=None, run_config: dict | None = None):
        if client_app is None:
            from ...node.app import app as client_app
        self._app = client_app
        self._nodes = {i + 1: dict(cfg) for i, cfg in enumerate(node_configs)}
        self._run_config = dict(run_config or {})
        self._replies: dict[str, Message] = {}
        self._run = Run.create_empty(run_id=1)
        self._states = {node_id: RecordDict() for node_id in self._nodes}
        # Messages read their sender's identity from here, as in Flower's ServerApp runtime.
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._nodes)

    @staticmethod
    def _new_id(msg: Message) -> str:
        msg_id = uuid.uuid4().hex
        msg.metadata.__dict__["_message_id"] = msg_id
        return msg_id

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        jobs = []
        for msg in messages:
            msg_id = self._new_id(msg)
            if msg.metadata.dst_node_id in self._nodes:
                jobs.append((msg_id, msg))
        workers = max(1, min(len(jobs), os.cpu_count() or 1))
        with _blas_controller().limit(limits=1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
            replies = list(pool.map(lambda job: self._deliver(*job), jobs))
        for (msg_id, _), reply in zip(jobs, replies):
            self._replies[msg_id] = reply
        return [msg_id for msg_id, _ in jobs]

    def _deliver(self, msg_id: str, msg: Message) -> Message:
        incoming = _wire(msg)
        incoming.metadata.__dict__["_message_id"] = msg_id
        return _wire(self._answer(incoming))

    def _answer(self, incoming: Message) -> Message:
        """The destination node's reply to a message that came over the wire."""
        node_id = incoming.metadata.dst_node_id
        context = Context(
            run_id=1,
            node_id=node_id,
            node_config=self._nodes[node_id],
            state=self._states[node_id],
            run_config=self._run_config,
        )
        try:
            reply = self._app(incoming, context)
        except Exception as exc:  # as Flower does: the exception becomes an error reply
            from flwr.app import Error

            reply = Message(Error(code=2, reason=f"{type(exc).__name__}"), reply_to=incoming)
        return reply

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

"""The node's Flower ClientApp: one query handler, `query.task`, in front of the dispatcher.

The same app runs in the in-process engine and in a deployed SuperNode. Which data it serves
comes from the node's configuration (`context.node_config`: name, data, schema, policy).

Before anything is decoded the task's size is checked against the policy (a huge payload is
refused unread), and nothing raised in here reaches Flower, which would forward the
exception's text to the coordinator: every failure becomes a reply with a code and a
sentence free of data values, the detail going to the node's local log.
"""

from __future__ import annotations

import logging

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from ..protocol import messages as m
from ..protocol.errors import SpecError
from ..protocol.formula_check import log_exception
from .disclosure import Violation
from .dispatch import dispatch, refuse_undecoded
from .runtime import NodeConfig, runtime_for

log = logging.getLogger("iaptnet.node")

app = ClientApp()


@app.query("task")
def task(msg: Message, context: Context) -> Message:
    try:
        reply = handle(msg.content, context)
    except Exception:  # noqa: BLE001 - never let Flower forward exception text
        log_exception(log, "the node's app failed")
        reply = m.Reply(
            status=m.ERROR,
            node=str(context.node_config.get("name", "")),
            code="internal_error",
            message="the node hit an internal error; the detail is in the node's own log.",
        )
    return Message(m.encode_reply(reply), reply_to=msg)


def handle(content, context: Context) -> m.Reply:
    runtime = runtime_for(NodeConfig.from_mapping(context.node_config))
    try:
        limit = runtime.policy.max_payload_bytes
    except SpecError as exc:
        log.error("node %s cannot load its policy: %s", runtime.name, exc)
        return m.Reply(
            status=m.ERROR,
            node=runtime.name,
            code="policy_invalid",
            message=f"this node's policy file is not valid: {exc}",
        )
    size = m.content_size(content)
    if size > limit:
        kind, task_id = m.peek_task(content)
        return refuse_undecoded(
            runtime,
            kind,
            task_id,
            Violation("max_payload_bytes", "the task is larger than this node accepts; it was not read", limit),
        )
    try:
        decoded = m.decode_task(content)
    except (ValueError, KeyError, TypeError, RecursionError):
        return m.Reply(
            status=m.ERROR,
            node=runtime.name,
            code="bad_task",
            message="the message is not a task this node understands.",
        )
    return dispatch(runtime, decoded)

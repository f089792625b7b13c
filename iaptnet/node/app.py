"""The node's Flower ClientApp: one query handler, `query.task`, in front of the dispatcher.

The same app runs in the in-process engine and in a deployed SuperNode. Which data it serves
comes from the node's configuration (`context.node_config`: name, data, schema, policy).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from ..protocol import messages as m
from .handlers import dispatch
from .runtime import NodeConfig, runtime_for

app = ClientApp()


@app.query("task")
def task(msg: Message, context: Context) -> Message:
    runtime = runtime_for(NodeConfig.from_mapping(context.node_config))
    try:
        decoded = m.decode_task(msg.content)
    except (ValueError, KeyError, TypeError):
        reply = m.Reply(status=m.ERROR, node=runtime.name, code="bad_task",
                        message="the message is not a task this node understands.")
    else:
        reply = dispatch(runtime, decoded)
    return Message(m.encode_reply(reply), reply_to=msg)

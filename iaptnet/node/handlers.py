"""The one door every task goes through at the node.

`dispatch` decodes nothing itself: it receives a `Task`, finds the handler registered for its
kind, lets the node's policy see the task before and the reply after, and turns any failure into
a reply with an error code and a sentence free of data values. The detail (with traceback) goes
to the node's local log only. A new task kind registers with `@handler(kind)` and so cannot
bypass the policy or the error shield.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..protocol import messages as m
from ..protocol.errors import IaptnetError
from .runtime import NodeRuntime

log = logging.getLogger("iaptnet.node")

Handler = Callable[[NodeRuntime, m.Task], m.Reply]
HANDLERS: dict[str, Handler] = {}


def handler(kind: str):
    def register(fn: Handler) -> Handler:
        HANDLERS[kind] = fn
        return fn
    return register


def dispatch(runtime: NodeRuntime, task: m.Task) -> m.Reply:
    fn = HANDLERS.get(task.kind)
    if fn is None:
        return _error(runtime, task, "unknown_task", f"this node does not know the task kind '{_safe(task.kind)}'.")
    try:
        reply = fn(runtime, task)
    except IaptnetError as exc:
        # Our own errors are written never to carry data values.
        log.info("task %s (%s) failed: %s", task.task_id, task.kind, exc)
        return _error(runtime, task, type(exc).__name__, str(exc))
    except Exception:  # noqa: BLE001 - anything else may carry values: log here, say little
        log.exception("task %s (%s) failed with an internal error", task.task_id, task.kind)
        return _error(runtime, task, "internal_error",
                      "the node hit an internal error; the detail is in the node's own log.")
    reply.node = runtime.name
    reply.task_id = task.task_id
    return reply


def _error(runtime: NodeRuntime, task: m.Task, code: str, message: str) -> m.Reply:
    return m.Reply(status=m.ERROR, node=runtime.name, code=code, message=message, task_id=task.task_id)


def _safe(text: str) -> str:
    return "".join(ch for ch in str(text)[:60] if ch.isprintable())


# Register the built-in task kinds.
from . import tasks  # noqa: E402,F401

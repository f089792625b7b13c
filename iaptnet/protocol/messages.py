"""Tasks and replies between coordinator and nodes, and their encoding into Flower records.

Every task travels as one Flower message of type `query.task` whose content holds a
ConfigRecord "task" (kind, study hash, round, JSON payload) and an ArrayRecord "arrays"
(float64 arrays, serialised by Flower with numpy's format, bit-exact). Replies mirror it with a
"reply" ConfigRecord (status, node, code, message, JSON payload). A refusal or an error is a
normal reply with status "refused" or "error": a sentence free of data values, never a trace.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

MESSAGE_TYPE = "query.task"
PROTOCOL_VERSION = 1

# Task kinds. Each has a node handler (node/handlers) and a coordinator half.
GLM_MOMENTS = "glm.moments"
GLM_PREPARE = "glm.prepare"
GLM_ROUND = "glm.round"

OK, REFUSED, ERROR = "ok", "refused", "error"


@dataclass
class Task:
    kind: str
    study_hash: str
    payload: dict = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    round: int = 0
    task_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    issued_at: float = field(default_factory=time.time)


@dataclass
class Reply:
    status: str
    node: str
    payload: dict = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    code: str = ""
    message: str = ""
    task_id: str = ""

    @property
    def ok(self) -> bool:
        return self.status == OK


def _arrays_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(np.asarray(v, dtype=np.float64))) for k, v in arrays.items()})


def _arrays_from(record: ArrayRecord | None) -> dict[str, np.ndarray]:
    if record is None:
        return {}
    return {k: v.numpy() for k, v in record.items()}


def encode_task(task: Task) -> RecordDict:
    return RecordDict({
        "task": ConfigRecord({
            "version": PROTOCOL_VERSION,
            "kind": task.kind,
            "study_hash": task.study_hash,
            "round": task.round,
            "task_id": task.task_id,
            "issued_at": task.issued_at,
            "payload": json.dumps(task.payload, sort_keys=True),
        }),
        "arrays": _arrays_record(task.arrays),
    })


def decode_task(content: RecordDict) -> Task:
    """Raise ValueError (caught by the node's dispatcher) when the content is not a task."""
    cfg = content.config_records.get("task")
    if cfg is None:
        raise ValueError("message carries no task record")
    payload = json.loads(str(cfg["payload"]))
    if not isinstance(payload, dict):
        raise ValueError("task payload is not an object")
    return Task(
        kind=str(cfg["kind"]),
        study_hash=str(cfg["study_hash"]),
        payload=payload,
        arrays=_arrays_from(content.array_records.get("arrays")),
        round=int(cfg["round"]),
        task_id=str(cfg["task_id"]),
        issued_at=float(cfg["issued_at"]),
    )


def encode_reply(reply: Reply) -> RecordDict:
    return RecordDict({
        "reply": ConfigRecord({
            "version": PROTOCOL_VERSION,
            "status": reply.status,
            "node": reply.node,
            "code": reply.code,
            "message": reply.message,
            "task_id": reply.task_id,
            "payload": json.dumps(reply.payload, sort_keys=True),
        }),
        "arrays": _arrays_record(reply.arrays),
    })


def decode_reply(content: RecordDict) -> Reply:
    cfg = content.config_records["reply"]
    return Reply(
        status=str(cfg["status"]),
        node=str(cfg["node"]),
        payload=json.loads(str(cfg["payload"])),
        arrays=_arrays_from(content.array_records.get("arrays")),
        code=str(cfg["code"]),
        message=str(cfg["message"]),
        task_id=str(cfg["task_id"]),
    )


def pack_upper(matrix: np.ndarray) -> np.ndarray:
    """The upper triangle (row-major, diagonal included) of a symmetric matrix."""
    return matrix[np.triu_indices(matrix.shape[0])]


def unpack_upper(packed: np.ndarray, p: int) -> np.ndarray:
    out = np.zeros((p, p))
    iu = np.triu_indices(p)
    out[iu] = packed
    out.T[iu] = packed
    return out

"""Tasks and replies between coordinator and nodes, and their encoding into Flower records.

Every task travels as one Flower message of type `query.task` whose content holds a
ConfigRecord "task" (kind, study hash, round, JSON payload) and an ArrayRecord "arrays"
(float64 arrays, serialised by Flower with numpy's format, bit-exact). Replies mirror it with a
"reply" ConfigRecord (status, node, code, message, JSON payload, audit hash). A refusal or
an error is a normal reply with status "refused" or "error": a sentence free of data values,
never a trace. A refusal's payload is {"refusals": [{rule, sentence, threshold, model, term,
level, fix}, ...]} (fields absent when they do not apply), which the coordinator renders in
plain words. `audit_seq` and `audit_hash` are the node's audit head after it logged the task
(the entry's sequence number and hash; metadata, never a row value): the coordinator records
them in results.json, and `iaptnet node audit --verify --against results.json` later holds
the node's log to them.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from .formula_check import AST_LOCK

MESSAGE_TYPE = "query.task"
PROTOCOL_VERSION = 1

# Task kinds are named by each kind's contract in protocol/kinds/ (the GLM's: kinds/glm.py).

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
    audit_hash: str = ""
    audit_seq: int = 0

    @property
    def ok(self) -> bool:
        return self.status == OK


def _arrays_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(np.asarray(v, dtype=np.float64))) for k, v in arrays.items()})


def arrays_from(record: ArrayRecord | None) -> dict[str, np.ndarray]:
    """A record's arrays as numpy arrays, read holding AST_LOCK."""
    if record is None:
        return {}
    with AST_LOCK:  # numpy reads each array's header with ast.literal_eval (see AST_LOCK)
        return {k: v.numpy() for k, v in record.items()}


def encode_task(task: Task) -> RecordDict:
    return RecordDict(
        {
            "task": ConfigRecord(
                {
                    "version": PROTOCOL_VERSION,
                    "kind": task.kind,
                    "study_hash": task.study_hash,
                    "round": task.round,
                    "task_id": task.task_id,
                    "issued_at": task.issued_at,
                    "payload": json.dumps(task.payload, sort_keys=True),
                }
            ),
            "arrays": _arrays_record(task.arrays),
        }
    )


def content_size(content: RecordDict) -> int:
    """Bytes a message's content holds (strings and array buffers), counted without decoding
    anything, so that a node can refuse a huge task before parsing it."""
    total = 0
    for record in content.config_records.values():
        for key, value in record.items():
            total += len(key) + (len(value) if isinstance(value, (str, bytes)) else 16)
    for record in content.array_records.values():
        for key, array in record.items():
            total += len(key) + len(array.data)
    return total


def peek_task(content: RecordDict) -> tuple[str, str]:
    """(kind, task id) of a task message, read without decoding its payload ("" if absent)."""
    cfg = content.config_records.get("task")
    if cfg is None:
        return "", ""
    kind, task_id = cfg.get("kind", ""), cfg.get("task_id", "")
    return (kind if isinstance(kind, str) else "", task_id if isinstance(task_id, str) else "")


def decode_task(content: RecordDict) -> Task:
    """Raise ValueError (caught by the node's dispatcher) when the content is not a task."""
    cfg = content.config_records.get("task")
    if cfg is None:
        raise ValueError("message carries no task record")
    try:
        payload = json.loads(str(cfg["payload"]))
    except RecursionError:
        raise ValueError("task payload is nested too deeply") from None
    if not isinstance(payload, dict):
        raise ValueError("task payload is not an object")
    return Task(
        kind=str(cfg["kind"]),
        study_hash=str(cfg["study_hash"]),
        payload=payload,
        arrays=arrays_from(content.array_records.get("arrays")),
        round=int(cfg["round"]),
        task_id=str(cfg["task_id"]),
        issued_at=float(cfg["issued_at"]),
    )


def encode_reply(reply: Reply) -> RecordDict:
    return RecordDict(
        {
            "reply": ConfigRecord(
                {
                    "version": PROTOCOL_VERSION,
                    "status": reply.status,
                    "node": reply.node,
                    "code": reply.code,
                    "message": reply.message,
                    "task_id": reply.task_id,
                    "audit_hash": reply.audit_hash,
                    "audit_seq": int(reply.audit_seq),
                    "payload": json.dumps(reply.payload, sort_keys=True),
                }
            ),
            "arrays": _arrays_record(reply.arrays),
        }
    )


def decode_reply(content: RecordDict) -> Reply:
    cfg = content.config_records["reply"]
    return Reply(
        status=str(cfg["status"]),
        node=str(cfg["node"]),
        payload=json.loads(str(cfg["payload"])),
        arrays=arrays_from(content.array_records.get("arrays")),
        code=str(cfg["code"]),
        message=str(cfg["message"]),
        task_id=str(cfg["task_id"]),
        audit_hash=str(cfg.get("audit_hash", "")),
        audit_seq=_seq(cfg.get("audit_seq", 0)),
    )


def _seq(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def render_refusal(refusal: dict) -> str:
    """One structured refusal in plain words, e.g. "level 'bdd' of problem has fewer than 8
    rows; the policy's minimum is 8 (model 'd5'); to fix: merge it with another level, ..."."""

    def clean(value) -> str:
        return "".join(ch for ch in str(value)[:600] if ch.isprintable())

    text = clean(refusal.get("sentence") or refusal.get("rule") or "refused")
    threshold = refusal.get("threshold")
    if isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
        word = "maximum" if str(refusal.get("rule", "")).startswith("max_") else "minimum"
        shown = str(int(threshold)) if float(threshold).is_integer() else f"{threshold:g}"
        text += f"; the policy's {word} is {shown}"
    if refusal.get("model"):
        text += f" (model '{clean(refusal['model'])}')"
    if refusal.get("fix"):
        text += f"; to fix: {clean(refusal['fix'])}"
    return text


def pack_upper(matrix: np.ndarray) -> np.ndarray:
    """The upper triangle (row-major, diagonal included) of a symmetric matrix."""
    return matrix[np.triu_indices(matrix.shape[0])]


def unpack_upper(packed: np.ndarray, p: int) -> np.ndarray:
    out = np.zeros((p, p))
    iu = np.triu_indices(p)
    out[iu] = packed
    out.T[iu] = packed
    return out

"""Framing of task and reply records for Flower's deployment engine: one array per message.

Flower stores and transfers every Array of a message as separate objects (an Array and its
chunks), each one HTTP request between node and hub. A GLM reply carries score, information
and statistics per model (six arrays for one model and its null model), so a reply costs
sixteen requests, and on the hub each request costs milliseconds of CPU. The deployment engine
therefore sends the float64 arrays of a task or reply concatenated in one Array, with their
names and shapes in a ConfigRecord, and unpacks them on arrival: the same numbers, bit for bit,
in a third of the requests. The in-process engine does not use it.

Pure: records in, records out.
"""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

ARRAYS = "arrays"  # the ArrayRecord of iaptnet's task and reply encodings (protocol/messages.py)
FRAME = "frame"
PACKED = "packed"
VERSION = 1


def pack(content: RecordDict) -> RecordDict:
    """`content` with its named float64 arrays packed into one Array (unchanged if < 2)."""
    record = content.array_records.get(ARRAYS)
    if record is None or len(record) < 2 or FRAME in content.config_records:
        return content
    names = list(record.keys())
    arrays = [record[name].numpy() for name in names]
    if any(a.dtype != np.float64 for a in arrays):
        return content
    packed = np.concatenate([a.ravel() for a in arrays]) if arrays else np.zeros(0)
    out = RecordDict({key: value for key, value in content.items() if key != ARRAYS})
    out[ARRAYS] = ArrayRecord({PACKED: Array(np.ascontiguousarray(packed))})
    out[FRAME] = ConfigRecord(
        {"version": VERSION, "names": json.dumps(names), "shapes": json.dumps([list(a.shape) for a in arrays])}
    )
    return out


def unpack(content: RecordDict) -> RecordDict:
    """The inverse of `pack` (content without a frame is returned as it is)."""
    frame = content.config_records.get(FRAME)
    if frame is None:
        return content
    if int(frame["version"]) != VERSION:
        raise ValueError("unknown frame version")
    names = json.loads(str(frame["names"]))
    shapes = [tuple(s) for s in json.loads(str(frame["shapes"]))]
    flat = content.array_records[ARRAYS][PACKED].numpy()
    sizes = [int(np.prod(s)) for s in shapes]
    if len(names) != len(shapes) or sum(sizes) != flat.size:
        raise ValueError("frame does not match its packed array")
    arrays = {}
    offset = 0
    for name, shape, size in zip(names, shapes, sizes):
        arrays[name] = Array(np.ascontiguousarray(flat[offset : offset + size].reshape(shape)))
        offset += size
    out = RecordDict({key: value for key, value in content.items() if key not in (ARRAYS, FRAME)})
    out[ARRAYS] = ArrayRecord(arrays)
    return out

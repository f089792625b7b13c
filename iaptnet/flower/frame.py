"""Framing of task and reply records for Flower's deployment engine: one record per message.

Flower stores and moves every record of a message, and every Array and chunk of an
ArrayRecord, as a separate object, each one HTTP request between node and hub (a pull or a
push, on the node's side and again on the ServerApp's). An iaptnet task or reply is one
ConfigRecord ("task" or "reply", protocol/messages.py) and an ArrayRecord of float64 arrays
("arrays"): seven objects with the arrays packed into one Array, sixteen for a GLM reply as it
is. The deployment engine therefore sends the arrays inside the ConfigRecord itself, as the
little-endian bytes of their concatenation, with their names and shapes, and unpacks them on
arrival: the same numbers, bit for bit, in three objects (the message, its RecordDict and the
one record). On the hub each request costs milliseconds of CPU: with 32 nodes this cut a
node's requests a round from 21 to 15.7 and the hub's CPU a round by a tenth
(bench/bench_hub.py). The in-process engine does not use it.

Pure: records in, records out.
"""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from ..protocol.messages import arrays_from

ARRAYS = "arrays"  # the ArrayRecord of iaptnet's task and reply encodings (protocol/messages.py)
FRAME = "frame.v2"  # key in the ConfigRecord: JSON {names, shapes}
PACKED = "frame.packed"  # key in the ConfigRecord: the arrays' bytes, float64 little-endian
_FLOAT = np.dtype("<f8")


def pack(content: RecordDict) -> RecordDict:
    """`content` as its one ConfigRecord holding its float64 arrays (unchanged when it is not
    one ConfigRecord and at most the "arrays" ArrayRecord, or holds arrays of another type)."""
    configs, arrays = content.config_records, content.array_records
    if len(configs) != 1 or set(arrays) - {ARRAYS} or len(content) != len(configs) + len(arrays):
        return content
    ((name, config),) = configs.items()
    if FRAME in config or PACKED in config:
        return content
    values = list(arrays_from(arrays.get(ARRAYS)).items())
    if any(value.dtype != np.float64 for _, value in values):
        return content
    flat = np.concatenate([value.ravel() for _, value in values]) if values else np.zeros(0)
    frame = {"names": [key for key, _ in values], "shapes": [list(value.shape) for _, value in values]}
    record = ConfigRecord(dict(config))
    record[FRAME] = json.dumps(frame)
    record[PACKED] = flat.astype(_FLOAT, copy=False).tobytes()
    return RecordDict({name: record})


def unpack(content: RecordDict) -> RecordDict:
    """The inverse of `pack` (content without a frame is returned as it is). Raises
    ValueError for a frame that does not match its bytes."""
    framed = [(name, record) for name, record in content.config_records.items() if FRAME in record]
    if not framed:
        return content
    if len(framed) != 1 or len(content) != 1:
        raise ValueError("a framed message holds one record")
    ((name, record),) = framed
    try:
        frame = json.loads(str(record[FRAME]))
        names = [str(n) for n in frame["names"]]
        shapes = [tuple(int(d) for d in s) for s in frame["shapes"]]
    except (ValueError, KeyError, TypeError):
        raise ValueError("the frame is not what pack writes") from None
    packed = record.get(PACKED)
    sizes = [int(np.prod(s)) for s in shapes]
    if (
        not isinstance(packed, bytes)
        or len(names) != len(shapes)
        or len(set(names)) != len(names)
        or any(d < 0 for s in shapes for d in s)
        or sum(sizes) * _FLOAT.itemsize != len(packed)
    ):
        raise ValueError("the frame does not match its packed bytes")
    flat = np.frombuffer(packed, dtype=_FLOAT)
    arrays, offset = {}, 0
    for key, shape, size in zip(names, shapes, sizes):
        arrays[key] = Array(np.ascontiguousarray(flat[offset : offset + size], dtype=np.float64).reshape(shape))
        offset += size
    config = ConfigRecord({key: value for key, value in record.items() if key not in (FRAME, PACKED)})
    return RecordDict({name: config, ARRAYS: ArrayRecord(arrays)})

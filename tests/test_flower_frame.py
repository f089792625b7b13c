"""The deployment engine's framing (a task or reply as one record, its arrays inside as bytes) is
lossless, cuts the objects Flower moves per message to three, and a study through it gives the
in-process numbers."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Message
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from glmcase import write_network, write_study

from iaptnet.coordinator.engines.inprocess import InProcessGrid
from iaptnet.coordinator.network import load_network
from iaptnet.coordinator.runner import run_batch
from iaptnet.coordinator.serverapp import FramedGrid
from iaptnet.coordinator.studies import load_study
from iaptnet.flower.frame import pack, unpack
from iaptnet.protocol import messages as m


def reply_with(arrays) -> m.Reply:
    return m.Reply(status=m.OK, node="site", arrays=arrays)


def test_pack_unpack_is_bit_exact():
    rng = np.random.default_rng(3)
    arrays = {
        "score/m0": rng.normal(size=7),
        "info/m0": rng.normal(size=28) * 1e300,
        "stats/m0": np.array([np.nan, -0.0, np.inf, 5e-324]),
        "empty": np.zeros(0),
        "matrix": rng.normal(size=(3, 4)),
    }
    content = m.encode_reply(reply_with(arrays))
    back = m.decode_reply(unpack(pack(content)))
    assert set(back.arrays) == set(arrays)
    for name, value in arrays.items():
        assert back.arrays[name].shape == value.shape
        assert back.arrays[name].tobytes() == np.asarray(value, dtype=np.float64).tobytes()
    assert unpack(content) is content  # unframed content passes through
    for few in ({}, {"only": np.ones(3)}):  # no array, or one: framed all the same
        content = m.encode_reply(reply_with(few))
        back, sent = m.decode_reply(unpack(pack(content))), m.decode_reply(content)
        assert {k: v.tobytes() for k, v in back.arrays.items()} == {k: v.tobytes() for k, v in sent.arrays.items()}
        assert (back.status, back.node, back.payload) == (sent.status, sent.node, sent.payload)


def test_what_the_frame_cannot_carry_passes_unchanged():
    from flwr.app import ConfigRecord, MetricRecord

    two_configs = m.encode_reply(reply_with({"a": np.ones(2)}))
    two_configs["other"] = ConfigRecord({"x": 1})
    metrics = m.encode_reply(reply_with({"a": np.ones(2)}))
    metrics["m"] = MetricRecord({"x": 1.0})
    ints = m.encode_reply(reply_with({}))
    from flwr.app import Array

    ints.array_records["arrays"]["i"] = Array(np.arange(3))
    for content in (two_configs, metrics, ints):
        assert pack(content) is content


def test_framing_cuts_the_objects_flower_moves():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    rng = np.random.default_rng(4)
    arrays = {
        f"{kind}/{model}": rng.normal(size=size)
        for model in ("m0", "m0.null")
        for kind, size in (("score", 60), ("info", 1830), ("stats", 4))
    }
    content = m.encode_reply(reply_with(arrays))
    plain = len(get_all_nested_objects(Message(content, dst_node_id=1, message_type=m.MESSAGE_TYPE)))
    framed = len(get_all_nested_objects(Message(pack(content), dst_node_id=1, message_type=m.MESSAGE_TYPE)))
    assert framed == 3 < 16 <= plain  # the message, its RecordDict and the one record


def test_study_through_the_frame_equals_inprocess(tmp_path):
    rng = np.random.default_rng(8)
    import pandas as pd

    columns = {
        "y": {"type": "binary"},
        "x": {"type": "numeric"},
        "g": {"type": "categorical", "levels": ["a", "b", "c"]},
    }
    sites = {}
    for k, n in enumerate((200, 300, 250)):
        x = rng.normal(size=n)
        g = rng.choice(["a", "b", "c"], size=n)
        y = (rng.random(n) < 1 / (1 + np.exp(0.2 - 0.7 * x))).astype(int)
        sites[f"s{k}"] = pd.DataFrame({"y": y, "x": x, "g": g})
    network = load_network(write_network(tmp_path, sites, columns))
    study = load_study(
        write_study(tmp_path / "st.toml", name="st", family="binomial", formula="y ~ x + g"), network.schema_paths
    )
    from iaptnet.node.app import app as node_app

    def framed_node(message, context):  # what the node daemon's warm worker does
        message.content = unpack(message.content)
        reply = node_app(message, context)
        reply.content = pack(reply.content)
        return reply

    framed = run_batch(FramedGrid(InProcessGrid(network.nodes, client_app=framed_node)), [study], engine="x")[0]
    plain = run_batch(InProcessGrid(network.nodes), [study], engine="x")[0]
    for key in ("terms", "deviance", "null_deviance", "n", "iterations"):
        assert framed[key] == plain[key], key
    # The nodes' entries too, but for each node's audit head: it travelled through the frame,
    # and the second run's tasks come later in the same logs.
    heads = [(a.pop("audit_head"), b.pop("audit_head")) for a, b in zip(framed["nodes"], plain["nodes"])]
    assert framed["nodes"] == plain["nodes"]
    assert all(0 < first["seq"] < second["seq"] for first, second in heads)


@pytest.mark.parametrize("bad", ["json", "size", "negative", "duplicate", "bytes", "second record"])
def test_bad_frames_are_rejected(bad):
    from flwr.app import ConfigRecord

    from iaptnet.flower.frame import FRAME, PACKED

    content = pack(m.encode_reply(reply_with({"a": np.ones(2), "b": np.ones(3)})))
    record = content.config_records["reply"]
    if bad == "json":
        record[FRAME] = "{not json"
    elif bad == "size":
        record[FRAME] = '{"names": ["a", "b"], "shapes": [[2], [4]]}'
    elif bad == "negative":
        record[FRAME] = '{"names": ["a", "b"], "shapes": [[-2], [7]]}'
    elif bad == "duplicate":
        record[FRAME] = '{"names": ["a", "a"], "shapes": [[2], [3]]}'
    elif bad == "bytes":
        record[PACKED] = "not bytes"
    else:
        content["other"] = ConfigRecord({"x": 1})
    with pytest.raises(ValueError):
        unpack(content)


def test_serverapp_events_survive_the_log_stream_exactly():
    import base64
    import json

    from iaptnet.coordinator.engines.flower import _EVENT
    from iaptnet.coordinator.serverapp import encode_event, name_nodes

    value = {"event": "result", "data": [0.1 + 0.2, 1e-310, float("nan"), -0.0, 2.5e300]}
    line = "INFO : noise before " + encode_event(value) + " and after"
    (blob,) = _EVENT.findall(line)
    back = json.loads(base64.b64decode(blob))
    assert [repr(x) for x in back["data"]] == [repr(x) for x in value["data"]]
    names = {123456789012345: "trust-c"}
    assert (
        name_nodes("node 123456789012345 did not answer; node 42 too", names) == "trust-c did not answer; node 42 too"
    )

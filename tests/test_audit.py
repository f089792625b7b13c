"""The audit log: one hash-chained entry per task holding exactly what was released (or the
refusal or error), an `iaptnet node audit` that lists and verifies it, and detection of any
edit, deletion or reordering."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json

import numpy as np
import pandas as pd
import pytest
from nodecase import Node, local_beta

from iaptnet.cli import main
from iaptnet.node import runtime as rt
from iaptnet.node.audit import logged_array
from iaptnet.protocol import messages as m
from iaptnet.protocol.kinds import glm as glm_protocol

COLUMNS = {"y": {"type": "binary"}, "x": {"type": "numeric"}, "g": {"type": "categorical", "levels": ["a", "b"]}}
POLICY = 'mode = "exploratory"\nstate_dir = "state"\n'


def frame(n: int = 300, seed: int = 2) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    return pd.DataFrame(
        {"y": (rng.random(n) < 1 / (1 + np.exp(-x))).astype(int), "x": x, "g": rng.choice(["a", "b"], size=n)}
    )


@pytest.fixture
def node(tmp_path):
    return Node(tmp_path / "n", frame(), COLUMNS, policy=POLICY)


def log_path(node: Node):
    return node.folder / "state" / "trust" / "audit.jsonl"


def run_tasks(node: Node) -> list[m.Reply]:
    """An honest study (prepare and two rounds), a refused task and one that cannot be
    computed (refused in the same form: a failure is never told apart from a refusal)."""
    prepare, study = node.prepare(node.spec(formula="y ~ x + g"))
    beta = local_beta(prepare)
    replies = [prepare, node.round(study, {"m0": beta * 0.9}), node.round(study, {"m0": beta})]
    replies.append(node.send(m.Task(kind="no.such.kind", study_hash="x")))
    replies.append(node.round(study, {"m0": [0.0]}))  # wrong length: cannot be computed
    return replies


def test_each_task_is_one_chained_entry_holding_exactly_what_was_released(node):
    replies = run_tasks(node)
    entries = [json.loads(line) for line in log_path(node).read_text().splitlines()]
    assert [e["status"] for e in entries] == ["ok", "ok", "ok", "refused", "refused"]
    assert [e["kind"] for e in entries] == ["glm.prepare", "glm.round", "glm.round", "no.such.kind", "glm.round"]
    prev = "0" * 64
    for number, (entry, reply) in enumerate(zip(entries, replies), 1):
        assert entry["seq"] == number and entry["prev"] == prev and entry["task_id"] == reply.task_id
        body = {k: v for k, v in entry.items() if k != "hash"}
        expected = hashlib.sha256((prev + json.dumps(body, sort_keys=True, separators=(",", ":"))).encode()).hexdigest()
        assert entry["hash"] == expected == reply.audit_hash
        dt.datetime.strptime(entry["time"], "%Y-%m-%dT%H:%M:%S.%fZ")
        assert len(entry["params"]) == 64
        prev = entry["hash"]
        if entry["status"] == "ok":
            released = entry["released"]
            assert released["payload"] == reply.payload
            assert set(released["arrays"]) == set(reply.arrays)
            for name, array in reply.arrays.items():
                logged = released["arrays"][name]
                assert logged["shape"] == list(array.shape)
                assert logged_array(logged).tobytes() == np.asarray(array, dtype="<f8").tobytes()  # bit for bit
    assert entries[3]["refusal"][0]["rule"] == "task_kind" and "released" not in entries[3]
    assert "released" not in entries[4] and entries[4]["refusal"][0]["rule"] == "cannot_compute"
    assert entries[4]["refusal"][0]["sentence"] in replies[4].message
    # the study hash, and a digest that changes with the parameters
    assert entries[1]["study_hash"] == entries[0]["study_hash"] and entries[1]["params"] != entries[2]["params"]


def test_verify_passes_on_an_untouched_log(node, capsys):
    run_tasks(node)
    assert main(["node", "audit", "--policy", str(node.folder / "policy.toml"), "--verify"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("audit log OK: 5 entries, chain intact")


def _edit_value(lines):
    entry = json.loads(lines[1])
    logged = entry["released"]["arrays"][sorted(entry["released"]["arrays"])[0]]
    values = logged_array(logged).copy()
    values.flat[0] += 1.0
    logged["f8_base64"] = base64.b64encode(values.astype("<f8").tobytes()).decode()
    lines[1] = json.dumps(entry, sort_keys=True, separators=(",", ":"))
    return lines


def _edit_and_rehash(lines):
    # An editor who recomputes the edited entry's own hash still breaks the next link.
    from iaptnet.node.audit import entry_hash

    entry = json.loads(lines[1])
    entry["kind"] = "glm.moments"
    entry["hash"] = entry_hash(entry["prev"], entry)
    lines[1] = json.dumps(entry, sort_keys=True, separators=(",", ":"))
    return lines


@pytest.mark.parametrize(
    "tamper, problem",
    [
        (_edit_value, "entry 2 was edited"),
        (_edit_and_rehash, "entry 3 does not follow entry 2"),
        (lambda lines: lines[:2] + lines[3:], "entry 3 is missing"),
        (lambda lines: [lines[0], lines[2], lines[1], *lines[3:]], "entry 2 is missing"),
        (lambda lines: lines[:-1], "the last entries were deleted"),
        (lambda lines: lines[:1] + ["{not json"] + lines[2:], "line 2 is not a valid entry"),
    ],
)
def test_verify_detects_edits_deletions_and_reordering(node, capsys, tamper, problem):
    run_tasks(node)
    path = log_path(node)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(tamper(lines)) + "\n")
    assert main(["node", "audit", "--policy", str(node.folder / "policy.toml"), "--verify"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("audit log FAILED") and problem in out


def test_a_deleted_head_is_reported(node, capsys):
    run_tasks(node)
    (node.folder / "state" / "trust" / "audit.head").unlink()
    assert main(["node", "audit", "--policy", str(node.folder / "policy.toml"), "--verify"]) == 1
    assert "audit.head is missing" in capsys.readouterr().out


def test_the_listing_since_a_date_and_as_json(node, capsys):
    run_tasks(node)
    policy = str(node.folder / "policy.toml")
    assert main(["node", "audit", "--policy", policy]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5
    assert lines[0].startswith("#1 ") and "glm.prepare" in lines[0] and "released 4 arrays" in lines[0]
    assert "REFUSED this node does not know the task kind 'no.such.kind'" in lines[3]
    assert "REFUSED model 'm0': expected 3 coefficients" in lines[4]
    tomorrow = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).strftime("%Y-%m-%d")
    assert main(["node", "audit", "--policy", policy, "--since", tomorrow]) == 0
    assert capsys.readouterr().out == ""
    assert main(["node", "audit", "--policy", policy, "--since", "2000-01-01", "--json"]) == 0
    parsed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["seq"] for e in parsed] == [1, 2, 3, 4, 5]
    assert main(["node", "audit", "--policy", policy, "--since", "yesterday"]) == 2
    assert "--since 'yesterday'" in capsys.readouterr().err


def test_the_log_and_the_memory_survive_a_restart(node):
    prepare, study = node.prepare(node.spec(formula="y ~ x"))
    task = m.Task(kind=glm_protocol.ROUND, study_hash=study, arrays={"beta/m0": local_beta(prepare)})
    assert node.send(task).status == m.OK
    rt._RUNTIMES.clear()
    rt._STATES.clear()
    again = node.send(task)  # the same task id after a restart
    assert again.status == m.REFUSED and again.code == "replay"
    entries = node.audit_entries()
    assert [e["seq"] for e in entries] == [1, 2, 3] and entries[2]["prev"] == entries[1]["hash"]


def test_a_node_without_policy_keeps_its_log_in_memory(tmp_path):
    node = Node(tmp_path / "n", frame(), COLUMNS)
    reply, _ = node.prepare(node.spec(formula="y ~ x"))
    assert reply.status == m.OK
    assert not any(p.name == "state" for p in (tmp_path / "n").iterdir())
    assert node.runtime.audit.verify().ok and len(node.audit_entries()) == 1


def test_released_arrays_are_logged_exactly_and_logs_of_release_0_2_still_read():
    from iaptnet.node.audit import arrays_for_log

    info = np.array([[1 / 3, -2.5e-300], [np.pi, 7.0]])
    logged = arrays_for_log({"info/m0": info, "score/m0": np.array([0.1, -0.0])})
    assert list(logged) == ["info/m0", "score/m0"] and logged["info/m0"]["shape"] == [2, 2]
    assert logged_array(logged["info/m0"]).tobytes() == info.tobytes()
    assert np.signbit(logged_array(logged["score/m0"])[1])  # -0.0 kept
    json.dumps(logged)  # plain JSON
    earlier = {"shape": [2, 2], "values": info.ravel().tolist()}  # how 0.2.0 wrote it
    assert logged_array(earlier).tobytes() == info.tobytes()

"""An audit entry that is valid JSON, with its sequence number and hashes, but a field of the
wrong type or shape (a time that is a number, a repair that is not an object, a released array
whose shape is text or whose values do not fill its shape) is a damaged entry: the listing
names the file and line and exits 1, `--verify` fails on it and `iaptnet node status` reports
the node unhealthy, whether the entry was edited in place or re-chained so that its hash and
the head match. None of them raises."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_flower_config import kit, node_toml  # noqa: F401 - the fixture

from iaptnet.cli import main
from iaptnet.node.audit import GENESIS, AuditLog, arrays_for_log, canonical, entry_hash, logged_array
from iaptnet.node.health import STATUS_FILE, Heartbeat
from iaptnet.protocol.errors import DataError

POLICY = 'mode = "exploratory"\nstate_dir = "state"\n'
ARRAY = arrays_for_log({"score/m0": np.array([0.5, -1.25, 3.0])})["score/m0"]

GOOD = {
    "time": "2026-01-05T08:00:00.000000Z",
    "node": "n1",
    "task_id": "t1",
    "kind": "glm.round",
    "study_hash": "a" * 64,
    "round": 1,
    "params": "b" * 64,
    "status": "ok",
    "released": {"payload": {"n": 300, "means": [0.5, 0.25]}, "arrays": {"score/m0": ARRAY}},
}

# (the entry's fields, what the message says is wrong)
BAD = [
    ({**GOOD, "time": 5}, "field 'time' is not text"),
    ({**GOOD, "kind": ["glm.round"]}, "field 'kind' is not text"),
    ({**GOOD, "round": "1"}, "field 'round' is not a whole number"),
    ({**GOOD, "round": True}, "field 'round' is not a whole number"),
    ({"time": GOOD["time"], "kind": "audit.recovery", "status": "recovered", "repairs": ["a"]}, "field 'repairs'"),
    ({"time": GOOD["time"], "kind": "audit.recovery", "status": "recovered", "repairs": 5}, "field 'repairs'"),
    ({"time": GOOD["time"], "kind": "audit.damage", "status": "damaged", "damage": 3, "repairs": []}, "'damage'"),
    ({**GOOD, "released": [1]}, "field 'released' is not an object"),
    ({**GOOD, "released": {"arrays": [1]}}, "field 'released.arrays' is not an object"),
    ({**GOOD, "released": {"arrays": {"score/m0": {**ARRAY, "shape": "ab"}}}}, "array 'score/m0'"),
    ({**GOOD, "released": {"arrays": {"score/m0": {**ARRAY, "shape": [2, 2]}}}}, "array 'score/m0'"),
    ({**GOOD, "released": {"arrays": {"score/m0": {**ARRAY, "shape": [-3]}}}}, "array 'score/m0'"),
    ({**GOOD, "released": {"arrays": {"score/m0": {**ARRAY, "f8_base64": "%%%"}}}}, "array 'score/m0'"),
    ({**GOOD, "released": {"arrays": {"score/m0": {"shape": [3], "values": [1.0, "x", 2.0]}}}}, "array 'score/m0'"),
    ({**GOOD, "released": {"arrays": {"score/m0": {"shape": [3], "values": [1.0]}}}}, "array 'score/m0'"),
    ({**GOOD, "released": {"arrays": {"score/m0": "AAAA"}}}, "array 'score/m0'"),
    ({**GOOD, "status": "refused", "released": None, "refusal": "no"}, "field 'refusal'"),
    ({**GOOD, "status": "refused", "refusal": [1]}, "field 'refusal'"),
    ({**GOOD, "status": "error", "code": 3, "error": "x"}, "field 'code' is not text"),
]
IDS = [f"{i}-{why.split()[-1].strip(chr(39))}" for i, (_, why) in enumerate(BAD)]


def write_log(folder: Path, entries: list[dict], rechain: bool) -> Path:
    """The entries as log lines and their head. rechain: every hash recomputed, so the chain
    and the head verify (an edit made by someone who re-chained the log); otherwise the
    second entry is edited in place after a proper chain was written."""
    folder.mkdir(parents=True, exist_ok=True)
    lines, prev = [], GENESIS
    for seq, fields in enumerate(entries, 1):
        entry = {**(fields if rechain or seq != 2 else GOOD), "seq": seq, "prev": prev}
        entry["hash"] = entry_hash(prev, entry)
        if not rechain and seq == 2:
            entry.update(fields)  # edited after it was chained
        lines.append(canonical(entry) + "\n")
        prev = entry["hash"]
    (folder / "audit.jsonl").write_text("".join(lines))
    (folder / "audit.head").write_text(json.dumps({"seq": len(entries), "hash": prev}) + "\n")
    return folder / "audit.jsonl"


@pytest.fixture
def policy(tmp_path) -> str:
    (tmp_path / "policy.toml").write_text(POLICY)
    return str(tmp_path / "policy.toml")


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def test_the_entries_used_here_verify_when_sound(tmp_path, policy, capsys):
    write_log(tmp_path / "state" / "n1", [GOOD, GOOD, GOOD], rechain=True)
    code, out, _ = cli(capsys, "node", "audit", "--policy", policy, "--verify")
    assert code == 0 and out.startswith("audit log OK: 3 entries")
    code, out, _ = cli(capsys, "node", "audit", "--policy", policy)
    assert code == 0 and len(out.splitlines()) == 3 and "released 1 arrays (3 numbers) and 3 values" in out


@pytest.mark.parametrize("rechain", [True, False], ids=["rechained", "edited"])
@pytest.mark.parametrize("bad, why", BAD, ids=IDS)
def test_a_field_of_the_wrong_type_is_a_damaged_entry(tmp_path, policy, capsys, bad, why, rechain):
    path = write_log(tmp_path / "state" / "n1", [GOOD, bad, GOOD], rechain)
    if rechain:
        assert AuditLog(path.parent).last_entry()["seq"] == 3

    # the listing: every readable entry, and one sentence naming the file and line of the damaged one
    for extra in ([], ["--json"]):
        code, out, err = cli(capsys, "node", "audit", "--policy", policy, *extra)
        assert code == 1 and len(out.splitlines()) == 2
        assert len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"error: {path}, line 2: the line is not a valid entry (") and why in err
        assert err.strip().endswith(").")

    # verification fails on it, in one sentence naming the file and line
    code, out, err = cli(capsys, "node", "audit", "--policy", policy, "--verify")
    assert code == 1 and len(out.strip().splitlines()) == 1, out
    assert out.startswith("audit log FAILED after 1 good entries: ")
    assert f"{path}: line 2 is not a valid entry (" in out and why in out and out.strip().endswith("edited.")
    result = AuditLog(path.parent).verify()
    assert not result.ok and result.entries == 1 and f"{path}: line 2" in result.problem


@pytest.mark.parametrize(
    "bad, why", BAD[:1] + BAD[4:5] + BAD[7:8] + BAD[9:10], ids=IDS[:1] + IDS[4:5] + IDS[7:8] + IDS[9:10]
)
def test_a_damaged_last_entry_makes_the_node_unhealthy(kit, capsys, bad, why):  # noqa: F811
    path = write_log(kit / "state" / "site-a", [GOOD, GOOD, bad], rechain=True)
    (kit / "state").mkdir(exist_ok=True)
    heart = Heartbeat(kit / "state" / STATUS_FILE, "site-a", "f" * 64)
    heart.started()
    heart.seen("poll")
    code = main(["node", "status", "--config", node_toml(kit)])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert code == 1 and len(out.strip().splitlines()) == 1, out
    assert "UNHEALTHY: audit log FAILED after 2 good entries" in out
    assert f"{path}: line 3 is not a valid entry (" in out and why in out
    assert "last audit entry #3" not in out  # the damaged entry is not shown as if it were sound


def test_the_command_line_reports_it_without_a_traceback(tmp_path, policy):
    path = write_log(tmp_path / "state" / "n1", [GOOD, {**GOOD, "time": 5}], rechain=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }
    said = {
        (): f"error: {path}, line 2: the line is not a valid entry (field 'time' is not text).\n",
        ("--verify",): f"audit log FAILED after 1 good entries: {path}: line 2 is not a valid entry (field 'time' is "
        "not text): the log was edited.\n",
    }
    for extra, sentence in said.items():
        proc = subprocess.run(
            [sys.executable, "-m", "iaptnet.cli", "node", "audit", "--policy", policy, *extra],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert sentence == (proc.stdout if extra else proc.stderr)


def test_logged_array_refuses_an_array_that_does_not_match_its_shape():
    assert logged_array(ARRAY).tolist() == [0.5, -1.25, 3.0]
    assert logged_array({"shape": [2], "values": [1.0, 2.0]}).tolist() == [1.0, 2.0]  # a 0.2.0 log
    short = {"shape": [3], "f8_base64": base64.b64encode(b"\0" * 16).decode()}
    garbled = {"shape": [1], "f8_base64": "%%%%%%%%%%%="}  # the length of one number, not base64
    bad = ({**ARRAY, "shape": "ab"}, short, garbled, {"shape": [2], "values": ["a", "b"]}, [1], {"shape": [1]})
    for logged in bad:
        with pytest.raises(DataError, match="not a valid logged array"):
            logged_array(logged)

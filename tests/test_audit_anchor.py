"""An anchor outside the node: every reply carries the node's audit head (sequence number and
hash) after the task, results.json records it per node, and `iaptnet node audit --verify
--against results.json` proves the node's log still holds the entries it released to those
studies, so a forger who edits an entry and recomputes every hash after it is caught."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import RecordDict
from glmcase import write_network
from test_audit import COLUMNS, frame

from iaptnet.cli import main
from iaptnet.flower.frame import FRAME, pack, unpack
from iaptnet.node.audit import GENESIS, canonical, entry_hash, logged_array
from iaptnet.protocol import messages as m

POLICY = 'mode = "exploratory"\nstate_dir = "state"\n'
SITES = ("north", "south")


@pytest.fixture
def net(tmp_path):
    sites = {name: frame(300, seed) for seed, name in enumerate(SITES, 1)}
    return write_network(tmp_path / "net", sites, COLUMNS, policies={name: POLICY for name in SITES})


def run(tmp_path: Path, net: Path, name: str, formula: str = "y ~ x + g") -> Path:
    study = tmp_path / f"{name}.toml"
    study.write_text(f'name = "{name}"\nfamily = "binomial"\nformula = "{formula}"\n')
    out = tmp_path / f"out-{name}"
    assert main(["run", str(study), "--network", str(net), "--out", str(out)]) == 0
    (results,) = out.rglob("results.json")
    return results


def log_of(net: Path, node: str) -> Path:
    return net.parent / "state" / node / "audit.jsonl"


def audit(net: Path, node: str, *against: Path) -> list[str]:
    argv = ["node", "audit", "--policy", str(net.parent / f"{node}_policy.toml"), "--node", node, "--verify"]
    if against:
        argv += ["--against", *map(str, against)]
    return argv


def rechain(net: Path, node: str, edit) -> None:
    """A forger with write access: edits the entries, recomputes every hash and the head."""
    path = log_of(net, node)
    entries = edit([json.loads(line) for line in path.read_text().splitlines()])
    prev, lines = GENESIS, []
    for seq, entry in enumerate(entries, 1):
        entry["seq"], entry["prev"] = seq, prev
        entry.pop("hash", None)
        entry["hash"] = prev = entry_hash(prev, entry)
        lines.append(canonical(entry) + "\n")
    path.write_text("".join(lines))
    (path.parent / "audit.head").write_text(json.dumps({"seq": len(entries), "hash": prev}) + "\n")


def test_results_record_each_nodes_audit_head_after_its_last_reply(tmp_path, net):
    results = json.loads(run(tmp_path, net, "first").read_text())
    for node in results["nodes"]:
        entries = [json.loads(line) for line in log_of(net, node["name"]).read_text().splitlines()]
        head = node["audit_head"]
        assert set(head) == {"seq", "hash"}
        assert head == {"seq": entries[-1]["seq"], "hash": entries[-1]["hash"]}  # the study's last task


def test_an_honest_log_passes_against_every_results_file(tmp_path, net, capsys):
    first = run(tmp_path, net, "first")
    second = run(tmp_path, net, "second", "y ~ x")
    capsys.readouterr()
    for node in SITES:
        assert main(audit(net, node, first, second)) == 0
        out = capsys.readouterr().out
        assert out.startswith("audit log OK") and "2 audit heads recorded in 2 results files match" in out


def test_a_rechained_forgery_passes_the_chain_but_not_the_anchor(tmp_path, net, capsys):
    first = run(tmp_path, net, "first")
    second = run(tmp_path, net, "second", "y ~ x")
    capsys.readouterr()

    def forge(entries):  # change a number the node released in the first study, hide it
        logged = entries[1]["released"]["arrays"][sorted(entries[1]["released"]["arrays"])[0]]
        values = logged_array(logged).copy()
        values.flat[0] += 0.5
        logged["f8_base64"] = base64.b64encode(values.astype("<f8").tobytes()).decode()
        return entries

    rechain(net, "north", forge)
    assert main(audit(net, "north")) == 0  # the chain alone cannot tell
    capsys.readouterr()
    assert main(audit(net, "north", first, second)) == 1
    out = capsys.readouterr().out
    assert out.startswith("audit log FAILED") and str(first) in out and "rewritten" in out and "'first'" in out
    assert main(audit(net, "south", first, second)) == 0  # the other node's log is untouched
    capsys.readouterr()


def test_entries_deleted_and_rechained_are_caught(tmp_path, net, capsys):
    first = run(tmp_path, net, "first")
    second = run(tmp_path, net, "second", "y ~ x")
    capsys.readouterr()
    rechain(net, "south", lambda entries: entries[:-2])  # the second study's tasks, gone
    assert main(audit(net, "south")) == 0
    capsys.readouterr()
    assert main(audit(net, "south", first, second)) == 1
    out = capsys.readouterr().out
    assert str(second) in out and "study 'second'" in out and "deleted" in out


def test_results_without_an_anchor_for_the_node_are_a_clean_error(tmp_path, net, capsys):
    first = run(tmp_path, net, "first")
    capsys.readouterr()
    old = json.loads(first.read_text())
    for node in old["nodes"]:
        node.pop("audit_head")
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "garbled.json").write_text("{not json")
    for path, words in (
        (tmp_path / "old.json", "no audit head recorded for node 'north'"),
        (tmp_path / "garbled.json", "not a results file"),
        (tmp_path / "missing.json", "no such results file"),
    ):
        assert main(audit(net, "north", path)) == 2
        out, err = capsys.readouterr()
        assert err.startswith("error: ") and str(path) in err and words in err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and not out


def test_the_reply_carries_the_head_as_metadata_through_flower_framing():
    reply = m.Reply(
        status=m.OK,
        node="north",
        arrays={"score/m0": np.arange(3.0), "info/m0": np.ones(6)},
        task_id="ab" * 8,
        audit_hash="c" * 64,
        audit_seq=41,
    )
    content = pack(m.encode_reply(reply))
    assert list(content.config_records) == ["reply"] and not content.array_records  # the framed form
    assert FRAME in content.config_records["reply"]
    back = m.decode_reply(unpack(RecordDict(dict(content.items()))))
    assert (back.audit_seq, back.audit_hash) == (41, "c" * 64)
    # metadata beside status and code: no array, nothing from the rows
    assert set(back.arrays) == set(reply.arrays) and "audit" not in json.dumps(back.payload)
    # a reply from an older node (no sequence number) decodes with none
    record = m.encode_reply(reply)
    del record.config_records["reply"]["audit_seq"]
    assert m.decode_reply(record).audit_seq == 0

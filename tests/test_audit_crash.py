"""The audit log survives a crash at any instant of an append: a node killed while writing an
entry (a torn final line), or after writing it but before recording the new head (a lagging
head), or storage that kept the head but lost the log's end, repairs itself when it next opens
the log, records a recovery entry saying what it repaired, and verifies. What a crash cannot
produce (an edit, entries deleted at a clean line end) is still reported as tampering, and
the listing of a damaged log names the file and line instead of raising."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from nodecase import Node, local_beta
from test_audit import COLUMNS, POLICY, frame, log_path, run_tasks

from iaptnet.cli import main
from iaptnet.node import runtime as rt
from iaptnet.node.audit import GENESIS, RECOVERY, AuditLog, entry_hash
from iaptnet.protocol import messages as m


@pytest.fixture
def node(tmp_path):
    return Node(tmp_path / "n", frame(), COLUMNS, policy=POLICY)


def head_of(entry: dict | None) -> str:
    if entry is None:
        return json.dumps({"seq": 0, "hash": GENESIS}) + "\n"
    return json.dumps({"seq": entry["seq"], "hash": entry["hash"]}) + "\n"


def write_state(folder: Path, log: bytes, head: str | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "audit.jsonl").write_bytes(log)
    if head is None:
        (folder / "audit.head").unlink(missing_ok=True)
    else:
        (folder / "audit.head").write_text(head)


def recovered(folder: Path) -> tuple[AuditLog, list[dict]]:
    """The node opens its log (a restart), then the whole log is read back."""
    log = AuditLog(folder)
    log.recover()
    return log, list(log.entries())


def assert_sound(log: AuditLog, before: list[dict]) -> None:
    """The log verifies, every entry written before the crash is still there unchanged, and the
    next append chains on from the repaired end."""
    result = log.verify()
    assert result.ok, result.problem
    entries = list(log.entries())
    assert entries[: len(before)] == before
    nxt = log.append({"kind": "probe", "status": "ok"})
    assert nxt["seq"] == entries[-1]["seq"] + 1 and nxt["prev"] == entries[-1]["hash"]
    assert log.verify().ok


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A real log of five tasks: the first four lines, the fifth (the append that is killed)."""
    folder = tmp_path_factory.mktemp("chain")
    log = AuditLog(folder)
    for i in range(5):
        log.append({"kind": "glm.round", "status": "ok", "released": {"payload": {"i": i, "values": [0.5] * 20}}})
    lines = (folder / "audit.jsonl").read_bytes().splitlines(keepends=True)
    entries = [json.loads(line) for line in lines]
    return b"".join(lines[:4]), entries[:4], lines[4], entries[4]


def test_a_kill_at_every_byte_of_an_append_is_repaired_with_a_recovery_entry(tmp_path, chain):
    base, before, line, entry = chain
    for cut in range(len(line) + 1):
        folder = tmp_path / f"cut{cut}"
        # Killed after `cut` bytes of the line reached the file, before the head was replaced.
        write_state(folder, base + line[:cut], head_of(before[-1]))
        log, entries = recovered(folder)
        if cut == 0:  # killed before writing anything: nothing to repair
            assert [e["seq"] for e in entries] == [1, 2, 3, 4]
        elif cut < len(line):  # a torn final line: removed, and said so
            assert [e["seq"] for e in entries] == [1, 2, 3, 4, 5]
            recovery = entries[-1]
            assert recovery["kind"] == RECOVERY and recovery["prev"] == before[-1]["hash"]
            (repair,) = recovery["repairs"]
            assert repair["repair"] == "torn_tail" and repair["bytes"] == cut and repair["after_seq"] == 4
        else:  # the whole line written, the head not yet: rolled forward
            assert entries[4] == entry
            recovery = entries[5]
            assert recovery["kind"] == RECOVERY and [r["repair"] for r in recovery["repairs"]] == [
                "head_rolled_forward"
            ]
        result = log.verify()
        assert result.ok and (cut == 0) == (not result.repairs), (cut, result)
        assert_sound(log, before)


def test_a_kill_after_the_head_was_replaced_needs_no_repair(tmp_path, chain):
    base, before, line, entry = chain
    write_state(tmp_path, base + line, head_of(entry))
    log, entries = recovered(tmp_path)
    assert entries == [*before, entry] and not log.verify().repairs


def test_a_kill_while_writing_the_recovery_entry_is_repaired_too(tmp_path, chain):
    base, before, line, _ = chain
    write_state(tmp_path / "first", base + line[:40], head_of(before[-1]))
    recovered(tmp_path / "first")  # the recovery entry's own line, to be killed in turn
    recovery_line = (tmp_path / "first" / "audit.jsonl").read_bytes().splitlines(keepends=True)[-1]
    for cut in range(0, len(recovery_line) + 1, 7):
        folder = tmp_path / f"cut{cut}"
        write_state(folder, base + recovery_line[:cut], head_of(before[-1]))
        log, entries = recovered(folder)
        assert log.verify().ok
        assert_sound(log, before)


def test_both_a_full_line_with_a_lagging_head_and_a_torn_line_after_it(tmp_path, chain):
    # Killed after writing entry 5 (head lagging), restarted, killed again while writing the
    # recovery entry: a torn line after a line the head does not record yet.
    base, before, line, entry = chain
    write_state(tmp_path, base + line + b'{"kind":"audit.recovery","not":"fin', head_of(before[-1]))
    log, entries = recovered(tmp_path)
    assert entries[4] == entry
    assert sorted(r["repair"] for r in entries[5]["repairs"]) == ["head_rolled_forward", "torn_tail"]
    assert_sound(log, before)


@pytest.mark.parametrize("cut", [1, 50, -1])
def test_a_head_ahead_of_a_torn_log_is_a_crash_that_lost_the_entry(tmp_path, chain, cut):
    # Storage that kept the new head but not the whole line (a disk that acknowledged a write
    # it had not made): the entry the head records is lost, and the recovery entry says which.
    base, before, line, entry = chain
    write_state(tmp_path, base + line[: cut % len(line)], head_of(entry))
    log, entries = recovered(tmp_path)
    lost = [r for r in entries[-1]["repairs"] if r["repair"] == "lost_entry"]
    assert lost and lost[0]["seq"] == entry["seq"] and lost[0]["hash"] == entry["hash"]
    assert_sound(log, before)


def test_the_first_append_killed_before_the_head_existed(tmp_path, chain):
    _, before, _, _ = chain
    first = (json.dumps(before[0], sort_keys=True, separators=(",", ":")) + "\n").encode()
    for log_bytes in (first[:10], first):
        write_state(tmp_path, log_bytes, None)
        log, entries = recovered(tmp_path)
        assert entries[-1]["kind"] == RECOVERY and log.verify().ok
        shutil.rmtree(tmp_path)


def test_an_unrepaired_crash_verifies_as_a_crash_not_as_tampering(tmp_path, chain, capsys):
    base, before, line, _ = chain
    for log_bytes in (base + line[:33], base + line):
        write_state(tmp_path, log_bytes, head_of(before[-1]))
        result = AuditLog(tmp_path).verify()  # the node has not restarted yet: nothing repaired
        assert result.ok and result.pending and not result.problem
        assert (tmp_path / "audit.jsonl").read_bytes() == log_bytes  # verify changes nothing


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda base, line, entries: (base[: base.rfind(b"\n", 0, -1) + 1], head_of(entries[-1])), "entry 4"),
        (lambda base, line, entries: (base, head_of(entries[1])), "head"),
        (lambda base, line, entries: (base, None), "audit.head"),
    ],
)
def test_what_a_crash_cannot_produce_is_still_tampering(tmp_path, chain, damage, words):
    """Entries deleted at a clean line end, a head two entries behind, a deleted head: the
    node keeps serving (its release memory decides what it may release), but writes an entry
    saying what it found, so that the log never verifies again."""
    base, before, line, _ = chain
    log_bytes, head = damage(base, line, before)
    write_state(tmp_path, log_bytes, head)
    assert not AuditLog(tmp_path).verify().ok
    log, entries = recovered(tmp_path)
    assert entries[-1]["kind"] == "audit.damage" and words in entries[-1]["damage"]
    log.append({"kind": "probe", "status": "ok"})
    result = log.verify()
    assert not result.ok and words in result.problem


def test_an_edit_in_the_middle_after_a_repaired_crash_is_tampering(tmp_path, chain):
    base, before, line, _ = chain
    write_state(tmp_path, base + line[:60], head_of(before[-1]))
    log, _ = recovered(tmp_path)
    assert log.verify().ok and log.verify().repairs
    lines = (tmp_path / "audit.jsonl").read_text().splitlines(keepends=True)
    lines[1] = lines[1].replace('"i":1', '"i":7')
    (tmp_path / "audit.jsonl").write_text("".join(lines))
    result = log.verify()
    assert not result.ok and "entry 2 was edited" in result.problem


# --------------------------------------------------------------------------- through the node


def test_a_restarted_node_repairs_its_log_before_its_next_task(node, capsys):
    prepare, study = node.prepare(node.spec(formula="y ~ x"))
    path = log_path(node)
    head = (path.parent / "audit.head").read_text()
    beta = local_beta(prepare)
    assert node.round(study, {"m0": beta}).ok
    # the node was killed while writing the round's entry: its line torn, the head as before
    data = path.read_bytes()
    path.write_bytes(data[: data.rfind(b"\n", 0, -1) + 1 + 25])
    (path.parent / "audit.head").write_text(head)
    rt._RUNTIMES.clear()
    rt._STATES.clear()
    prepare, study = node.prepare(node.spec(formula="y ~ x"))  # after the restart
    assert prepare.ok
    entries = node.audit_entries()
    assert [e["kind"] for e in entries] == ["glm.prepare", RECOVERY, "glm.prepare"]
    assert prepare.audit_hash == entries[-1]["hash"] and prepare.audit_seq == entries[-1]["seq"]
    policy = str(node.folder / "policy.toml")
    assert main(["node", "audit", "--policy", policy, "--verify"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("audit log OK") and "crash repair" in out and "entry 2" in out
    assert main(["node", "audit", "--policy", policy]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert len(listing) == 3 and "RECOVERED" in listing[1]


def test_the_listing_of_a_damaged_log_names_file_and_line(node, capsys):
    run_tasks(node)
    path = log_path(node)
    policy = str(node.folder / "policy.toml")
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2]) + "{garbled\n" + "".join(lines[3:]) + lines[1][:30])
    code = main(["node", "audit", "--policy", policy])
    out, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in err
    assert len(out.splitlines()) == 4  # every readable entry is still listed
    assert f"{path}, line 3" in err and f"{path}, line 6" in err and "torn" in err
    code = main(["node", "audit", "--policy", policy, "--json"])
    out, err = capsys.readouterr()
    assert code == 1 and [json.loads(x)["seq"] for x in out.splitlines()] == [1, 2, 4, 5]


# --------------------------------------------------------------------------- a real kill

_WRITER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from iaptnet.node.audit import AuditLog

    real_fsync = os.fsync

    def fsync(fd):  # each fsync of an append (log line, new head, folder) says so, then lingers
        real_fsync(fd)
        print("fsync", flush=True)
        time.sleep(0.15)

    os.fsync = fsync
    log = AuditLog(Path(sys.argv[1]))
    i = 0
    while True:
        log.append({"kind": "glm.round", "status": "ok", "released": {"payload": {"i": i, "v": [0.5] * 500}}})
        i += 1
    """
)


def test_a_process_killed_with_sigkill_mid_append_loop_recovers(tmp_path):
    """A real process killed (SIGKILL) inside an append: after the line's fsync (the head not
    yet replaced), after the new head's fsync (not yet renamed into place), after the rename."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    repairs = 0
    for attempt in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, env=env, text=True
        )
        for _ in range(4 + attempt):  # the (4 + attempt)th fsync: each of the three points in turn
            assert proc.stdout.readline() == "fsync\n", "the writer stopped"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        log = AuditLog(tmp_path)
        repairs += log.recover() is not None
        result = log.verify()
        assert result.ok, result.problem
    assert repairs >= 2  # the kills between the line and the head's rename needed a repair
    entries = list(AuditLog(tmp_path).entries())
    assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1))
    assert all(e["prev"] == p["hash"] for p, e in zip(entries, entries[1:]))
    assert all(entry_hash(e["prev"], e) == e["hash"] for e in entries)
    # each recovery entry recorded what it repaired
    assert sum(e["kind"] == RECOVERY for e in entries) == repairs
    assert all(e["repairs"] for e in entries if e["kind"] == RECOVERY)
    assert not list(tmp_path.glob(".audit.head.tmp-*"))  # an interrupted head replacement cleaned up


def test_recovery_of_an_untouched_log_writes_nothing(node):
    run_tasks(node)
    before = log_path(node).read_bytes()
    rt._RUNTIMES.clear()
    rt._STATES.clear()
    assert node.runtime.audit.recover() is None
    assert node.send(m.Task(kind="no.such.kind", study_hash="x")).status == m.REFUSED
    assert log_path(node).read_bytes().startswith(before)
    assert RECOVERY not in {e["kind"] for e in node.audit_entries()}

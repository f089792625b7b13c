"""`iaptnet node status --config node.toml`: one line (daemon, hub contact, last audit entry,
audit head and whether the log verifies, data version) and exit 0 only when healthy. The
daemon's side is the status file its SuperNode loop keeps (`Heartbeat`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
from test_flower_config import kit, node_toml  # noqa: F401 - the fixture

from iaptnet.cli import main
from iaptnet.flower import supernode
from iaptnet.node.audit import AuditLog
from iaptnet.node.health import STATUS_FILE, Heartbeat


def status(capsys, config, *extra) -> tuple[int, str]:
    code = main(["node", "status", "--config", config, *extra])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out


def node_log(kit) -> AuditLog:  # noqa: F811
    """The node's audit log, where the daemon keeps it (the policy's state_dir, per name)."""
    log = AuditLog(kit / "state" / "site-a")
    for i in range(3):
        log.append({"kind": "glm.round", "status": "ok", "round": i})
    return log


def beat(kit, **changes) -> Heartbeat:  # noqa: F811
    """The daemon started (this process stands in for it) and heard from the hub."""
    (kit / "state").mkdir(exist_ok=True)
    heart = Heartbeat(kit / "state" / STATUS_FILE, "site-a", "f" * 64)
    heart.started()
    heart.seen("poll")
    if changes:
        path = kit / "state" / STATUS_FILE
        data = json.loads(path.read_text())
        data.update(changes)
        path.write_text(json.dumps(data))
    return heart


def test_a_running_connected_node_with_a_sound_log_is_healthy(kit, capsys):  # noqa: F811
    log = node_log(kit)
    beat(kit)
    code, out = status(capsys, node_toml(kit))
    assert code == 0 and len(out.splitlines()) == 1, out
    assert out.startswith("node site-a: healthy")
    assert f"pid {os.getpid()}" in out and "hub answered" in out
    assert f"audit head {log.verify().head[:12]}" in out and "log verifies" in out
    assert f"#{log.last_entry()['seq']} glm.round" in out and "data version ffffffffffff" in out


def test_a_daemon_that_never_ran_is_unhealthy(kit, capsys):  # noqa: F811
    code, out = status(capsys, node_toml(kit))
    assert code == 1 and out.startswith("node site-a: UNHEALTHY: the daemon has not run here")
    assert "audit log empty" in out


def test_a_hub_silent_for_too_long_is_not_connected(kit, capsys):  # noqa: F811
    node_log(kit)
    beat(kit, last_contact=time.time() - 600)
    code, out = status(capsys, node_toml(kit))
    assert code == 1 and "UNHEALTHY: not connected: the hub last answered 10 min ago" in out
    assert status(capsys, node_toml(kit), "--max-silence", "900")[0] == 0


def test_a_task_in_progress_counts_until_it_takes_too_long(kit, capsys):  # noqa: F811
    beat(kit, last_contact=time.time() - 200, task_since=time.time() - 30)
    code, out = status(capsys, node_toml(kit))
    assert code == 0 and "answering a task for 30 s" in out
    beat(kit, last_contact=time.time() - 900, task_since=time.time() - 900)
    code, out = status(capsys, node_toml(kit))
    assert code == 1 and "UNHEALTHY: answering one task for 15 min" in out


def test_a_dead_or_stopped_daemon_is_unhealthy(kit, capsys):  # noqa: F811
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    beat(kit, pid=gone.pid)
    code, out = status(capsys, node_toml(kit))
    assert code == 1 and "the daemon is not running" in out
    beat(kit).stopped()
    code, out = status(capsys, node_toml(kit))
    assert code == 1 and "it stopped at" in out


def test_a_log_that_fails_verification_is_unhealthy_and_a_crash_is_not(kit, capsys):  # noqa: F811
    log = node_log(kit)
    beat(kit)
    data = log.path.read_bytes()
    log.path.write_bytes(data + b'{"seq":4,"kind":"glm.rou')  # killed mid-append, not restarted yet
    code, out = status(capsys, node_toml(kit))
    assert code == 0 and "a crash to repair at the next start" in out
    log.path.write_bytes(data.replace(b'"round":1', b'"round":9'))
    code, out = status(capsys, node_toml(kit))
    assert code == 1 and "UNHEALTHY: audit log FAILED" in out and "entry 2 was edited" in out


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--config", "missing.toml"], "missing.toml"),
        (["--max-silence", "0"], "--max-silence"),
    ],
)
def test_mistakes_are_one_sentence(kit, capsys, argv, words):  # noqa: F811
    config = node_toml(kit)
    args = ["node", "status", "--config", config, *argv]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and len(err.strip().splitlines()) == 1


def test_the_supernode_loop_reports_each_contact_with_the_hub(monkeypatch):
    import flwr.supernode.start_client_internal as sci

    answers = iter([None, 7])

    def pull(*args, **kwargs):
        answer = next(answers, "down")
        if answer == "down":
            raise ConnectionError("hub unreachable")
        return answer

    monkeypatch.setattr(sci, "_pull_and_store_message", pull)
    monkeypatch.setattr(sci, "_push_messages", lambda *a, **k: None)
    events = []
    supernode.install_supernode_adaptations(
        supernode.SleepPolicy(), lambda: None, threading.Lock(), on_contact=events.append
    )
    try:
        sci._pull_and_store_message()  # an empty poll
        sci._pull_and_store_message()  # a task
        sci._push_messages()  # its reply delivered
        with pytest.raises(ConnectionError):
            sci._pull_and_store_message()  # the hub did not answer: no contact
    finally:
        supernode.uninstall_supernode_adaptations()
    assert events == ["poll", "message", "reply"]


def test_the_heartbeat_tracks_tasks_and_writes_rarely_while_idle(tmp_path):
    heart = Heartbeat(tmp_path / STATUS_FILE, "site-a", "v", every=60)
    heart.started()
    heart.seen("message")
    assert json.loads((tmp_path / STATUS_FILE).read_text())["task_since"] is not None
    heart.seen("reply")
    first = json.loads((tmp_path / STATUS_FILE).read_text())
    assert first["task_since"] is None and first["last_contact"] is not None
    heart.seen("poll")  # within `every` of the last write: not written again
    assert json.loads((tmp_path / STATUS_FILE).read_text()) == first

"""The real network on localhost: a Flower SuperLink hub and node daemons (SuperNodes) as
separate processes, with TLS and SuperNode authentication, started by `iaptnet network up`.

* a logistic study over the network gives the in-process engine's numbers (to 1e-12), and a
  node that connects mid-study does not join it; a node restarted mid-study comes back with
  its identity, contributes nothing more, and the study stops naming it;
* refusals, for real: an unregistered node key, a node speaking plain HTTP, an app bundle the
  Trust has not approved (refused before any of its code runs, said so in the node's log);
* faults: a node killed mid-study fails the study within the configured timeout naming the
  node, or, when the study allows a minimum number of nodes, the study completes without it and
  says so in its results; the hub and the other nodes keep running;
* self-healing (issue 13): the hub crashes mid-study and is started again: every node daemon
  rejoins it by itself (same process, no traceback), `iaptnet run` says the run was lost, and
  submitted again the study continues from its checkpoint to the uninterrupted run's results;
  a node frozen (SIGSTOP) past the node timeout and thawed answers the next study, or ends
  itself through its watchdog and, started again as systemd would, answers it;
* `network down` stops exactly the processes `network up` started.

Every process started here is stopped whatever happens (the module fixture's finally, plus a
sweep of any process whose command line names this test's private folder).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from glmcase import write_network, write_study

from iaptnet import keys as pki
from iaptnet.cli import main
from iaptnet.coordinator.engines.flower import run_flower
from iaptnet.coordinator.inprocess import run_inprocess
from iaptnet.coordinator.outputs import write_json_atomic
from iaptnet.node.audit import AuditLog, read_anchors
from iaptnet.ops import launcher
from iaptnet.protocol.errors import NetworkError

pytestmark = pytest.mark.network

COLUMNS = {
    "y": {"type": "binary"},
    "x": {"type": "numeric"},
    "z": {"type": "numeric"},
    "g": {"type": "categorical", "levels": ["a", "b", "c"]},
}
SITES = ("site0", "site1", "site2", "site3")
NODE_TIMEOUT = 10.0


def make_sites(seed: int = 11, sizes=(300, 450, 350, 400)) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    sites = {}
    for name, n in zip(SITES + ("newcomer",), sizes + (200,)):
        x = rng.normal(size=n)
        z = rng.normal(size=n)
        g = rng.choice(["a", "b", "c"], size=n)
        eta = -0.3 + 0.8 * x - 0.4 * z + pd.Series(g).map({"a": 0.0, "b": 0.5, "c": -0.6}).to_numpy()
        y = (rng.random(n) < 1 / (1 + np.exp(-eta))).astype(int)
        frame = pd.DataFrame({"y": y, "x": x, "z": z, "g": g})
        frame.loc[rng.choice(n, size=n // 30, replace=False), "x"] = np.nan
        sites[name] = frame
    return sites


def _sweep(marker: str) -> None:
    """Kill (by pid) any process left whose command line names this test's folder."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


PG_URL = os.environ.get("IAPTNET_TEST_POSTGRES_URL")


def _site0_in_postgres(network: Path, frame: pd.DataFrame) -> str | None:
    """With a PostgreSQL server (CI), node site0 reads its rows from a database table."""
    if not PG_URL:
        return None
    import uuid

    import sqlalchemy as sa

    table = f"flower_site0_{uuid.uuid4().hex[:8]}"
    engine = sa.create_engine(PG_URL)
    frame.to_sql(table, engine, index=False)
    engine.dispose()
    text = network.read_text().replace('data = "site0.csv"', f'data = "{PG_URL}"\ntable = "{table}"', 1)
    network.write_text(text)
    return table


def _drop_table(table: str) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(PG_URL)
    with engine.begin() as conn:
        conn.execute(sa.text(f'DROP TABLE IF EXISTS "{table}"'))
    engine.dispose()


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flowernet")
    sites = make_sites()
    newcomer = sites.pop("newcomer")
    network = write_network(folder, sites, COLUMNS)
    newcomer.to_csv(folder / "newcomer.csv", index=False)
    table = _site0_in_postgres(network, sites["site0"])
    lines = []
    try:
        record = launcher.up(network, timeout=180, node_timeout=NODE_TIMEOUT, echo=lines.append)
        yield {"folder": folder, "network": network, "record": record, "hub": folder / "hub.toml", "sites": sites}
    finally:
        try:
            if (folder / launcher.STATE_DIR / launcher.PROCESSES).exists():
                launcher.down(network, echo=lines.append)
        finally:
            _sweep(str(folder))
            if table:
                _drop_table(table)


def node_pid(net, name: str) -> int:
    return next(p["pid"] for p in net["record"]["processes"] if p["name"] == name)


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def study(net, name: str, **extra) -> Path:
    fields = {"name": name, "family": "binomial", "formula": "y ~ x + z + g", "exposure": "x"}
    fields.update(extra)
    return write_study(net["folder"] / f"{name}.toml", **fields)


def log_of(net, name: str) -> str:
    return (net["folder"] / launcher.STATE_DIR / "logs" / f"{name}.log").read_text(errors="replace")


def _start_newcomer(net) -> subprocess.Popen:
    """A registered node that connects after the study has pinned its cohort."""
    from iaptnet.coordinator.hub import load_hub_config, register_node
    from iaptnet.flower.bundle import release_hash
    from iaptnet.node.config import approve

    root = net["folder"] / launcher.STATE_DIR
    ndir = root / "nodes" / "newcomer"
    key, pub = pki.node_key(ndir, "newcomer")
    register_node(load_hub_config(root / "coordinator.toml"), "newcomer", pub)
    approve(ndir / "state" / "approved-apps.txt", release_hash())
    (ndir / "node.toml").write_text(
        f'name = "newcomer"\nhub = "{net["record"]["address"]}"\nca_cert = "{root / "pki" / "ca.crt"}"\n'
        f'key = "{key}"\ndata = "{net["folder"] / "newcomer.csv"}"\nschema = "{net["folder"] / "schema.toml"}"\n'
        f'state_dir = "{ndir / "state"}"\n'
    )
    log = open(root / "logs" / "newcomer.log", "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "iaptnet.cli", "node", "start", "--config", str(ndir / "node.toml"), "--local-network"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
    )


def test_logistic_study_equals_inprocess_and_newcomer_does_not_join(net, capsys):
    path = study(net, "logit_equal")
    # This study waits up to a minute for a node (the others use NODE_TIMEOUT): site1 is
    # frozen mid-study while a registered newcomer starts and connects to the hub, then
    # thawed, so the newcomer is certainly online while the study runs.
    patient_hub = _patient_hub(net)
    events, newcomer, connected = [], [], []
    newcomer_log = net["folder"] / launcher.STATE_DIR / "logs" / "newcomer.log"

    def progress(kind, round_no, answered, expected):
        events.append((kind, round_no, answered, expected))

    def freeze_site1_and_start_newcomer():
        pid = node_pid(net, "site1")
        os.killpg(pid, signal.SIGSTOP)
        try:
            newcomer.append(_start_newcomer(net))
            deadline = time.monotonic() + 45
            while time.monotonic() < deadline and not connected:
                if newcomer_log.exists() and "SuperNode ID" in newcomer_log.read_text(errors="replace"):
                    connected.append(time.monotonic())
                time.sleep(0.05)
        finally:
            os.killpg(pid, signal.SIGCONT)

    try:
        with _OnAnswer(net, "site1", freeze_site1_and_start_newcomer) as watcher:
            flower = run_flower([path], patient_hub, progress=progress)[0]
    finally:
        for proc in newcomer:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
    assert watcher.fired and connected, "the newcomer did not connect while the study waited"
    said = newcomer_log.read_text(errors="replace")
    # never asked anything: no task reached it, it answered and refused nothing
    assert "Receiving:" not in said and "node newcomer answered" not in said and "node newcomer refused" not in said
    local = run_inprocess([path], net["network"])[0]
    assert flower["engine"] == "flower" and local["engine"] == "inprocess"
    assert [n["name"] for n in flower["nodes"]] == list(SITES) and all(n["contributed"] for n in flower["nodes"])
    # results.json is the same document, every number equal to 1e-12
    assert_same(
        {k: v for k, v in flower.items() if k not in ("engine", "created_at")},
        {k: v for k, v in local.items() if k not in ("engine", "created_at")},
    )
    assert events[0][0] == "glm.prepare" and events[-1][2] == events[-1][3] == len(SITES)
    assert flower["rounds"] <= 5  # warm start: prepare + a few Newton rounds
    # Each node's audit head travelled in its replies (framed for the deployment engine) and
    # results.json holds it: the node's own log verifies against it.
    results_file = net["folder"] / "logit_equal-results.json"
    write_json_atomic(results_file, flower)
    for name in SITES:
        (log_file,) = (net["folder"] / launcher.STATE_DIR / "nodes" / name).rglob("audit.jsonl")
        anchors = read_anchors([results_file], name)
        verified = AuditLog(log_file.parent).verify(anchors)
        assert anchors and verified.ok and verified.anchored == len(anchors), verified.problem
    # A running node daemon reports itself healthy and connected (its status file).
    capsys.readouterr()
    node_toml = net["folder"] / launcher.STATE_DIR / "nodes" / "site0" / "node.toml"
    assert main(["node", "status", "--config", str(node_toml)]) == 0
    said = capsys.readouterr().out
    assert said.startswith("node site0: healthy") and "hub answered" in said, said


def assert_same(a, b, path="results"):
    """Equal documents; each node's `audit_head` is its own log's state (a different log per
    engine), so only its presence is compared."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), path
        for key in a:
            if key != "audit_head":
                assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool):
        assert a == pytest.approx(b, rel=1e-12, abs=0, nan_ok=True), path
    else:
        assert a == b, path


def _patient_hub(net) -> Path:
    """The network's hub file with a node timeout of a minute (the others use NODE_TIMEOUT)."""
    path = net["folder"] / "hub-patient.toml"
    path.write_text(re.sub(r"(?m)^node_timeout = .*$", "node_timeout = 60.0", net["hub"].read_text()))
    return path


def _replace_process(net, name: str, proc: subprocess.Popen) -> None:
    """Record a restarted node's new process, in memory and on disk (for `network down`)."""
    for record in (net["record"], None):
        if record is None:
            path = net["folder"] / launcher.STATE_DIR / launcher.PROCESSES
            record = json.loads(path.read_text())
        for entry in record["processes"]:
            if entry["name"] == name:
                entry["pid"] = proc.pid
        if record is not net["record"]:
            path.write_text(json.dumps(record, indent=2))


def test_node_restarted_mid_study_is_not_taken_back_as_a_stranger(net):
    """A Trust restarts its node (systemctl restart: SIGTERM, then start) just after it has
    answered the first Newton round. It comes back with the same identity (its key) but
    without the prepared study or the task in flight, so it contributes nothing more and the
    study stops naming it (flwr 1.42 drops the in-flight task: the node does not answer in
    time, or the hub reports it offline, having seen it disconnect; a task it did receive
    would be refused as not prepared)."""
    node_toml = net["folder"] / launcher.STATE_DIR / "nodes" / "site1" / "node.toml"
    log = net["folder"] / launcher.STATE_DIR / "logs" / "site1.log"
    restarted = []

    def restart_site1():
        old = node_pid(net, "site1")
        os.killpg(old, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while alive(old) and time.monotonic() < deadline:
            time.sleep(0.05)
        with open(log, "ab") as fh:
            fh.write(b"--- restarted by the test ---\n")
            fh.flush()
            restarted.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "iaptnet.cli",
                        "node",
                        "start",
                        "--config",
                        str(node_toml),
                        "--local-network",
                    ],
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
                )
            )

    ids_before = re.findall(r"SuperNode ID: (\d+)", log.read_text(errors="replace"))
    path = study(net, "logit_restart")
    # the prepare reply and the first round's reply have been sent: the second "Sent successfully"
    after_round_1 = _OnAnswer(net, "site1", restart_site1, seen=lambda text: text.count("Sent successfully") >= 2)
    try:
        with after_round_1, pytest.raises(NetworkError) as err:
            run_flower([path], net["hub"])
        deadline = time.monotonic() + 60  # the restarted node is back (for the tests after this one)
        while "SuperNode ID" not in log.read_text(errors="replace").rsplit("restarted by the test", 1)[-1]:
            assert time.monotonic() < deadline, "the restarted node did not reconnect"
            time.sleep(0.2)
    finally:
        if restarted:
            _replace_process(net, "site1", restarted[0])
    assert after_round_1.fired and restarted
    message = str(err.value)
    assert "site1" in message and any(
        why in message for why in ("did not answer", "went offline before answering", "has not prepared the study")
    )
    text = log.read_text(errors="replace")
    after = text.rsplit("restarted by the test", 1)[-1]
    ids_after = re.findall(r"SuperNode ID: (\d+)", text)
    assert ids_after[-1] == ids_before[-1] and len(ids_after) == len(ids_before) + 1  # same identity, back
    assert "answered" not in after  # contributed nothing more to the study
    assert all(alive(p["pid"]) for p in net["record"]["processes"])  # hub, other nodes, restarted node


def test_unapproved_app_bundle_is_refused_before_it_runs(net, capsys):
    approved = net["folder"] / launcher.STATE_DIR / "nodes" / "site1" / "state" / "approved-apps.txt"
    saved = approved.read_text()
    approved.write_text("# nothing approved\n")
    try:  # the command line: a run that fails on the hub exits non-zero with the reason
        code = main(["run", str(study(net, "logit_refused")), "--engine", "flower", "--hub", str(net["hub"])])
    finally:
        approved.write_text(saved)
    text = capsys.readouterr().err
    assert code == NetworkError.exit_code and "Traceback" not in text
    assert "site1 refused" in text and "has not approved this app bundle" in text
    assert "REFUSED run" in log_of(net, "site1") and "not approved" in log_of(net, "site1").lower()


def _warm_serverapp_pid(net) -> int | None:
    """The warm ServerApp itself: the hub's own child, not a run's process forked from it
    (which has the same command line)."""
    from iaptnet.ops.launcher import _children

    hub = next(p["pid"] for p in net["record"]["processes"] if p["role"] == "hub")
    for pid in _children().get(hub, []):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"iaptnet.flower.warm_serverapp" in cmdline and alive(pid):
            return pid
    return None


def test_the_hub_serves_only_its_own_release_and_its_warm_serverapp_comes_back(net, capsys, monkeypatch, tmp_path):
    """The warm ServerApp (flower/warm_serverapp.py) killed: the hub starts it again. A run
    whose bundle is not the hub's release is refused with a sentence the analyst sees, and
    none of its code runs at the hub; the next run of the release completes."""
    from iaptnet.flower import bundle

    first = _warm_serverapp_pid(net)
    assert first is not None, "the hub runs no warm ServerApp"
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while (_warm_serverapp_pid(net) in (None, first)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _warm_serverapp_pid(net) not in (None, first), "the hub did not start its warm ServerApp again"
    assert "the warm ServerApp ended" in log_of(net, "hub")

    app = bundle.stage_release(tmp_path)
    marker = tmp_path / "ran-foreign-code"
    (app / "iaptnet" / "coordinator" / "serverapp.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        + (app / "iaptnet" / "coordinator" / "serverapp.py").read_text()
    )
    foreign = bundle.build_fab_from_dir(app)
    import hashlib

    monkeypatch.setattr(bundle, "release_fab", lambda: (foreign, hashlib.sha256(foreign).hexdigest()))
    code = main(["run", str(study(net, "logit_foreign")), "--engine", "flower", "--hub", str(net["hub"])])
    err = capsys.readouterr().err
    assert code == NetworkError.exit_code and "Traceback" not in err
    assert "the hub serves only the app of its own iaptnet release" in err
    assert hashlib.sha256(foreign).hexdigest()[:16] in err
    assert not marker.exists()

    monkeypatch.undo()
    out = tmp_path / "out"
    assert (
        main(
            [
                "run",
                str(study(net, "logit_after_warm")),
                "--engine",
                "flower",
                "--hub",
                str(net["hub"]),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert json.loads((out / "results.json").read_text())["terms"]
    # Its polls are not logged one line a request (they would fill the hub's log and the
    # run's own log stream).
    assert "HTTP Request:" not in log_of(net, "hub")


def _free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_unregistered_key_and_plain_http_are_refused(net, tmp_path):
    root = net["folder"] / launcher.STATE_DIR
    key, _ = pki.node_key(tmp_path, "intruder")
    (tmp_path / "node.toml").write_text(
        f'name = "intruder"\nhub = "{net["record"]["address"]}"\nca_cert = "{root / "pki" / "ca.crt"}"\n'
        f'key = "{key}"\ndata = "{net["folder"] / "site0.csv"}"\nschema = "{net["folder"] / "schema.toml"}"\n'
        f'state_dir = "{tmp_path / "state"}"\n'
    )
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(sys.path),
        FLWR_HOME=str(tmp_path / "home"),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
    )
    intruder = subprocess.run(
        [
            sys.executable,
            "-m",
            "iaptnet.cli",
            "node",
            "start",
            "--config",
            str(tmp_path / "node.toml"),
            "--local-network",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        start_new_session=True,
    )
    assert intruder.returncode != 0
    assert "Failed to activate SuperNode" in intruder.stderr and "register" in intruder.stderr
    plain = subprocess.run(
        [
            str(Path(sys.executable).parent / "flower-supernode"),
            "--insecure",
            "--superlink",
            net["record"]["address"],
            "--max-retries",
            "1",
            "--max-wait-time",
            "10",
            "--isolation",
            "process",
            "--port",
            _free_port(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        start_new_session=True,
    )
    assert plain.returncode != 0 and "could not establish a connection" in (plain.stdout + plain.stderr)
    with_key = subprocess.run(
        [
            str(Path(sys.executable).parent / "flower-supernode"),
            "--insecure",
            "--superlink",
            net["record"]["address"],
            "--auth-supernode-private-key",
            str(root / "nodes" / "site0" / "site0.key"),
            "--isolation",
            "process",
            "--port",
            _free_port(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        start_new_session=True,
    )
    assert with_key.returncode != 0 and "requires a secure TLS connection" in (with_key.stdout + with_key.stderr)
    assert all(alive(p["pid"]) for p in net["record"]["processes"])


class _OnAnswer(threading.Thread):
    """Runs `action` the moment a node's own log says it answered the study's prepare task:
    mid-study every time, after the study pinned the node and before the first Newton round
    (the hub needs at least one poll interval to collect every reply and push the next
    round), whether or not the node's prepare reply got out first. (Acting on the analyst's
    first progress event was racy: Flower's log stream can deliver it after the study ended.)"""

    def __init__(self, net, name: str, action, seen=None):
        super().__init__(daemon=True)
        self.path = net["folder"] / launcher.STATE_DIR / "logs" / f"{name}.log"
        self.offset = self.path.stat().st_size
        self.seen = seen or (lambda text: f"node {name} answered glm.prepare" in text)
        self.action = action
        self.fired = False
        self.done = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + 120
        while not self.done.is_set() and time.monotonic() < deadline:
            with open(self.path, errors="replace") as fh:
                fh.seek(self.offset)
                new = fh.read()
            if self.seen(new):
                self.fired = True
                self.action()
                return
            time.sleep(0.005)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.join(timeout=90)


def _kill_after_answer(net, name: str) -> _OnAnswer:
    return _OnAnswer(net, name, lambda: os.killpg(node_pid(net, name), signal.SIGKILL))


def _since(net, name: str, offset: int) -> str:
    with open(net["folder"] / launcher.STATE_DIR / "logs" / f"{name}.log", errors="replace") as fh:
        fh.seek(offset)
        return fh.read()


def _log_sizes(net) -> dict[str, int]:
    return {name: (net["folder"] / launcher.STATE_DIR / "logs" / f"{name}.log").stat().st_size for name in SITES}


def _restart_hub(net, pause: float = 1.0, how: int = signal.SIGTERM) -> None:
    """Stop the hub (systemctl restart: SIGTERM; a crash: SIGKILL) and start it again on the
    same address; its Flower state is in memory, so it comes back knowing no node session and
    no run."""
    from iaptnet.coordinator.hub import wait_for_hub

    root = net["folder"] / launcher.STATE_DIR
    old = next(p["pid"] for p in net["record"]["processes"] if p["role"] == "hub")
    os.killpg(old, how)
    deadline = time.monotonic() + 30
    while alive(old) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(pause)
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    proc = launcher._spawn(
        launcher._cli("coordinator", "start", "--config", str(root / "coordinator.toml")),
        root / "logs" / "hub.log",
        env,
    )
    _replace_process(net, "hub", proc)
    assert wait_for_hub(net["record"]["address"], root / "pki" / "ca.crt", proc, 60), "the hub did not start again"


def _wait_rejoined(net, offsets: dict[str, int], timeout: float = 120.0) -> float:
    """Seconds until every node has logged a new SuperNode ID (accepted by the hub again)."""
    started = time.monotonic()
    while True:
        pending = [n for n in SITES if "SuperNode ID" not in _since(net, n, offsets[n])]
        if not pending:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, f"{', '.join(pending)} did not rejoin the hub"
        time.sleep(0.2)


def test_hub_restart_nodes_rejoin_and_the_lost_run_continues_from_its_checkpoint(net, tmp_path):
    """The hub restarts (here: crashes and is started again) while a study is in its Newton
    rounds. Every node daemon rejoins it by itself, in the same process and without a
    traceback. `iaptnet run` says the run was lost and where its checkpoint is; submitted again
    once the nodes are back, the study continues from the last completed round (the nodes
    prepare it again) and its results are the uninterrupted run's."""
    out = tmp_path / "out"
    path = study(net, "logit_resumed")
    pids = {name: node_pid(net, name) for name in SITES}
    offsets = _log_sizes(net)

    def crash_once_the_checkpoint_is_kept():
        # Freeze site0 (the study then waits for its next reply, up to the node timeout) until
        # the analyst holds a checkpoint: Flower's log stream delivers the ServerApp's events
        # with a delay that a loaded machine stretches past a short study's last round.
        pid = node_pid(net, "site0")
        os.killpg(pid, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + NODE_TIMEOUT - 2.0
            while not any((out / ".checkpoint").glob("*.json")) and time.monotonic() < deadline:
                time.sleep(0.05)
            _restart_hub(net, how=signal.SIGKILL)
        finally:
            os.killpg(pid, signal.SIGCONT)

    crash = _OnAnswer(
        net,
        "site0",
        crash_once_the_checkpoint_is_kept,
        seen=lambda text: text.count("node site0 answered glm.round") >= 2,
    )
    with crash, pytest.raises(NetworkError) as err:
        run_flower([path], net["hub"], out=out)
    assert crash.fired
    message = str(err.value)
    assert message.startswith("run ") and " was lost: the hub no longer knows it" in message, message
    assert f"kept in {out / '.checkpoint'}" in message and "run the same command again" in message
    (saved,) = (out / ".checkpoint").glob("*.json")
    kept = json.loads(saved.read_text())["round"]
    assert kept >= 2  # prepare, then at least the first Newton round
    took = _wait_rejoined(net, offsets)
    print(f"nodes rejoined the restarted hub within {took:.1f} s of the lost run's message")
    for name in SITES:
        said = _since(net, name, offsets[name])
        assert alive(pids[name]) and node_pid(net, name) == pids[name]  # the same process: no restart
        assert "Traceback" not in said and "Exit Code" not in said, said[-2000:]
        assert "reconnecting" in said
    notes = []
    resumed = run_flower([path], net["hub"], out=out, status=notes.append)[0]
    assert any(f"continuing from the checkpoint of round {kept}" in n for n in notes), notes
    assert not saved.exists()
    local = run_inprocess([path], net["network"])[0]
    assert_same(
        {k: v for k, v in resumed.items() if k not in ("engine", "created_at")},
        {k: v for k, v in local.items() if k not in ("engine", "created_at")},
    )


def _start_node(net, name: str) -> subprocess.Popen:
    """Start a node daemon again, as systemd does after it exited."""
    node_toml = net["folder"] / launcher.STATE_DIR / "nodes" / name / "node.toml"
    with open(net["folder"] / launcher.STATE_DIR / "logs" / f"{name}.log", "ab") as fh:
        fh.write(b"--- started again by the test ---\n")
        fh.flush()
        proc = subprocess.Popen(
            [sys.executable, "-m", "iaptnet.cli", "node", "start", "--config", str(node_toml), "--local-network"],
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
        )
    _replace_process(net, name, proc)
    return proc


def freeze_and_thaw(net, name: str, hold: float, *, min_nodes: int) -> tuple[dict, str]:
    """Freeze node `name` (SIGSTOP) the moment it has answered a study's prepare, for `hold`
    seconds (past the node timeout), then thaw it (SIGCONT), while the study goes on without it
    under `min_nodes`. Then run the next study on every node: returns its result (or
    {"error": ...}) and what the node logged meanwhile. If the node ended itself (its watchdog),
    it is started again first, as systemd would."""
    pid = node_pid(net, name)
    offset = _log_sizes(net)[name]

    def freeze():
        os.killpg(pid, signal.SIGSTOP)
        time.sleep(hold)
        os.killpg(pid, signal.SIGCONT)

    tag = f"{name}_{time.monotonic_ns()}"
    with _OnAnswer(net, name, freeze) as watcher:
        first = run_flower([study(net, f"freeze_{tag}", min_nodes=min_nodes)], net["hub"])[0]
    assert watcher.fired
    assert {n["name"]: n["contributed"] for n in first["nodes"]}[name] is False
    time.sleep(1.0)
    if not alive(pid):
        assert "the watchdog ends the daemon (exit code 75)" in _since(net, name, offset)
        _start_node(net, name)
        deadline = time.monotonic() + 90
        while "SuperNode ID" not in _since(net, name, offset).rsplit("started again by the test", 1)[-1]:
            assert time.monotonic() < deadline, "the node started again did not connect"
            time.sleep(0.2)
    try:
        second = run_flower([study(net, f"after_{tag}")], net["hub"])[0]
    except NetworkError as exc:
        second = {"error": str(exc)}
    return second, _since(net, name, offset)


def test_a_node_frozen_past_the_timeout_answers_the_next_study_or_restarts_itself(net):
    result, said = freeze_and_thaw(net, "site1", NODE_TIMEOUT + 4.0, min_nodes=3)
    assert "error" not in result, result
    assert result["converged"] and all(n["contributed"] for n in result["nodes"]), said[-3000:]
    assert "suspended for about" in said  # the watchdog saw the freeze for what it was


def test_node_killed_mid_study_fails_it_naming_the_node(net):
    started = time.monotonic()
    with _kill_after_answer(net, "site3") as killer, pytest.raises(NetworkError) as err:
        run_flower([study(net, "logit_killed")], net["hub"])
    assert killer.fired and "site3" in str(err.value) and f"did not answer within {NODE_TIMEOUT:g} s" in str(err.value)
    assert time.monotonic() - started < 120  # bounded by the node timeout, not Flower's 60 s+ defaults
    others = [p for p in net["record"]["processes"] if p["name"] != "site3"]
    assert all(alive(p["pid"]) for p in others)  # the hub and the other nodes keep running


def test_node_killed_mid_study_with_min_nodes_completes_without_it(net, tmp_path):
    # site3 was killed above (the hub may still count it online for a minute); kill site2 now.
    with _kill_after_answer(net, "site2") as killer:
        result = run_flower([study(net, "logit_min_nodes", min_nodes=2)], net["hub"])[0]
    write_json_atomic(tmp_path / "results.json", result)
    result = json.loads((tmp_path / "results.json").read_text())
    assert killer.fired and result["converged"]
    by_name = {n["name"]: n for n in result["nodes"]}
    assert by_name["site2"]["contributed"] is False and "did not answer" in by_name["site2"]["reason"]
    assert by_name["site0"]["contributed"] and by_name["site1"]["contributed"]
    if "site3" in by_name:
        assert by_name["site3"]["contributed"] is False
    used = net["sites"]["site0"].dropna().shape[0] + net["sites"]["site1"].dropna().shape[0]
    assert result["n"] == used
    # The estimate is the pooled fit of the nodes that stayed (within Newton's tolerance).
    two = net["folder"] / "two"
    write_network(two, {k: net["sites"][k] for k in ("site0", "site1")}, COLUMNS)
    local = run_inprocess([net["folder"] / "logit_min_nodes.toml"], two / "network.toml")[0]
    np.testing.assert_allclose(
        [t["estimate"] for t in result["terms"]], [t["estimate"] for t in local["terms"]], rtol=1e-7
    )
    assert alive(node_pid(net, "site0")) and alive(node_pid(net, "site1"))


def test_network_down_stops_exactly_its_processes(net):
    decoy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    try:
        ours = [p["pid"] for p in net["record"]["processes"]]
        stopped = launcher.down(net["network"], echo=lambda *_: None)
        assert "hub hub" in stopped
        deadline = time.monotonic() + 15
        while any(alive(pid) for pid in ours) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(pid) for pid in ours)
        assert decoy.poll() is None  # not ours: untouched
        leftovers = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    cmd = (entry / "cmdline").read_bytes().decode(errors="replace")
                except OSError:
                    continue
                if str(net["folder"] / launcher.STATE_DIR) in cmd and alive(int(entry.name)):
                    leftovers.append(cmd[:120])
        assert not leftovers
    finally:
        decoy.kill()
        decoy.wait()

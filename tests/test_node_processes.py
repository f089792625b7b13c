"""The in-process engine with its nodes in worker processes (what `iaptnet run` and `iaptnet
demo` use on a machine of two or more cores): the same estimates as statsmodels on the pooled
rows, each node's audit log and release memory kept on disk by its worker where the next run
finds them, no worker left behind, and a worker that dies reported in a sentence."""

from __future__ import annotations

import json
import os

import pytest
from glmcase import assert_matches, pooled, reference_fit, write_network, write_study
from test_glm_exact import COLUMNS, make_sites

from iaptnet.cli import main
from iaptnet.coordinator.engines.node_processes import NodeProcessGrid, assign_workers
from iaptnet.coordinator.inprocess import run_inprocess
from iaptnet.coordinator.network import load_network
from iaptnet.node.runtime import NodeConfig, runtime_for
from iaptnet.protocol.errors import IaptnetError


def _children() -> set[int]:
    path = f"/proc/{os.getpid()}/task/{os.getpid()}/children"
    return {int(p) for p in open(path).read().split()}


@pytest.fixture()
def network(tmp_path):
    sites = make_sites(seed=11)
    write_network(tmp_path, sites, COLUMNS)
    return tmp_path, pooled(sites, COLUMNS)


def test_nodes_in_worker_processes_give_the_pooled_fit_and_keep_their_audit_logs(network):
    folder, frame = network
    study = write_study(folder / "logit.toml", name="logit", family="binomial", formula="y ~ x + g + h")
    before = _children()
    result = run_inprocess([study], folder / "network.toml", workers=2)[0]
    assert _children() == before  # the workers stopped with the run
    assert_matches(result, reference_fit(frame, "y ~ x + g + h", "binomial", ["y", "x", "g", "h"]))
    for node in load_network(folder / "network.toml").nodes:
        # The worker wrote the node's log; this process (the next run) reads it whole.
        audit = runtime_for(NodeConfig.from_mapping(node)).audit
        assert audit.verify().ok
        assert sum(1 for e in audit.entries() if e.get("kind") == "glm.round") == result["rounds"] - 1


def test_a_release_remembered_by_a_worker_is_remembered_by_the_next_run(capsys, tmp_path, monkeypatch):
    """The attack of two runs that differ by one person (tests/test_attacks.py, class 2),
    the first run's nodes in worker processes and the second's in this process: the
    release memory the workers wrote on disk is what refuses the second run."""
    import tomli_w
    from test_attacks import COLUMNS as ATTACK_COLUMNS
    from test_attacks import make_frame, restart_nodes

    monkeypatch.delenv("IAPTNET_STATE_DIR")
    net = write_network(tmp_path / "net", {"trust": make_frame(), "twin": make_frame()}, ATTACK_COLUMNS)

    def run(name, where, workers):
        path = tmp_path / f"{name}.toml"
        path.write_text(tomli_w.dumps({"name": name, "family": "binomial", "formula": "y ~ x", "where": where}))
        code = main(["run", str(path), "--network", str(net), "--json", "--workers", str(workers)])
        return code, capsys.readouterr().err

    assert run("first", "h == 1", 2) == (0, "")
    restart_nodes()
    code, err = run("second", "h == 1 and age < 93", 1)
    assert code == 4 and "fewer than 8 people" in err, err


def test_the_work_is_shared_by_the_size_of_each_node_s_extract(tmp_path):
    sizes = {1: 900, 2: 500, 3: 400, 4: 100, 5: 0}
    nodes = {}
    for node_id, size in sizes.items():
        path = tmp_path / f"{node_id}.csv"
        path.write_bytes(b"x" * size)
        nodes[node_id] = {"data": str(path)}
    owner = assign_workers(nodes, 2)
    load = [sum(sizes[n] for n in owner if owner[n] == w) for w in (0, 1)]
    assert sorted(load) == [900, 1000]  # 900 | 500 + 400 + 100 (the empty one anywhere)
    assert set(owner) == set(sizes)


def _dies(msg, context):
    os._exit(7)


def test_a_worker_that_dies_is_reported_in_a_sentence_not_waited_for(network):
    folder, _ = network
    nodes = load_network(folder / "network.toml").nodes
    from flwr.app import RecordDict

    with NodeProcessGrid(nodes, workers=2, client_app=_dies) as grid:
        message = grid.create_message(RecordDict(), "query.task", 1, "g")
        with pytest.raises(IaptnetError, match=r"worker process .* stopped \(exit code 7\)"):
            grid.push_messages([message])


def test_the_command_line_runs_its_nodes_in_workers_and_checks_the_number(network, capsys):
    folder, frame = network
    study = write_study(folder / "ols.toml", name="ols", family="gaussian", formula="w ~ x + z")
    assert main(["run", str(study), "--network", str(folder / "network.toml"), "--json", "--workers", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert_matches(result, reference_fit(frame, "w ~ x + z", "gaussian", ["w", "x", "z"]))
    assert main(["run", str(study), "--network", str(folder / "network.toml"), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "--workers expects a whole number of 1 or more" in err and "Traceback" not in err


def _slow(msg, context):
    import time

    time.sleep(0.5)
    return msg


def test_a_run_stopped_while_a_worker_works_ends_it_quietly(network, capfd):
    """The coordinator stops mid-round (Ctrl-C, an error): the worker finishes its task,
    finds nobody to answer, and ends without a traceback on the analyst's terminal."""
    import time

    from flwr.app import RecordDict

    from iaptnet.coordinator.engines.node_processes import _to_bytes

    folder, _ = network
    grid = NodeProcessGrid(load_network(folder / "network.toml").nodes, workers=2, client_app=_slow)
    message = grid.create_message(RecordDict(), "query.task", 1, "g")
    worker = grid._owner[1]
    grid._pipes[worker].send([("m1", _to_bytes(message))])
    process = grid._processes[worker]
    start = time.monotonic()
    grid.close()
    assert time.monotonic() - start < 2.0 and process.exitcode == 0
    assert "Traceback" not in capfd.readouterr().err


def _run_in_a_daemon(study: str, network: str, answer) -> None:
    try:
        answer.put(run_inprocess([study], network, workers=2)[0]["terms"])
    except Exception as exc:  # noqa: BLE001 (the test shows what went wrong)
        answer.put(f"{type(exc).__name__}: {exc}")


def test_a_run_in_a_daemonic_process_answers_in_threads(network):
    """A multiprocessing pool's worker (a daemonic process) may not start processes: the nodes
    answer in its threads instead of failing ('daemonic processes are not allowed to have
    children'), with the results of worker processes."""
    import multiprocessing

    folder, _ = network
    study = write_study(folder / "logit.toml", name="logit", family="binomial", formula="y ~ x + g + h")
    expected = run_inprocess([study], folder / "network.toml", workers=2)[0]["terms"]
    context = multiprocessing.get_context("fork")
    answer = context.Queue()
    daemon = context.Process(target=_run_in_a_daemon, args=(str(study), str(folder / "network.toml"), answer))
    daemon.daemon = True
    daemon.start()
    got = answer.get(timeout=120)
    daemon.join(timeout=30)
    assert got == expected

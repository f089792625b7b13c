"""Studies that resume (issue 13): a GLM batch keeps its Newton state after every round in the
run's --out folder (coordinator/checkpoint.py, coordinator/resume.py); a run lost mid-way and
started again has the nodes prepare again and continues from the last completed round, and
its results are those of an uninterrupted run, every number identical. A checkpoint that no
longer applies (a node's data changed) is set aside with a sentence, and the run starts again.

The in-process engine plays the network; `LostHub` loses the run at a chosen round, as a
hub restart does. tests/test_flower_network.py restarts a real hub mid-study."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from glmcase import write_network, write_study

from iaptnet.cli import main
from iaptnet.coordinator.checkpoint import FOLDER, FileCheckpoints
from iaptnet.coordinator.engines.inprocess import InProcessGrid
from iaptnet.coordinator.network import load_network
from iaptnet.coordinator.runner import run_batch
from iaptnet.coordinator.studies import load_study
from iaptnet.protocol import messages as m
from iaptnet.protocol.errors import NetworkError

COLUMNS = {
    "y": {"type": "binary"},
    "count": {"type": "integer", "min": 0, "max": 1000},
    "x": {"type": "numeric"},
    "z": {"type": "numeric"},
    "e": {"type": "binary"},
    "g": {"type": "categorical", "levels": ["a", "b", "c"]},
}
SITES = ("s0", "s1", "s2")


def make_sites(seed: int = 9, shift: float = 0.0) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    sites = {}
    for name, n in zip(SITES, (300, 380, 320)):
        x = rng.normal(size=n) + shift
        z = rng.normal(size=n)
        e = (rng.random(n) < 0.45).astype(int)
        g = rng.choice(["a", "b", "c"], size=n)
        eta = -0.3 + 0.9 * x - 0.4 * z + 0.5 * e + pd.Series(g).map({"a": 0.0, "b": 0.3, "c": -0.6}).to_numpy()
        y = (rng.random(n) < 1 / (1 + np.exp(-eta))).astype(int)
        count = rng.negative_binomial(3, 3 / (3 + np.exp(0.6 + 0.3 * x)))
        frame = pd.DataFrame({"y": y, "count": count, "x": x, "z": z, "e": e, "g": g})
        sites[name] = frame
    return sites


class LostHub(InProcessGrid):
    """The in-process network, whose hub is lost (a restart) when it would push the task of
    round `at`: the run ends there with the session's own NetworkError."""

    def __init__(self, nodes, at: int | None = None):
        super().__init__(nodes)
        self.at = at
        self.asked: list[tuple[str, int]] = []

    def push_messages(self, messages):
        messages = list(messages)
        task = m.decode_task(messages[0].content)
        if self.at is not None and task.round >= self.at:
            raise NetworkError("the hub was lost")
        self.asked.append((task.kind, task.round))
        return super().push_messages(messages)


STUDIES = {
    "logit": {"family": "binomial", "formula": "y ~ x + z + g", "exposure": "x"},
    "scaled": {"family": "poisson", "formula": "count ~ scale(x) + center(z) + g"},
    "nb": {"family": "negative_binomial", "formula": "count ~ x + g"},
    "marginal": {"family": "binomial", "formula": "y ~ e + x + g", "marginal": ["e"]},
}


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume")
    write_network(folder, make_sites(), COLUMNS)
    network = load_network(folder / "network.toml")
    paths = {name: write_study(folder / f"{name}.toml", name=name, **fields) for name, fields in STUDIES.items()}
    return {"folder": folder, "network": network, "paths": paths}


def studies_of(net, names):
    return [load_study(net["paths"][n], net["network"].schema_paths) for n in names]


def without_volatile(result: dict) -> dict:
    """A result less what differs between any two runs: when it was made, and each node's
    audit head (its log grew)."""
    out = {k: v for k, v in result.items() if k != "created_at"}
    out["nodes"] = [{k: v for k, v in n.items() if k != "audit_head"} for n in result["nodes"]]
    return out


def run(net, names, grid, store=None, notes=None):
    return run_batch(grid, studies_of(net, names), engine="inprocess", checkpoints=store, announce=notes)


@pytest.mark.parametrize("at", [4, 6])
def test_a_run_lost_mid_way_continues_from_its_checkpoint_and_ends_identical(net, tmp_path, at):
    names = ["logit", "scaled", "nb", "marginal"]
    whole_grid = LostHub(net["network"].nodes)
    whole = run(net, names, whole_grid)
    store = FileCheckpoints(tmp_path)
    with pytest.raises(NetworkError, match="the hub was lost"):
        run(net, names, LostHub(net["network"].nodes, at=at), store)
    (saved,) = list((tmp_path / FOLDER).glob("*.json"))
    state = json.loads(saved.read_text())
    assert state["round"] == at - 1  # the last completed round, kept
    notes = []
    again = LostHub(net["network"].nodes)
    resumed = run(net, names, again, store, notes.append)
    assert any(f"continuing from the checkpoint of round {at - 1}" in n for n in notes), notes
    # identical, every number, to the run that was not interrupted
    assert [without_volatile(r) for r in resumed] == [without_volatile(r) for r in whole]
    # the nodes prepared again (and the scaled model's moments were the checkpoint's), then
    # only the rounds after the checkpoint were asked
    kinds = [k for k, _ in again.asked]
    assert kinds[0] == "glm.prepare" and "glm.moments" not in kinds
    assert len(again.asked) == 1 + (len(whole_grid.asked) - at + 1)
    assert not saved.exists()  # done: the checkpoint is removed


def test_a_checkpoint_taken_after_a_node_left_keeps_it_out(net, tmp_path):
    class Losing(LostHub):
        def push_messages(self, messages):
            messages = list(messages)
            task = m.decode_task(messages[0].content)
            if task.round >= 3:  # s2 stops answering from round 3 on
                messages = [msg for msg in messages if msg.metadata.dst_node_id != 3]
            return super().push_messages(messages) if messages else []

    fields = dict(STUDIES["logit"], min_nodes=2)
    path = write_study(net["folder"] / "logit_min.toml", name="logit_min", **fields)
    study = [load_study(path, net["network"].schema_paths)]

    class LosingThenLost(Losing):
        pass

    whole = run_batch(Losing(net["network"].nodes), study, engine="inprocess", timeout=0.2)[0]
    store = FileCheckpoints(tmp_path)
    with pytest.raises(NetworkError, match="the hub was lost"):
        run_batch(LosingThenLost(net["network"].nodes, at=5), study, engine="inprocess", timeout=0.2, checkpoints=store)
    # started again with every node connected: s2 answers the prepare, but the checkpoint says
    # it left, so it is left out again, with the reason it left for
    resumed = run_batch(LostHub(net["network"].nodes), study, engine="inprocess", timeout=0.2, checkpoints=store)[0]
    assert without_volatile(resumed) == without_volatile(whole)
    s2 = {n["name"]: n for n in resumed["nodes"]}["s2"]
    assert s2["contributed"] is False and s2["reason"] == "did not answer within 0.2 s"


def test_a_checkpoint_that_no_longer_applies_is_set_aside(net, tmp_path):
    names = ["logit"]
    store = FileCheckpoints(tmp_path)
    with pytest.raises(NetworkError):
        run(net, names, LostHub(net["network"].nodes, at=4), store)
    other = tmp_path / "other"
    write_network(other, make_sites(shift=0.5), COLUMNS)  # s0..s2 with new data versions
    network = load_network(other / "network.toml")
    notes = []
    result = run_batch(
        LostHub(network.nodes),
        [load_study(net["paths"]["logit"], network.schema_paths)],
        engine="inprocess",
        checkpoints=store,
        announce=notes.append,
    )[0]
    fresh = run_batch(
        LostHub(network.nodes), [load_study(net["paths"]["logit"], network.schema_paths)], engine="inprocess"
    )[0]
    assert any("the checkpoint does not apply (s0's data changed (its data version is now" in n for n in notes), notes
    assert without_volatile(result) == without_volatile(fresh)


def test_iaptnet_run_out_keeps_and_removes_its_checkpoint(net, tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        main(["run", str(net["paths"]["logit"]), "--network", str(net["folder"] / "network.toml"), "--out", str(out)])
        == 0
    )
    assert (out / "results.json").exists() and not (out / FOLDER).exists()
    capsys.readouterr()

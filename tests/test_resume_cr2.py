"""A resumed GLM batch keeps CR2's degrees of freedom (tests/test_resume.py's setting: the
in-process network, a hub lost at a chosen round, the run started again from its checkpoint).

A cov_type = "CR2" model gains its meat and Satterthwaite degrees of freedom (`fit.df`,
coordinator/cr2.py) in its CR2 round, which comes after every model of the batch has converged
and after the marginal round; checkpoints are taken after Newton rounds only. So no checkpoint
holds a CR2 model's sums: one taken while another model of the batch still iterates has the CR2
model converged without them, and the resumed run asks the marginal and CR2 rounds again, at the
same estimates. Here the batch is interrupted at each of those places (the Newton round that
ends the slowest model, the marginal round, the CR2 round before and after the nodes answered
it) and the resumed CR2 terms (estimate, std_error, df, p_value), and every other number, are
those of the uninterrupted run."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from glmcase import write_network, write_study

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
    "clinic": {"type": "integer"},
}
# The CR2 model converges in a few rounds; the negative binomial one iterates on after it.
STUDIES = {
    "cr2": {"family": "binomial", "formula": "y ~ x + z + e", "cov_type": "CR2", "cluster": "clinic"},
    "nb": {"family": "negative_binomial", "formula": "count ~ x + z"},
    "marginal": {"family": "binomial", "formula": "y ~ e + x", "marginal": ["e"]},
}
TERM_FIELDS = ("estimate", "std_error", "df", "p_value")


def make_sites(seed: int = 5) -> dict[str, pd.DataFrame]:
    """Three services of three clinics each (a clinic within one service, as CR2 needs), every
    clinic above the 100 rows a CR2 cluster needs; a clinic effect on the outcome."""
    rng = np.random.default_rng(seed)
    effect = rng.normal(scale=0.5, size=30)
    sites = {}
    for i, (name, n) in enumerate(zip(("s0", "s1", "s2"), (600, 760, 640))):
        clinic = 10 * i + rng.integers(0, 3, size=n)
        x, z = rng.normal(size=n), rng.normal(size=n)
        e = (rng.random(n) < 0.45).astype(int)
        eta = -0.3 + 0.9 * x - 0.4 * z + 0.5 * e + effect[clinic]
        y = (rng.random(n) < 1 / (1 + np.exp(-eta))).astype(int)
        count = rng.negative_binomial(3, 3 / (3 + np.exp(0.6 + 0.3 * x)))
        sites[name] = pd.DataFrame({"y": y, "count": count, "x": x, "z": z, "e": e, "clinic": clinic})
    return sites


class Hub(InProcessGrid):
    """The in-process network, recording each round's task (kind, round, and which of the
    final rounds it is), and lost at round `at`: before the nodes see it (`when="push"`), or
    after they answered it, before the coordinator reads their replies (`when="pull"`)."""

    def __init__(self, nodes, at: int | None = None, when: str = "push"):
        super().__init__(nodes)
        self.at, self.when = at, when
        self.asked: list[tuple[str, int, str]] = []
        self.current = 0

    def push_messages(self, messages):
        messages = list(messages)
        task = m.decode_task(messages[0].content)
        if self.at is not None and task.round >= self.at and self.when == "push":
            raise NetworkError("the hub was lost")
        stage = "cr2" if "cr2" in task.payload else "marginal" if "marginal" in task.payload else "newton"
        self.asked.append((task.kind, task.round, stage))
        self.current = task.round
        return super().push_messages(messages)

    def pull_messages(self, message_ids):
        if self.at is not None and self.current >= self.at and self.when == "pull":
            raise NetworkError("the hub was lost")
        return super().pull_messages(message_ids)


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume_cr2")
    write_network(folder, make_sites(), COLUMNS)
    network = load_network(folder / "network.toml")
    paths = [write_study(folder / f"{name}.toml", name=name, **fields) for name, fields in STUDIES.items()]
    studies = [load_study(path, network.schema_paths) for path in paths]
    grid = Hub(network.nodes)
    whole = run_batch(grid, studies, engine="inprocess")
    return {"network": network, "studies": studies, "whole": whole, "asked": grid.asked}


def without_volatile(result: dict) -> dict:
    """A result less what differs between any two runs: when it was made, and each node's
    audit head (its log grew)."""
    out = {k: v for k, v in result.items() if k != "created_at"}
    out["nodes"] = [{k: v for k, v in n.items() if k != "audit_head"} for n in result["nodes"]]
    return out


def round_of(asked: list, stage: str) -> int:
    (number,) = [r for kind, r, s in asked if kind == "glm.round" and s == stage]
    return number


@pytest.mark.parametrize(
    "stage, when",
    [("newton", "push"), ("marginal", "push"), ("cr2", "push"), ("cr2", "pull")],
    ids=["another-model-iterating", "marginal-round-pending", "cr2-round-pending", "cr2-replies-lost"],
)
def test_a_resumed_batch_has_the_uninterrupted_runs_cr2_terms(net, tmp_path, stage, when):
    asked = net["asked"]
    # The batch's last rounds: the marginal round, then the CR2 round, after every Newton round.
    assert [s for _, _, s in asked[-2:]] == ["marginal", "cr2"]
    if stage == "newton":  # the round after the one the CR2 model converged in (the prepare is round 1)
        at = net["whole"][0]["iterations"] + 2
    else:
        at = round_of(asked, stage)
    store = FileCheckpoints(tmp_path)
    with pytest.raises(NetworkError, match="the hub was lost"):
        run_batch(Hub(net["network"].nodes, at=at, when=when), net["studies"], engine="inprocess", checkpoints=store)
    (saved,) = list((tmp_path / FOLDER).glob("*.json"))
    state = json.loads(saved.read_text())
    cr2, nb = state["models"]["m0"]["model"], state["models"]["m1"]["model"]  # the batch's order
    assert cr2["converged"] and cr2["cov"] is not None
    if stage == "newton":  # taken while the negative binomial model still iterated
        assert not nb["converged"]
    assert cr2["meat"] is None  # its CR2 sums (meat and df) come from the CR2 round, asked again

    notes = []
    again = Hub(net["network"].nodes)
    resumed = run_batch(again, net["studies"], engine="inprocess", checkpoints=store, announce=notes.append)
    assert any(f"continuing from the checkpoint of round {state['round']}" in n for n in notes), notes
    assert [s for _, _, s in again.asked if s != "newton"] == ["marginal", "cr2"]
    whole = net["whole"]
    mine, reference = resumed[0], whole[0]
    assert mine["study"] == reference["study"] == "cr2" and mine["cov_type"] == "CR2"
    assert [t["term"] for t in mine["terms"]] == [t["term"] for t in reference["terms"]]
    for ours, theirs in zip(mine["terms"], reference["terms"]):
        assert {f: ours[f] for f in TERM_FIELDS} == {f: theirs[f] for f in TERM_FIELDS}, ours["term"]
        assert ours["df"] is not None and np.isfinite(ours["df"]) and ours["df"] > 0
    # and every other number of every model
    assert [without_volatile(r) for r in resumed] == [without_volatile(r) for r in whole]
    assert not saved.exists()

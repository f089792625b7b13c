"""A study with a random intercept is a mixed model: the node answers it through the glmm.*
tasks only. A coordinator (modified, or mistaken) that sends it as a plain glm.prepare,
glm.moments or glm.round would otherwise get a plain GLM's statistics for a study the Trust
approved, under its hash, as a mixed model. The node refuses, in one sentence naming the model,
and releases nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from nodecase import Node, assert_nothing_released, local_beta
from test_glmm import COLUMNS as GLMM_COLUMNS

from iaptnet.protocol import messages as m
from iaptnet.protocol.kinds import glm as glm_protocol
from iaptnet.protocol.kinds import glmm as glmm_protocol

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = GLMM_COLUMNS["glmm_binomial"]  # the VerbAgg extract of tests/results
FORMULA = "y ~ anger + situ"


def one_service() -> pd.DataFrame:
    """One service of lme4's VerbAgg (tests/results/glmm_binomial_input.csv): 90 people's answers."""
    frame = pd.read_csv(RESULTS / "glmm_binomial_input.csv")
    return frame[frame.site == "s1"].drop(columns="site").reset_index(drop=True)


def approving_node(folder: Path, study: dict) -> Node:
    """A node whose Trust approved exactly `study` (a mixed model) and nothing else."""
    probe = Node(folder / "probe", one_service(), COLUMNS)
    digest = Node.hash_of(probe.spec(**study))
    return Node(folder / "node", one_service(), COLUMNS, policy=f'mode = "approved"\napproved = ["{digest}"]\n')


def assert_refused_for_the_random_intercept(reply: m.Reply, name: str) -> None:
    assert_nothing_released(reply, rule="cannot_compute")
    (item,) = reply.payload["refusals"]
    sentence = item["sentence"]
    assert f"'{name}'" in sentence and "random intercept" in sentence
    assert "\n" not in sentence and sentence.count(". ") == 0


@pytest.mark.parametrize("nagq", [1, 5])
def test_glm_prepare_refuses_an_approved_study_with_a_random_intercept(tmp_path, nagq):
    study = {"name": "mixed", "family": "binomial", "formula": FORMULA, "random_intercept": "id", "nagq": nagq}
    node = approving_node(tmp_path, study)
    wire = node.spec(**study)
    reply, _ = node.prepare(wire, kind=glm_protocol.PREPARE)
    assert_refused_for_the_random_intercept(reply, "mixed")
    entry = node.audit_entries()[-1]
    assert entry["kind"] == glm_protocol.PREPARE and "released" not in entry
    assert "random intercept" in entry["refusal"][0]["sentence"]
    # The same approved study through its own tasks is answered: the refusal is the task kind's.
    reply, _ = node.prepare(wire, kind=glmm_protocol.PREPARE)
    assert reply.status == m.OK, reply.message


def test_glm_moments_refuses_a_study_with_a_random_intercept(tmp_path):
    node = Node(tmp_path, one_service(), COLUMNS)
    wire = node.spec(name="scaled", formula="y ~ scale(anger) + situ", random_intercept="id")
    reply, _ = node.prepare(wire, kind=glm_protocol.MOMENTS)
    assert_refused_for_the_random_intercept(reply, "scaled")
    reply, _ = node.prepare(wire, kind=glmm_protocol.MOMENTS)
    assert reply.status == m.OK, reply.message


def test_glm_round_refuses_a_study_prepared_with_a_random_intercept(tmp_path):
    """glmm.prepare keeps the mixed model's design under the study's hash; a glm.round on that
    hash would release the plain GLM's score and information of it."""
    node = Node(tmp_path, one_service(), COLUMNS)
    wire = node.spec(name="mixed", formula=FORMULA, random_intercept="id")
    reply, study = node.prepare(wire, kind=glmm_protocol.PREPARE)
    assert reply.status == m.OK, reply.message
    beta = local_beta(reply)
    assert_refused_for_the_random_intercept(node.round(study, {"m0": beta}), "mixed")
    # Its own rounds still are answered.
    task = m.Task(
        kind=glmm_protocol.ROUND,
        study_hash=study,
        payload={"models": ["m0"]},
        arrays={glmm_protocol.parameters_key("m0"): np.append(beta, 0.5)},
    )
    assert node.send(task).status == m.OK


def test_a_plain_glm_of_the_same_model_is_answered(tmp_path):
    """The control: without the random intercept, glm.prepare and glm.round answer."""
    node = Node(tmp_path, one_service(), COLUMNS)
    reply, study = node.prepare(node.spec(name="plain", formula=FORMULA))
    assert reply.status == m.OK, reply.message
    assert node.round(study, {"m0": local_beta(reply)}).status == m.OK

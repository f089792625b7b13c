"""The glm.* tasks fit GLM studies (`kind = "glm"`) and the GLMs another kind's study derives,
and nothing else. A modified coordinator holds a study the Trust approved of another kind
(psm, iptw, meta, its, table, access), or any study at all under the exploratory policy, and
sends arbitrary glm.* tasks; the node must not release a GLM's statistics for

- the study itself, sent as a GLM: for a psm or iptw study, the outcome regression on the
  unmatched, unweighted cohort, which the Trust never approved (it approved the matched or
  weighted one); for a meta study its formula fitted under the meta study's hash;
- a model that reads the columns the node computed for a study (its matched pairs, weights,
  segments) without being a model that study derives: under the exploratory policy any GLM
  study is answered, so a derived model with its `derived_from` dropped, in another formula,
  cohort or weighting, would reach the node's private columns;
- a model claiming an approved study that derives another model (another formula, cohort or
  weights), or claiming a study of a kind that derives no models.

Each is refused in one sentence naming the model, recorded in the audit log, and releases
nothing; the models the approved studies legitimately derive are answered."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from nodecase import Node, assert_nothing_released, local_beta

from iaptnet.protocol import messages as m
from iaptnet.protocol.kinds import glm as glm_protocol
from iaptnet.protocol.kinds import its as its_protocol
from iaptnet.protocol.kinds import meta as meta_protocol
from iaptnet.protocol.kinds import propensity as ps_protocol
from iaptnet.protocol.study import StudySpec, parse_study

COLUMNS = {
    "y": {"type": "binary"},
    "t": {"type": "binary"},
    "x1": {"type": "numeric"},
    "x2": {"type": "numeric"},
    "g": {"type": "categorical", "levels": ["a", "b", "c"]},
    "svc": {"type": "categorical", "levels": ["1", "2"]},
    "month": {"type": "integer", "min": 0, "max": 47},
    "dna": {"type": "integer", "min": 0},
    "att": {"type": "integer", "min": 0},
}

STUDIES = {
    "psm": dict(name="psm_study", kind="psm", outcome="y", exposure="t", covariates="x1 + g"),
    "iptw": dict(name="iptw_study", kind="iptw", outcome="y", exposure="t", covariates="x1 + g"),
    "meta": dict(
        name="meta_study", kind="meta", family="binomial", formula="y ~ t + x1 + svc", exposure="t", service="svc"
    ),
    "its": dict(
        name="its_study", kind="its", outcome="dna", denominator=["att"], time="month", group="svc", changes={"1": 20}
    ),
    "table": dict(name="table_study", kind="table", variables=["g", "x1"]),
}


def site(n: int = 480, seed: int = 7) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x1 = rng.normal(size=n)
    g = rng.choice(["a", "b", "c"], size=n)
    t = (rng.random(n) < 1 / (1 + np.exp(-(0.4 * x1 + 0.5 * (g == "b"))))).astype(float)
    y = (rng.random(n) < 1 / (1 + np.exp(-(-0.3 + 0.7 * t + 0.5 * x1)))).astype(float)
    month = rng.integers(0, 48, size=n)
    att = rng.poisson(3.0, size=n) + 1
    dna = rng.poisson(0.3 * att)
    svc = rng.choice(["1", "2"], size=n)
    return pd.DataFrame(
        {"y": y, "t": t, "x1": x1, "x2": rng.normal(size=n), "g": g, "svc": svc, "month": month, "dna": dna, "att": att}
    )


def study(node: Node, fields: dict) -> StudySpec:
    spec, _ = parse_study(dict(fields), node.schema, f"{fields['name']}.toml")
    return spec


def approving_node(folder: Path, *specs: StudySpec) -> Node:
    """A node whose Trust approved exactly these studies (their own hashes) and nothing else."""
    listed = ", ".join(f'"{s.hash}"' for s in specs)
    return Node(folder, site(), COLUMNS, policy=f'mode = "approved"\napproved = [{listed}]\n')


def assert_refused_naming(reply: m.Reply, name: str, *words: str) -> None:
    assert_nothing_released(reply, rule="cannot_compute")
    (item,) = reply.payload["refusals"]
    sentence = item["sentence"]
    assert f"'{name}'" in sentence, sentence
    for word in words:
        assert word in sentence, sentence
    assert "\n" not in sentence and sentence.count(". ") == 0


def assert_audited_refusal(node: Node, kind: str, *words: str) -> None:
    entry = node.audit_entries()[-1]
    assert entry["kind"] == kind and entry["status"] == m.REFUSED and "released" not in entry
    for word in words:
        assert word in entry["refusal"][0]["sentence"]


# --------------------------------------------------------------------------- the study itself


@pytest.mark.parametrize("kind", sorted(STUDIES))
def test_glm_prepare_refuses_an_approved_study_of_another_kind(tmp_path, kind):
    """A Trust approved a study of `kind`; the coordinator sends that very study (its hash is
    the approved one) as glm.prepare. For psm/iptw the study's formula is the outcome model,
    which glm.prepare would fit on the whole cohort, unmatched and unweighted."""
    probe = Node(tmp_path / "probe", site(), COLUMNS)
    spec = study(probe, STUDIES[kind])
    node = approving_node(tmp_path / "node", spec)
    reply, study_hash = node.prepare(spec.to_wire())
    assert_refused_naming(reply, spec.name, f"'{kind}'")
    assert_audited_refusal(node, glm_protocol.PREPARE, spec.name)
    # Nothing was kept for glm.round to continue.
    assert_nothing_released(node.round(study_hash, {"m0": np.zeros(3)}), rule="not_prepared")


def test_an_access_study_sent_as_a_glm_is_refused(tmp_path):
    """The same for an access study's kind (its wire form: the hash is all a node checks)."""
    node = Node(tmp_path, site(), COLUMNS)
    wire = dict(node.spec(name="access_study", formula="y ~ t"), kind="access", params={"by": ["g"]})
    reply, _ = node.prepare(wire)
    assert_refused_naming(reply, "access_study", "'access'")
    # A kind no study has is refused alike, without its text echoed.
    reply, _ = node.prepare(dict(wire, kind="glm2 <b>"))
    assert_refused_naming(reply, "access_study", "another kind")
    assert "glm2" not in reply.message


def test_glm_moments_refuses_a_study_of_another_kind(tmp_path):
    """An iptw study whose outcome model scales a covariate: glm.moments would release its
    moments over the outcome model's cohort."""
    probe = Node(tmp_path / "probe", site(), COLUMNS)
    fields = dict(STUDIES["iptw"], covariates="scale(x2) + g", adjust_outcome=True)
    spec = study(probe, fields)
    assert "scale(x2)" in spec.formula
    node = approving_node(tmp_path / "node", spec)
    reply, _ = node.prepare(spec.to_wire(), kind=glm_protocol.MOMENTS)
    assert_refused_naming(reply, spec.name, "'iptw'")
    assert_audited_refusal(node, glm_protocol.MOMENTS, spec.name)


@pytest.mark.parametrize("kind", ["psm", "iptw", "meta"])
def test_the_models_an_approved_study_derives_are_answered(tmp_path, kind):
    """The control: the same Trust answers glm.prepare and glm.round for the GLMs the study
    derives (those that read no computed columns: the propensity model, the one-stage models)."""
    probe = Node(tmp_path / "probe", site(), COLUMNS)
    spec = study(probe, STUDIES[kind])
    node = approving_node(tmp_path / "node", spec)
    models = [ps_protocol.derived_specs(spec)["ps"]] if kind != "meta" else list(meta_protocol.model_specs(spec))
    for model in models:
        reply, study_hash = node.prepare(model.to_wire())
        assert reply.status == m.OK, reply.message
        assert node.round(study_hash, {"m0": local_beta(reply)}).status == m.OK


# --------------------------------------------------------------------------- computed columns


def score(node: Node, spec: StudySpec) -> None:
    """The iptw study's first steps, as an honest coordinator runs them: the propensity model
    prepared, then scored at the node's own estimate (the node keeps logits and weights)."""
    ps = ps_protocol.derived_specs(spec)["ps"].to_wire()
    reply, study_hash = node.prepare(ps)
    assert reply.status == m.OK, reply.message
    task = m.Task(
        kind=ps_protocol.TASK_SCORE,
        study_hash=study_hash,
        payload={"models": {"m0": ps}},
        arrays={"beta": local_beta(reply)},
    )
    reply = node.send(task)
    assert reply.status == m.OK, reply.message


def columns(node: Node, spec: StudySpec) -> None:
    """An its study's first step: its.columns (the node keeps the segment columns)."""
    task = m.Task(kind=its_protocol.TASK, study_hash=spec.hash, payload={"models": {"m0": spec.to_wire()}})
    reply = node.send(task)
    assert reply.status == m.OK, reply.message


FORGERIES = {
    # the outcome model in another cohort
    "cohort": lambda d: replace(d, where="x2 > 0"),
    # in another formula, with the weights as the outcome
    "formula": lambda d: replace(
        d, family="gaussian", formula="iptw_weight ~ x1 + g", weights=None, cov_type="nonrobust"
    ),
    # unweighted
    "weights": lambda d: replace(d, weights=None, cov_type="nonrobust"),
}


@pytest.mark.parametrize("change", sorted(FORGERIES))
def test_exploratory_node_refuses_a_model_of_computed_columns_that_no_study_derives(tmp_path, change):
    """Under the default (exploratory) policy any GLM study is answered. The iptw study's
    outcome model, with its `derived_from` dropped and changed, reads the weights the node
    computed for the study in a model the study never asked for."""
    node = Node(tmp_path, site(), COLUMNS)
    spec = study(node, STUDIES["iptw"])
    score(node, spec)
    outcome = ps_protocol.derived_specs(spec)["outcome"]
    forged = FORGERIES[change](replace(outcome, name="forged", params={}))
    reply, _ = node.prepare(forged.to_wire())
    assert_refused_naming(reply, "forged", "computed")
    assert_audited_refusal(node, glm_protocol.PREPARE, "forged")
    # The study's own outcome model, naming its study, is answered.
    reply, study_hash = node.prepare(outcome.to_wire())
    assert reply.status == m.OK, reply.message
    assert node.round(study_hash, {"m0": local_beta(reply)}).status == m.OK


def test_exploratory_node_refuses_an_its_model_of_computed_columns_that_no_study_derives(tmp_path):
    node = Node(tmp_path, site(), COLUMNS)
    spec = study(node, STUDIES["its"])
    columns(node, spec)
    pooled = its_protocol.pooled_spec(spec)
    forged = replace(pooled, name="forged", params={}, where="x2 > 0")
    reply, _ = node.prepare(forged.to_wire())
    assert_refused_naming(reply, "forged", "computed")
    reply, study_hash = node.prepare(pooled.to_wire())
    assert reply.status == m.OK, reply.message
    assert node.round(study_hash, {"m0": local_beta(reply)}).status == m.OK


@pytest.mark.parametrize("change", sorted(FORGERIES))
@pytest.mark.parametrize("mode", ["approved", "exploratory"])
def test_a_model_claiming_an_approved_study_that_derives_another_is_refused(tmp_path, change, mode):
    """Keeping `derived_from` (the approved study's hash) on a changed model: the node re-derives
    the study's models and finds none equal (already closed at the gate; proved here)."""
    probe = Node(tmp_path / "probe", site(), COLUMNS)
    spec = study(probe, STUDIES["iptw"])
    node = approving_node(tmp_path / "node", spec) if mode == "approved" else Node(tmp_path / "node", site(), COLUMNS)
    score(node, spec)
    outcome = ps_protocol.derived_specs(spec)["outcome"]
    forged = FORGERIES[change](outcome)
    reply, _ = node.prepare(forged.to_wire())
    assert_nothing_released(reply, rule="invalid_study")
    assert "is not one the study 'iptw_study' derives" in reply.message
    # Dropping the claim instead: not approved (approved mode) or not derived (exploratory).
    reply, _ = node.prepare(replace(forged, params={}).to_wire())
    assert_nothing_released(reply, rule="not_approved" if mode == "approved" else "cannot_compute")


@pytest.mark.parametrize("parent_kind", ["table", "glm"])
def test_a_model_claiming_an_approved_study_that_derives_no_models_is_refused(tmp_path, parent_kind):
    probe = Node(tmp_path / "probe", site(), COLUMNS)
    if parent_kind == "table":
        parent = study(probe, STUDIES["table"])
    else:
        parent = StudySpec.from_wire(probe.spec(name="glm_study", formula="y ~ t"))
    node = approving_node(tmp_path / "node", parent)
    claim = dict(probe.spec(name="claimant", formula="y ~ t + x1"), params={"derived_from": parent.canonical()})
    reply, _ = node.prepare(claim)
    assert_nothing_released(reply, rule="invalid_study")
    assert "claims to belong to a study that derives no models" in reply.message

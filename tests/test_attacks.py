"""The attack suite: a curious or malicious coordinator against one node.

Each case plays the coordinator, sending tasks straight to the node's Flower ClientApp (no
coordinator-side validation in the way), and asserts that the node refuses and that nothing
it released reveals a row: the refused reply carries no arrays and no number but the
policy's thresholds, no value of the target's row appears in any text, and the audit log
records the refusal with nothing released. Where part of an attack is legitimately answered
(the first model of a differencing pair), the case asserts the other part was refused, so
the difference that would reveal the row never leaves the node.

The target is one person, "Bob" (row 0), who has values no one else has. ATTACKS lists every
case; the README ("The Trust stays in control") reports them (tried, refused, leaked) and a test keeps the two in
step.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.app import ConfigRecord, RecordDict

from iaptnet.protocol import messages as m
from iaptnet.protocol.errors import SpecError
from nodecase import Node, assert_nothing_released, local_beta

BOB_X = 7.31234
BOB_BONUS = 5.5512
SECRETS = ("7.31234", "5.5512", "93")
N = 400
EXTRA = [f"n{i}" for i in range(1, 56)]

COLUMNS = {
    "y": {"type": "binary"},
    "x": {"type": "numeric"},
    "x2": {"type": "numeric"},
    "age": {"type": "integer"},
    "h": {"type": "binary"},
    "g": {"type": "categorical", "levels": ["a", "b", "c", "rare"]},
    "unit": {"type": "categorical", "levels": ["p", "q"]},
    "bonus": {"type": "numeric"},
    "wmiss": {"type": "numeric"},
    **{name: {"type": "numeric"} for name in EXTRA},
}

ATTACKS = {
    "differencing_filter": "the same model on a cohort, then on that cohort minus one person",
    "differencing_missing_covariate": "the same model again with a covariate missing only for the target",
    "differencing_complement": "a cohort of everyone but the target (complement of one)",
    "differencing_in_one_task": "both cohorts of a differencing pair in one task",
    "cohort_of_three": "a model on a cohort of three people",
    "saturated_model": "more parameters than a third of the rows",
    "single_person_level": "a categorical level held by one person",
    "single_person_column": "a numeric term non-zero for one person",
    "single_person_interaction": "an interaction cell held by one person",
    "near_duplicate_terms": "two terms equal for everyone but the target (leverage 1)",
    "extreme_beta_huge": "coefficients of 1e6",
    "extreme_beta_not_finite": "coefficients that are NaN or infinite",
    "beta_isolates_one_row": "bounded coefficients that put every fitted weight on the target",
    "beta_isolates_all_but_one": "bounded coefficients that put every weight but the target's at 1",
    "beta_bulk_constant": "coefficients that give everyone the same fit except the target",
    "beta_round_difference": "a round differing from an answered round only in the target's fit",
    "replayed_task": "a task answered before, sent again",
    "stale_task": "a task issued two days ago",
    "unknown_task_kind": "a task kind the node does not know",
    "disallowed_task_kind": "a task kind the Trust's policy does not allow",
    "huge_payload": "a 3 MB task",
    "nested_payload": "a task payload nested 100,000 levels deep",
    "filter_injection": "cohort filters that try to run code, reach attributes or nest deeply",
    "formula_injection": "formulas that try to run code, reach attributes or nest deeply",
    "merge_injection": "level merges on columns and levels the schema does not have",
    "study_not_approved": "a study hash the Trust did not approve",
    "study_hash_mislabelled": "an approved study's hash on a different study",
    "round_without_prepare": "rounds for a study the node refused to prepare",
    "too_many_rounds": "more tasks for one study than the policy allows in a day",
    "too_many_studies": "more studies in a day than the policy allows",
}


def make_frame(seed: int = 11) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = np.clip(rng.normal(size=N), -3, 3)
    x[0] = BOB_X
    x2 = x.copy()
    x2[0] = 0.0
    age = rng.integers(18, 80, size=N)
    age[:3] = [93, 86, 87]
    h = np.zeros(N, dtype=int)
    h[:150] = 1
    g = rng.choice(["a", "b", "c"], size=N).astype(object)
    g[0] = "rare"
    unit = np.array(["p"] * N, dtype=object)
    unit[200:230] = "q"  # all with h = 0
    unit[0] = "q"
    bonus = np.zeros(N)
    bonus[0] = BOB_BONUS
    wmiss = rng.normal(size=N)
    wmiss[0] = np.nan
    eta = 0.4 * np.clip(x, -3, 3) + 0.3 * h - 0.2
    y = (rng.random(N) < 1 / (1 + np.exp(-eta))).astype(int)
    y[0] = 1
    frame = pd.DataFrame({"y": y, "x": x, "x2": x2, "age": age, "h": h, "g": g, "unit": unit,
                          "bonus": bonus, "wmiss": wmiss})
    for name in EXTRA:
        frame[name] = rng.normal(size=N)
    return frame


@pytest.fixture
def node(tmp_path):
    return Node(tmp_path / "node", make_frame(), COLUMNS)


def policy_node(tmp_path, text: str) -> Node:
    return Node(tmp_path / "node", make_frame(), COLUMNS, policy=text)


def refused(node: Node, reply: m.Reply, rule: str | None = None) -> None:
    """The node refused, released nothing, and logged exactly that."""
    assert_nothing_released(reply, rule=rule, secrets=SECRETS)
    last = node.audit_entries()[-1]
    assert last["status"] == reply.status and "released" not in last
    assert last["task_id"] == reply.task_id or reply.task_id == ""


def ok(reply: m.Reply) -> m.Reply:
    assert reply.status == m.OK, reply.message
    return reply


# --------------------------------------------------------------------------- differencing

def test_differencing_filter(node):
    ok(node.prepare(node.spec(formula="y ~ x", where="h == 1"))[0])
    reply, _ = node.prepare(node.spec(formula="y ~ x", where="h == 1 and age < 90"))
    refused(node, reply, "min_subset_difference")


def test_differencing_missing_covariate(node):
    ok(node.prepare(node.spec(formula="y ~ x", where="h == 1"))[0])
    reply, _ = node.prepare(node.spec(formula="y ~ x + wmiss", where="h == 1"))
    refused(node, reply, "min_subset_difference")


def test_differencing_complement(node):
    reply, _ = node.prepare(node.spec(formula="y ~ x", where="age < 90"))
    refused(node, reply, "min_subset_difference")
    assert "leave out fewer than 8" in reply.message


def test_differencing_in_one_task(node):
    reply, _ = node.prepare(node.spec(name="a", formula="y ~ x", where="h == 1"),
                            node.spec(name="b", formula="y ~ x", where="h == 1 and age < 90"))
    refused(node, reply, "min_subset_difference")


def test_differencing_is_remembered_across_a_restart(tmp_path):
    policy = 'mode = "exploratory"\nstate_dir = "state"\n'
    first = policy_node(tmp_path, policy)
    ok(first.prepare(first.spec(formula="y ~ x", where="h == 1"))[0])
    from iaptnet.node import runtime as rt

    rt._RUNTIMES.clear()  # a restarted node: fresh runtime, same state folder
    rt._STATES.clear()
    reply, _ = first.prepare(first.spec(formula="y ~ x", where="h == 1 and age < 90"))
    refused(first, reply, "min_subset_difference")


# --------------------------------------------------------------------------- small and saturated

def test_cohort_of_three(node):
    reply, _ = node.prepare(node.spec(formula="y ~ x", where="age > 85"))
    refused(node, reply, "min_rows")


def test_saturated_model(node):
    reply, _ = node.prepare(node.spec(formula="y ~ " + " + ".join(EXTRA), where="h == 1"))
    refused(node, reply, "max_params_per_row")


def test_single_person_level(node):
    reply, _ = node.prepare(node.spec(formula="y ~ x + g"))
    refused(node, reply, "min_level_count")
    (item,) = [r for r in reply.payload["refusals"] if r["rule"] == "min_level_count"]
    assert (item["term"], item["level"], item["threshold"]) == ("g", "rare", 8)
    assert "[merge.g]" in item["fix"] and "drop the term 'g'" in item["fix"]
    # The fix works: with the level merged the model is answered.
    ok(node.prepare(node.spec(formula="y ~ x + g", merge={"g": {"c": ["c", "rare"]}}))[0])


def test_single_person_column(node):
    reply, _ = node.prepare(node.spec(formula="y ~ x + bonus"))
    refused(node, reply, "min_level_count")
    assert "design column 'bonus'" in reply.message


def test_single_person_interaction(node):
    reply, _ = node.prepare(node.spec(formula="y ~ unit * h"))
    refused(node, reply, "min_level_count")
    assert "unit[T.q]:h" in reply.message


def test_near_duplicate_terms(node):
    reply, _ = node.prepare(node.spec(formula="y ~ x + x2 + h"))
    refused(node, reply, "max_leverage")


# --------------------------------------------------------------------------- probing with beta

@pytest.fixture
def prepared(node):
    reply, study = node.prepare(node.spec(formula="y ~ x + h"))
    ok(reply)
    return node, study, local_beta(reply)


def test_extreme_beta_huge(prepared):
    node, study, _ = prepared
    refused(node, node.round(study, {"m0": [1e6, 1e6, 0.0]}), "max_abs_coefficient")


def test_extreme_beta_not_finite(prepared):
    node, study, _ = prepared
    refused(node, node.round(study, {"m0": [np.nan, 0.0, 0.0]}), "finite_coefficients")
    refused(node, node.round(study, {"m0": [0.0, np.inf, 0.0]}), "finite_coefficients")


def test_beta_isolates_one_row(prepared):
    node, study, beta = prepared
    ok(node.round(study, {"m0": beta}))  # the honest round is answered
    refused(node, node.round(study, {"m0": [-40.0, 8.0, 0.0]}), "min_effective_rows")


def test_beta_isolates_all_but_one(prepared):
    node, study, _ = prepared
    refused(node, node.round(study, {"m0": [40.0, -8.0, 0.0]}), "min_effective_rows")


def test_beta_bulk_constant(tmp_path):
    # With the leverage rule off, a design with two nearly equal terms is prepared; a round
    # whose fit is the same for everyone but the target is still refused.
    node = policy_node(tmp_path, 'mode = "exploratory"\n[rules]\nmax_leverage = 1.0\n[exploratory]\nmax_leverage = 1.0\n')
    reply, study = node.prepare(node.spec(formula="y ~ x + x2 + h"))
    ok(reply)
    refused(node, node.round(study, {"m0": [0.1, 30.0, -30.0, 0.0]}), "min_effective_rows")


def test_beta_round_difference(tmp_path):
    node = policy_node(tmp_path, 'mode = "exploratory"\n[rules]\nmax_leverage = 1.0\n[exploratory]\nmax_leverage = 1.0\n')
    reply, study = node.prepare(node.spec(formula="y ~ x + x2 + h"))
    ok(reply)
    beta = np.array([-0.2, 0.2, 0.2, 0.3])
    ok(node.round(study, {"m0": beta}))
    # The same coefficients but for the x - x2 direction, which only the target's row has.
    probe = beta + np.array([0.0, 5.0, -5.0, 0.0])
    refused(node, node.round(study, {"m0": probe}), "min_effective_rows")
    assert "compared with a round this node already answered" in node.audit_entries()[-1]["refusal"][0]["sentence"]


# --------------------------------------------------------------------------- the gate

def test_replayed_task(node):
    task = m.Task(kind=m.GLM_PREPARE, study_hash="", payload={})
    wire = node.spec(formula="y ~ x")
    task.payload = {"models": {"m0": wire}, "transform_state": {}}
    task.study_hash = node.hash_of(wire)
    ok(node.send(task))
    refused(node, node.send(task), "replay")


def test_stale_task(node):
    wire = node.spec(formula="y ~ x")
    task = m.Task(kind=m.GLM_PREPARE, study_hash=node.hash_of(wire),
                  payload={"models": {"m0": wire}, "transform_state": {}},
                  issued_at=time.time() - 2 * 86400)
    refused(node, node.send(task), "max_task_age")


def test_unknown_task_kind(node):
    reply = node.send(m.Task(kind="python.exec", study_hash="x", payload={"code": "import os"}))
    refused(node, reply, "task_kind")


def test_disallowed_task_kind(tmp_path):
    node = policy_node(tmp_path, 'mode = "exploratory"\ntasks = ["glm.prepare", "glm.round"]\n')
    reply, _ = node.prepare(node.spec(formula="y ~ center(x)"), kind=m.GLM_MOMENTS)
    refused(node, reply, "task_kind")


def test_huge_payload(node, monkeypatch):
    def never(_):
        raise AssertionError("a huge task was decoded")

    monkeypatch.setattr(m, "decode_task", never)
    task = m.Task(kind=m.GLM_PREPARE, study_hash="x", payload={"junk": "x" * 3_000_000})
    refused(node, node.send(task), "max_payload_bytes")


def test_nested_payload(node):
    content = RecordDict({"task": ConfigRecord({
        "version": 1, "kind": m.GLM_PREPARE, "study_hash": "x", "round": 0,
        "task_id": "ab" * 16, "issued_at": time.time(),
        "payload": "[" * 100_000 + "]" * 100_000})})
    start = time.perf_counter()
    reply = node.send_content(content)
    assert time.perf_counter() - start < 2.0
    assert_nothing_released(reply, secrets=SECRETS)
    assert reply.code == "bad_task"


FILTERS = [
    "__import__('os').system('touch pwned')",
    "x.__class__ == 1",
    "x > 1; import os",
    "(" * 1000 + "x > 1" + ")" * 1000,
    "not " * 1000 + "x > 1",
    "x in [" + ", ".join(["1"] * 2000) + "]",
    " or ".join(["x > 1"] * 2000),
    "exec == 1",
    "g == 'a' or __builtins__ == 1",
]


@pytest.mark.parametrize("where", FILTERS, ids=range(len(FILTERS)))
def test_filter_injection(node, where, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    wire = node.spec(formula="y ~ x")
    wire["where"] = where  # sent as is: the node checks it itself
    start = time.perf_counter()
    reply, _ = node.prepare(wire)
    assert time.perf_counter() - start < 2.0
    refused(node, reply, "invalid_study")
    assert not (tmp_path / "pwned").exists()


FORMULAS = [
    "y ~ __import__('os').system('touch pwned')",
    "y ~ x.__class__",
    "y ~ I(x.__class__.__bases__)",
    "y ~ {open('/etc/passwd')}",
    "y ~ I(eval('1'))",
    "y ~ I(lambda: 1)",
    "y ~ np.load('x')",
    "y ~ C(g, levels=__import__('os'))",
    "y ~ I(9 ** 9 ** 9)",
    "y ~ I(x ** 10 ** 10 ** 10)",
    "y ~ " + "(" * 500 + "x" + ")" * 500,
    "y ~ (x + g + h + unit) ** 40",
    "y ~ " + " + ".join(f"I(x ** {i % 9 + 1})" for i in range(2000)),
]


@pytest.mark.parametrize("formula", FORMULAS, ids=range(len(FORMULAS)))
def test_formula_injection(node, formula, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    wire = node.spec(formula="y ~ x")
    wire["formula"] = formula
    start = time.perf_counter()
    reply, _ = node.prepare(wire)
    assert time.perf_counter() - start < 2.0
    refused(node, reply, "invalid_study")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("merge", [
    {"x": {"a": ["a", "b"]}},
    {"g": {"z": ["a", "nope"]}},
    {"nope": {"z": ["a", "b"]}},
    {"g": {"z": ["a", "b", "c", "rare"]}},
    {"g": "__import__('os')"},
])
def test_merge_injection(node, merge):
    wire = node.spec(formula="y ~ x + g", merge={"g": {"c": ["c", "rare"]}})
    wire["merge"] = merge
    try:
        digest = Node.hash_of(wire)
    except SpecError:
        digest = "0" * 64  # not even hashable: the node must still refuse cleanly
    reply, _ = node.prepare(wire, study_hash=digest)
    refused(node, reply, "invalid_study")


# --------------------------------------------------------------------------- approval and volume

def test_study_not_approved(tmp_path):
    node = policy_node(tmp_path, 'mode = "approved"\napproved = []\n')
    reply, _ = node.prepare(node.spec(formula="y ~ x"))
    refused(node, reply, "not_approved")
    assert "has not approved the study 's'" in reply.message


def test_study_hash_mislabelled(tmp_path):
    approved = Node(tmp_path / "probe", make_frame(), COLUMNS).spec(formula="y ~ x")
    digest = Node.hash_of(approved)
    node = policy_node(tmp_path, f'mode = "approved"\napproved = ["{digest}"]\n')
    ok(node.prepare(approved)[0])  # the approved study itself runs
    other = node.spec(formula="y ~ x + g", merge={"g": {"c": ["c", "rare"]}})
    reply, _ = node.prepare(other, study_hash=digest)
    refused(node, reply, "study_hash")
    reply, _ = node.prepare(other)  # under its own hash: not approved
    refused(node, reply, "not_approved")


def test_round_without_prepare(node):
    reply, study = node.prepare(node.spec(formula="y ~ x + g"))
    refused(node, reply, "min_level_count")
    refused(node, node.round(study, {"m0": [0.0] * 5}), "not_prepared")


def test_too_many_rounds(tmp_path):
    node = policy_node(tmp_path, 'mode = "exploratory"\n[rules]\nmax_rounds_per_study = 3\n')
    reply, study = node.prepare(node.spec(formula="y ~ x + h"))
    beta = local_beta(ok(reply))
    ok(node.round(study, {"m0": beta}))
    ok(node.round(study, {"m0": beta * 0.999}))
    refused(node, node.round(study, {"m0": beta * 0.998}), "max_rounds_per_study")


def test_too_many_studies(tmp_path):
    node = policy_node(tmp_path, 'mode = "exploratory"\n[rules]\nmax_studies_per_day = 2\n')
    ok(node.prepare(node.spec(name="one", formula="y ~ x"))[0])
    ok(node.prepare(node.spec(name="two", formula="y ~ x"))[0])
    reply, _ = node.prepare(node.spec(name="three", formula="y ~ x"))
    refused(node, reply, "max_studies_per_day")


# --------------------------------------------------------------------------- the report

def test_every_attack_has_a_test_and_a_line_in_the_report():
    here = Path(__file__).read_text()
    report = (Path(__file__).parents[1] / "README.md").read_text()
    for name in ATTACKS:
        assert f"def test_{name}(" in here, name
        assert f"`{name}`" in report, name
    assert f"{len(ATTACKS)} attacks tried, {len(ATTACKS)} refused, 0 leaked" in report


def test_honest_rounds_are_answered(prepared):
    # The control: Newton-like rounds around the node's own fit are answered, every time.
    node, study, beta = prepared
    for step in (0.5, 0.8, 0.95, 1.0):
        reply = ok(node.round(study, {"m0": beta * step}))
        assert set(reply.arrays) == {"score/m0", "info/m0", "stats/m0"}
    entry = node.audit_entries()[-1]
    released = entry["released"]["arrays"]["score/m0"]["values"]
    assert released == reply.arrays["score/m0"].tolist()
    assert json.dumps(entry)  # the audit entry is plain JSON

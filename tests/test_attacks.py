"""The attack suite: a curious or malicious coordinator against one node.

Each case plays the coordinator, sending tasks straight to the node's Flower ClientApp (no
coordinator-side validation in the way), and asserts that the node refuses and that nothing
it released reveals a row: the refused reply carries no arrays and no number but the
policy's thresholds, no value of the target's row appears in any text, and the audit log
records the refusal with nothing released. Where part of an attack is legitimately answered
(the first model of a differencing pair), the case asserts the other part was refused, so
the difference that would reveal the row never leaves the node.

The target is one person, "Bob" (row 0), who has values no one else has. ATTACKS lists every
case; docs/governance/attack-suite.md reports them (tried, refused, leaked) and a test keeps the
two in step.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.app import ConfigRecord, RecordDict
from nodecase import ApprovingNode, Node, assert_nothing_released, local_beta

from iaptnet.node.audit import logged_array
from iaptnet.protocol import messages as m
from iaptnet.protocol.errors import SpecError
from iaptnet.protocol.kinds import glm as glm_protocol
from iaptnet.protocol.study import parse_study

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
    "big": {"type": "numeric"},  # ordinary values, the target's 1e200
    "spike": {"type": "numeric"},  # 1e-41 for everyone, the target's 1.0
    "wt_spike": {"type": "numeric", "min": 0},  # 0 for everyone, the target's 1.0
    "wt_tiny": {"type": "numeric", "min": 0},  # 1e-9 for everyone, the target's 1.0
    "count": {"type": "integer", "min": 0},
    "score": {"type": "numeric"},
    "solo": {"type": "categorical", "levels": ["crowd", "alone"]},  # "alone": the target only
    **{name: {"type": "numeric"} for name in EXTRA},
    "visits": {"type": "integer", "min": 0},  # over-dispersed counts below 20, the target's 61
}
BOB_VISITS = 61

ATTACKS = {
    "differencing_filter": "the same model on a cohort, then on that cohort minus one person",
    "differencing_missing_covariate": "the same model again with a covariate missing only for the target",
    "differencing_complement": "a cohort of everyone but the target (complement of one)",
    "differencing_in_one_task": "both cohorts of a differencing pair in one task",
    "a_count_cell_that_combines_with_three_models_to_one_person": "three models on A, B, C, then a rounded count cell that is A + B - C plus the target, at a rounding boundary",
    "a_count_cell_that_combines_with_a_summary_and_two_models": "the same with A's exact size from a table's summary instead of a model",
    "three_models_that_complete_a_shown_count_cell": "the same in the other order: the table first, then the three models",
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
    "combination_of_three_cohorts": "three cohorts, pairwise far apart, whose combination is one person",
    "combination_across_kinds_through_the_cli": "a GLM's sums and two tables' means that combine to one person",
    "memory_across_runs_under_the_default_policy": "two runs without a policy file, differing by one person",
    "memory_across_a_restart_and_kinds": "a table, a node restart, then a GLM differing from it by one person",
    "prior_weights_zero_for_all_but_the_target": "prior weights 0 for everyone but one person",
    "prior_weights_negligible_for_all_but_the_target": "prior weights 1e-9 for everyone but one person",
    "offset_concentrated_on_the_target": "an offset of 1 for one person and 1e-41 for the rest",
    "an_offset_whose_exponential_rests_on_a_few_rows": "an offset of 8 * age, which a log link turns into weights on the oldest few",
    "two_designs_that_differ_in_one_row": "two designs whose columns differ only in one person's value",
    "interaction_against_a_cohort": "x:h over everyone against x over the h cohort minus one person",
    "transforms_outside_the_whitelist": "a term scaled to 1e-30, high or nested powers, exp, products of columns, an unbounded log",
    "a_column_that_overflows_the_leverage_check": "a column whose square overflows the leverage check to NaN",
    "a_statistic_that_overflows_is_never_released": "an information matrix that overflows, with leverage off",
    "empty_and_small_cohorts_get_the_same_answer": "a cohort of 0 against a cohort of 1 (the person's outcome)",
    "a_small_cohort_is_refused_for_its_size_alone": "a cohort of 3 whose refusal would name a level one of them holds",
    "a_computation_that_fails_on_the_target_says_nothing_more": "a transform that overflows for one person only",
    "refusals_that_answer_questions_are_rationed": "many yes/no questions asked through refusals",
    "cells_withheld_by_the_audit_are_rationed_like_refusals": "many yes/no questions asked through table cells the differencing audit withholds",
    "a_threshold_withheld_by_the_audit_is_rationed_like_a_refusal": "the same through quantile thresholds withheld for combining with other studies'",
    "a_by_group_of_one_shows_nothing_through_the_cli": "a table column of one person beside exact zeros",
    "the_maximum_cannot_be_bisected": "thresholds at, below and beyond the maximum",
    "a_quantile_at_the_top_is_never_the_maximum_through_the_cli": "a quantile at p = 0.9999",
    "a_table_of_three_people_is_refused": "a table of a cohort of three",
    "thresholds_of_three_studies_that_combine_to_one_person": "quantile thresholds on three cohorts whose combination is 13 people, one of them below the threshold",
    "thresholds_combine_across_a_restart": "two cohorts' thresholds, a node restart, then the third cohort's",
    "a_bisection_resumed_after_a_restart_remembers_its_bins": "two columns' thresholds, a node restart, then the third column's, which combine to three people",
    "rounded_counts_of_two_tables_that_differ_in_one_person": "two tables whose h == 1 cells differ by the target alone, one count above a rounding boundary",
    "a_rounded_count_beside_an_exact_model_count": "a model's exact count of a cell's rows, then the cell without the target, rounded",
    "rounded_counts_that_differ_in_one_person_through_the_cli": "the two tables of a rounding-boundary difference through `iaptnet run`",
    "a_study_name_cannot_write_outside_out": "a study named ../../escaped",
    "a_deeply_nested_study_file_is_one_sentence": "a study file nested 3,000 levels deep",
    "a_filter_that_pins_the_released_variable": "a cohort whose outcome the filter fixes, plus the target through another column",
    "a_condition_that_sets_a_few_people_apart_answers_no_question": "age < 94 then age < 93 beside y == v: the refusal as a question about y",
    "a_condition_of_a_few_people_is_refused_alone": "a filter condition that admits, or leaves out, one person",
    "rows_at_the_boundary_are_not_released": "a round's count of rows beyond a coefficient-chosen cut",
    "round_history_survives_a_restart": "a probing round sent after a node restart",
    "a_robust_middle_term_on_one_row": "HC0 middle term at coefficients leaving one non-zero residual",
    "three_models_whose_columns_combine_to_one_row": "x ~ age, x ~ I(age ** 2), x ~ I(age ** 3): a combination of their sums is one person",
    "a_cluster_of_one": "cluster-robust SEs with the target alone in his cluster",
    "theta_rounds_the_outcome": "a negative binomial theta of 2^58, at which theta + y drops every count below 32",
    "marginal_rounds_differ_in_one_row": "two marginal-effect rounds whose fitted means with the exposure set differ only in the target's",
    "marginal_contrast_isolates_one_row": "two rounds of a categorical contrast whose fitted means with every row set to one level differ only in the target's",
    "theta_weighs_one_row": "a tiny negative binomial theta that weighs the target's outcome 16 times anyone else's",
    "a_cr2_cluster_of_the_target_and_thirty": "CR2 SEs with the target's cluster 31 people large (enough for cluster-robust SEs, not for a model)",
    "cr2_clusters_that_differ_in_one_person": "two CR2 studies whose clusters differ only by where the target is",
    "a_cr2_covariance_no_pooled_fit_gives": "a CR2 round whose covariance is 100 times the inverse of the node's own information",
    "a_cr2_round_that_gives_the_target_leverage": "coefficients whose IRLS weights give the target a leverage of 0.89, then a CR2 round at them",
    "a_cr2_cluster_alone_on_a_term": "CR2 clustered on a term's own values, so that one cluster alone determines it ((I - H)^-1/2 infinite)",
    "a_random_intercept_group_of_one": "a random intercept whose groups leave the target alone in his",
    "random_intercept_groups_that_differ_in_one_person": "two random-intercept studies whose groups differ only by where the target is",
    "a_random_intercept_round_that_isolates_one_row": "coefficients and sigma that put every fitted weight at the groups' modes on the target",
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
    big = rng.normal(size=N)
    big[0] = 1e200
    spike = np.full(N, 1e-41)
    spike[0] = 1.0
    wt_spike = np.zeros(N)
    wt_spike[0] = 1.0
    wt_tiny = np.full(N, 1e-9)
    wt_tiny[0] = 1.0
    count = rng.poisson(2.0, size=N)
    score = 10 + 3 * x + rng.normal(size=N)
    solo = np.array(["crowd"] * N, dtype=object)
    solo[0] = "alone"
    frame = pd.DataFrame(
        {
            "y": y,
            "x": x,
            "x2": x2,
            "age": age,
            "h": h,
            "g": g,
            "unit": unit,
            "bonus": bonus,
            "wmiss": wmiss,
            "big": big,
            "spike": spike,
            "wt_spike": wt_spike,
            "wt_tiny": wt_tiny,
            "count": count,
            "score": score,
            "solo": solo,
        }
    )
    for name in EXTRA:
        frame[name] = rng.normal(size=N)
    visits = np.minimum(rng.negative_binomial(1, 0.35, size=N), 19)
    visits[0] = BOB_VISITS
    frame["visits"] = visits
    return frame


#: A strict exploratory policy: every rule a notch stricter than the defaults.
STRICT = (
    'mode = "exploratory"\n[exploratory]\nmin_rows = 120\nmin_level_count = 10\nmin_effective_rows = 20\n'
    "max_leverage = 0.3\n"
)


@pytest.fixture(params=["default", "strict", "approved"])
def node(request, tmp_path):
    """The target's node under the default policy (no policy file), a strict exploratory
    policy, and approved mode with a Trust that approves every study sent."""
    if request.param == "approved":
        return ApprovingNode(tmp_path / "node", make_frame(), COLUMNS)
    return Node(tmp_path / "node", make_frame(), COLUMNS, policy=STRICT if request.param == "strict" else None)


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
    reply, _ = node.prepare(node.spec(formula="y ~ x + wmiss"))  # everyone but the target
    refused(node, reply, "min_subset_difference")
    assert "leave out fewer than 8" in reply.message


def test_differencing_in_one_task(node):
    reply, _ = node.prepare(
        node.spec(name="a", formula="y ~ x", where="h == 1"),
        node.spec(name="b", formula="y ~ x", where="h == 1 and age < 90"),
    )
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
    assert (item["term"], item["level"]) == ("g", "rare")
    assert item["threshold"] == node.runtime.policy.rules_for(isinstance(node, ApprovingNode)).min_level_count
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
    node = policy_node(
        tmp_path,
        'mode = "exploratory"\n[rules]\nmax_leverage = 1.0\nmax_combined_leverage = 1.0\n[exploratory]\nmax_leverage = 1.0\nmax_combined_leverage = 1.0\n',
    )
    reply, study = node.prepare(node.spec(formula="y ~ x + x2 + h"))
    ok(reply)
    refused(node, node.round(study, {"m0": [0.1, 30.0, -30.0, 0.0]}), "min_effective_rows")


def test_beta_round_difference(tmp_path):
    node = policy_node(
        tmp_path,
        'mode = "exploratory"\n[rules]\nmax_leverage = 1.0\nmax_combined_leverage = 1.0\n[exploratory]\nmax_leverage = 1.0\nmax_combined_leverage = 1.0\n',
    )
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
    task = m.Task(kind=glm_protocol.PREPARE, study_hash="", payload={})
    wire = node.spec(formula="y ~ x")
    task.payload = {"models": {"m0": wire}, "transform_state": {}}
    task.study_hash = node.hash_of(wire)
    ok(node.send(task))
    refused(node, node.send(task), "replay")


def test_stale_task(node):
    wire = node.spec(formula="y ~ x")
    task = m.Task(
        kind=glm_protocol.PREPARE,
        study_hash=node.hash_of(wire),
        payload={"models": {"m0": wire}, "transform_state": {}},
        issued_at=time.time() - 2 * 86400,
    )
    refused(node, node.send(task), "max_task_age")


def test_unknown_task_kind(node):
    reply = node.send(m.Task(kind="python.exec", study_hash="x", payload={"code": "import os"}))
    refused(node, reply, "task_kind")


def test_disallowed_task_kind(tmp_path):
    node = policy_node(tmp_path, 'mode = "exploratory"\ntasks = ["glm.prepare", "glm.round"]\n')
    reply, _ = node.prepare(node.spec(formula="y ~ center(x)"), kind=glm_protocol.MOMENTS)
    refused(node, reply, "task_kind")


def test_huge_payload(node, monkeypatch):
    def never(_):
        raise AssertionError("a huge task was decoded")

    monkeypatch.setattr(m, "decode_task", never)
    task = m.Task(kind=glm_protocol.PREPARE, study_hash="x", payload={"junk": "x" * 3_000_000})
    refused(node, node.send(task), "max_payload_bytes")


def test_nested_payload(node):
    content = RecordDict(
        {
            "task": ConfigRecord(
                {
                    "version": 1,
                    "kind": glm_protocol.PREPARE,
                    "study_hash": "x",
                    "round": 0,
                    "task_id": "ab" * 16,
                    "issued_at": time.time(),
                    "payload": "[" * 100_000 + "]" * 100_000,
                }
            )
        }
    )
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


@pytest.mark.parametrize(
    "merge",
    [
        {"x": {"a": ["a", "b"]}},
        {"g": {"z": ["a", "nope"]}},
        {"nope": {"z": ["a", "b"]}},
        {"g": {"z": ["a", "b", "c", "rare"]}},
        {"g": "__import__('os')"},
    ],
)
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
    """The governance documentation's attack table lists exactly these cases."""
    here = Path(__file__).read_text()
    report = (Path(__file__).parents[1] / "docs" / "governance" / "attack-suite.md").read_text()
    for name in ATTACKS:
        assert f"def test_{name}(" in here, name
        assert f"`{name}`" in report, name
    assert sum(line.startswith("| `") for line in report.splitlines()) == len(ATTACKS)
    assert f"{len(ATTACKS)} attacks tried, {len(ATTACKS)} refused, 0 leaked" in report


def test_honest_rounds_are_answered(prepared):
    # The control: Newton-like rounds around the node's own fit are answered, every time.
    node, study, beta = prepared
    for step in (0.5, 0.8, 0.95, 1.0):
        reply = ok(node.round(study, {"m0": beta * step}))
        assert set(reply.arrays) == {"score/m0", "info/m0", "stats/m0"}
    entry = node.audit_entries()[-1]
    released = logged_array(entry["released"]["arrays"]["score/m0"])
    assert released.tolist() == reply.arrays["score/m0"].tolist()  # bit for bit
    assert json.dumps(entry)  # the audit entry is plain JSON


# =========================================================================== the classes of
# attack a determined analyst found with study files alone (issue 9). Each case is built so
# that, if it were answered, it would give the target's planted value exactly; the case first
# checks that arithmetic on the frame, then that the node refuses with nothing released.

from glmcase import write_network  # noqa: E402

from iaptnet.cli import main as cli_main  # noqa: E402
from iaptnet.node import runtime as node_runtime  # noqa: E402
from iaptnet.protocol.kinds.describe import QUANTILE_TASK, TABLE_TASK  # noqa: E402

APPROVED = 'mode = "approved"\napproved = []\n'


def cli_network(tmp_path, policy: str | None = None) -> Path:
    """The attack frame as a one-node network behind the CLI (`iaptnet run`)."""
    return write_network(
        tmp_path / "net", {"trust": make_frame()}, COLUMNS, policies={"trust": policy} if policy else None
    )


@pytest.fixture(params=["default", "strict", "approved"])
def cli_policy(request) -> str | None:
    """The node's policy for a case run through the CLI: none (the default), a strict
    exploratory one, or approved mode, where `cli_run` has the Trust approve every study."""
    return {"default": None, "strict": STRICT, "approved": APPROVED}[request.param]


def cli_run(capsys, tmp_path, network: Path, **study) -> tuple[int, str, Path]:
    """Run one study; a node in approved mode has its Trust approve it first (`node approve`)."""
    import tomli_w

    study.setdefault("family", "binomial")
    study = {k: v for k, v in study.items() if v is not None}
    slug = "".join(ch if ch.isalnum() else "_" for ch in study["name"])
    path = tmp_path / f"{slug}.toml"
    path.write_text(tomli_w.dumps(study))
    policy = network.parent / "trust_policy.toml"
    if policy.exists() and policy.read_text().startswith('mode = "approved"'):
        approve = [
            "node",
            "approve",
            str(path),
            "--policy",
            str(policy),
            "--schema",
            str(network.parent / "schema.toml"),
        ]
        assert cli_main([*approve, "--yes"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    out = tmp_path / f"out-{slug}"
    code = cli_main(["run", str(path), "--network", str(network), "--out", str(out)])
    err = capsys.readouterr().err
    return code, err, out


def cli_refused(code: int, err: str, out: Path, rule_words: str) -> None:
    """The CLI stopped with one sentence naming the refusal, wrote nothing, showed no value."""
    assert code == 4, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert rule_words in err, err
    assert not out.exists()
    for secret in SECRETS:
        assert secret not in err


def restart_nodes() -> None:
    """A node process restarted: every runtime and its in-memory state gone."""
    node_runtime._RUNTIMES.clear()
    node_runtime._STATES.clear()


def table_task(node: Node, **fields) -> m.Reply:
    fields.setdefault("name", "t")
    spec, _ = parse_study({"kind": "table", **fields}, node.schema, "t.toml")
    return node.send(
        m.Task(kind=TABLE_TASK, study_hash=spec.hash, payload={"models": {"m0": spec.to_wire()}})
    ), spec.hash


# --------------------------------------------------------------------------- 1. combinations


def test_combination_of_three_cohorts(node):
    """All rows, then age < 50, then 50 <= age < 93: pairwise the cohorts differ by hundreds,
    but all - (age < 50) - (50..92) is the target alone, so the third release's events would
    give the target's outcome."""
    frame = make_frame()
    a, b = frame.age < 50, (frame.age >= 50) & (frame.age < 93)
    assert frame.y.sum() - frame.y[a].sum() - frame.y[b].sum() == frame.y[0]  # the leak, if answered
    ok(node.prepare(node.spec(name="all", formula="y ~ x"))[0])
    ok(node.prepare(node.spec(name="young", formula="y ~ x", where="age < 50"))[0])
    reply, _ = node.prepare(node.spec(name="rest", formula="y ~ x", where="age >= 50 and age < 93"))
    refused(node, reply, "min_subset_difference")
    assert "combination" in reply.message


def test_combination_across_kinds_through_the_cli(capsys, tmp_path, cli_policy):
    """A GLM on everyone (its X'X holds the sum of x), then a table's exact mean of x on
    age < 60 and on 60 <= age < 93: the sum minus both tables' sums is the target's x."""
    frame = make_frame()
    a, b = frame.age < 60, (frame.age >= 60) & (frame.age < 93)
    assert abs(frame.x.sum() - frame.x[a].sum() - frame.x[b].sum() - BOB_X) < 1e-9
    net = cli_network(tmp_path, cli_policy)
    assert cli_run(capsys, tmp_path, net, name="everyone", formula="y ~ x")[0] == 0
    code, err, _ = cli_run(
        capsys,
        tmp_path,
        net,
        name="young",
        kind="table",
        where="age < 60",
        variables=[{"name": "x", "resolution": 0.5}],
        family=None,
    )
    assert code == 0, err
    code, err, out = cli_run(
        capsys,
        tmp_path,
        net,
        name="older",
        kind="table",
        where="age >= 60 and age < 93",
        variables=[{"name": "x", "resolution": 0.5}],
        family=None,
    )
    # A table withholds a summary rather than refuse: the mean that would close the
    # combination is not in results.json, and neither is the target's x.
    if code == 0:
        result = json.loads((out / "results.json").read_text())
        summary = result["tables"][0]["summary"][0]
        assert summary["mean"] is None and summary["suppressed"]
        assert "7.312" not in (out / "results.json").read_text()
    else:
        cli_refused(code, err, out, "fewer than 8 people")


#: Models small enough to count the rows around a count cell (a Trust may lower min_rows).
SMALL_MODELS = 'mode = "exploratory"\n[rules]\nmin_rows = 20\n[exploratory]\nmin_rows = 20\n'


def cell_combination(frame: pd.DataFrame) -> tuple[int, list[str], int]:
    """An age cut k, and three cohorts whose combination A + B - C is everyone aged k or more
    with y == 1 but the target (unit 'q' with h == 1): A = y == 1 in unit 'p', B = y == 1 with
    h == 0, C = their overlap. Their exact sizes (a model's information matrix gives them)
    add up to one above a rounding boundary (187: shown as 185, 188 as 190), so a table's
    rounded count of y == 1 on those ages says the target's y."""
    for k in range(18, 70):
        old = frame.age >= k
        sizes = [
            int(((frame.y == 1) & (frame.unit == "p") & old).sum()),
            int(((frame.y == 1) & (frame.h == 0) & old).sum()),
            int(((frame.y == 1) & (frame.h == 0) & (frame.unit == "p") & old).sum()),
        ]
        known = sizes[0] + sizes[1] - sizes[2]
        if known % 5 == 2 and min(sizes) >= 20 and sizes[1] - sizes[2] >= 8:
            cohorts = [
                f"y == 1 and unit == 'p' and age >= {k}",
                f"y == 1 and h == 0 and age >= {k}",
                f"y == 1 and h == 0 and unit == 'p' and age >= {k}",
            ]
            return k, cohorts, known
    raise AssertionError("no cut for the cell combination in the attack frame")


def test_a_count_cell_that_combines_with_three_models_to_one_person(tmp_path):
    """Three models on A, B and C, then a table of y on the ages: every pair of row sets
    differs by dozens, but the y == 1 cell is A + B - C plus the target, so its rounded count
    (190 against 185) would give the target's y. The cell is withheld: joined to the span of
    everything released, it would lift the target's leverage to 1."""
    frame = make_frame()
    k, cohorts, known = cell_combination(frame)
    assert round(known / 5) * 5 != round((known + 1) / 5) * 5  # the leak, if shown
    node = policy_node(tmp_path, SMALL_MODELS)
    for i, where in enumerate(cohorts):
        ok(node.prepare(node.spec(name=f"m{i}", formula="score ~ x", family="gaussian", where=where))[0])
    reply, _ = table_task(node, where=f"age >= {k}", variables=["y"])
    assert_cell_hidden_with_a_partner(shown_counts(ok(reply)), "v0", "1/0")


def test_a_count_cell_that_combines_with_a_summary_and_two_models(tmp_path):
    """The same combination with A's exact size read from a table's summary of n1 on A (its
    n is exact) instead of a model: the summary's rows are A's recorded rows, whose count cell
    joined the span with that table, so the y == 1 cell is still withheld."""
    frame = make_frame()
    k, cohorts, _ = cell_combination(frame)
    node = policy_node(tmp_path, SMALL_MODELS)
    reply, _ = table_task(node, name="a", where=cohorts[0], variables=["n1"])
    assert ok(reply).payload["summaries"]["v0/0"]["n"] > 0
    for i, where in enumerate(cohorts[1:], start=1):
        ok(node.prepare(node.spec(name=f"m{i}", formula="score ~ x", family="gaussian", where=where))[0])
    reply, _ = table_task(node, where=f"age >= {k}", variables=["y"])
    assert_cell_hidden_with_a_partner(shown_counts(ok(reply)), "v0", "1/0")


def test_three_models_that_complete_a_shown_count_cell(tmp_path):
    """The same in the other order: the table first (its y == 1 cell shown, rounded), then the
    three models; the last one would complete the combination, and is refused."""
    frame = make_frame()
    k, cohorts, _ = cell_combination(frame)
    node = policy_node(tmp_path, SMALL_MODELS)
    reply, _ = table_task(node, where=f"age >= {k}", variables=["y"])
    assert shown_counts(ok(reply))["v0"]["1/0"] is not None
    replies = [
        node.prepare(node.spec(name=f"m{i}", formula="score ~ x", family="gaussian", where=w))[0]
        for i, w in enumerate(cohorts)
    ]
    assert [r.status for r in replies[:2]] == [m.OK, m.OK]
    refused(node, replies[2], "max_combined_leverage")


# --------------------------------------------------------------------------- 2. memory


def test_memory_across_runs_under_the_default_policy(capsys, tmp_path, monkeypatch):
    """No policy file, two runs: the second differs from the first by the target. The node
    keeps what it released on disk beside the network file, so the second run is refused."""
    monkeypatch.delenv("IAPTNET_STATE_DIR")
    frame = make_frame()
    assert frame.y[(frame.h == 1)].sum() - frame.y[(frame.h == 1) & (frame.age < 93)].sum() == frame.y[0]
    net = cli_network(tmp_path)
    assert cli_run(capsys, tmp_path, net, name="first", formula="y ~ x", where="h == 1")[0] == 0
    restart_nodes()
    code, err, out = cli_run(capsys, tmp_path, net, name="second", formula="y ~ x", where="h == 1 and age < 93")
    cli_refused(code, err, out, "fewer than 8 people")
    assert (net.parent / ".iaptnet-state" / "trust" / "releases").is_dir()


def test_memory_across_a_restart_and_kinds(node):
    """A table's exact mean of x over h == 1, a restart, then a GLM on h == 1 without the
    target: its X'X sum of x beside the table's would give the target's x."""
    reply, _ = table_task(node, where="h == 1", variables=[{"name": "x", "resolution": 0.5}])
    ok(reply)
    assert "v0/0" in reply.payload["summaries"]
    restart_nodes()
    reply, _ = node.prepare(node.spec(formula="y ~ x", where="h == 1 and age < 93"))
    refused(node, reply, "min_subset_difference")


# --------------------------------------------------------------------------- 3. unjudged inputs


def test_prior_weights_zero_for_all_but_the_target(node):
    """Weights 0 for everyone but the target: the weighted sums are the target's values."""
    reply, _ = node.prepare(node.spec(formula="y ~ x", weights="wt_spike"))
    refused(node, reply, "min_rows")


def test_prior_weights_negligible_for_all_but_the_target(node):
    """Weights 1e-9 for everyone but the target: every row counts, yet the sums are the
    target's values to nine digits."""
    reply, _ = node.prepare(node.spec(formula="y ~ x", weights="wt_tiny"))
    refused(node, reply, "prior_weights")


def test_offset_concentrated_on_the_target(node):
    """An offset of 1 for the target and 1e-41 for everyone else shapes only the target's
    fitted count: the rounds' difference with and without it isolates the target."""
    reply, _ = node.prepare(node.spec(family="poisson", formula="count ~ x", offset="spike"))
    refused(node, reply, "offset")


@pytest.mark.parametrize("scale", [2, 8])
def test_an_offset_whose_exponential_rests_on_a_few_rows(node, scale):
    """`scale * age` is an ordinary column (it varies over every row), but a log link turns it
    into exp(scale * age): the node's own fit at prepare weighs the oldest people e^(6 scale)
    times the next, so its information over its weight sum is their x, and a meta study's own
    estimate is theirs. Every fit a node makes at coefficients it chose is judged as a round
    at them: the GLM, random-intercept and meta prepares refuse (or, where the fit runs off,
    send no estimate); a gentle offset is answered."""
    frame = make_frame()
    oldest = frame.age.to_numpy() >= 86
    heavy = np.exp(scale * frame.age.to_numpy(dtype=float) - scale * 93.0)
    assert heavy[oldest].sum() / heavy.sum() > 0.99  # the weights an answer would rest on
    offset = f"{scale} * age"
    glm_study = node.spec(name="glm", family="poisson", formula="count ~ x", offset=offset)
    refused(node, node.prepare(glm_study)[0], "min_effective_rows")
    mixed = node.spec(name="mixed", family="poisson", formula="count ~ x", offset=offset, random_intercept="unit")
    refused(node, node.prepare(mixed, kind="glmm.prepare")[0], "min_effective_rows")
    meta = node.spec(
        name="meta", kind="meta", family="poisson", formula="count ~ x + h", exposure="h", service="unit", offset=offset
    )
    reply = node.prepare(meta, kind="meta.local_fit")[0]
    if scale == 2:  # an estimate, resting on the oldest few: refused
        refused(node, reply, "min_effective_rows")
    else:  # the fit runs off before any estimate: none is sent
        assert ok(reply).payload["models"]["m0"] == {"has_rows": True, "estimable": False}
    gentle = node.spec(name="gentle", family="poisson", formula="count ~ x", offset="0.02 * age")
    ok(node.prepare(gentle)[0])


def test_two_designs_that_differ_in_one_row(node):
    """y ~ x, then y ~ x2 where x2 equals x for everyone but the target: X'y of the two
    differ by the target's x times their outcome."""
    frame = make_frame()
    assert abs((frame.x * frame.y).sum() - (frame.x2 * frame.y).sum() - BOB_X * frame.y[0]) < 1e-9
    ok(node.prepare(node.spec(name="one", formula="y ~ x + h"))[0])
    reply, _ = node.prepare(node.spec(name="two", formula="y ~ x2 + h"))
    refused(node, reply, "min_subset_difference")
    assert "column" in reply.message


def test_interaction_against_a_cohort(node):
    """x:h over everyone is x on the h == 1 rows; x over h == 1 without the target differs
    from it only in the target's row, though the two cohorts differ by 250 people."""
    ok(node.prepare(node.spec(name="inter", formula="y ~ x:h"))[0])
    reply, _ = node.prepare(node.spec(name="cohort", formula="y ~ x", where="h == 1 and age < 93"))
    refused(node, reply, "min_subset_difference")


@pytest.mark.parametrize(
    "formula",
    ["y ~ x + I(x2 * 1e-30)", "y ~ I(x ** 5)", "y ~ exp(x)", "y ~ I(x * x2)", "y ~ log(x)", "y ~ I((x ** 2) ** 2)"],
)
def test_transforms_outside_the_whitelist(node, formula):
    """Sent straight to the node (no coordinator validation): a term scaled to 1e-30, a high
    power, an exponential, a product of columns, a log the schema does not keep finite, a
    nested power — each could shape a column onto one row; the node's own check refuses."""
    wire = node.spec(formula="y ~ x")
    wire["formula"] = formula
    reply, _ = node.prepare(wire)
    refused(node, reply, "invalid_study")


# --------------------------------------------------------------------------- 4. fail open


def test_a_column_that_overflows_the_leverage_check(node):
    """big is ordinary for everyone and 1e200 for the target: its square overflows, which
    made the leverage check NaN (and NaN > limit is false). Its X'y entry is 1e200 times the
    target's outcome."""
    reply, _ = node.prepare(node.spec(formula="y ~ x + big"))
    refused(node, reply)
    assert reply.payload["refusals"][0]["rule"] in ("max_leverage", "cannot_compute")


def test_a_statistic_that_overflows_is_never_released(tmp_path):
    """With the leverage rule switched off by the Trust, the same column's information
    matrix is infinite: the node refuses rather than send a non-finite number (the X'y beside
    it would still be the target's outcome times 1e200)."""
    node = policy_node(
        tmp_path,
        'mode = "exploratory"\n[rules]\nmax_leverage = 1.0\nmax_combined_leverage = 1.0\n[exploratory]\nmax_leverage = 1.0\nmax_combined_leverage = 1.0\n',
    )
    reply, _ = node.prepare(node.spec(family="gaussian", formula="score ~ x + big"))
    refused(node, reply)
    assert reply.payload["refusals"][0]["rule"] in ("not_finite", "cannot_compute")


# --------------------------------------------------------------------------- 5. oracles


def _same_answer(a: m.Reply, b: m.Reply) -> None:
    assert a.status == b.status and a.code == b.code and a.payload == b.payload and a.message == b.message


def test_empty_and_small_cohorts_get_the_same_answer(tmp_path):
    """age == 93 and y == 1 holds the target or no one, depending on their outcome: the two
    answers must be identical, or the refusal tells the outcome."""
    frame = make_frame()
    assert frame.y[0] == 1 and ((frame.age == 93) & (frame.y == 0)).sum() == 0
    first = Node(tmp_path / "a", frame, COLUMNS)
    holds, _ = first.prepare(first.spec(formula="y ~ x", where="age == 93 and y == 1"))
    second = Node(tmp_path / "b", frame, COLUMNS, name="trust2")
    empty, _ = second.prepare(second.spec(formula="y ~ x", where="age == 93 and y == 0"))
    refused(first, holds, "min_rows")
    refused(second, empty, "min_rows")
    _same_answer(holds, empty)


def test_a_small_cohort_is_refused_for_its_size_alone(node):
    """age >= 86 holds three people, the target among them with the only 'rare' level: the
    refusal names the size rule only, never the rare level (which would say the target is in
    the cohort and has it)."""
    reply, _ = node.prepare(node.spec(formula="y ~ g + x", where="age >= 86"))
    refused(node, reply, "min_rows")
    assert [r["rule"] for r in reply.payload["refusals"]] == ["min_rows"]
    assert "rare" not in reply.message and "level" not in reply.message


def test_a_computation_that_fails_on_the_target_says_nothing_more(tmp_path):
    """big ** 3 overflows for the target alone: on a cohort of the target it used to fail
    ("not finite") where a cohort of someone else was refused for its size. Both now get
    the size rule's one answer."""
    frame = make_frame()
    first = Node(tmp_path / "a", frame, COLUMNS)
    target, _ = first.prepare(first.spec(formula="y ~ I(big ** 3)", where="age == 93"))
    second = Node(tmp_path / "b", frame, COLUMNS, name="trust2")
    other, _ = second.prepare(second.spec(formula="y ~ I(big ** 3)", where="age == 86"))
    refused(first, target, "min_rows")
    _same_answer(target, other)


def test_refusals_that_answer_questions_are_rationed(tmp_path):
    """Each refusal of the data's rules answers a yes/no question; after the policy's daily
    number the node answers nothing more that day, honest studies included."""
    node = policy_node(
        tmp_path, 'mode = "exploratory"\n[exploratory]\nmax_refusals_per_day = 3\n[rules]\nmax_refusals_per_day = 3\n'
    )
    for age in (90, 91, 92):
        refused(node, node.prepare(node.spec(name=f"q{age}", formula="y ~ x", where=f"age > {age}"))[0], "min_rows")
    reply, _ = node.prepare(node.spec(name="honest", formula="y ~ x"))
    refused(node, reply, "max_refusals_per_day")


# --------------------------------------------------------------------------- 6. small cells


def test_a_by_group_of_one_shows_nothing_through_the_cli(capsys, tmp_path, cli_policy):
    """A table by `solo`, whose level 'alone' is the target: a suppressed total beside
    exact zeros would give the target's level of g. Every cell of that column is hidden."""
    net = cli_network(tmp_path, cli_policy)
    code, err, out = cli_run(
        capsys, tmp_path, net, name="solo_table", kind="table", by="solo", variables=["g", "h"], family=None
    )
    assert code == 0, err
    result = json.loads((out / "results.json").read_text())
    alone = result["columns"].index(next(c for c in result["columns"] if c.get("level") == "alone"))
    assert result["group_sizes"][alone]["count"] is None
    for table in result["tables"]:
        for row in table["rows"]:
            assert row["cells"][alone]["count"] is None, (table["variable"], row["row"])


def test_the_maximum_cannot_be_bisected(node):
    """Thresholds at, below and beyond the target's age (the maximum): every one of them is
    withheld alike, so bisection can find neither the maximum nor whether 93 is it."""
    reply, study = table_task(node, variables=["age"])
    ok(reply)
    for t in (92.0, 93.0, 1000.0, 86.5):
        reply = node.send(m.Task(kind=QUANTILE_TASK, study_hash=study, arrays={"t/0/0": np.array([t])}))
        assert reply.status == m.OK and not reply.payload.get("thresholds"), t
    reply = node.send(m.Task(kind=QUANTILE_TASK, study_hash=study, arrays={"t/0/0": np.array([50.0])}))
    assert reply.payload["thresholds"]["v0/0/0"]["count"] == int((make_frame().age <= 50).sum())


def test_a_quantile_at_the_top_is_never_the_maximum_through_the_cli(capsys, tmp_path, cli_policy):
    net = cli_network(tmp_path, cli_policy)
    code, err, out = cli_run(
        capsys,
        tmp_path,
        net,
        name="top",
        kind="table",
        variables=[{"name": "age", "quantiles": [0.5, 0.9999]}],
        family=None,
    )
    assert code == 0, err
    summary = json.loads((out / "results.json").read_text())["tables"][0]["summary"][0]
    top = summary["quantiles"][1]
    assert not top["exact"] and top["value"] is None and top["high"] != 93.0 and top["low"] < 86


def test_a_table_of_three_people_is_refused(node):
    reply, _ = table_task(node, where="age >= 86", variables=["g", "h"])
    refused(node, reply, "min_rows")


def thresholds_frame() -> pd.DataFrame:
    """The attack frame with the target aged 50 and the lowest n1 (-1.2345) of the 13 people
    aged 50 or 51 (the others' n1 above 0.1), though 54 people in all have n1 <= -1."""
    frame = make_frame()
    frame.loc[0, "age"] = 50
    pair = frame.age.between(50, 51)
    frame.loc[pair, "n1"] = frame.loc[pair, "n1"].abs() + 0.1
    frame.loc[0, "n1"] = -1.2345
    return frame


def test_thresholds_of_three_studies_that_combine_to_one_person(tmp_path):
    """Quantile thresholds of n1 in three tables: everyone, age < 50 and age > 51. Every
    cohort and every pair of threshold sets differs by dozens, but everyone minus the two
    cohorts is the 13 people aged 50 or 51, so the three counts at a threshold t combine to
    the number of them with n1 <= t: 1 at t = -1 and 0 at t = -1.3, and bisection between
    would give the target's n1 exactly. At every threshold at least one of the three counts is
    withheld once the three studies' thresholds could combine."""
    frame = thresholds_frame()
    d = frame.age.between(50, 51)
    assert ((frame.n1 <= -1.0) & d).sum() == 1 and ((frame.n1 <= -1.3) & d).sum() == 0  # the leak
    node = Node(tmp_path / "node", frame, COLUMNS)
    studies = {}
    for name, where in (("everyone", None), ("young", "age < 50"), ("old", "age > 51")):
        reply, studies[name] = table_task(node, name=name, variables=["n1"], **({"where": where} if where else {}))
        assert "v0/0" in ok(reply).payload["summaries"]
    for t in (-1.0, -1.3, -1.1, -1.2):
        counts = []
        for study in studies.values():
            reply = node.send(m.Task(kind=QUANTILE_TASK, study_hash=study, arrays={"t/0/0": np.array([t])}))
            counts.append(ok(reply).payload.get("thresholds", {}).get("v0/0/0", {}).get("count"))
        assert None in counts, (t, counts)


def test_thresholds_combine_across_a_restart(tmp_path):
    """The first two tables' thresholds, a node restart, then the third table's: the node
    keeps every threshold set it answered on disk, per variable, so the third study's counts
    still cannot complete the combination."""
    frame = thresholds_frame()
    node = Node(tmp_path / "node", frame, COLUMNS)
    studies = {}
    for name, where in (("everyone", None), ("young", "age < 50"), ("old", "age > 51")):
        reply, studies[name] = table_task(node, name=name, variables=["n1"], **({"where": where} if where else {}))
        ok(reply)
    counts = {}
    for name in ("everyone", "young"):
        reply = node.send(m.Task(kind=QUANTILE_TASK, study_hash=studies[name], arrays={"t/0/0": np.array([-1.0])}))
        counts[name] = ok(reply).payload["thresholds"]["v0/0/0"]["count"]
    restart_nodes()
    reply, again = table_task(node, name="old", variables=["n1"], where="age > 51")
    ok(reply)
    reply = node.send(m.Task(kind=QUANTILE_TASK, study_hash=again, arrays={"t/0/0": np.array([-1.0])}))
    assert not ok(reply).payload.get("thresholds"), counts


def test_a_threshold_withheld_by_the_audit_is_rationed_like_a_refusal(tmp_path):
    """The three studies' thresholds of the case above under a policy of one refusal a day:
    the third study's withheld count answered one yes/no question, so the node's next task,
    of any study, is refused for the day's ration."""
    limit = 'mode = "exploratory"\n[exploratory]\nmax_refusals_per_day = 1\n[rules]\nmax_refusals_per_day = 1\n'
    node = Node(tmp_path / "node", thresholds_frame(), COLUMNS, policy=limit)
    studies = {}
    for name, where in (("everyone", None), ("young", "age < 50"), ("old", "age > 51")):
        reply, studies[name] = table_task(node, name=name, variables=["n1"], **({"where": where} if where else {}))
        ok(reply)
    answered = []
    for study in studies.values():
        reply = node.send(m.Task(kind=QUANTILE_TASK, study_hash=study, arrays={"t/0/0": np.array([-1.0])}))
        answered.append(bool(ok(reply).payload.get("thresholds")))
    assert answered == [True, True, False]
    reply = node.send(m.Task(kind=QUANTILE_TASK, study_hash=studies["everyone"], arrays={"t/0/0": np.array([0.5])}))
    refused(node, reply, "max_refusals_per_day")


def test_a_bisection_resumed_after_a_restart_remembers_its_bins(tmp_path):
    """A table of n2 by h: the count at or below t overall and among h == 0 (the difference is
    the h == 1 people at or below t), a node restart (the process forgets its bins), the study
    prepared again, then the count among h == 1 at or below s, three of them fewer: the
    combination would count the three h == 1 people between s and t. The node judges the new
    threshold with the ones it keeps on disk and withholds it."""
    frame = make_frame()
    group = np.sort(frame.n2[frame.h == 1].to_numpy())
    s_, t_ = float(group[59]), float(group[62])
    overall, young = (frame.n2 <= t_).sum(), ((frame.h == 0) & (frame.n2 <= t_)).sum()
    assert overall - young - ((frame.h == 1) & (frame.n2 <= s_)).sum() == 3  # the leak, if answered
    node = Node(tmp_path / "node", frame, COLUMNS)
    reply, study = table_task(node, name="n2", by="h", variables=["n2"])
    ok(reply)
    arrays = {"t/0/0": np.array([t_]), "t/0/1": np.array([t_])}
    reply = node.send(m.Task(kind=QUANTILE_TASK, study_hash=study, arrays=arrays))
    assert set(ok(reply).payload["thresholds"]) == {"v0/0/0", "v0/1/0"}
    restart_nodes()
    reply, again = table_task(node, name="n2", by="h", variables=["n2"])
    assert again == study
    ok(reply)
    reply = node.send(m.Task(kind=QUANTILE_TASK, study_hash=study, arrays={"t/0/2": np.array([s_])}))
    assert not ok(reply).payload.get("thresholds")


def pinned_cut(frame: pd.DataFrame) -> int:
    """An age cut whose cohort holds a number of h == 1 people one above a rounding
    boundary (143 rounds to 145, 142 to 140) and, among the 'q' unit the target shares with
    30 h == 0 people, at least 8: an analyst who learnt that exact count from a model's
    information matrix can tell from two rounded counts whether one person is in a cell."""
    for cut in range(18, 70):
        h1 = int(((frame.h == 1) & (frame.age >= cut)).sum())
        if h1 % 5 == 3 and int(((frame.unit == "q") & (frame.age >= cut)).sum()) >= 8:
            return cut
    raise AssertionError("no pinned cut in the attack frame")


def shown_counts(reply: m.Reply) -> dict:
    return reply.payload.get("tables", {})


def assert_cell_hidden_with_a_partner(tables: dict, section: str, cell: str) -> None:
    """The cell is not released, and neither is it the one unknown of the cohort's relation
    (cohort = the variable's rows): a second cell of that relation is hidden too."""
    assert cell not in tables.get(section, {}), tables
    column = cell.split("/")[1]
    relation = [tables.get("N", {}).get(column), *(tables.get(section, {}).get(f"{r}/{column}") for r in range(3))]
    assert sum(v is None for v in relation) >= 2, tables


def test_rounded_counts_of_two_tables_that_differ_in_one_person(node):
    """Two tables of h: on age >= cut (143 with h == 1: shown as 145), then on the same ages
    in unit 'p', which leaves out the target and 29 people with h == 0. The cohorts differ by
    30, but the h == 1 cells differ by the target alone: shown as 140 the second time, which
    says the target has h == 1 (143 - 1 rounds down, 143 would not). The second table's
    h == 1 cell is withheld, with a partner, so no rounding can say it."""
    frame = make_frame()
    cut = pinned_cut(frame)
    first, _ = table_task(node, where=f"age >= {cut}", variables=["h"])
    assert shown_counts(ok(first))["v0"]["1/0"] == 145
    second, _ = table_task(node, name="t2", where=f"age >= {cut} and unit == 'p'", variables=["h"])
    assert_cell_hidden_with_a_partner(shown_counts(ok(second)), "v0", "1/0")


def test_a_rounded_count_beside_an_exact_model_count(node):
    """A model on the h == 1 people aged cut or more releases their number exactly (143);
    a table of h on the same ages in unit 'p' would show that cell, one person fewer, as
    140. The cell differs from the model's rows by the target alone and is withheld."""
    frame = make_frame()
    cut = pinned_cut(frame)
    ok(node.prepare(node.spec(name="exact", formula="y ~ n1", where=f"h == 1 and age >= {cut}"))[0])
    reply, _ = table_task(node, name="t", where=f"age >= {cut} and unit == 'p'", variables=["h"])
    assert_cell_hidden_with_a_partner(shown_counts(ok(reply)), "v0", "1/0")


def test_rounded_counts_that_differ_in_one_person_through_the_cli(capsys, tmp_path, cli_policy):
    """The two tables of the first case through `iaptnet run`: the second table's h == 1
    count is not in its results.json (the first one's is 145)."""
    cut = pinned_cut(make_frame())
    net = cli_network(tmp_path, cli_policy)
    code, err, out = cli_run(
        capsys, tmp_path, net, name="first", kind="table", where=f"age >= {cut}", variables=["h"], family=None
    )
    assert code == 0, err
    rows = json.loads((out / "results.json").read_text())["tables"][0]["rows"]
    assert rows[1]["cells"][0]["count"] == 145, rows
    code, err, out = cli_run(
        capsys,
        tmp_path,
        net,
        name="second",
        kind="table",
        where=f"age >= {cut} and unit == 'p'",
        variables=["h"],
        family=None,
    )
    assert code == 0, err
    rows = json.loads((out / "results.json").read_text())["tables"][0]["rows"]
    assert rows[1]["cells"][0]["count"] is None, rows


def test_cells_withheld_by_the_audit_are_rationed_like_refusals(tmp_path):
    """A cell the differencing audit withholds (the second table of the case above) says that
    its rows differ by a few people from a remembered set, as a refusal would: one yes/no
    answer. Each table that withholds one counts against max_refusals_per_day, so an analyst
    cannot ask that question without limit; after the policy's number the node answers
    nothing more that day."""
    node = policy_node(
        tmp_path, 'mode = "exploratory"\n[exploratory]\nmax_refusals_per_day = 2\n[rules]\nmax_refusals_per_day = 2\n'
    )
    cut = pinned_cut(make_frame())
    ok(table_task(node, where=f"age >= {cut}", variables=["h"])[0])
    for name in ("t2", "t3"):
        reply, _ = table_task(node, name=name, where=f"age >= {cut} and unit == 'p'", variables=["h"])
        assert_cell_hidden_with_a_partner(shown_counts(ok(reply)), "v0", "1/0")
    reply, _ = table_task(node, name="t4", where=f"age >= {cut} and unit == 'p'", variables=["h"])
    refused(node, reply, "max_refusals_per_day")


def test_the_same_withheld_answer_again_is_counted_once(tmp_path):
    """The second table of the case above, sent again (the same question on the same data, the
    same cells withheld) tells nothing new and is not counted again; another table that
    withholds is, and uses up the day's two."""
    node = policy_node(
        tmp_path, 'mode = "exploratory"\n[exploratory]\nmax_refusals_per_day = 2\n[rules]\nmax_refusals_per_day = 2\n'
    )
    cut = pinned_cut(make_frame())
    ok(table_task(node, where=f"age >= {cut}", variables=["h"])[0])
    for name in ("t2", "t2", "t3"):
        reply, _ = table_task(node, name=name, where=f"age >= {cut} and unit == 'p'", variables=["h"])
        assert_cell_hidden_with_a_partner(shown_counts(ok(reply)), "v0", "1/0")
    reply, _ = table_task(node, name="t4", where=f"age >= {cut} and unit == 'p'", variables=["h"])
    refused(node, reply, "max_refusals_per_day")


def test_a_table_that_withholds_nothing_is_not_counted(tmp_path):
    """Only a withheld cell answers a question: tables the audit lets through in full do not
    use up the day's refusals."""
    node = policy_node(
        tmp_path, 'mode = "exploratory"\n[exploratory]\nmax_refusals_per_day = 1\n[rules]\nmax_refusals_per_day = 1\n'
    )
    for name, where in (("a", "age >= 30"), ("b", "age >= 40"), ("c", "age >= 50")):
        ok(table_task(node, name=name, where=where, variables=["h"])[0])


# --------------------------------------------------------------------------- 7. output and crashes


def test_a_study_name_cannot_write_outside_out(capsys, tmp_path):
    net = cli_network(tmp_path)
    code, err, out = cli_run(capsys, tmp_path, net, name="../../escaped", formula="y ~ x")
    assert code == 0, err
    assert not (tmp_path.parent / "escaped").exists() and not (tmp_path / "escaped").exists()
    assert len(list(out.rglob("results.json"))) == 1


def test_a_deeply_nested_study_file_is_one_sentence(capsys, tmp_path):
    net = cli_network(tmp_path)
    study = tmp_path / "deep.toml"
    study.write_text('name = "deep"\nx = ' + "[" * 3000 + "]" * 3000 + "\n")
    code = cli_main(["run", str(study), "--network", str(net), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err and "deep.toml" in err


# --------------------------------------------------------------------------- 8. filters that pin values

PINNING_FILTERS = [
    "(y == 1 and age < 90) or age == 93",  # everyone's outcome known but the target's
    "not (y != 1 and age != 93)",  # the same, through De Morgan
    "(x < 0 and age < 90) or (x >= 0 and age == 93)",
    "x2 < x",  # two columns compared: 0 < x only where x2 was zeroed
]


@pytest.mark.parametrize("where", PINNING_FILTERS, ids=range(len(PINNING_FILTERS)))
def test_a_filter_that_pins_the_released_variable(node, where):
    """A cohort of people whose outcome the filter fixes, plus the target through another
    column: the mean outcome would be the target's. Sent straight to the node (past the
    coordinator's check), as a model and as a table."""
    wire = node.spec(formula="y ~ 1", family="gaussian")
    wire["where"] = where
    reply, _ = node.prepare(wire)
    refused(node, reply, "invalid_study")
    assert "a cohort must be conditions joined by 'and', each on one column" in reply.message
    with pytest.raises(SpecError, match="each on one column"):
        table_task(node, variables=["y"], where=where)


def test_a_condition_that_sets_a_few_people_apart_answers_no_question(tmp_path):
    """`y == v and age < 94` then `y == v and age < 93`: the cohorts differ by the target
    exactly when the target's y is v, so a differencing audit of the cohorts alone would
    answer "is the target's y v?" by refusing or not. The node judges the age conditions on
    the whole dataset (they differ by the target whatever y is): the same refusal for both v."""
    replies = []
    for v in (0, 1):
        node = Node(tmp_path / f"node{v}", make_frame(), COLUMNS)
        ok(node.prepare(node.spec(formula="h ~ x", where=f"y == {v} and age < 94"))[0])
        reply, _ = node.prepare(node.spec(formula="h ~ x", where=f"y == {v} and age < 93"))
        refused(node, reply, "min_subset_difference")
        replies.append(reply)
        restart_nodes()
    assert replies[0].message == replies[1].message
    assert "condition on 'age'" in replies[0].message


def test_a_condition_of_a_few_people_is_refused_alone(node):
    """`age > 85` admits three people of the whole dataset: refused for its size whatever the
    rest of the filter; a condition that leaves out one person (`age != 93`) likewise."""
    reply, _ = node.prepare(node.spec(formula="y ~ x", where="h == 0 and age != 93"))
    refused(node, reply, "min_subset_difference")
    assert "condition on 'age'" in reply.message


def test_rows_at_the_boundary_are_not_released(prepared):
    """A binomial round used to say how many rows had |eta| > 30 at the coefficients sent: a
    threshold count at any cut the coordinator chose (bisection found the maximum of x). A
    round releases the score, the information and [deviance, Pearson, log-likelihood] only."""
    node, study, _ = prepared
    reply = ok(node.round(study, {"m0": np.array([-0.2, 0.4, 0.3])}))
    assert set(reply.arrays) == {"score/m0", "info/m0", "stats/m0"}
    assert reply.arrays["stats/m0"].shape == (3,)


def test_round_history_survives_a_restart(tmp_path):
    """The probing round of test_beta_round_difference, sent after a restart and a fresh
    (free, repeated) prepare: still compared with the round answered before the restart."""
    node = policy_node(
        tmp_path,
        'mode = "exploratory"\nstate_dir = "state"\n[rules]\nmax_leverage = 1.0\n'
        "max_combined_leverage = 1.0\n[exploratory]\nmax_leverage = 1.0\nmax_combined_leverage = 1.0\n",
    )
    wire = node.spec(formula="y ~ x + x2 + h")
    reply, study = node.prepare(wire)
    ok(reply)
    beta = np.array([-0.2, 0.2, 0.2, 0.3])
    ok(node.round(study, {"m0": beta}))
    restart_nodes()
    ok(node.prepare(wire)[0])
    probe = beta + np.array([0.0, 5.0, -5.0, 0.0])
    refused(node, node.round(study, {"m0": probe}), "min_effective_rows")
    assert "compared with a round this node already answered" in node.audit_entries()[-1]["refusal"][0]["sentence"]


def test_a_robust_middle_term_on_one_row(node):
    """Gaussian `bonus ~ x` with HC0 SEs: at coefficients 0 every residual is 0 but the
    target's, so the middle term sum r^2 x x' would be the target's bonus squared times his
    x x'. Its squared residuals are judged like IRLS weights (Gaussian models too)."""
    reply, study = node.prepare(node.spec(formula="bonus ~ x", family="gaussian", cov_type="HC0"))
    ok(reply)
    refused(node, node.round(study, {"m0": np.zeros(2)}), "min_effective_rows")
    assert "squared residual" in node.audit_entries()[-1]["refusal"][0]["sentence"]


# --------------------------------------------------------------------------- 9. combinations across models

SPAN_COLUMNS = {
    "x": {"type": "numeric"},
    "age": {"type": "integer"},
    "g": {"type": "categorical", "levels": ["a", "b"]},
}


def span_frame() -> pd.DataFrame:
    """300 people aged 60, 61 or 62 and the target aged 64: (a-60)(a-61)(a-62) is 24 for the
    target and 0 for everyone else."""
    rng = np.random.default_rng(5)
    age = np.repeat([60, 61, 62], 100)
    age = np.concatenate([[64], age])
    x = rng.normal(size=age.size)
    x[0] = BOB_X
    g = rng.choice(["a", "b"], size=age.size).astype(object)
    return pd.DataFrame({"x": x, "age": age, "g": g})


def test_three_models_whose_columns_combine_to_one_row(tmp_path):
    """`x ~ age`, `x ~ I(age ** 2)`, `x ~ I(age ** 3)`, each with low leverage alone: a
    combination of their X'y is 24 times the target's x (red team, round 2). The node keeps
    the span of every column it released and refuses the model that would let a combination
    weigh one row above max_leverage."""
    frame = span_frame()
    a = frame.age.to_numpy(dtype=float)
    p = (a - 60) * (a - 61) * (a - 62)
    coefficients = np.polynomial.polynomial.polyfromroots([60, 61, 62])  # p = c0 + c1 a + c2 a^2 + c3 a^3
    sums = [np.sum(a**k * frame.x) for k in range(4)]
    assert np.isclose(np.dot(coefficients, sums) / 24, BOB_X)  # the leak, if all were answered
    assert np.count_nonzero(p) == 1
    node = Node(tmp_path / "node", frame, SPAN_COLUMNS)
    replies = [
        node.prepare(node.spec(name=f"s{k}", family="gaussian", formula=f))[0]
        for k, f in enumerate(["x ~ age", "x ~ I(age ** 2)", "x ~ I(age ** 3)"])
    ]
    assert replies[0].status == m.OK and replies[1].status == m.OK  # (the target's leverage: below 0.9)
    assert_nothing_released(replies[2], rule="max_combined_leverage", secrets=SECRETS)
    assert "together with everything this node released before" in replies[2].message


def test_a_cluster_of_one(tmp_path):
    """Cluster-robust SEs clustered on age: the target is alone in his cluster, and the
    per-cluster meat at chosen coefficients would give his sums (red team, round 2)."""
    node = Node(tmp_path / "node", span_frame(), SPAN_COLUMNS)
    reply, _ = node.prepare(node.spec(family="gaussian", formula="x ~ g", cov_type="cluster", cluster="age"))
    refused(node, reply, "min_level_count")
    assert "a cluster of the cluster-robust variance" in reply.message and "64" not in reply.message


# --------------------------------------------------------------------------- 10. negative binomial theta


def test_theta_rounds_the_outcome(node):
    """`visits ~ x + h` as a negative binomial model, whose rounds carry log theta after the
    coefficients. At theta = 2^58 the sum theta + y rounds every count below 32 to theta, so the
    theta score is the same whatever everyone else's count, and non-zero exactly when someone
    has 32 or more: a yes/no question about the maximum (the target's 61), which halving or
    doubling theta would bisect. The node evaluates theta only within 1e-6..1e6, where
    theta + y is exact."""
    from iaptnet.protocol.families import NegativeBinomial

    theta = 2.0**58
    y = make_frame()["visits"].to_numpy(dtype=float)
    assert y[0] == BOB_VISITS and y[1:].max() < 32
    mu = np.full(N, np.exp(0.6))
    family = NegativeBinomial(theta)
    answer = family.theta_sums(y, mu)[0]
    others = y.copy()
    others[1:] = np.random.default_rng(1).integers(0, 32, size=N - 1)
    assert family.theta_sums(others, mu)[0] == answer != 0.0  # the others' counts do not matter
    assert family.theta_sums(np.minimum(y, 31), mu)[0] == 0.0  # no one at 32 or more: zero
    reply, study = node.prepare(node.spec(family="negative_binomial", formula="visits ~ x + h"))
    beta = local_beta(ok(reply))
    ok(node.round(study, {"m0": np.append(beta, 0.0)}))  # an honest round, at theta = 1
    refused(node, node.round(study, {"m0": [0.6, 0.0, 0.0, np.log(theta)]}), "theta_range")


def test_theta_weighs_one_row(node):
    """`visits ~ x` at coefficients (0, -1): the fitted means exp(-x) pass the rules (about 150
    effective rows), but the score weighs each row's outcome by theta / (theta + mu), which a
    tiny theta turns into about theta / mu = theta exp(x): at theta = exp(-6) the target's x of
    7.3 gets a weight of 0.79 and no one else more than 0.05, so his 61 visits weigh in the
    intercept's score as much as 16 other people's (9 effective rows). The outcome's weights are
    judged like the fitted means; so are the information weights, mu theta / (theta + mu), which
    are then about theta for everyone but the target (refused first, as setting him apart)."""
    frame = make_frame()
    theta = np.exp(-6.0)
    mu = np.exp(-frame["x"].to_numpy())
    weight = theta / (theta + mu)
    assert weight[0] > 0.75 and np.all(weight[1:] < 0.05)
    assert (weight.sum() ** 2 / np.sum(weight**2)) < 10
    assert (mu.sum() ** 2 / np.sum(mu**2)) > 100  # (the fitted means alone pass)
    reply, study = node.prepare(node.spec(family="negative_binomial", formula="visits ~ x"))
    ok(reply)
    refused(node, node.round(study, {"m0": [0.0, -1.0, np.log(theta)]}), "min_effective_rows")
    assert "weights" in node.audit_entries()[-1]["refusal"][0]["sentence"]


# --------------------------------------------------------------------------- 11. marginal effects


def test_marginal_rounds_differ_in_one_row(tmp_path):
    """`y ~ h * (x + x2)` with `marginal = ["h"]` (x2 is x but 0 for the target; the leverage
    rules are off so that the design is prepared). A round may ask for the sums of the fitted
    means with h set to 1 and their gradient. Between two such rounds the coefficients move by
    d = (0, 0, c, 0, a - c, -a): with h set to 1 every row's linear predictor moves by
    a (x - x2), the target's alone, while the model's own fitted means move for everyone with
    h = 0. The difference of the two gradient sums is then the target's row times a number:
    its x component over its intercept component is his x. The counterfactual fitted means are
    judged like the fitted means, against those of the rounds answered before."""
    from iaptnet.node.design import build_design
    from iaptnet.protocol.study import StudySpec

    node = policy_node(
        tmp_path,
        'mode = "exploratory"\n[rules]\nmax_leverage = 1.0\nmax_combined_leverage = 1.0\n'
        "[exploratory]\nmax_leverage = 1.0\nmax_combined_leverage = 1.0\n",
    )
    wire = node.spec(formula="y ~ h * (x + x2)", marginal=["h"])
    spec = StudySpec.from_wire(wire)
    design = build_design(make_frame(), node.schema, spec, counterfactual=("h",))
    assert design.names == ["Intercept", "h", "x", "x2", "h:x", "h:x2"]
    c, a = 0.3, 0.5
    d = np.array([0.0, 0.0, c, 0.0, a - c, -a])
    X1, _ = design.counterfactual["h"]
    assert np.count_nonzero(X1 @ d) == 1 and np.count_nonzero(design.X @ d) > 200
    beta = np.array([-0.2, 0.3, 0.4, 0.0, 0.0, 0.0])  # every fitted mean with h = 1 changes
    slopes = []
    for b in (beta, beta + d):
        mu1 = 1 / (1 + np.exp(-(X1 @ b)))
        slopes.append(X1.T @ (mu1 * (1 - mu1)))
    leak = slopes[1] - slopes[0]
    assert np.isclose(leak[2] / leak[0], BOB_X, rtol=1e-9, atol=0)  # the leak, if both were answered
    reply, study = node.prepare(wire)
    ok(reply)

    def marginal_round(coefficients):
        task = m.Task(
            kind=glm_protocol.ROUND,
            study_hash=study,
            payload={"models": ["m0"], "marginal": {"m0": ["h"]}},
            arrays={"beta/m0": np.asarray(coefficients, dtype=float)},
        )
        return node.send(task)

    assert ok(marginal_round(beta)).arrays["marginal/m0/0"].shape == (3 + 2 * 6,)
    refused(node, marginal_round(beta + d), "min_effective_rows")
    assert "compared with a round this node already answered" in node.audit_entries()[-1]["refusal"][0]["sentence"]


def test_marginal_contrast_isolates_one_row(tmp_path):
    """A contrast `{exposure = "unit", compare = ["q", "p"]}` of `y ~ unit * (x + x2)` (x2 is
    x but 0 for the target, who is one of unit q's 31 rows; the leverage rules are off so that
    the design is prepared). With every row set to unit q, the design's interaction columns
    are x and x2 for everyone, so between two rounds the coefficients move by d (c on x, a - c
    on unit[T.q]:x, -a on unit[T.q]:x2) and every row's counterfactual linear predictor moves
    by a (x - x2): the target's alone, while the model's own fitted means move for every row of
    unit p. The difference of the two gradient sums would be the target's row times a number
    (its x component over its intercept component is his x). The contrast's counterfactual
    fitted means are judged as weights against the rounds answered before, as a binary
    exposure's are."""
    from iaptnet.node.design import build_design
    from iaptnet.protocol.study import StudySpec

    node = policy_node(
        tmp_path,
        'mode = "exploratory"\n[rules]\nmax_leverage = 1.0\nmax_combined_leverage = 1.0\n'
        "[exploratory]\nmax_leverage = 1.0\nmax_combined_leverage = 1.0\n",
    )
    contrast = {"exposure": "unit", "compare": ["q", "p"]}
    wire = node.spec(formula="y ~ unit * (x + x2)", marginal=[contrast])
    spec = StudySpec.from_wire(wire)
    frame = make_frame().assign(unit=lambda f: pd.Categorical(f["unit"], categories=["p", "q"]))
    design = build_design(frame, node.schema, spec, counterfactual=spec.marginal)
    assert design.names == ["Intercept", "unit[T.q]", "x", "unit[T.q]:x", "x2", "unit[T.q]:x2"]
    c, a = 0.3, 0.5
    d = np.array([0.0, 0.0, c, a - c, 0.0, -a])
    Xq, _ = design.counterfactual["unit q vs p"]
    assert np.count_nonzero(np.abs(Xq @ d) > 1e-12) == 1 and np.count_nonzero(design.X @ d) > 300
    beta = np.array([-0.2, 0.3, 0.4, 0.0, 0.0, 0.0])
    slopes = []
    for b in (beta, beta + d):
        mu = 1 / (1 + np.exp(-(Xq @ b)))
        slopes.append(Xq.T @ (mu * (1 - mu)))
    leak = slopes[1] - slopes[0]
    assert np.isclose(leak[2] / leak[0], BOB_X, rtol=1e-9, atol=0)  # the leak, if both were answered
    reply, study = node.prepare(wire)
    ok(reply)

    def contrast_round(coefficients):
        task = m.Task(
            kind=glm_protocol.ROUND,
            study_hash=study,
            payload={"models": ["m0"], "marginal": {"m0": ["unit q vs p"]}},
            arrays={"beta/m0": np.asarray(coefficients, dtype=float)},
        )
        return node.send(task)

    assert ok(contrast_round(beta)).arrays["marginal/m0/0"].shape == (3 + 2 * 6,)
    refused(node, contrast_round(beta + d), "min_effective_rows")
    sentence = node.audit_entries()[-1]["refusal"][0]["sentence"]
    assert "compared with a round this node already answered" in sentence and "unit = q" in sentence


# --------------------------------------------------------------------------- 12. random intercepts


def _glmm_round(node: Node, study: str, parameters) -> m.Reply:
    from iaptnet.protocol.kinds import glmm as glmm_protocol

    return node.send(
        m.Task(
            kind=glmm_protocol.ROUND,
            study_hash=study,
            payload={"models": ["m0"]},
            arrays={glmm_protocol.parameters_key("m0"): np.asarray(parameters, dtype=float)},
        )
    )


def _gaussian_cross(frame: pd.DataFrame, groups: str, theta: float) -> np.ndarray:
    """What a node would release for `x ~ g` with a random intercept per `groups` at theta:
    Z'V^-1 Z, Z = [1, g[T.b], x] (node/glmm_likelihood.py's own sums)."""
    from iaptnet.node.glmm_likelihood import GroupDesign, Groups, gaussian_sums

    X = np.column_stack([np.ones(len(frame)), frame.g == "b"]).astype(float)
    codes, values = pd.factorize(frame[groups], sort=True)
    design = GroupDesign(X, frame.x.to_numpy(dtype=float), np.zeros(len(frame)), Groups(codes, len(values)))
    return gaussian_sums(design, theta)[0][0]


def test_a_random_intercept_group_of_one(tmp_path):
    """`x ~ g` with a random intercept per age: the target (64) is alone in his group, beside
    three groups of 100. A gaussian round at theta releases Z'Z - sum_g w(n_g, theta) s_g s_g'
    (s_g the group's sums of [1, g, x], w depending only on its size), so rounds at theta = 0
    and two more thetas are three equations in the two size classes' sums: the class of size 1
    is the target's row, whose x is its x entry over its intercept entry. Every group must have
    min_level_count rows; the refusal never names the group's value."""
    frame = span_frame()
    base = _gaussian_cross(frame, "age", 0.0)
    rows = []
    for theta in (0.5, 2.0):
        w = {n: theta**2 / (1 + n * theta**2) for n in (1, 100)}
        rows.append((w[100], w[1], base - _gaussian_cross(frame, "age", theta)))
    (a1, b1, d1), (a2, b2, d2) = rows
    target = (a2 * d1 - a1 * d2) / (a2 * b1 - a1 * b2)  # the class of size 1: his [1, g, x] outer product
    assert np.isclose(target[0, 2] / target[0, 0], BOB_X, rtol=1e-9, atol=0)  # the leak, if answered
    node = Node(tmp_path / "node", frame, SPAN_COLUMNS)
    reply, _ = node.prepare(node.spec(family="gaussian", formula="x ~ g", random_intercept="age"), kind="glmm.prepare")
    refused(node, reply, "min_level_count")
    assert "a group of the random intercept has fewer than 8 rows" in reply.message and "64" not in reply.message


def ward_frame() -> pd.DataFrame:
    """301 people in 10 wards of 30, the target in ward 0 by one record (`ward`) and in ward
    1 by another (`ward2`); everyone else's wards agree."""
    rng = np.random.default_rng(8)
    ward = np.concatenate([[0], np.repeat(np.arange(10), 30)])
    ward2 = ward.copy()
    ward2[0] = 1
    x = rng.normal(size=ward.size)
    x[0] = BOB_X
    g = rng.choice(["a", "b"], size=ward.size).astype(object)
    return pd.DataFrame({"x": x, "g": g, "ward": ward, "ward2": ward2})


WARD_COLUMNS = {
    "x": {"type": "numeric"},
    "g": {"type": "categorical", "levels": ["a", "b"]},
    "ward": {"type": "integer"},
    "ward2": {"type": "integer"},
}


def test_random_intercept_groups_that_differ_in_one_person(tmp_path):
    """`x ~ g` with a random intercept per ward, then per ward2, where only the target moves
    (ward 0 to ward 1). Between the two studies' gaussian rounds at the same theta, the x
    column's sums give (Y0 - Y1) times a known number (Y the two wards' sums of x without him),
    and its squares, at two thetas, two equations in Y0 + Y1 and his x. The groups' row sets
    join the differencing audit: a group differing by 1 to 7 people from one released before
    is refused."""
    frame = ward_frame()
    diffs, ws = [], []
    for theta in (0.5, 2.0):
        diffs.append(_gaussian_cross(frame, "ward", theta) - _gaussian_cross(frame, "ward2", theta))
        ws.append({n: theta**2 / (1 + n * theta**2) for n in (30, 31)})
    gap = diffs[0][0, 2] / (31 * ws[0][31] - 30 * ws[0][30])  # Y0 - Y1
    # (x, x) entry: gap * (w31 (S + 2 x_t) - w30 S), S = Y0 + Y1: linear in (S, x_t).
    A = np.array([[w[31] - w[30], 2 * w[31]] for w in ws])
    S, x_t = np.linalg.solve(A, [d[2, 2] / gap for d in diffs])
    assert np.isclose(x_t, BOB_X, rtol=1e-8, atol=0)  # the leak, if both were answered
    node = Node(tmp_path / "node", frame, WARD_COLUMNS)
    first, _ = node.prepare(
        node.spec(name="a", family="gaussian", formula="x ~ g", random_intercept="ward"), kind="glmm.prepare"
    )
    ok(first)
    reply, _ = node.prepare(
        node.spec(name="b", family="gaussian", formula="x ~ g", random_intercept="ward2"), kind="glmm.prepare"
    )
    refused(node, reply, "min_subset_difference")


def test_a_random_intercept_round_that_isolates_one_row(node):
    """`y ~ x` with a random intercept per unit (369 and 31 people): at an intercept of -40
    and a slope of 8 every fitted mean is 0 but the target's (x = 7.3). A group's intercept at
    its mode, sigma u*, lifts its whole group (by about sigma^2 times its events while their
    fitted means are 0), so a large sigma spreads the weights again; at sigma = 0.01 it lifts
    them by less than 0.03 and the round's sums would be the target's. A random-intercept round
    declares the fitted means and information weights at the groups' modes, judged like a GLM
    round's (an honest round first)."""
    from iaptnet.node.glmm_likelihood import Groups, modes

    frame = make_frame()
    beta, sigma = np.array([-40.0, 8.0]), 0.01
    codes, values = pd.factorize(frame.unit, sort=True)
    eta = beta[0] + beta[1] * frame.x.to_numpy()
    lift = sigma * modes("binomial", frame.y.to_numpy(dtype=float), eta, Groups(codes, len(values)), sigma)
    assert np.all(np.abs(lift) < 0.03)
    mu = 1 / (1 + np.exp(-(eta + lift[codes])))
    assert mu[0] > 0.99 and np.all(mu[1:] < 1e-5)  # every fitted weight on the target
    reply, study = node.prepare(node.spec(formula="y ~ x", random_intercept="unit"), kind="glmm.prepare")
    ok(reply)
    ok(_glmm_round(node, study, np.append(local_beta(reply), 1.0)))
    refused(node, _glmm_round(node, study, [*beta, sigma]), "min_effective_rows")


# --------------------------------------------------------------------------- 13. CR2


def _cr2_round(node: Node, study: str, beta, bread) -> m.Reply:
    """A CR2 round (protocol/kinds/glm.py): the coefficients and the pooled inverse
    information the node's adjustment uses, over every column."""
    from iaptnet.protocol.messages import pack_upper

    beta = np.asarray(beta, dtype=float)
    return node.send(
        m.Task(
            kind=glm_protocol.ROUND,
            study_hash=study,
            payload={"models": ["m0"], "cr2": {"m0": [1] * beta.size}},
            arrays={"beta/m0": beta, "bread/m0": pack_upper(np.asarray(bread, dtype=float))},
        )
    )


def _information(beta, columns: list[str]) -> np.ndarray:
    """X'WX of `y ~ columns` (binomial) at `beta` over the attack frame's rows."""
    frame = make_frame()
    X = np.column_stack([np.ones(N)] + [frame[c].to_numpy(dtype=float) for c in columns])
    mu = 1 / (1 + np.exp(-(X @ np.asarray(beta, dtype=float))))
    return (X * (mu * (1 - mu))[:, None]).T @ X


def test_a_cr2_cluster_of_the_target_and_thirty(node):
    """`y ~ x` with CR2 SEs clustered on unit: the target shares unit q with 30 people. That
    passes the cluster rule of cluster-robust SEs (8 rows), but CR2's adjusted sums of a
    cluster are a model's statistics of its rows (its (I - H)^-1/2 reaches into each row
    through the cluster's own design): a CR2 cluster is held to min_rows too."""
    reply, _ = node.prepare(node.spec(formula="y ~ x", cov_type="cluster", cluster="unit"))
    ok(reply)  # (the control: cluster-robust SEs on the same clusters)
    reply, _ = node.prepare(node.spec(name="t", formula="y ~ x", cov_type="CR2", cluster="unit"))
    refused(node, reply, "min_rows")
    assert (
        f"a cluster of the CR2 variance has fewer than {reply.payload['refusals'][0]['threshold']} rows"
        in reply.message
    )


def test_cr2_clusters_that_differ_in_one_person(tmp_path):
    """`y ~ x` with CR2 SEs clustered on h (150 and 250 people), then on hb, the same but
    the target moved from one cluster to the other. The two studies' cluster sums at the same
    coefficients differ by the target's adjusted score, counted in one cluster or the other.
    The clusters' row sets join the differencing audit."""
    frame = make_frame()
    frame["hb"] = frame["h"]
    frame.loc[0, "hb"] = 0
    assert frame.loc[0, "h"] == 1 and (frame["h"] != frame["hb"]).sum() == 1
    node = Node(tmp_path / "node", frame, {**COLUMNS, "hb": {"type": "integer"}})
    first, _ = node.prepare(node.spec(name="a", formula="y ~ x", cov_type="CR2", cluster="h"))
    ok(first)
    reply, _ = node.prepare(node.spec(name="b", formula="y ~ x", cov_type="CR2", cluster="hb"))
    refused(node, reply, "min_subset_difference")


def test_a_cr2_covariance_no_pooled_fit_gives(node):
    """`y ~ x` with CR2 SEs clustered on h. A CR2 round carries the pooled inverse information
    M, which the node cannot recompute (it is the other nodes' too); its adjustment
    (I - H_jj)^-1/2, H_jj = Y_j M Y_j', grows without bound as M grows, and past that is
    undefined. The pooled information includes the node's own, so M can be no larger than the
    inverse of the node's information: 100 times that is refused (the honest M first)."""
    reply, study = node.prepare(node.spec(formula="y ~ x", cov_type="CR2", cluster="h"))
    beta = local_beta(ok(reply))
    own = np.linalg.inv(_information(beta, ["x"]))
    answered = ok(_cr2_round(node, study, beta, own))
    assert {"cr2_meat/m0", "cr2_trace/m0", "cr2_cross/m0"} <= set(answered.arrays)
    refused(node, _cr2_round(node, study, beta, 100 * own), "cr2_covariance")


def test_a_cr2_round_that_gives_the_target_leverage(node):
    """`y ~ x` with CR2 SEs clustered on h. At coefficients (-8, 0.6) every fitted mean is
    small, the target's (x = 7.3) least so: the IRLS weights pass the round rules (45
    effective rows, 13 set apart from the median), but they give him a leverage of 0.89 in
    X'WX. With M the inverse of that information (as a pooled fit of this node's rows alone
    would send), his cluster's CR2 adjustment multiplies his part of its score 3.4 times (8%
    of the plain score's size, 21% of the adjusted one's). The node judges every row's leverage
    under the M sent like a model's (max_leverage); the plain round at these coefficients is
    answered."""
    from iaptnet.node import cr2

    frame = make_frame()
    beta = np.array([-8.0, 0.6])
    X = np.column_stack([np.ones(N), frame.x.to_numpy()])
    mu = 1 / (1 + np.exp(-(X @ beta)))
    Y = np.sqrt(mu * (1 - mu))[:, None] * X
    M = np.linalg.inv(Y.T @ Y)
    leverage = np.einsum("ij,jk,ik->i", Y, M, Y)
    assert leverage[0] > 0.88 and np.all(leverage[1:] < 0.02)
    rows = frame.h.to_numpy() == 1
    resid = frame.y.to_numpy(dtype=float)[rows] - mu[rows]
    Mh, _ = cr2.sqrt_psd(M)
    without = resid.copy()
    without[0] = 0.0
    his = cr2.cluster_pieces((mu * (1 - mu))[rows], Y[rows], resid, Mh, "m")[0]
    his = his - cr2.cluster_pieces((mu * (1 - mu))[rows], Y[rows], without, Mh, "m")[0]
    assert np.linalg.norm(his) / np.linalg.norm(X[0] * resid[0]) > 3.3  # the amplification, if answered
    reply, study = node.prepare(node.spec(formula="y ~ x", cov_type="CR2", cluster="h"))
    ok(reply)
    ok(node.round(study, {"m0": beta}))
    refused(node, _cr2_round(node, study, beta, M), "max_leverage")
    assert "one row's leverage in the pooled fit" in node.audit_entries()[-1]["refusal"][0]["sentence"]


def test_a_cr2_cluster_alone_on_a_term(node):
    """`y ~ x + h` with CR2 SEs clustered on h itself: the cluster h = 1 alone determines the
    intercept plus h's coefficient, so its H_jj has an eigenvalue of 1 and (I - H_jj)^-1/2 is
    infinite (clubSandwich drops such a direction; its degrees of freedom are meaningless). The
    node refuses a cluster whose share of the information in some direction is above 0.999."""
    reply, study = node.prepare(node.spec(formula="y ~ x + h", cov_type="CR2", cluster="h"))
    beta = local_beta(ok(reply))
    refused(node, _cr2_round(node, study, beta, np.linalg.inv(_information(beta, ["x", "h"]))), "cr2_cluster_alone")

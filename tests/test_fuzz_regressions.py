"""Each cause the command-line fuzz (tests/test_fuzz_cli.py, bench/fuzz_cli.py) found, kept as
its own case: the input that gave a traceback, a LAPACK complaint or a library warning now
ends as one sentence (or a result) and nothing else on the terminal."""

from __future__ import annotations

import sqlite3

import pandas as pd
import pytest
import tomli_w
from fuzzcase import NODES, Case, _network_of, _run_argv, build_workspace, policy_template, run_case


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("regressions"), iapt_patients=500)


def outcome_of(workspace, files: dict[str, bytes], argv=None, kind="glm"):
    files = {
        "study.toml": tomli_w.dumps(workspace.studies[kind]).encode(),
        "population.csv": (workspace.custom / "population.csv").read_bytes(),
        **files,
    }
    case = Case("regression", files, argv or _run_argv("{case}/study.toml", "{case}/network.toml"))
    outcome = run_case(case, workspace, workspace.root / "cases" / "regression")
    assert outcome.ok, (outcome.kind, outcome.stderr, outcome.detail, outcome.warnings)
    return outcome


def network(**node) -> bytes:
    nodes = [{"name": n, "data": f"{{custom}}/{n}.csv", "schema": "{custom}/schema.toml"} for n in NODES]
    nodes[0].update(node)
    return tomli_w.dumps({"node": nodes}).encode()


def test_a_node_entry_that_is_not_a_table(workspace):
    out = outcome_of(workspace, {"network.toml": b"node = [1.5]\n"})
    assert out.kind == "clean" and "[[node]] number 1 is not a table" in out.stderr


@pytest.mark.parametrize("data", ["x" * 5000, "a\x00b.csv"], ids=["too long", "NUL"])
def test_a_data_path_the_system_refuses(workspace, data):
    out = outcome_of(workspace, {"network.toml": network(data=data)})
    assert out.kind == "clean" and "field 'data'" in out.stderr


def test_levels_on_a_column_that_has_none(workspace):
    schema = tomli_w.dumps({"columns": {"x": {"type": "numeric", "levels": 0}, "y": {"type": "binary"}}})
    out = outcome_of(workspace, {"schema.toml": schema.encode(), "network.toml": network(schema="schema.toml")})
    assert out.kind == "clean" and "'levels' is only allowed for categorical columns" in out.stderr


def test_a_query_the_database_cannot_run(workspace, tmp_path):
    db = tmp_path / "db.sqlite"
    with sqlite3.connect(db) as conn:
        pd.read_csv(workspace.custom / "s0.csv").to_sql("t", conn)
    out = outcome_of(workspace, {"network.toml": network(data=f"sqlite:///{db}", query="selec nothing")})
    assert out.kind == "clean" and "could not read the query" in out.stderr


@pytest.mark.parametrize("kind", ["iptw", "meta", "glm", "table"])
def test_values_near_the_limit_of_a_float(workspace, kind):
    """x of 1e300 at one node: no LAPACK message ("On entry to DLASCL ...") and no
    LinAlgWarning beside the node's refusal."""
    s0 = pd.read_csv(workspace.custom / "s0.csv")
    s0["x"] = s0["x"] * 1e300
    files = {"s0.csv": s0.to_csv(index=False).encode(), "s1.csv": (workspace.custom / "s1.csv").read_bytes()}
    files["network.toml"] = _network_of(str(workspace.custom / "schema.toml"), {n: f"{n}.csv" for n in NODES})
    outcome_of(workspace, files, kind=kind)


def test_an_access_study_with_no_referral_in_the_reference_level(workspace):
    frames = {n: pd.read_csv(workspace.custom / f"{n}.csv").assign(sex="female") for n in NODES}
    files = {f"{n}.csv": f.to_csv(index=False).encode() for n, f in frames.items()}
    files["network.toml"] = _network_of(str(workspace.custom / "schema.toml"), {n: f"{n}.csv" for n in NODES})
    out = outcome_of(workspace, files, kind="access")
    assert (
        out.kind == "clean" and "no referrals in the cohort are in the first (reference) level of 'sex'" in out.stderr
    )


def test_an_invalid_policy_is_one_sentence_in_process(workspace):
    """The nodes' own log (each node saying it cannot read its policy) stays out of the
    analyst's terminal; the coordinator's sentence carries the policy's words."""
    policy = {**policy_template(), "mode": "APPROVED"}
    files = {"policy.toml": tomli_w.dumps(policy).encode(), "network.toml": network(policy="policy.toml")}
    out = outcome_of(workspace, files)
    assert out.kind == "clean" and "field 'mode'" in out.stderr


def test_a_field_value_with_control_characters_is_quoted_on_one_line(workspace):
    """A value quoted back in the sentence (here an exposure naming no column) keeps the error
    on one line and cannot steer the terminal (a newline, a right-to-left override, ESC)."""
    study = {**workspace.studies["iptw"], "exposure": "  g\u202e\n\x1b[31m"}
    files = {"study.toml": tomli_w.dumps(study).encode(), "network.toml": network()}
    out = outcome_of(workspace, files)
    assert out.kind == "clean" and "\\u202e\\n\\x1b[31m" in out.stderr


def test_an_ill_conditioned_information_matrix_is_solved_without_a_warning():
    import warnings

    import numpy as np

    from iaptnet.coordinator.glm import _solve_pos

    a = np.array([[1.0, 1.0], [1.0, 1.0 + 3e-16]])  # scipy.linalg.solve warns: rcond 6e-17
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = _solve_pos(a, np.array([1.0, 2.0]))
    assert np.all(np.isfinite(x))


def test_identifiers_stored_as_floats_beyond_exact_integers():
    """A Parquet identifier column of floats holding 1e300 or inf: kept as text, not cast to
    Int64 (a TypeError, with pandas' RuntimeWarning, before)."""
    import warnings

    import numpy as np

    from iaptnet.node.validate import identifier_text

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert identifier_text(pd.Series([1.0, 2.0, np.nan])).tolist()[:2] == ["1", "2"]
        assert identifier_text(pd.Series([1e300, 2.0, np.inf])).tolist() == ["1e+300", "2.0", "inf"]

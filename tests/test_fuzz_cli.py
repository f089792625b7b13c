"""Zero tracebacks: fuzzed inputs through the public command line (tests/fuzzcase.py).

Study files of every kind, network files, policy files, extracts and valid data at its edges,
drawn by hypothesis, each run through `iaptnet.cli.main` in this process: every input ends as
a success or one clean error (`error: ...`, one line, a non-zero exit, nothing written to
--out), and no library warning reaches the user. The default profile ('repeatable') draws
the same inputs on every run; `pytest --hypothesis-profile=explore` searches afresh, and
bench/fuzz_cli.py runs 10,000 inputs with hangs counted.
"""

from __future__ import annotations

import pytest
from fuzzcase import build_workspace, make_case, run_case
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("fuzz"), iapt_patients=2000)


def check(workspace, rng, target: str) -> None:
    case = make_case(rng, workspace, target)
    outcome = run_case(case, workspace, workspace.root / "cases" / target)
    shown = {name: raw[:2000] for name, raw in case.files.items() if name.endswith(".toml")}
    assert outcome.ok, (
        f"{target} ({case.note}) ended as {outcome.kind}, exit {outcome.code}:\n{outcome.stderr}\n"
        f"{outcome.detail}\nwarnings: {outcome.warnings}\nargv: {case.argv}\nfiles: {shown}"
    )


def fuzz(examples: int):
    # No shrinking: a failing input is reported whole (its files and argv), and shrinking a
    # run of the command line would take minutes.
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=(Phase.explicit, Phase.reuse, Phase.generate),
    )


RANDOMS = st.randoms(use_true_random=False)


@fuzz(60)
@given(rng=RANDOMS)
def test_study_files_of_every_kind(workspace, rng):
    check(workspace, rng, "study")


@fuzz(15)
@given(rng=RANDOMS)
def test_catalogue_studies_changed_on_the_iapt_extract(workspace, rng):
    check(workspace, rng, "iapt_study")


@fuzz(60)
@given(rng=RANDOMS)
def test_network_files(workspace, rng):
    check(workspace, rng, "network")


@fuzz(60)
@given(rng=RANDOMS)
def test_policy_files(workspace, rng):
    check(workspace, rng, "policy")


@fuzz(30)
@given(rng=RANDOMS)
def test_damaged_extracts(workspace, rng):
    check(workspace, rng, "extract")


@fuzz(10)
@given(rng=RANDOMS)
def test_damaged_iapt_extracts(workspace, rng):
    check(workspace, rng, "iapt_extract")


@fuzz(15)
@given(rng=RANDOMS)
def test_valid_data_at_its_edges(workspace, rng):
    check(workspace, rng, "data")

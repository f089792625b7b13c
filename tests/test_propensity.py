"""Propensity-score studies (`kind = "psm"`, `"iptw"`) equal the same analysis on the pooled
rows (tests/reference_propensity.py: statsmodels and numpy) to 1e-8: the propensity model, the
SD of its logit and the caliper, the pairs each node makes (against the same matching run on
each site's rows directly), balance before and after, weights, and the outcome model with SEs
clustered on the pair (PSM) or robust HC0 with weights (IPTW). Plus: what the nodes release
obeys their policy, a Trust approves a study once for its derived models, and bad study
fields are one clear sentence."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from glmcase import assert_matches, pooled, write_network, write_study
from nodecase import Node, assert_nothing_released, local_beta
from reference_propensity import match_within, reference_iptw, reference_psm

from iaptnet.coordinator.inprocess import run_inprocess
from iaptnet.coordinator.network import load_network
from iaptnet.coordinator.propensity import render
from iaptnet.node.audit import logged_array
from iaptnet.node.runtime import NodeConfig, runtime_for
from iaptnet.protocol import messages as m
from iaptnet.protocol.errors import SpecError
from iaptnet.protocol.kinds import propensity as kind
from iaptnet.protocol.schema import Schema
from iaptnet.protocol.study import parse_study

COLUMNS = {
    "y": {"type": "binary"},
    "t": {"type": "binary"},
    "x1": {"type": "numeric"},
    "x2": {"type": "numeric"},
    "g": {"type": "categorical", "levels": ["a", "b", "c"]},
    "h": {"type": "binary"},
}
RTOL = 1e-8


def make_sites(seed: int = 5, sizes=(640, 560, 500)) -> dict[str, pd.DataFrame]:
    """Three services. x1 takes a few uneven values (so many rows tie on the propensity
    score), x2 is continuous; level c of g makes exposure likely (so some exposed find no
    control within the caliper); some outcomes and x1 are missing (never x2, so that the
    PSM and IPTW cohorts are the same rows)."""
    rng = np.random.default_rng(seed)
    sites = {}
    for k, n in enumerate(sizes):
        g = rng.choice(["a", "b", "c"], size=n, p=[0.5, 0.3, 0.2])
        h = (rng.random(n) < 0.4).astype(float)
        x1 = rng.choice([0.0, 1.0, 3.0, 7.0], size=n, p=[0.3, 0.3, 0.25, 0.15])
        x2 = rng.normal(0.2 * k, 1.0, size=n)
        gcode = pd.Series(g).map({"a": 0.0, "b": 0.5, "c": 2.2}).to_numpy()
        t = (rng.random(n) < 1 / (1 + np.exp(-(-1.3 + gcode + 0.5 * h + 0.12 * x1 + 0.3 * x2)))).astype(float)
        eta = -0.4 + 0.6 * t + 0.1 * x1 + 0.5 * x2 - 0.3 * h + 0.3 * (g == "b")
        y = (rng.random(n) < 1 / (1 + np.exp(-eta))).astype(float)
        frame = pd.DataFrame({"y": y, "t": t, "x1": x1, "x2": x2, "g": g, "h": h})
        for col in ("y", "x1"):
            frame.loc[rng.choice(n, size=n // 30, replace=False), col] = np.nan
        sites[f"site{k}"] = frame
    return sites


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    folder = tmp_path_factory.mktemp("psnet")
    sites = make_sites()
    write_network(folder, sites, COLUMNS)
    frame = pooled(sites, COLUMNS)
    frame["site"] = np.repeat(list(sites), [len(s) for s in sites.values()])
    return folder, frame


def run(folder, **fields) -> dict:
    study = write_study(folder / f"{fields['name']}.toml", **fields)
    result = run_inprocess([study], folder / "network.toml")[0]
    json.dumps(result, allow_nan=True)  # the results.json contract: plain JSON
    return result


def node_states(folder, study_result) -> dict[str, pd.DataFrame]:
    """What each node kept for the study (test only: never sent anywhere)."""
    from iaptnet.coordinator.studies import load_study

    spec = load_study(folder / f"{study_result['study']}.toml", {str(folder / "schema.toml")}).spec
    out = {}
    for node in load_network(folder / "network.toml").nodes:
        runtime = runtime_for(NodeConfig.from_mapping(node))
        out[node["name"]] = runtime.augments[kind.state_key(spec)]
    return out


def assert_terms(rows: list[dict], ref) -> None:
    assert [t["term"] for t in rows] == list(ref.params.index)
    np.testing.assert_allclose([t["estimate"] for t in rows], ref.params.to_numpy(), rtol=RTOL)
    np.testing.assert_allclose([t["std_error"] for t in rows], ref.bse.to_numpy(), rtol=RTOL)


def assert_balance(result: dict, ref: pd.DataFrame) -> None:
    rows = pd.DataFrame(result["balance"]).set_index("term")
    expected = ref.loc[rows.index]  # the intercept and absent levels have no balance row
    assert list(rows.index) == [n for n in ref.index if n != "Intercept"]
    columns = [
        "mean_exposed_before",
        "mean_control_before",
        "difference_before",
        "smd_before",
        "difference_after",
        "smd_after",
    ]
    if result["kind"] == "iptw":
        columns += ["mean_exposed_after", "mean_control_after"]
    else:  # matching releases no sum over one group of the matched set
        assert "mean_exposed_after" not in rows
    for column in columns:
        np.testing.assert_allclose(rows[column].astype(float), expected[column], rtol=RTOL, atol=1e-12, err_msg=column)


PSM = dict(kind="psm", outcome="y", exposure="t", covariates="g + h + x1", where="x2 > -1.6")


def test_psm_equals_matching_on_pooled_rows(network):
    folder, frame = network
    result = run(folder, name="psm", **PSM)
    ref = reference_psm(frame, {**PSM, "where": (frame.x2 > -1.6).to_numpy()}, group="site")
    assert result["kind"] == "psm" and result["study"] == "psm"
    assert_terms(result["propensity_model"]["terms"], ref["ps"])
    assert result["propensity_model"]["n"] == len(ref["rows"])
    np.testing.assert_allclose(result["propensity_score"]["logit_sd"], ref["logit_sd"], rtol=RTOL)
    np.testing.assert_allclose(result["matching"]["caliper"], ref["caliper"], rtol=RTOL)
    # Each node's pairs are those of the same matching run on that site's rows directly.
    rows = ref["rows"]
    for name, state in node_states(folder, result).items():
        scored = state[kind.LOGIT_COLUMN].notna()
        np.testing.assert_allclose(
            state.loc[scored, kind.LOGIT_COLUMN], ref["logit"][rows.site == name], rtol=1e-9, atol=1e-11
        )
        ours = state.loc[scored, kind.PAIR_COLUMN].to_numpy()
        assert np.array_equal(ours, ref["pair"][rows.site == name], equal_nan=True), name
        # ... and with the node's own logits as input, too (the algorithm alone).
        logit = state.loc[scored, kind.LOGIT_COLUMN].to_numpy()
        exposed = rows.loc[rows.site == name, "t"].to_numpy() == 1
        assert np.array_equal(ours, match_within(logit, exposed, result["matching"]["caliper"]), equal_nan=True)
    assert result["matching"]["pairs"] == ref["n_pairs"]
    assert result["matching"]["exposed_unmatched"] >= 8  # level c: exposure too likely for some
    assert_balance(result, ref["balance"])
    assert_matches(result, ref["outcome"])
    assert result["cov_type"] == "cluster" and result["n_clusters"] == ref["n_pairs"]
    assert result["exposure_term"]["term"] == "t"
    # Counts shown per node follow the small-number rules (rounded to 5); totals are exact.
    for node in result["matching"]["nodes"]:
        assert all(v is None or v % 5 == 0 for k, v in node.items() if k != "name")
    text = render(result)
    assert "propensity-score matching" in text and "<- exposure" in text


@pytest.mark.parametrize(
    "options",
    [
        {"estimand": "ATE", "stabilized": True},
        {"estimand": "ATT", "adjust_outcome": True},
    ],
)
def test_iptw_equals_weighting_on_pooled_rows(network, options):
    folder, frame = network
    # The same cohort as the PSM study's: its exposed rows differing from those by a few
    # people would be a differencing pair, which the nodes refuse.
    settings = dict(kind="iptw", outcome="y", exposure="t", covariates="g + h + x1 + x2", where="x2 > -1.6", **options)
    result = run(folder, name=f"iptw_{options['estimand'].lower()}", **settings)
    ref = reference_iptw(frame, {**settings, "where": (frame.x2 > -1.6).to_numpy()})
    assert_terms(result["propensity_model"]["terms"], ref["ps"])
    for group in ("exposed", "control"):
        ours, theirs = result["weighting"][group], ref["weighting"][group]
        assert ours["n"] == theirs["n"]
        np.testing.assert_allclose(
            [ours["sum_weights"], ours["effective_n"]], [theirs["sum_weights"], theirs["effective_n"]], rtol=RTOL
        )
    assert_balance(result, ref["balance"])
    assert_matches(result, ref["outcome"])
    assert result["cov_type"] == "HC0" and result["weights"] == kind.WEIGHT_COLUMN
    assert "inverse probability weighting" in render(result)


def test_nodes_never_release_scores_pairs_or_weights(network):
    folder, _ = network
    run(folder, name="psm_audited", **PSM)
    run(
        folder,
        name="iptw_audited",
        kind="iptw",
        outcome="y",
        exposure="t",
        covariates="g + h + x1",
        where="x2 > -1.6",
        estimand="ATE",
    )
    n_rows = min(len(f) for f in make_sites().values())
    for node in load_network(folder / "network.toml").nodes:
        runtime = runtime_for(NodeConfig.from_mapping(node))
        entries = [e for e in runtime.audit.entries() if e["kind"].startswith("propensity.")]
        assert entries
        for entry in entries:
            released = json.dumps(entry.get("released", {}))
            assert "pair_id" not in released and "ps_logit" not in released
            shapes = _array_shapes(entry.get("released", {}).get("arrays", {}))
            assert shapes
            for shape in shapes:
                assert max(shape, default=0) < n_rows / 4  # per-column statistics, never per-row


def _array_shapes(arrays) -> list[tuple]:
    out = []
    for value in arrays.values():
        if isinstance(value, dict) and "shape" in value:
            out.append(tuple(value["shape"]))
        elif isinstance(value, list):
            out.append((len(value),))
    return out


def _single_site(exposed=(40, 40, 40), controls=(60, 60, 60), seed: int = 3) -> pd.DataFrame:
    """One service with x1 = 0, 1 and 3: the given exposed and controls at each value. An
    exposed row matches a control with its own x1 or none (the values lie beyond the caliper)."""
    rng = np.random.default_rng(seed)
    x1 = np.concatenate([np.full(e + c, v) for v, e, c in zip((0.0, 1.0, 3.0), exposed, controls)])
    t = np.concatenate([np.r_[np.ones(e), np.zeros(c)] for e, c in zip(exposed, controls)])
    n = len(x1)
    frame = pd.DataFrame(
        {
            "y": (rng.random(n) < 0.45).astype(float),
            "t": t,
            "x1": x1,
            "x2": rng.normal(size=n),
            "g": rng.choice(["a", "b", "c"], size=n),
            "h": (rng.random(n) < 0.5).astype(float),
        }
    )
    return frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def _pairs_released(folder) -> float:
    (node,) = load_network(folder / "network.toml").nodes
    (entry,) = [e for e in runtime_for(NodeConfig.from_mapping(node)).audit.entries() if e["kind"] == kind.TASK_MATCH]
    assert sorted(entry["released"]["arrays"]) == ["after/difference", "after/pairs"]  # no sum over one group
    return logged_array(entry["released"]["arrays"]["after/pairs"])[0]


@pytest.mark.parametrize(
    "exposed, controls",
    [((40, 40, 43), (42, 41, 40)), ((40, 40, 43), (70, 70, 40))],
    ids=["few-of-each", "few-exposed-many-controls"],
)
def test_a_few_unmatched_people_are_never_left(tmp_path, exposed, controls):
    """Matching leaves 3 exposed without a control (and 3, or 60, controls over): results on
    the matched set beside results on the cohort (the exposure column of the outcome model
    beside the propensity model's) would differ by those few people. So the node also
    unmatches its worst-matched pairs until 0 or at least 8 of each group are left, as the
    documented rule says (tests/reference_propensity.py applies it to the pooled rows), and
    the study runs; nothing released over the matched set is a sum over one group."""
    site = _single_site(exposed=exposed, controls=controls)
    write_network(tmp_path, {"trust": site}, COLUMNS)
    settings = dict(name="few", kind="psm", outcome="y", exposure="t", covariates="x1")
    result = run_inprocess([write_study(tmp_path / "few.toml", **settings)], tmp_path / "network.toml")[0]
    frame = site.assign(site="trust")
    ref = reference_psm(frame, settings, group="site")
    assert _pairs_released(tmp_path) == ref["n_pairs"] == sum(exposed) - 8
    assert_matches(result, ref["outcome"])


def test_trust_approves_the_study_once_for_its_models(tmp_path):
    """An approved-mode node answers every step of an approved PSM study (its derived models
    are checked to be the study's), and refuses a model that only claims to belong to it."""
    schema_path = tmp_path / "schema.toml"
    from glmcase import write_schema

    write_schema(schema_path, COLUMNS)
    fields = dict(name="approved_psm", kind="psm", outcome="y", exposure="t", covariates="x1 + g")
    spec, _ = parse_study(fields, Schema.load(schema_path), "approved_psm.toml")
    policy = f'mode = "approved"\napproved = ["{spec.hash}"]\nstate_dir = "state"\n'
    (tmp_path / "policy.toml").write_text(policy)
    write_network(tmp_path, {"trust": _single_site()}, COLUMNS)
    text = (tmp_path / "network.toml").read_text() + 'policy = "policy.toml"\n'
    (tmp_path / "network.toml").write_text(text)
    study = write_study(tmp_path / "approved_psm.toml", **fields)
    result = run_inprocess([study], tmp_path / "network.toml")[0]
    assert result["matching"]["pairs"] == 120 and result["n"] == 240
    # A forged model: another formula, claiming the approved study as its parent.
    node = Node(
        tmp_path / "forged",
        _single_site(),
        COLUMNS,
        policy=f'mode = "approved"\napproved = ["{spec.hash}"]\nstate_dir = "state"\n',
    )
    real = kind.derived_specs(spec)["ps"].to_wire()
    forged = dict(real, formula="t ~ x2")
    reply, _ = node.prepare(forged)
    assert_nothing_released(reply, rule="invalid_study")
    reply, _ = node.prepare(real)
    assert reply.status == m.OK


def test_score_coefficients_that_put_the_weights_on_a_few_people_are_refused(tmp_path):
    """A coordinator sending a β of its own choosing to the weighting step, so that the
    weights (and the weighted means released) rest on the few people with the largest x2."""
    node = Node(tmp_path, _single_site(), COLUMNS)
    spec, _ = parse_study(
        dict(name="probe", kind="iptw", outcome="y", exposure="t", covariates="x1 + x2"), node.schema, "probe.toml"
    )
    ps = kind.derived_specs(spec)["ps"].to_wire()
    reply, study_hash = node.prepare(ps)
    assert reply.status == m.OK

    def score(beta):
        return node.send(
            m.Task(
                kind=kind.TASK_SCORE,
                study_hash=study_hash,
                payload={"models": {"m0": ps}},
                arrays={"beta": np.asarray(beta, dtype=float)},
            )
        )

    assert_nothing_released(score([0.0, 0.0, -25.0]), rule="min_effective_rows")
    assert score(local_beta(reply)).status == m.OK


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"outcome": None}, "field 'outcome' is required"),
        ({"exposure": "x1"}, "field 'exposure' names the numeric column 'x1'"),
        ({"covariates": "g + t"}, "field 'covariates' uses the exposure 't'"),
        ({"covariates": "g + y"}, "field 'covariates' uses the outcome 'y'"),
        ({"covariates": "g + nope"}, "field 'covariates' names column 'nope'"),
        ({"covariates": "g + __import__('os')"}, "field 'covariates'"),
        ({"caliper": 0}, "field 'caliper' must be a number above 0"),
        ({"caliper": "wide"}, "field 'caliper' must be a number above 0"),
        ({"estimand": "ATE"}, "field 'estimand' applies only to kind = \"iptw\""),
        ({"kind": "iptw", "estimand": "ATC"}, 'field \'estimand\' must be "ATE" or "ATT"'),
        ({"kind": "iptw", "estimand": "ATT", "stabilized": True}, "field 'stabilized' applies to ATE weights only"),
        ({"kind": "iptw", "caliper": 0.1}, "field 'caliper' applies only to kind = \"psm\""),
        ({"family": "negbin"}, "field 'family' must be one of"),
        ({"adjust_outcome": "yes"}, "field 'adjust_outcome' must be true or false"),
        ({"formula": "y ~ t"}, "unknown field 'formula'"),
    ],
)
def test_bad_fields_are_one_sentence(tmp_path, fields, message):
    from glmcase import write_schema

    schema = Schema.load(write_schema(tmp_path / "schema.toml", COLUMNS))
    data = {"name": "bad", "kind": "psm", "outcome": "y", "exposure": "t", "covariates": "g + x1", **fields}
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(SpecError) as info:
        parse_study(data, schema, "bad.toml")
    text = str(info.value)
    assert text.startswith("bad.toml: ") and message in text and "\n" not in text


def test_derived_models_are_deterministic_and_checked(tmp_path):
    from glmcase import write_schema

    schema = Schema.load(write_schema(tmp_path / "schema.toml", COLUMNS))
    spec, parsed = parse_study(
        dict(name="d", kind="iptw", outcome="y", exposure="t", covariates="g + x1", where="x2 > 0"), schema, "d.toml"
    )
    models = kind.derived_specs(spec)
    assert models["ps"].formula == "t ~ g + x1" and models["ps"].where == models["outcome"].where
    assert "y is not missing" in models["ps"].where
    assert models["outcome"].weights == kind.WEIGHT_COLUMN and models["outcome"].cov_type == "HC0"
    again = kind.derived_specs(
        parse_study(
            dict(name="d", kind="iptw", outcome="y", exposure="t", covariates="g  +  x1", where="x2 > 0"),
            schema,
            "e.toml",
        )[0]
    )
    assert again["ps"].hash == models["ps"].hash
    assert kind.parent_of(models["outcome"]).hash == spec.hash
    assert parsed.outcome == "y" and "x1" in parsed.columns

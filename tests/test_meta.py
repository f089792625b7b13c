"""`kind = "meta"`: each node's own fit and the meta-analysis of the exposure equal statsmodels'
GLM on each service's rows and the textbook formulas (tests/reference_meta.py), and the
one-stage models equal statsmodels on the pooled rows, to 1e-8; nodes whose policy refuses
their own fit are reported and left out; bad study fields are one sentence."""

from __future__ import annotations

import glmcase
import numpy as np
import pandas as pd
import pytest
from glmcase import assert_matches, pooled, write_schema, write_study
from nodecase import Node, assert_nothing_released
from reference_meta import pool, reference_meta

from iaptnet.coordinator.inprocess import run_inprocess
from iaptnet.coordinator.meta import render
from iaptnet.coordinator.meta_analysis import meta_analyse
from iaptnet.protocol.errors import SpecError
from iaptnet.protocol.kinds import meta as protocol
from iaptnet.protocol.schema import Schema
from iaptnet.protocol.study import parse_study

SITES = ["s1", "s2", "s3", "s4", "s5", "s6"]
COLUMNS = {
    "y": {"type": "binary"},
    "w": {"type": "numeric"},
    "x": {"type": "numeric"},
    "z": {"type": "numeric"},
    "wt": {"type": "numeric", "min": 0},
    "g": {"type": "categorical", "levels": ["a", "b", "c"]},
    "site": {"type": "categorical", "levels": SITES},
}
SLOPES = {"s1": 0.4, "s2": 0.75, "s3": 0.2, "s4": 0.9, "s5": 0.55, "s6": 0.5}
RTOL = 1e-8


def make_site(name: str, n: int, rng) -> pd.DataFrame:
    levels = ["a", "b"] if name == "s3" else ["a", "b", "c"]  # s3 has no rows of level c
    g = rng.choice(levels, size=n)
    x = rng.normal(0.3, 1.0, size=n)
    z = rng.normal(size=n)
    eff = pd.Series(g).map({"a": 0.0, "b": 0.5, "c": -0.4}).to_numpy()
    eta = -0.3 + SLOPES[name] * x + 0.4 * z + eff + 0.1 * SITES.index(name)
    y = (rng.random(n) < 1 / (1 + np.exp(-eta))).astype(float)
    w = 2.0 + (SLOPES[name] + 0.5) * x - 0.5 * z + eff + rng.normal(scale=1.0 + 0.3 * (x > 0), size=n)
    return pd.DataFrame({"y": y, "w": w, "x": x, "z": z, "wt": rng.gamma(2.0, 0.5, size=n), "g": g, "site": name})


def write_network(folder, sites: dict[str, pd.DataFrame], policies: dict[str, str] | None = None):
    return glmcase.write_network(folder, sites, COLUMNS, policies)


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    rng = np.random.default_rng(5)
    sites = {name: make_site(name, n, rng) for name, n in zip(SITES[:5], (500, 700, 450, 650, 550))}
    folder = tmp_path_factory.mktemp("meta")
    write_network(folder, sites, None)
    return folder, sites


def _study(folder, **fields):
    fields.setdefault("kind", "meta")
    path = write_study(folder / f"{fields['name']}.toml", **fields)
    return run_inprocess([path], folder / "network.toml")[0]


def assert_pooled_matches(result: dict, ref: dict, nodes: list[str]) -> None:
    by_node = {e["node"]: e for e in result["per_node"]}
    for node in nodes:
        np.testing.assert_allclose(by_node[node]["estimate"], ref["per_service"][node]["estimate"], rtol=RTOL)
        np.testing.assert_allclose(by_node[node]["std_error"], ref["per_service"][node]["std_error"], rtol=RTOL)
    for key in ("fixed", "random_dl", "random_reml"):
        for field in ref[key]:
            np.testing.assert_allclose(
                result[key][field], ref[key][field], rtol=RTOL, atol=1e-14, err_msg=f"{key}.{field}"
            )


def test_binomial_meta_equals_per_service_fits_and_pooled_rows(network):
    folder, sites = network
    settings = {
        "name": "het_x",
        "family": "binomial",
        "formula": "y ~ x + z + g + site",
        "exposure": "x",
        "service": "site",
    }
    result = _study(folder, **settings)
    ref = reference_meta(pooled(sites, COLUMNS), settings)
    assert_pooled_matches(result, ref, list(sites))
    assert result["k"] == 5 and all(e["estimate"] is not None for e in result["per_node"])
    # site s3 has no rows of level c: its column is dropped in its own fit, with the service
    # columns (constant within a node)
    s3 = next(e for e in result["per_node"] if e["node"] == "s3")
    assert "g[T.c]" in s3["dropped_terms"] and "site[T.s2]" in s3["dropped_terms"]
    assert result["random_reml"]["tau2"] > 0 and result["random_dl"]["tau2"] > 0
    assert result["random_dl"]["prediction_low"] < result["random_dl"]["estimate"]
    np.testing.assert_allclose(result["random_reml"]["ratio"], np.exp(ref["random_reml"]["estimate"]), rtol=RTOL)
    assert_matches(result["one_stage"], ref["one_stage"])
    assert_matches(result["one_stage_service_fe"], ref["one_stage_service_fe"])
    assert result["one_stage"]["formula"] == "y ~ x + z + g"
    assert result["exposure_term"]["term"] == "x"
    text = render(result)
    assert "REML" in text and "prediction interval" in text and "S3" in text  # (services as the report names them)


def test_gaussian_hc0_weighted_meta(network):
    folder, sites = network
    settings = {
        "name": "het_w",
        "family": "gaussian",
        "formula": "w ~ x + z + g",
        "exposure": "x",
        "service": "site",
        "cov_type": "HC0",
        "weights": "wt",
        "where": "z > -1.5",
    }
    result = _study(folder, **settings)
    ref = reference_meta(pooled(sites, COLUMNS), settings)
    assert_pooled_matches(result, ref, list(sites))
    assert_matches(result["one_stage"], ref["one_stage"])
    assert_matches(result["one_stage_service_fe"], ref["one_stage_service_fe"])
    assert result["one_stage_service_fe"]["formula"] == "w ~ x + z + g + site"


def test_refusing_nodes_are_reported_and_left_out(tmp_path):
    """s2's Trust approves the study's models but does not release its own estimate; s6 has
    too few rows for any model (min_nodes lets the one-stage fits go on without it)."""
    rng = np.random.default_rng(8)
    sizes = (500, 700, 450, 650, 550, 60)
    sites = {name: make_site(name, n, rng) for name, n in zip(SITES, sizes)}
    settings = {
        "name": "het_policy",
        "kind": "meta",
        "family": "binomial",
        "formula": "y ~ x + z + g",
        "exposure": "x",
        "service": "site",
        "min_nodes": 5,
    }
    schema_path = write_schema(tmp_path / "schema.toml", COLUMNS)  # as the network names it
    spec, _ = parse_study(settings, Schema.load(schema_path), "het_policy.toml")
    # approving the study's own hash is enough: its one-stage models name it and s2 checks that
    policy = f'mode = "approved"\napproved = ["{spec.hash}"]\ntasks = ["glm.moments", "glm.prepare", "glm.round"]\n'
    write_network(tmp_path, sites, {"s2": policy})
    result = run_inprocess([write_study(tmp_path / "het_policy.toml", **settings)], tmp_path / "network.toml")[0]
    by_node = {e["node"]: e for e in result["per_node"]}
    assert (
        by_node["s2"]["estimate"] is None and "does not allow the task kind 'meta.local_fit'" in by_node["s2"]["reason"]
    )
    assert by_node["s6"]["estimate"] is None and "rows at this node are fewer than 100" in by_node["s6"]["reason"]
    assert result["k"] == 4
    ref = reference_meta(pooled({k: v for k, v in sites.items() if k != "s6"}, COLUMNS), settings)
    kept = ["s1", "s3", "s4", "s5"]
    y = np.array([ref["per_service"][s]["estimate"] for s in kept])
    v = np.array([ref["per_service"][s]["std_error"] ** 2 for s in kept])
    assert_pooled_matches(result, {"per_service": ref["per_service"], **pool(y, v)}, kept)
    # the one-stage fits include s2 (approved) and not s6 (refused, min_nodes = 5)
    assert_matches(result["one_stage"], ref["one_stage"])
    status = {n["name"]: n["contributed"] for n in result["nodes"]}
    assert status == {"s1": True, "s2": True, "s3": True, "s4": True, "s5": True, "s6": False}
    assert "not pooled" in render(result)


def test_estimators_against_textbook_formulas():
    rng = np.random.default_rng(3)
    y = rng.normal(0.1, 0.2, size=7)
    v = rng.uniform(0.005, 0.03, size=7)
    ref = pool(y, v)
    got = meta_analyse(y, v)
    for key in ref:
        for field in ref[key]:
            np.testing.assert_allclose(
                got[key][field], ref[key][field], rtol=1e-10, atol=1e-15, err_msg=f"{key}.{field}"
            )
    # homogeneous: Q < k - 1, so tau^2 is 0 (statsmodels' DL would go negative) and RE = FE
    y = np.array([0.10, 0.11, 0.105, 0.099])
    v = np.array([0.01, 0.01, 0.02, 0.015])
    got = meta_analyse(y, v)
    assert got["random_dl"]["tau2"] == 0.0 and got["random_reml"]["tau2"] == 0.0
    assert got["random_dl"]["I2"] == 0.0 and got["fixed"]["I2"] == 0.0
    np.testing.assert_allclose(got["random_reml"]["estimate"], got["fixed"]["estimate"], rtol=1e-14)
    ref = pool(y, v)
    for key in ref:
        for field in ref[key]:
            np.testing.assert_allclose(got[key][field], ref[key][field], rtol=1e-10, atol=1e-15)
    two = meta_analyse(y[:2], v[:2])
    assert two["random_reml"]["prediction_low"] is None  # needs k >= 3


def test_node_refuses_its_own_fit_below_the_model_minimums(tmp_path):
    rng = np.random.default_rng(2)
    node = Node(tmp_path, make_site("s1", 40, rng), COLUMNS)
    spec, _ = parse_study(
        {
            "name": "small",
            "kind": "meta",
            "family": "binomial",
            "formula": "y ~ x + z",
            "exposure": "x",
            "service": "site",
        },
        node.schema,
        "small.toml",
    )
    wire = spec.to_wire()
    reply, _ = node.prepare(wire, kind=protocol.TASK)
    assert_nothing_released(reply, rule="min_rows")


BASE = {
    "name": "m",
    "kind": "meta",
    "family": "binomial",
    "formula": "y ~ x + z + site",
    "exposure": "x",
    "service": "site",
}


@pytest.mark.parametrize(
    "change, words",
    [
        ({"exposure": None}, "field 'exposure' is required"),
        ({"exposure": "q"}, "field 'exposure' must be a term of the formula"),
        ({"exposure": "g", "formula": "y ~ x + g"}, "name one of its levels"),
        ({"exposure": "g[T.a]", "formula": "y ~ x + g"}, "not one of its non-reference levels"),
        ({"service": "x"}, "field 'service' must name a categorical column"),
        ({"formula": "y ~ x + site:z"}, "other than as a main effect"),
        ({"formula": "y ~ center(x) + z"}, "center() or scale()"),
        ({"cov_type": "cluster"}, "field 'cov_type' must be"),
        ({"family": "binomial", "offset": "z"}, "field 'offset' is not supported"),
        ({"colour": "red"}, "unknown field 'colour'"),
        ({"ci": "knha"}, 'field \'ci\' must be "normal" (Wald, the default) or "hksj"'),
        ({"ci": 1}, "got 1."),
    ],
)
def test_bad_fields_are_one_sentence(tmp_path, change, words):
    schema = Schema.load(write_schema(tmp_path / "schema.toml", COLUMNS))
    data = {k: v for k, v in {**BASE, **change}.items() if v is not None}
    with pytest.raises(SpecError) as err:
        parse_study(data, schema, "m.toml")
    assert str(err.value).startswith("m.toml: ") and words in str(err.value)
    assert "\n" not in str(err.value)


def test_exposure_level_and_service_term_added(tmp_path):
    schema = Schema.load(write_schema(tmp_path / "schema.toml", COLUMNS))
    spec, _ = parse_study({**BASE, "formula": "y ~ x + g", "exposure": "g[T.c]"}, schema, "m.toml")
    one, fe = protocol.model_specs(spec)
    assert (one.formula, fe.formula) == ("y ~ x + g", "y ~ x + g + site")
    assert len(set(protocol.approval_hashes(spec))) == 3


def test_a_trust_approving_the_study_answers_only_the_models_it_derives(tmp_path):
    """A one-stage model names its meta study; a node checks that the study derives exactly
    that model before counting the study's approval for it."""
    from dataclasses import replace

    from iaptnet.protocol import messages as m
    from iaptnet.protocol.study import approval_hash

    rng = np.random.default_rng(9)
    node = Node(tmp_path, make_site("s1", 400, rng), COLUMNS, policy="")  # the schema, for the hash
    spec, _ = parse_study({**BASE, "formula": "y ~ x + z"}, node.schema, "m.toml")
    one, fe = protocol.model_specs(spec)
    assert approval_hash(one) == approval_hash(fe) == spec.hash == protocol.parent_of(fe).hash
    (tmp_path / "policy.toml").write_text(f'mode = "approved"\napproved = ["{spec.hash}"]\n')
    reply, _ = node.prepare(one.to_wire())
    assert reply.status == m.OK
    tampered = replace(one, formula="y ~ x")  # claims the study, which derives no such model
    reply, _ = node.prepare(tampered.to_wire())
    assert_nothing_released(reply, rule="invalid_study")
    assert "is not one the study 'm' derives" in reply.message
    lines = protocol.describe(spec, node.runtime.policy.rules)
    assert any("own fit" in line for line in lines)


def test_ci_field_changes_the_hash_only_when_hksj_and_nothing_a_node_releases(tmp_path):
    """`ci` is coordinator-side: a node answers an HKSJ study with exactly the release of the
    default one. The default ("normal") is left out of the study hash, so that studies written
    before the field keep theirs; "hksj" is part of it (and checked by the node)."""
    from dataclasses import replace

    from iaptnet.protocol import messages as m

    rng = np.random.default_rng(12)
    node = Node(tmp_path, make_site("s1", 400, rng), COLUMNS)
    default, _ = parse_study(BASE, node.schema, "m.toml")
    normal, _ = parse_study({**BASE, "ci": "normal"}, node.schema, "m.toml")
    hksj, _ = parse_study({**BASE, "ci": "hksj"}, node.schema, "m.toml")
    assert normal.hash == default.hash and default.params == {"service": "site"}
    assert hksj.hash != default.hash and hksj.params == {"service": "site", "ci": "hksj"}
    replies = [node.prepare(spec.to_wire(), kind=protocol.TASK)[0] for spec in (default, hksj)]
    assert all(r.status == m.OK for r in replies)
    assert replies[0].payload["models"] == replies[1].payload["models"]
    assert any("HKSJ" in line for line in protocol.describe(hksj, node.runtime.policy.rules))
    with pytest.raises(SpecError, match="settings are not valid here"):
        protocol.check_at_node(replace(hksj, params={"service": "site", "ci": "adhoc"}), node.schema)

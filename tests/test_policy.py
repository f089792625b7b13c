"""The node's policy file, the approval workflow, refusals the analyst can act on (level
merges, min_nodes), small-number rounding of released counts, and safe errors."""

from __future__ import annotations

import tomllib

import numpy as np
import pandas as pd
import pytest
from glmcase import pooled, reference_fit, run_study, write_network, write_study
from nodecase import Node, assert_nothing_released

from iaptnet.cli import main
from iaptnet.coordinator.inprocess import run_inprocess
from iaptnet.node import disclosure as d
from iaptnet.node.policy import Rules, load_policy, round_count
from iaptnet.node.registry import HANDLERS, handler
from iaptnet.protocol import messages as m
from iaptnet.protocol.errors import NetworkError, SpecError
from iaptnet.protocol.study import StudySpec

COLUMNS = {
    "y": {"type": "binary"},
    "x": {"type": "numeric"},
    "g": {"type": "categorical", "levels": ["a", "b", "c", "d"]},
}


def make_sites(rare_at: str | None = "s1", seed: int = 5) -> dict[str, pd.DataFrame]:
    """Three sites; level d is held by 3 rows at `rare_at` and is absent elsewhere."""
    rng = np.random.default_rng(seed)
    sites = {}
    for k, n in enumerate((300, 350, 400)):
        name = f"s{k}"
        g = rng.choice(["a", "b", "c"], size=n).astype(object)
        if name == rare_at:
            g[:3] = "d"
        x = rng.normal(size=n)
        eff = pd.Series(g).map({"a": 0.0, "b": 0.5, "c": -0.4, "d": 0.3}).to_numpy()
        y = (rng.random(n) < 1 / (1 + np.exp(-(0.5 * x + eff)))).astype(int)
        sites[name] = pd.DataFrame({"y": y, "x": x, "g": g})
    return sites


# --------------------------------------------------------------------------- the policy file


def test_defaults_without_a_file_are_exploratory_and_a_production_node_needs_one():
    policy = load_policy(None, production=False)
    assert policy.mode == "exploratory" and policy.state_dir is None and not policy.approved
    assert (policy.rules.suppress_max, policy.rules.round_to) == (7, 5)
    assert policy.rules.max_params_per_row == 0.33
    for field in ("min_rows", "min_events", "min_effective_rows"):
        assert getattr(policy.exploratory, field) > getattr(policy.rules, field)
    assert policy.exploratory.max_studies_per_day < policy.rules.max_studies_per_day
    with pytest.raises(SpecError, match="production node needs a policy file"):
        load_policy(None, production=True)


def test_a_full_policy_file(tmp_path):
    digest = "ab" * 32
    path = tmp_path / "policy.toml"
    path.write_text(f'''
mode = "approved"
approved = ["{digest}"]
tasks = ["glm.prepare", "glm.round"]
state_dir = "/var/lib/iaptnet"
max_task_age_minutes = 10
max_payload_mb = 1
[rules]
min_rows = 30
min_level_count = 10
[exploratory]
min_rows = 200
''')
    policy = load_policy(path, production=True)
    assert policy.is_approved(digest) and not policy.is_approved("cd" * 32)
    assert policy.allows_kind("glm.round") and not policy.allows_kind("glm.moments")
    assert str(policy.state_dir) == "/var/lib/iaptnet"
    assert policy.max_task_age_seconds == 600 and policy.max_payload_bytes == 1_000_000
    assert policy.rules.min_rows == 30 and policy.rules.min_level_count == 10
    assert policy.exploratory.min_rows == 200
    assert policy.exploratory.min_level_count == 10  # never looser than [rules]
    assert policy.rules_for(True) is policy.rules and policy.rules_for(False) is policy.exploratory


@pytest.mark.parametrize(
    "text, field",
    [
        ('mode = "open"', "'mode'"),
        ('approved = ["not-a-hash"]', "'approved'"),
        ("tasks = []", "'tasks'"),
        ("colour = 1", "'colour'"),
        ('[rules]\nmin_rows = "ten"', "'rules.min_rows'"),
        ("[rules]\nmin_rows = 0", "'rules.min_rows'"),
        ("[rules]\nmax_params_per_row = 2.0", "'rules.max_params_per_row'"),
        ("[rules]\nmin_cell = 5", "'rules.min_cell'"),
        ("[rules]\nmin_rows = 80\n[exploratory]\nmin_rows = 60", "'exploratory.min_rows'"),
        ("[exploratory]\nmax_studies_per_day = 500", "'exploratory.max_studies_per_day'"),
        ("max_payload_mb = -1", "'max_payload_mb'"),
        ("mode = ", "not a valid TOML file"),
    ],
)
def test_a_malformed_policy_is_one_sentence_naming_file_and_field(tmp_path, capsys, text, field):
    path = tmp_path / "policy.toml"
    path.write_text(text + "\n")
    with pytest.raises(SpecError) as err:
        load_policy(path, production=True)
    message = str(err.value)
    assert message.startswith(str(path)) and field in message and "\n" not in message
    # and through the command line: one line, no traceback
    assert main(["node", "audit", "--policy", str(path)]) == 2
    out = capsys.readouterr().err.strip()
    assert out.startswith("error: ") and field in out and len(out.splitlines()) == 1


def test_a_policy_that_breaks_while_serving_stops_the_node_answering(tmp_path):
    node = Node(tmp_path / "n", make_sites()["s0"], COLUMNS, policy='mode = "exploratory"\n')
    reply, _ = node.prepare(node.spec(formula="y ~ x"))
    assert reply.status == m.OK
    (tmp_path / "n" / "policy.toml").write_text('mode = "exploratory"\n[rules]\nmin_rows = -5\n')
    reply, _ = node.prepare(node.spec(formula="y ~ x + g"))
    assert reply.status == m.ERROR and reply.code == "policy_invalid" and "rules.min_rows" in reply.message
    assert reply.arrays == {}


@pytest.mark.parametrize(
    "count, shown",
    [
        (0, 0),
        (1, None),
        (7, None),
        (8, 10),
        (12, 10),
        (13, 15),
        (17, 15),
        (18, 20),
        (1234, 1235),
        (1232, 1230),
    ],
)
def test_small_numbers_follow_the_nhs_convention(count, shown):
    assert round_count(count, Rules()) == shown


def test_count_tables_and_cell_statistics_are_rounded_and_suppressed():
    release = d.Release()
    facts = d.ModelFacts("t", np.ones(100, dtype=bool))
    table = release.table("by_level", facts=facts)
    table.count("a", 3).count("b", 48).count("c", 0)
    table.cell_statistic("a/mean", 12.5, 3).cell_statistic("b/mean", 9.25, 48)
    payload, arrays = d.finish(release, Rules())
    assert payload == {"tables": {"by_level": {"a": None, "b": 50, "c": 0, "a/mean": None, "b/mean": 9.25}}}
    assert arrays == {}


# --------------------------------------------------------------------------- approval


def test_approve_prints_the_study_and_adds_its_hash_keeping_the_file(tmp_path, capsys):
    sites = make_sites(rare_at=None)
    net = write_network(tmp_path / "net", sites, COLUMNS)
    policy = tmp_path / "net" / "policy.toml"
    policy.write_text(
        '# the Trust\'s policy: keep this comment\nmode = "approved"\nstate_dir = "state"\n\n[rules]\nmin_rows = 60  # ours\n'
    )
    net.write_text(
        net.read_text().replace('schema = "schema.toml"\n', 'schema = "schema.toml"\npolicy = "policy.toml"\n')
    )
    study = write_study(
        tmp_path / "s.toml",
        name="s",
        family="binomial",
        formula="y ~ x + g",
        schema=str(tmp_path / "net" / "schema.toml"),
    )
    with pytest.raises(NetworkError, match="s0, s1 and s2 refused: the Trust has not approved the study 's'"):
        run_inprocess([study], net)
    assert main(["node", "approve", str(study), "--policy", str(policy), "--yes"]) == 0
    out = capsys.readouterr().out
    expected = StudySpec.from_wire(_wire(study, tmp_path / "net" / "schema.toml")).hash
    assert f"hash       {expected}" in out and "estimates  5 coefficients: Intercept, g[T.b], g[T.c], g[T.d], x" in out
    assert "under 60 rows" in out
    text = policy.read_text()
    assert "keep this comment" in text and "min_rows = 60  # ours" in text
    assert tomllib.loads(text)["approved"] == [expected]
    result = run_inprocess([study], net)[0]  # the running nodes see the new approval
    assert result["study_hash"] == expected and all(n["contributed"] for n in result["nodes"])
    assert main(["node", "approve", str(study), "--policy", str(policy), "--yes"]) == 0
    assert "already approved" in capsys.readouterr().out
    assert tomllib.loads(policy.read_text())["approved"] == [expected]


def _wire(study_path, schema_path):
    from iaptnet.protocol.schema import Schema
    from iaptnet.protocol.study import parse_study, read_study_file

    return parse_study(read_study_file(study_path), Schema.load(schema_path), str(study_path))[0].to_wire()


# --------------------------------------------------------------------------- refusals and fixes


def test_a_rare_level_is_refused_in_plain_words_with_the_fix(tmp_path):
    net = write_network(tmp_path / "net", make_sites(), COLUMNS).parent
    with pytest.raises(NetworkError) as err:
        run_study(net, name="s", family="binomial", formula="y ~ x + g")
    assert str(err.value) == (
        "the study stopped at glm.prepare: s1 refused: level 'd' of g has fewer than 8 rows; "
        "the policy's minimum is 8 (model 's'); to fix: merge it with another level, e.g. "
        '[merge.g] c = ["c", "d"], or drop the term \'g\'.'
    )


def test_min_nodes_lets_the_study_continue_without_the_refusing_node(tmp_path):
    sites = make_sites()
    net = write_network(tmp_path / "net", sites, COLUMNS).parent
    result = run_study(net, name="s", family="binomial", formula="y ~ x + g", min_nodes=2)
    status = {n["name"]: n for n in result["nodes"]}
    assert not status["s1"]["contributed"]
    assert status["s1"]["reason"].startswith("refused: level 'd' of g has fewer than 8 rows")
    assert status["s0"]["contributed"] and status["s2"]["contributed"]
    others = pooled({k: v for k, v in sites.items() if k != "s1"}, COLUMNS)
    ref = reference_fit(others, "y ~ x + g", "binomial", ["y", "x", "g"])
    # g[T.d] has no rows among the contributors: dropped, as the reference drops it.
    assert [t["term"] for t in result["terms"]] == list(ref.params.index.drop("g[T.d]"))
    np.testing.assert_allclose([t["estimate"] for t in result["terms"]], ref.params.drop("g[T.d]"), rtol=1e-8)
    assert result["n"] == int(ref.nobs)


def test_a_level_merge_fixes_the_refusal_and_matches_statsmodels(tmp_path):
    sites = make_sites()
    net = write_network(tmp_path / "net", sites, COLUMNS).parent
    result = run_study(net, name="s", family="binomial", formula="y ~ x + g", merge={"g": {"c": ["c", "d"]}})
    frame = pooled(sites, COLUMNS)
    frame["g"] = pd.Categorical(frame["g"].astype(str).replace({"d": "c"}), categories=["a", "b", "c"])
    ref = reference_fit(frame, "y ~ x + g", "binomial", ["y", "x", "g"])
    assert [t["term"] for t in result["terms"]] == list(ref.params.index) == ["Intercept", "g[T.b]", "g[T.c]", "x"]
    np.testing.assert_allclose([t["estimate"] for t in result["terms"]], ref.params, rtol=1e-8)
    np.testing.assert_allclose([t["std_error"] for t in result["terms"]], ref.bse, rtol=1e-8)
    assert result["n"] == int(ref.nobs)


def test_a_merge_changes_the_hash_and_keeps_the_reference_level(tmp_path):
    from iaptnet.protocol.schema import Schema
    from iaptnet.protocol.study import merged_levels, parse_study

    sites = make_sites()
    write_network(tmp_path / "net", sites, COLUMNS)
    schema = Schema.load(tmp_path / "net" / "schema.toml")
    plain = parse_study({"name": "s", "family": "binomial", "formula": "y ~ x + g"}, schema, "s")[0]
    merged = parse_study(
        {"name": "s", "family": "binomial", "formula": "y ~ x + g", "merge": {"g": {"c": ["c", "d"]}}}, schema, "s"
    )[0]
    assert plain.hash != merged.hash and "merge" not in plain.canonical()
    assert merged_levels(["a", "b", "c", "d"], {"ab": ["a", "b"]}) == (["ab", "c", "d"], {"a": "ab", "b": "ab"})
    assert merged_levels(["a", "b", "c", "d"], {"z": ["d", "a"]})[0] == ["b", "c", "z"]


@pytest.mark.parametrize(
    "merge, message",
    [
        ({"x": {"a": ["a", "b"]}}, "merges levels of the numeric column 'x'"),
        ({"g": {"e": ["a", "zz"]}}, "lists 'zz', which is not a level of 'g'"),
        ({"g": {"e": ["a"]}}, "at least two levels"),
        ({"g": {"e": ["a", "b"], "f": ["b", "c"]}}, "level 'b' is merged twice"),
        ({"g": {"b": ["a", "c"]}}, "already a level of 'g'"),
        ({"g": {"e": ["a", "b", "c", "d"]}}, "single level"),
        ({"h": {"e": ["a", "b"]}}, "names column 'h'"),
    ],
)
def test_merge_mistakes_are_one_sentence(tmp_path, capsys, merge, message):
    net = write_network(tmp_path / "net", make_sites(rare_at=None), COLUMNS)
    study = write_study(tmp_path / "s.toml", name="s", family="binomial", formula="y ~ x + g", merge=merge)
    assert main(["run", str(study), "--network", str(net)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1


def test_per_node_counts_follow_the_small_number_rules(tmp_path):
    sites = make_sites(rare_at=None)
    for frame in sites.values():
        frame.loc[:4, "x"] = np.nan  # 5 rows of the cohort dropped as missing: suppressed
        frame.loc[:4, "g"] = "a"
    net = write_network(tmp_path / "net", sites, COLUMNS).parent
    result = run_study(net, name="s", family="binomial", formula="y ~ x", where='g != "c"')
    used = {name: int(((frame.g != "c") & frame.x.notna()).sum()) for name, frame in sites.items()}
    for node in result["nodes"]:
        assert node["n_missing"] is None
        assert node["n_used"] == int(np.floor(used[node["name"]] / 5 + 0.5) * 5)
        assert node["events"] % 5 == 0 and node["n_cohort"] % 5 == 0
    assert result["n"] == sum(used.values())  # the model's n stays exact
    assert result["n_missing"] == 0  # the sum of suppressed counts


# --------------------------------------------------------------------------- the one door


@pytest.fixture
def scratch_kind():
    added = []

    def register(kind, fn, studies="none"):
        handler(kind, studies=studies)(fn)
        added.append(kind)

    yield register
    for kind in added:
        HANDLERS.pop(kind, None)


def test_no_exception_text_leaves_the_node(tmp_path, scratch_kind):
    def explode(runtime, task):
        secret = runtime.dataset.frame["x"].iloc[0]
        raise ValueError(f"row value {secret!r} broke")

    scratch_kind("test.explode", explode)
    node = Node(tmp_path / "n", make_sites()["s0"], COLUMNS)
    secret = repr(node.runtime.dataset.frame["x"].iloc[0])
    reply = node.send(m.Task(kind="test.explode", study_hash="x"))
    assert_nothing_released(reply, secrets=(secret, str(secret)[:8]))
    assert reply.code == "internal_error"
    assert node.audit_entries()[-1]["status"] == m.ERROR


def test_an_exception_outside_the_dispatcher_is_not_forwarded_by_flower(tmp_path, monkeypatch):
    import iaptnet.node.app as app_module

    def broken(runtime, task):
        raise RuntimeError("secret 4242")

    monkeypatch.setattr(app_module, "dispatch", broken)
    node = Node(tmp_path / "n", make_sites()["s0"], COLUMNS)
    reply, _ = node.prepare(node.spec(formula="y ~ x"))
    assert reply.status == m.ERROR and reply.code == "internal_error" and "4242" not in reply.message


def test_an_undeclared_release_is_refused(tmp_path, scratch_kind):
    def sneaky(runtime, task):
        return m.Reply(status=m.OK, node="", arrays={"x": runtime.dataset.frame["x"].to_numpy()})

    def forgetful(runtime, task):
        release = d.Release()
        release.model("m0", None).array("x", runtime.dataset.frame["x"].to_numpy())
        return release

    def reads_no_rows(runtime, task):
        release = d.Release()
        release.model("m0", d.ModelFacts("m", np.ones(len(runtime.dataset.frame), dtype=bool))).array("x", [1.0])
        return release

    scratch_kind("test.sneaky", sneaky)
    scratch_kind("test.forgetful", forgetful)
    scratch_kind("test.none", reads_no_rows)
    node = Node(tmp_path / "n", make_sites()["s0"], COLUMNS)
    for kind in ("test.sneaky", "test.forgetful", "test.none"):
        reply = node.send(m.Task(kind=kind, study_hash="x"))
        assert_nothing_released(reply, rule="undeclared")
    with pytest.raises(TypeError):
        d.Release().public("n_rows", 300)  # numbers are never "public"


def test_refusal_sentences_name_rule_threshold_and_fix():
    v = d.Violation("min_rows", "the model uses fewer than 50 rows at this node", 50, model="s", fix="widen the cohort")
    assert (
        v.render()
        == "the model uses fewer than 50 rows at this node; the policy's minimum is 50 (model 's'); to fix: widen the cohort"
    )
    v = d.Violation("max_params_per_row", "too many parameters", 0.33)
    assert v.render() == "too many parameters; the policy's maximum is 0.33"


def test_a_study_run_again_on_the_same_data_does_not_use_up_the_daily_limits(tmp_path):
    """The node's volume limits count new releases: the same study answered again (same
    tasks, same data) releases nothing new, so running the demo twice in a day works; a
    different study still counts."""
    rng = np.random.default_rng(3)
    sites = {"a": pd.DataFrame({"y": (rng.random(300) < 0.4).astype(float), "x": rng.normal(size=300)})}
    policy = (
        'mode = "exploratory"\n[exploratory]\nmax_rounds_per_study = 8\nmax_studies_per_day = 2\n'
        "[rules]\nmax_rounds_per_study = 8\nmax_studies_per_day = 2\n"
    )
    write_network(tmp_path, sites, {"y": {"type": "binary"}, "x": {"type": "numeric"}}, {"a": policy})
    for _ in range(4):  # about 5 tasks a run, 8 allowed a day
        result = run_study(tmp_path, name="same", family="binomial", formula="y ~ x")
        assert result["converged"]
    run_study(tmp_path, name="other", family="binomial", formula="y ~ x", where="x > -2")
    with pytest.raises(NetworkError, match="max_studies_per_day|as many studies today"):
        run_study(tmp_path, name="third", family="binomial", formula="y ~ x", where="x > -2.5")

"""Hostile or mistaken input through the public CLI: every case ends as one sentence on stderr
naming the file and field, a non-zero exit, no traceback, and nothing written outside --out
(or anything at all when the run fails)."""

from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd
import pytest
import tomli_w
from glmcase import write_network

from iaptnet.cli import main
from iaptnet.protocol import messages as m

COLUMNS = {
    "y": {"type": "binary"},
    "x": {"type": "numeric"},
    "k": {"type": "integer", "min": 0, "max": 27},
    "z": {"type": "numeric"},
    "w": {"type": "numeric", "min": 0},
    "d": {"type": "date"},
    "g": {"type": "categorical", "levels": ["a", "b"]},
}


def frame(rng, n: int = 200) -> pd.DataFrame:
    days = rng.integers(0, 3000, size=n)
    return pd.DataFrame(
        {
            "y": (rng.random(n) < 0.5).astype(int),
            "x": rng.normal(size=n),
            "k": rng.integers(0, 28, size=n),
            "z": rng.normal(50, 10, size=n),
            "w": rng.gamma(2.0, 20.0, size=n),
            "d": (pd.Timestamp("2012-04-01") + pd.to_timedelta(days, unit="D")).strftime("%Y-%m-%d"),
            "g": rng.choice(["a", "b"], size=n),
        }
    )


@pytest.fixture
def net(tmp_path):
    rng = np.random.default_rng(7)
    return write_network(tmp_path / "net", {f"s{i}": frame(rng) for i in range(2)}, COLUMNS)


def write(path, **fields):
    path.write_text(tomli_w.dumps(fields))
    return path


def cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip()


def one_sentence(code: int, err: str, *expected: str, exit_code: int | None = None) -> None:
    assert code != 0 if exit_code is None else code == exit_code, err
    assert "Traceback" not in err
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    for text in expected:
        assert text in err, err


def files_under(folder) -> set[str]:
    return {os.path.join(root, f) for root, _, files in os.walk(folder) for f in files}


# --------------------------------------------------------------------------- 1. output paths

BAD_NAMES = ["../../escaped", "a/b", "..", ".", "bad\x00name\x1b[31m\n", "~", "x" * 400]


@pytest.mark.parametrize("name", BAD_NAMES + ["ABS"], ids=range(len(BAD_NAMES) + 1))
def test_study_names_never_choose_a_path_outside_out(capsys, tmp_path, net, name):
    if name == "ABS":
        name = str(tmp_path / "absolute")
    a = write(tmp_path / "a.toml", name=name, family="binomial", formula="y ~ x")
    b = write(tmp_path / "b.toml", name="plain", family="binomial", formula="y ~ x")
    out = tmp_path / "deep" / "er" / "out"
    before = files_under(tmp_path)
    code, err = cli(capsys, "run", a, b, "--network", net, "--out", out)
    assert code == 0, err
    written = files_under(tmp_path) - before
    assert written and all(f.startswith(str(out) + os.sep) for f in written), written
    assert (out / "plain" / "results.json").exists()
    folders = [p for p in out.iterdir() if p.name not in ("plain", "tables", "tables.xlsx", "report.html")]
    assert len(folders) == 1 and (folders[0] / "results.json").exists()
    tables = list((out / "tables").iterdir())  # the report's tables: plain names too
    assert tables and all(not t.name.startswith(".") and t.name.isprintable() and t.suffix == ".csv" for t in tables)
    assert not folders[0].name.startswith(".") and all(c.isprintable() for c in folders[0].name)


@pytest.mark.parametrize("first, second", [("a/b", "a_b"), ("Same", "same"), ("x", "x")])
def test_two_studies_with_one_results_folder_are_refused_before_anything_runs(
    capsys, tmp_path, net, monkeypatch, first, second
):
    import iaptnet.coordinator.inprocess as inprocess

    monkeypatch.setattr(inprocess, "run_inprocess", lambda *a, **k: pytest.fail("the studies ran"))
    a = write(tmp_path / "a.toml", name=first, family="binomial", formula="y ~ x")
    b = write(tmp_path / "b.toml", name=second, family="binomial", formula="y ~ x")
    out = tmp_path / "out"
    code, err = cli(capsys, "run", a, b, "--network", net, "--out", out)
    one_sentence(code, err, "b.toml", "field 'name'", "a.toml", exit_code=2)
    assert not out.exists()


def test_a_results_folder_that_leads_outside_out_is_refused(capsys, tmp_path, net):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "one").symlink_to(elsewhere, target_is_directory=True)
    a = write(tmp_path / "a.toml", name="one", family="binomial", formula="y ~ x")
    b = write(tmp_path / "b.toml", name="two", family="binomial", formula="y ~ x")
    code, err = cli(capsys, "run", a, b, "--network", net, "--out", out)
    one_sentence(code, err, "one", "outside", exit_code=2)
    assert not any(elsewhere.iterdir())
    assert not (out / "two").exists()


def test_an_out_that_is_a_file_is_refused_before_anything_runs(capsys, tmp_path, net, monkeypatch):
    import iaptnet.coordinator.inprocess as inprocess

    monkeypatch.setattr(inprocess, "run_inprocess", lambda *a, **k: pytest.fail("the study ran"))
    out = tmp_path / "out"
    out.write_text("not a folder")
    study = write(tmp_path / "s.toml", name="s", family="binomial", formula="y ~ x")
    code, err = cli(capsys, "run", study, "--network", net, "--out", out)
    one_sentence(code, err, str(out), "--out", "not a folder", exit_code=2)
    code, err = cli(capsys, "run", study, "--network", net, "--out", out / "below")
    one_sentence(code, err, str(out / "below"), "--out", exit_code=2)
    assert out.read_text() == "not a folder"


def test_results_that_cannot_be_written_are_one_sentence(capsys, tmp_path, net, monkeypatch):
    from iaptnet.coordinator import outputs

    def full(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs, "write_json_atomic", full)
    study = write(tmp_path / "s.toml", name="s", family="binomial", formula="y ~ x")
    code, err = cli(capsys, "run", study, "--network", net, "--out", tmp_path / "out")
    one_sentence(code, err, "results.json", "cannot be written", "No space left", exit_code=2)


def test_the_demo_writes_study_names_under_out_only(tmp_path, monkeypatch):
    from iaptnet.coordinator import demo

    results = [{"study": "../../escaped", "kind": "glm"}, {"study": str(tmp_path / "abs"), "kind": "glm"}]
    monkeypatch.setattr(demo, "synthetic_network", lambda *a, **k: tmp_path / "network.toml")
    monkeypatch.setattr(demo, "run_inprocess", lambda *a, **k: results)
    import iaptnet.report

    monkeypatch.setattr(iaptnet.report, "write_report", lambda folder: iaptnet.report.ReportFiles(folder, [], folder))
    out = tmp_path / "a" / "b" / "out"
    assert demo.run_demo(out, cache=tmp_path, json_mode=True, patients=demo.MIN_PATIENTS) == 0
    written = files_under(tmp_path)
    assert len(written) == 4 and all(f.startswith(str(out) + os.sep) for f in written), written


# --------------------------------------------------------------------------- 2. deep TOML

DEEP = "a = " + "[" * 3000 + "]" * 3000 + "\n"


def test_a_deeply_nested_study_file(capsys, tmp_path, net):
    study = tmp_path / "deep.toml"
    study.write_text('name = "s"\nfamily = "binomial"\nformula = "y ~ x"\n' + DEEP)
    code, err = cli(capsys, "run", study, "--network", net, "--out", tmp_path / "out")
    one_sentence(code, err, "deep.toml", "nested too deeply", exit_code=2)


def test_a_deeply_nested_network_file(capsys, tmp_path, net):
    net.write_text(net.read_text() + "\n[extra]\n" + DEEP)
    study = write(tmp_path / "s.toml", name="s", family="binomial", formula="y ~ x")
    code, err = cli(capsys, "run", study, "--network", net, "--out", tmp_path / "out")
    one_sentence(code, err, "network.toml", "nested too deeply", exit_code=2)


def test_a_deeply_nested_schema_file(capsys, tmp_path, net):
    schema = tmp_path / "schema.toml"
    schema.write_text((net.parent / "schema.toml").read_text() + "\n[extra]\n" + DEEP)
    study = write(tmp_path / "s.toml", name="s", family="binomial", formula="y ~ x", schema="schema.toml")
    code, err = cli(capsys, "run", study, "--network", net, "--out", tmp_path / "out")
    one_sentence(code, err, "schema.toml", "nested too deeply", exit_code=2)


def test_a_deeply_nested_policy_file(capsys, tmp_path, net):
    (net.parent / "policy.toml").write_text(DEEP)
    net.write_text(
        net.read_text().replace('schema = "schema.toml"\n', 'schema = "schema.toml"\npolicy = "policy.toml"\n', 1)
    )
    study = write(tmp_path / "s.toml", name="s", family="binomial", formula="y ~ x")
    code, err = cli(capsys, "run", study, "--network", net, "--out", tmp_path / "out")
    one_sentence(code, err, "policy.toml", "nested too deeply")
    assert not (tmp_path / "out").exists()


def test_a_deeply_nested_hub_file(capsys, tmp_path):
    hub = tmp_path / "hub.toml"
    hub.write_text(DEEP)
    study = write(tmp_path / "s.toml", name="s", family="binomial", formula="y ~ x")
    code, err = cli(capsys, "run", study, "--engine", "flower", "--hub", hub, "--out", tmp_path / "out")
    one_sentence(code, err, "hub.toml", "nested too deeply", exit_code=2)


@pytest.mark.parametrize("field", ["study", "schema"])
def test_a_toml_path_that_is_not_a_regular_file(capsys, tmp_path, net, field):
    """/dev/zero would be read forever; a named pipe would block on open."""
    os.mkfifo(tmp_path / "pipe.toml")
    study = write(tmp_path / "s.toml", name="s", family="binomial", formula="y ~ x", schema="/dev/zero")
    if field == "study":
        study = tmp_path / "pipe.toml"
    code, err = cli(capsys, "run", study, "--network", net, "--out", tmp_path / "out")
    one_sentence(code, err, "/dev/zero" if field == "schema" else "pipe.toml", "not a regular file", exit_code=2)


def test_a_toml_path_with_a_nul_character(capsys, tmp_path, net):
    study = write(tmp_path / "s.toml", name="s", family="binomial", formula="y ~ x", schema="sch\x00ema.toml")
    code, err = cli(capsys, "run", study, "--network", net, "--out", tmp_path / "out")
    one_sentence(code, err, "sch\\x00ema.toml", "NUL", exit_code=2)


def test_a_toml_file_too_large_to_be_ours(capsys, tmp_path, net):
    study = tmp_path / "big.toml"
    study.write_text('name = "s"\nfamily = "binomial"\nformula = "y ~ x"\n' + "# padding\n" * 1_100_000)
    code, err = cli(capsys, "run", study, "--network", net, "--out", tmp_path / "out")
    one_sentence(code, err, "big.toml", "larger than", exit_code=2)


# --------------------------------------------------------------------------- 3. cohort filters

BAD_FILTERS = [
    ('d >= "2020-13-45"', "not a calendar date"),
    ('d in ["2020-02-30"]', "not a calendar date"),
    ('d > "0000-01-01"', "not a calendar date"),
    ("d > 5", "quoted date"),
    ('k > "2020-01-01"', "with a string"),
    ("d < k", "'d'"),
    ("k == d", "'d'"),
    ("y != d", "'d'"),
    ("k > 1e999", "too large"),
    ("x < -1e400", "too large"),
]


@pytest.mark.parametrize("where, expected", BAD_FILTERS, ids=range(len(BAD_FILTERS)))
def test_filters_that_make_no_sense_for_the_column_type(capsys, tmp_path, net, where, expected):
    study = write(tmp_path / "s.toml", name="s", family="binomial", formula="y ~ x", where=where)
    out = tmp_path / "out"
    code, err = cli(capsys, "run", study, "--network", net, "--out", out)
    one_sentence(code, err, "s.toml", "'where'", expected, exit_code=2)
    assert not out.exists()


def test_a_funnel_step_with_an_impossible_date(capsys, tmp_path, net):
    study = write(tmp_path / "t.toml", name="t", kind="table", funnel=['d >= "2020-02-30"'])
    code, err = cli(capsys, "run", study, "--network", net, "--out", tmp_path / "out")
    one_sentence(code, err, "t.toml", "'funnel' step 1", "not a calendar date", exit_code=2)


@pytest.mark.parametrize("where", ['d >= "2020-13-45"', 'd in ["2020-02-30"]', "d < k", "k == d", 'd != "9999-99-99"'])
def test_a_node_refuses_such_filters_sent_anyway(tmp_path, where):
    from nodecase import Node, assert_nothing_released

    node = Node(tmp_path / "node", frame(np.random.default_rng(3), 400), COLUMNS)
    wire = node.spec(formula="y ~ x")
    wire["where"] = where  # as a coordinator that skipped its checks would send it
    reply, _ = node.prepare(wire)
    assert_nothing_released(reply, rule="invalid_study")
    assert "'where'" in reply.message


def test_a_node_evaluates_a_bad_date_without_crashing():
    """cohort_mask itself, should a tree reach it unchecked: a SpecError, not a pandas error."""
    from iaptnet.node.cohort import cohort_mask
    from iaptnet.protocol.errors import SpecError

    data = pd.DataFrame({"d": pd.to_datetime(["2020-01-01", None]), "k": [1.0, 2.0]})
    with pytest.raises(SpecError, match="not a calendar date"):
        cohort_mask(data, ("cmp", ">=", ("col", "d"), ("str", "2020-13-45")))
    with pytest.raises(SpecError, match="'d'"):
        cohort_mask(data, ("cmp", "<", ("col", "d"), ("col", "k")))
    with pytest.raises(SpecError, match="'d'"):
        cohort_mask(data, ("cmp", "<", ("col", "d"), ("num", 5.0)))


# --------------------------------------------------------------------------- 4. exact fits


@pytest.mark.parametrize("outcome", ["exact", "integer"])
def test_a_gaussian_model_that_fits_its_outcome_exactly(capsys, tmp_path, outcome):
    rng = np.random.default_rng(2)
    sites = {}
    for i in range(2):
        x = rng.normal(size=100) if outcome == "exact" else rng.integers(0, 10, size=100).astype(float)
        sites[f"s{i}"] = pd.DataFrame({"y": 2 * x + 1, "x": x})
    network = write_network(tmp_path / "net", sites, {"y": {"type": "numeric"}, "x": {"type": "numeric"}})
    study = write(tmp_path / "s.toml", name="exact", family="gaussian", formula="y ~ x")
    out = tmp_path / "out"
    code, err = cli(capsys, "run", study, "--network", network, "--out", out)
    one_sentence(code, err, "model 'exact'", "fits the outcome exactly", exit_code=3)
    assert not out.exists()


def test_a_gaussian_model_with_a_small_residual_still_fits(capsys, tmp_path):
    rng = np.random.default_rng(2)
    sites = {}
    for i in range(2):
        x = rng.normal(size=100)
        sites[f"s{i}"] = pd.DataFrame({"y": 2 * x + 1 + 1e-6 * rng.normal(size=100), "x": x})
    network = write_network(tmp_path / "net", sites, {"y": {"type": "numeric"}, "x": {"type": "numeric"}})
    study = write(tmp_path / "s.toml", name="close", family="gaussian", formula="y ~ x")
    code, err = cli(capsys, "run", study, "--network", network, "--out", tmp_path / "out", "--json")
    assert code == 0, err
    import json

    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert math.isfinite(result["llf"]) and result["scale"] > 0


# --------------------------------------------------------------------------- 5. non-finite replies


class NonFiniteHub:
    """A Grid of four nodes that answer at once; `bad` maps a node id to (arrays, payload)."""

    NAMES = {1: "site0", 2: "site1", 3: "site2", 4: "site3"}

    def __init__(self, bad: dict[int, tuple[dict, dict]]):
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.supercore.task_identity import TaskIdentity

        self.bad = bad
        self.sent = {}
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID

    def get_node_ids(self):
        return list(self.NAMES)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg_id = f"task-{msg.metadata.dst_node_id}"
            msg.metadata.__dict__["_message_id"] = msg_id
            self.sent[msg_id] = msg
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids):
        from flwr.app import Message

        out = []
        for msg_id in message_ids:
            msg = self.sent[msg_id]
            node_id = msg.metadata.dst_node_id
            arrays, payload = self.bad.get(node_id, ({"score": np.ones(3)}, {"n": 5, "stats": {"mean": 1.5}}))
            task = m.decode_task(msg.content)
            deep = payload == "DEEP"
            reply = m.Reply(
                status=m.OK,
                node=self.NAMES[node_id],
                task_id=task.task_id,
                arrays=arrays,
                payload={} if deep else payload,
            )
            content = m.encode_reply(reply)
            if deep:  # JSON nested deeper than Python's json module can decode
                content.config_records["reply"]["payload"] = "[" * 100_000 + "]" * 100_000
            out.append(Message(content, reply_to=msg))
        return out


NON_FINITE = {
    "nan_array": ({"score": np.array([1.0, np.nan, 2.0])}, {}),
    "inf_array": ({"score": np.ones(3), "info": np.array([[1.0, -np.inf]])}, {}),
    "nan_payload": ({}, {"counts": {"m0": {"n_used": float("nan")}}}),
    "inf_payload_list": ({}, {"sums": [1.0, [2.0, float("inf")]]}),
    "int_beyond_floats": ({}, {"counts": {"m0": {"n_used": 10**400}}}),
}


@pytest.mark.parametrize("case", NON_FINITE)
def test_a_node_that_sends_a_non_finite_number_has_failed(case):
    from iaptnet.coordinator.session import Session
    from iaptnet.protocol.errors import NetworkError

    hub = NonFiniteHub({3: NON_FINITE[case]})
    with pytest.raises(NetworkError) as err:
        Session(hub, "f" * 64, timeout=1.0).ask("glm.prepare")
    assert "site2 sent a statistic that is not a finite number" in str(err.value)
    s = Session(hub, "f" * 64, timeout=1.0, min_nodes=3)
    replies = s.ask("glm.prepare")
    assert [r.node for r in replies] == ["site0", "site1", "site3"]
    assert s.nodes[3].dropped_reason == "sent a statistic that is not a finite number"


def test_a_reply_nested_too_deeply_to_decode_is_a_failed_node():
    from iaptnet.coordinator.session import Session

    s = Session(NonFiniteHub({3: ({}, "DEEP")}), "f" * 64, timeout=1.0, min_nodes=3)
    assert [r.node for r in s.ask("glm.prepare")] == ["site0", "site1", "site3"]
    assert "cannot read" in s.nodes[3].dropped_reason


def test_a_run_stops_on_a_node_that_releases_nan(capsys, tmp_path, net, monkeypatch):
    real = m.encode_reply

    def poisoned(reply):
        if reply.node == "s1" and reply.arrays:
            key = sorted(reply.arrays)[0]
            reply.arrays[key] = np.full_like(np.asarray(reply.arrays[key], dtype=float), np.nan)
        return real(reply)

    monkeypatch.setattr(m, "encode_reply", poisoned)
    study = write(tmp_path / "s.toml", name="s", family="binomial", formula="y ~ x")
    out = tmp_path / "out"
    code, err = cli(capsys, "run", study, "--network", net, "--out", out)
    one_sentence(code, err, "s1 sent a statistic that is not a finite number", exit_code=4)
    assert not out.exists()


# --------------------------------------------------------------------------- 6. table resolution

BAD_RESOLUTIONS = [
    ("k", 1e-300, "steps"),
    ("k", 1e300, "range"),
    ("k", 5e-324, "steps"),
    ("w", 5e-324, "between"),
    ("z", 1e-310, "between"),
    ("z", 1e300, "between"),
    ("x", 0, "positive"),
    ("x", float("nan"), "positive"),
    ("x", float("inf"), "positive"),
    ("x", 10**400, "positive"),
]


@pytest.mark.parametrize("column, resolution, expected", BAD_RESOLUTIONS, ids=range(len(BAD_RESOLUTIONS)))
def test_a_quantile_grid_that_is_too_fine_or_too_coarse(capsys, tmp_path, net, column, resolution, expected):
    study = tmp_path / "t.toml"
    # Written by hand: TOML has nan, inf and integers larger than tomli_w writes.
    study.write_text(f'name = "t"\nkind = "table"\nvariables = [{{name = "{column}", resolution = {resolution!r}}}]\n')
    out = tmp_path / "out"
    code, err = cli(capsys, "run", study, "--network", net, "--out", out)
    one_sentence(code, err, "t.toml", f"variables.{column}", "resolution", expected, exit_code=2)
    assert not out.exists()


def test_a_reasonable_resolution_still_runs(capsys, tmp_path, net):
    study = write(
        tmp_path / "t.toml",
        name="t",
        kind="table",
        variables=[{"name": "k"}, {"name": "w", "resolution": 0.5}, {"name": "z", "resolution": 1e-3}],
    )
    code, err = cli(capsys, "run", study, "--network", net, "--out", tmp_path / "out")
    assert code == 0, err


# --------------------------------------------------------------------------- 7. fuzzing


@pytest.mark.parametrize("kind", [{}, [[]]], ids=["table", "list"])
def test_a_kind_that_is_not_a_string(capsys, tmp_path, net, kind):
    study = write(tmp_path / "s.toml", name="s", kind=kind, family="binomial", formula="y ~ x")
    code, err = cli(capsys, "run", study, "--network", net, "--out", tmp_path / "out")
    one_sentence(code, err, "s.toml", "field 'kind'", exit_code=2)


@pytest.mark.parametrize("schema", [3, [1], {"a": 1}, ""], ids=["number", "list", "table", "empty"])
def test_a_schema_field_that_is_not_a_path(capsys, tmp_path, net, schema):
    study = write(tmp_path / "s.toml", name="s", schema=schema, family="binomial", formula="y ~ x")
    code, err = cli(capsys, "run", study, "--network", net, "--out", tmp_path / "out")
    one_sentence(code, err, "s.toml", "field 'schema'", exit_code=2)

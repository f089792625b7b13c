"""Bad input gets one clear sentence and a non-zero exit, never a traceback, and nothing is
written half-way."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tomli_w
from glmcase import write_network

from iaptnet.cli import main

COLUMNS = {
    "y": {"type": "binary"},
    "x": {"type": "numeric"},
    "g": {"type": "categorical", "levels": ["a", "b"]},
}


@pytest.fixture
def net(tmp_path):
    rng = np.random.default_rng(3)
    sites = {}
    for k in range(2):
        n = 200
        x = rng.normal(size=n)
        sites[f"s{k}"] = pd.DataFrame(
            {"y": (rng.random(n) < 0.5).astype(int), "x": x, "g": rng.choice(["a", "b"], size=n)}
        )
    return write_network(tmp_path / "net", sites, COLUMNS)


def run_cli(capsys, tmp_path, network, **study):
    study.setdefault("name", "s")
    study.setdefault("family", "binomial")
    path = tmp_path / "study.toml"
    path.write_text(tomli_w.dumps(study))
    out = tmp_path / "out"
    code = main(["run", str(path), "--network", str(network), "--out", str(out)])
    captured = capsys.readouterr()
    return code, captured.err.strip(), out


def assert_clean_failure(code, err, out):
    assert code != 0
    assert err.startswith("error: ")
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize(
    "study, expected",
    [
        ({"formula": "y ~ x + age"}, "names column 'age'"),
        ({"formula": "y ~ x", "where": "bmi > 30"}, "names column 'bmi'"),
        ({"formula": "x ~ g"}, "needs a binary outcome"),
        ({"formula": "y ~ C(x)"}, "C() needs a categorical column"),
        ({"formula": "y ~ x", "where": 'g == "zz"'}, "level that column 'g' does not have"),
        ({"formula": "y ~ x", "family": "gamma"}, "field 'family' must be one of"),
        ({"formula": "y ~ x", "offset": "g"}, "field 'offset'"),
        ({"formula": "y ~ x", "colour": "red"}, "unknown field 'colour'"),
        ({"formula": "y x"}, "exactly one '~'"),
    ],
)
def test_study_mistakes(capsys, tmp_path, net, study, expected):
    code, err, out = run_cli(capsys, tmp_path, net, **study)
    assert_clean_failure(code, err, out)
    assert expected in err
    assert "study.toml" in err


@pytest.mark.parametrize(
    "formula",
    [
        "y ~ __import__('os').system('touch pwned')",
        "y ~ x.__class__",
        "y ~ I(x.__class__.__bases__)",
        "y ~ {open('/etc/passwd')}",
        "y ~ I(eval('1'))",
        "y ~ I([c for c in x])",
        "y ~ np.load('x')",
        "y ~ I(lambda: 1)",
        "y ~ I(x ** 10 ** 10 ** 10)",
        "y ~ I(9 ** 9 ** 9)",
        "y ~ " + "(" * 200 + "x" + ")" * 200,
        "y ~ (x + g) ** 40",
    ],
)
def test_formula_injection_is_refused_before_evaluation(capsys, tmp_path, net, formula):
    code, err, out = run_cli(capsys, tmp_path, net, formula=formula)
    assert_clean_failure(code, err, out)
    assert "field 'formula'" in err
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    "where",
    [
        "__import__('os').system('touch pwned')",
        "x.__class__ == 1",
        "x > 1; import os",
        "(" * 100 + "x > 1" + ")" * 100,
        "not " * 100 + "x > 1",
        "x in [" + ", ".join(["1"] * 1000) + "]",
        "1 == 1",
    ],
)
def test_filter_injection_is_refused(capsys, tmp_path, net, where):
    code, err, out = run_cli(capsys, tmp_path, net, formula="y ~ x", where=where)
    assert_clean_failure(code, err, out)
    assert "'where'" in err or "filter" in err
    assert not (tmp_path / "pwned").exists()


def test_empty_cohort(capsys, tmp_path, net):
    """An empty cohort is refused with the very sentence a cohort of a few people gets: a
    refusal must not tell 0 people from 1."""
    code, err, out = run_cli(capsys, tmp_path, net, formula="y ~ x", where="x > 1000")
    assert_clean_failure(code, err, out)
    assert "rows at this node are fewer than 100" in err


def test_separation_names_the_level(capsys, tmp_path):
    rng = np.random.default_rng(5)
    sites = {}
    for k in range(2):
        n = 300
        g = rng.choice(["a", "b"], size=n)
        y = np.where(g == "b", 0, (rng.random(n) < 0.5)).astype(int)
        sites[f"s{k}"] = pd.DataFrame({"y": y, "x": rng.normal(size=n), "g": g})
    network = write_network(tmp_path / "sep", sites, COLUMNS)
    code, err, out = run_cli(capsys, tmp_path, network, formula="y ~ x + g")
    assert_clean_failure(code, err, out)
    assert "separation" in err and "g[T.b]" in err


def test_collinearity_names_the_terms(capsys, tmp_path):
    rng = np.random.default_rng(6)
    cols = dict(COLUMNS, x2={"type": "numeric"})
    sites = {}
    for k in range(2):
        n = 300
        x = rng.normal(size=n)
        sites[f"s{k}"] = pd.DataFrame(
            {"y": (rng.random(n) < 0.5).astype(int), "x": x, "x2": 2 * x + 1, "g": rng.choice(["a", "b"], size=n)}
        )
    network = write_network(tmp_path / "col", sites, cols)
    code, err, out = run_cli(capsys, tmp_path, network, formula="y ~ g + x + x2")
    assert_clean_failure(code, err, out)
    assert "collinear" in err and "'x2'" in err and "'x'" in err


def test_text_in_a_numeric_column(capsys, tmp_path, net):
    frame = pd.read_csv(net.parent / "s0.csv")
    frame["x"] = frame["x"].astype(object)
    frame.loc[5, "x"] = "secret-value-123"
    frame.to_csv(net.parent / "s0.csv", index=False)
    code, err, out = run_cli(capsys, tmp_path, net, formula="y ~ x")
    assert_clean_failure(code, err, out)
    assert "s0" in err and "validation" in err
    assert "secret-value-123" not in err


def test_file_that_is_not_the_format_it_claims(capsys, tmp_path, net):
    bogus = net.parent / "s1.parquet"
    bogus.write_text((net.parent / "s1.csv").read_text())
    net.write_text(net.read_text().replace('data = "s1.csv"', 'data = "s1.parquet"'))
    code, err, out = run_cli(capsys, tmp_path, net, formula="y ~ x")
    assert_clean_failure(code, err, out)
    assert "s1.parquet" in err


def test_missing_network_file(capsys, tmp_path):
    code, err, out = run_cli(capsys, tmp_path, tmp_path / "nope.toml", formula="y ~ x")
    assert_clean_failure(code, err, out)
    assert "nope.toml" in err


def test_every_command_and_option_says_what_it_is_for():
    """`iaptnet --help` says what the tool is, and every sub-command and option has help
    text (defaults are shown by the formatter)."""
    import argparse

    from iaptnet.cli import build_parser

    parser = build_parser()
    assert "federated analysis network" in parser.format_help()
    missing = []

    def walk(p, path):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {a.dest: a.help for a in action._choices_actions}
                for name, sub in action.choices.items():
                    if not helps.get(name):
                        missing.append(f"{path} {name}")
                    walk(sub, f"{path} {name}")
            elif action.help is None and not isinstance(action, argparse._HelpAction):
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")

    walk(parser, "iaptnet")
    assert missing == []

"""Fuzzed inputs for the public command line, shared by tests/test_fuzz_cli.py (hypothesis) and
bench/fuzz_cli.py (10,000 inputs from a seeded generator).

A `Workspace` holds what every input starts from: a small network of two CSV nodes on a
schema with a column for every kind (`custom/`), a small synthetic IAPT network
(`iapt/`, no schema file: the extract and its derived variables), a valid study of every kind
for each, a population table and a policy file. `make_case(rng, workspace, target)` draws one
input from a `random.Random` (hypothesis's `st.randoms()` in the tests, a seeded one in the
bench): study files of every kind, structurally plausible or broken (wrong types, unknown
fields, extreme numbers, empty strings, unicode, deep nesting, huge formulas, bytes that are
not TOML); network files; policy files; and extracts (CSV or Parquet with missing columns,
wrong types, NaN and infinities, empty or truncated files). `run_case` runs it through
`iaptnet.cli.main` in this process and says how it ended:

- `success`: exit 0, no traceback, no warning;
- `clean`: a non-zero exit with one line `error: ...` on stderr, and nothing written to --out;
- `traceback`: an exception escaped main, or stderr shows one;
- `unclean`: anything else (several lines, a half-written --out, a warning beside the error).

A library warning (numpy's RuntimeWarning, pandas', scipy's) caught on the way is reported in
`warnings` whatever the outcome: none may reach the user.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import tomli_w

KINDS = ("glm", "table", "psm", "iptw", "access", "meta", "its")
TARGETS = ("study", "iapt_study", "network", "policy", "extract", "iapt_extract", "data")

# --------------------------------------------------------------------------- the workspace

COLUMNS = {
    "y": {"type": "binary"},
    "x": {"type": "numeric"},
    "z": {"type": "numeric"},
    "k": {"type": "integer", "min": 0},
    "n": {"type": "integer", "min": 0},
    "month": {"type": "integer", "min": 0, "max": 23},
    "svc": {"type": "categorical", "levels": ["1", "2", "3"]},
    "g": {"type": "categorical", "levels": ["a", "b", "c"]},
    "sex": {"type": "categorical", "levels": ["male", "female"]},
    "t": {"type": "binary"},
    "w": {"type": "numeric", "min": 0},
    "referral_date": {"type": "date"},
}
NODES = ("s0", "s1")
ROWS = 300


def site_frame(seed: int, service: str, n: int = ROWS) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    t = (rng.random(n) < 1 / (1 + np.exp(-0.5 * x))).astype(int)
    month = rng.integers(0, 24, size=n)
    eta = -0.3 + 0.4 * x - 0.3 * t
    days = rng.integers(0, 700, size=n)
    return pd.DataFrame(
        {
            "y": (rng.random(n) < 1 / (1 + np.exp(-eta))).astype(int),
            "x": x,
            "z": rng.normal(50, 10, size=n),
            "k": rng.poisson(np.exp(0.3 + 0.2 * x - 0.3 * (month >= 12))),
            "n": rng.integers(1, 6, size=n),
            "month": month,
            "svc": service,
            "g": rng.choice(["a", "b", "c"], size=n),
            "sex": rng.choice(["male", "female"], size=n),
            "t": t,
            "w": rng.gamma(2.0, 1.0, size=n),
            "referral_date": (pd.Timestamp("2018-04-01") + pd.to_timedelta(days, unit="D")).strftime("%Y-%m-%d"),
        }
    )


def write_schema(path: Path, columns: dict) -> None:
    path.write_text(tomli_w.dumps({"columns": columns}))


def custom_studies() -> dict[str, dict]:
    """A valid study of every kind on the custom network."""
    return {
        "glm": {"name": "glm", "family": "binomial", "formula": "y ~ x + g + t", "exposure": "t"},
        "table": {
            "name": "table",
            "kind": "table",
            "by": "t",
            "variables": [{"name": "x"}, {"name": "g"}, {"name": "k"}, {"name": "z", "resolution": 1}],
            "funnel": [{"label": "treated", "where": "t == 1"}],
        },
        "psm": {
            "name": "psm",
            "kind": "psm",
            "outcome": "y",
            "exposure": "t",
            "covariates": "x + g",
            "caliper": 0.2,
        },
        "iptw": {
            "name": "iptw",
            "kind": "iptw",
            "outcome": "y",
            "exposure": "t",
            "covariates": "x + g",
            "estimand": "ATE",
            "stabilized": True,
        },
        "access": {
            "name": "access",
            "kind": "access",
            "population": "population.csv",
            "by": ["sex"],
            "period": ["2018-04-01", "2020-03-31"],
        },
        "meta": {
            "name": "meta",
            "kind": "meta",
            "family": "poisson",
            "formula": "k ~ x + t + svc",
            "exposure": "t",
            "service": "svc",
        },
        "its": {
            "name": "its",
            "kind": "its",
            "outcome": "k",
            "denominator": ["n"],
            "time": "month",
            "group": "svc",
            "changes": {"1": 12, "2": 8},
        },
    }


def policy_template() -> dict:
    return {
        "mode": "exploratory",
        "approved": [],
        "state_dir": "state",
        "max_task_age_minutes": 60,
        "max_payload_mb": 2,
        "rules": {"suppress_max": 7, "round_to": 5, "min_rows": 50, "min_level_count": 8},
        "exploratory": {"min_rows": 100, "min_events": 20},
    }


@dataclass
class Workspace:
    root: Path
    custom: Path  # folder of the custom network (network.toml, schema.toml, s0.csv, s1.csv)
    iapt: Path  # folder of the synthetic IAPT network
    studies: dict[str, dict] = field(default_factory=custom_studies)
    iapt_studies: dict[str, dict] = field(default_factory=dict)


def build_workspace(root: Path, *, iapt_patients: int = 3000) -> Workspace:
    root = Path(root)
    custom = root / "custom"
    custom.mkdir(parents=True, exist_ok=True)
    write_schema(custom / "schema.toml", COLUMNS)
    entries = []
    for i, name in enumerate(NODES):
        site_frame(100 + i, str(i + 1)).to_csv(custom / f"{name}.csv", index=False)
        entries.append({"name": name, "data": f"{name}.csv", "schema": "schema.toml"})
    (custom / "network.toml").write_text(tomli_w.dumps({"node": entries}))
    lines = ["area,sex,population"] + [f"{n},{s},{p}" for n in NODES for s, p in (("male", 41000), ("female", 43000))]
    (custom / "population.csv").write_text("\n".join(lines) + "\n")
    (custom / "policy.toml").write_text(tomli_w.dumps(policy_template()))

    from iaptnet.synth import generate_network

    iapt = root / "iapt"
    if not (iapt / "network.toml").exists():
        with contextlib.redirect_stdout(io.StringIO()):
            generate_network(iapt, services=2, patients=iapt_patients, seed=7, fmt="csv")
    return open_workspace(root)


def open_workspace(root: Path) -> Workspace:
    """The workspace `build_workspace` wrote (read only: several processes may share it)."""
    import tomllib

    from iaptnet.coordinator.catalogue import catalogue_paths

    root = Path(root)
    custom, iapt = root / "custom", root / "iapt"

    iapt_studies = {}
    for path in catalogue_paths():
        data = tomllib.loads(Path(path).read_text())
        if data.get("kind") == "access":
            data["population"] = "population.csv"  # the network's own catchments
        iapt_studies[Path(path).stem] = data
    return Workspace(root, custom, iapt, iapt_studies=iapt_studies)


# --------------------------------------------------------------------------- drawing values

UNICODE = ["é", "名前", "\u202e", "\u0000", "🙂", "\ufeff", "\u00a0", "\U0010ffff", "ß", "İ", "\t", "\r\n"]
WORDS = ["", " ", "a", "x", "y", "g", "t", "svc", "month", "k", "glm", "its", "table", "kind", "name", "1", "0"]


def weird_value(rng: random.Random, depth: int = 0):
    """A TOML value of any type, often one that does not belong where it is put."""
    choice = rng.randrange(16 if depth < 3 else 11)
    if choice == 0:
        return {}
    if choice == 1:
        return []
    if choice == 2:
        return rng.choice([0, 1, -1, 2**63 - 1, -(2**63), 7, 10**18, 3])
    if choice == 3:
        return rng.choice([0.0, -0.0, 1e308, -1e308, 5e-324, math.inf, -math.inf, math.nan, 0.5, 1e-300, 1e6])
    if choice == 4:
        return rng.choice([True, False])
    if choice == 5:
        return ""
    if choice == 6:
        return "".join(rng.choice(UNICODE + WORDS) for _ in range(rng.randrange(1, 6)))
    if choice == 7:
        return rng.choice(WORDS) * rng.choice([1, 50, 5000])
    if choice == 8:
        import datetime as dt

        return rng.choice([dt.date(2016, 1, 1), dt.datetime(2016, 1, 1, 12, 0), dt.time(12, 0)])
    if choice == 9:
        return rng.choice(list(COLUMNS) + ["age_group", "service_id", "n_dna", "referral_month", "reliable_recovery"])
    if choice == 10:
        return rng.choice(["2016-01", "2012-04", "9999-99", "2016-13", "2020-02-30", "0000-01", "-1"])
    if choice in (11, 12):
        return [weird_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    if choice == 13:
        return {rng.choice(WORDS + ["name", "where", "label"]) or "k": weird_value(rng, depth + 1) for _ in range(2)}
    if choice == 14:
        return [[[]]] * rng.randrange(1, 3)
    return {"a": {"b": {"c": weird_value(rng, depth + 1)}}}


FORMULA_PARTS = [
    "x",
    "z",
    "g",
    "t",
    "k",
    "svc",
    "month",
    "y",
    "C(g)",
    "log(z)",
    "scale(x)",
    "center(z)",
    "I(x**2)",
    "x:g",
    "x*t",
    "np.exp(x)",
    "__import__('os')",
    "(x",
    ")",
    "-1",
    "0",
    "1",
    "+",
    "~",
    "bs(x, 3)",
    "poly(x, 2)",
    "exp(x)",
    "sqrt(w)",
    "log(n)",
    "x**5",
    "'g'",
    "é",
    "nosuch",
]


def formula_text(rng: random.Random) -> str:
    left = rng.choice(["y", "k", "x", "t", "g", "", "y + k", "log(k)"])
    n = rng.choice([0, 1, 2, 3, 5, 40, 600])
    right = " + ".join(rng.choice(FORMULA_PARTS) for _ in range(n)) or rng.choice(["", "1", "0"])
    sep = rng.choice(["~", "~", "~", "", "~~", "="])
    return f"{left} {sep} {right}"


def filter_text(rng: random.Random) -> str:
    parts = [
        "x > 0",
        "t == 1",
        'g == "a"',
        'g in ["a", "b"]',
        "x is missing",
        "k >= 2",
        'referral_date >= "2019-01-01"',
        'month < "x"',
        "nosuch == 1",
        "x > 1e400",
        "(",
        "not",
        "y == 0 and y == 1",
        "w > -1",
    ]
    return f" {rng.choice(['and', 'or'])} ".join(rng.choice(parts) for _ in range(rng.randrange(1, 5)))


def mutate(rng: random.Random, data: dict, kind: str) -> dict:
    """One to four changes to a study: a field given a wrong or odd value, a field removed, an
    unknown field, another kind, a formula or filter of random terms, or a plausible value."""
    data = dict(data)
    for _ in range(rng.randrange(1, 5)):
        op = rng.randrange(10)
        keys = list(data) or ["name"]
        if op == 0:
            data[rng.choice(keys)] = weird_value(rng)
        elif op == 1 and data:
            data.pop(rng.choice(keys), None)
        elif op == 2:
            data[rng.choice(["nosuch", "Name", "formula ", "café", "x" * 300])] = weird_value(rng)
        elif op == 3:
            data["kind"] = rng.choice([*KINDS, "GLM", "", {}, [], 3, "its "])
        elif op == 4:
            data["formula"] = formula_text(rng)
        elif op == 5:
            data["where"] = filter_text(rng)
        elif op == 6:
            data["min_nodes"] = rng.choice([0, 1, 2, 3, 100, -1, 2**63 - 1, 1.5, True])
        elif op == 7:
            field_name = rng.choice(["merge", "reference", "changes", "variables", "funnel", "by_labels", "areas"])
            data[field_name] = rng.choice(
                [
                    {"g": {"ab": ["a", "b"]}},
                    {"g": {"a": ["a", "b", "c"]}},
                    {"svc": {"x": ["1", "2"]}},
                    {"1": 0, "2": 23, "3": 24},
                    {"1": "2016-01"},
                    [{"name": "x", "quantiles": [0.5, 2]}],
                    [{"label": "", "where": "t == 1"}] * 3,
                    {"0": "no", "1": "yes"},
                    weird_value(rng),
                ]
            )
        elif op == 8:
            data[rng.choice(keys)] = rng.choice(list(COLUMNS) + ["", "x + g", "y", "1"])
        else:
            plausible = {
                "family": ["binomial", "poisson", "gaussian", "negative_binomial", "gamma"],
                "cov_type": ["HC0", "cluster", "nonrobust", "HC3", "CR2"],
                "random_intercept": ["svc", "g", "x", "nosuch"],
                "nagq": [1, 10, 25, 0, 26, 1.5, -1, True],
                "reml": [True, False, "yes"],
                "sensitivity": [
                    {"cluster": "svc", "random_intercept": "svc", "marginal": True},
                    {"cluster": "g"},
                    {"random_intercept": "x", "marginal": "yes"},
                    {"cluster": "svc", "other": 1},
                    {},
                    "svc",
                ],
                "cluster": ["svc", "g", "x"],
                "weights": ["w", "x", "k"],
                "offset": ["log(n)", "x", "n", "log(w)"],
                "marginal": [["t"], ["y"], ["x"], []],
                "caliper": [0.0, 0.2, -1, 1e9, math.nan],
                "estimand": ["ATE", "ATT", "ATC", ""],
                "ci": ["hksj", "normal", "t"],
                "service": ["svc", "g", "t"],
                "denominator": [["n"], ["n", "k"], "n", [], ["x"]],
                "time": ["month", "k", "x"],
                "group": ["svc", "g", "sex"],
                "period": [["2018-04-01", "2020-03-31"], ["2020-01-01", "2019-01-01"], ["2019-02-30", "2020-01-01"]],
                "by": ["t", "g", ["sex"], ["sex", "g"], "y", "x"],
                "outcome": ["y", "k", "x", "t"],
                "exposure": ["t", "y", "x", "g[T.b]"],
                "covariates": ["x + g", "x", "", "y + x", "t + x"],
                "time_origin": ["2012-04", "2016-01", "bad"],
                "area_effects": [True, False],
                "stabilized": [True, False],
                "adjust_outcome": [True, False],
            }
            name = rng.choice(sorted(plausible))
            data[name] = rng.choice(plausible[name])
    return data


def deep(rng: random.Random) -> str:
    depth = rng.choice([40, 200, 1200])
    return rng.choice(["a = " + "[" * depth + "]" * depth, "x = " + "{a = " * depth + "1" + "}" * depth])


def toml_bytes(rng: random.Random, data: dict) -> bytes:
    """The dict as TOML, now and then damaged: truncated, with bytes that are not UTF-8,
    nested too deeply, or not TOML at all."""
    try:
        text = tomli_w.dumps(data)
    except (TypeError, ValueError):
        text = "name = 'x'\n"
    damage = rng.randrange(12)
    if damage == 0:
        return text.encode()[: rng.randrange(len(text) + 1)]
    if damage == 1:
        return text.encode() + b"\n\xff\xfe = 1\n"
    if damage == 2:
        return (text + "\n" + deep(rng) + "\n").encode()
    if damage == 3:
        return rng.choice([b"", b"\x00" * 10, b"[[[", b"name = \n", b"= 1", "name = 'é'\n".encode("utf-16")])
    if damage == 4:
        return (text + "\n" + text).encode()  # every key twice
    return text.encode()


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    target: str
    files: dict[str, bytes]  # relative path -> content, written into the case's folder
    argv: list[str]  # "{case}", "{custom}", "{iapt}" stand for the folders
    note: str = ""


def make_case(rng: random.Random, ws: Workspace, target: str) -> Case:
    return {
        "study": _study_case,
        "iapt_study": _iapt_study_case,
        "network": _network_case,
        "policy": _policy_case,
        "extract": _extract_case,
        "iapt_extract": _iapt_extract_case,
        "data": _data_case,
    }[target](rng, ws)


def _run_argv(study: str, network: str) -> list[str]:
    return ["run", study, "--network", network, "--out", "{case}/out", "--json"]


def _study_case(rng, ws):
    kind = rng.choice(KINDS)
    data = ws.studies[kind]
    if rng.random() < 0.8:
        data = mutate(rng, data, kind)
    files = {"study.toml": toml_bytes(rng, data)}
    if "population" in data or kind == "access":
        files["population.csv"] = (ws.custom / "population.csv").read_bytes()
        if rng.random() < 0.3:
            files["population.csv"] = _corrupt_text(rng, files["population.csv"])
    if rng.random() < 0.15:  # a study of its own schema (copied), sometimes damaged
        files["schema.toml"] = toml_bytes(rng, {"columns": _mutate_columns(rng)})
        files["study.toml"] = toml_bytes(rng, {**data, "schema": "schema.toml"})
    if rng.random() < 0.1:
        return Case("study", files, ["node", "approve", "{case}/study.toml", "--policy", "{case}/policy.toml", "--yes"])
    return Case("study", files, _run_argv("{case}/study.toml", "{custom}/network.toml"), kind)


def _iapt_study_case(rng, ws):
    name = rng.choice(sorted(ws.iapt_studies))
    data = ws.iapt_studies[name]
    if rng.random() < 0.7:
        data = mutate(rng, data, data.get("kind", "glm"))
    files = {"study.toml": toml_bytes(rng, data)}
    if data.get("kind") == "access" or "population" in data:
        files["population.csv"] = (ws.iapt / "population.csv").read_bytes()
    return Case("iapt_study", files, _run_argv("{case}/study.toml", "{iapt}/network.toml"), name)


def _mutate_columns(rng):
    columns = {k: dict(v) for k, v in COLUMNS.items()}
    for _ in range(rng.randrange(1, 4)):
        name = rng.choice(list(columns))
        op = rng.randrange(5)
        if op == 0 and isinstance(columns[name], dict):
            columns[name]["type"] = rng.choice(["numeric", "integer", "binary", "categorical", "date", "text", ""])
        elif op == 1 and isinstance(columns[name], dict):
            columns[name][rng.choice(["min", "max", "levels", "required", "label", "nosuch"])] = weird_value(rng)
        elif op == 2:
            del columns[name]
        elif op == 3:
            columns[name] = weird_value(rng)
        else:
            columns[rng.choice(["é", "", "1x", "a b", "x" * 200])] = {"type": "numeric"}
    return columns


def _network_case(rng, ws):
    nodes = [{"name": n, "data": f"{{custom}}/{n}.csv", "schema": "{custom}/schema.toml"} for n in NODES]
    files = {}
    for _ in range(rng.randrange(1, 4)):
        node = rng.choice(nodes)
        op = rng.randrange(9)
        if op == 0:
            node["name"] = rng.choice(["", "a b", "../x", "s0", "é", "x" * 100, weird_value(rng)])
        elif op == 1:
            node["data"] = rng.choice(
                ["", "nosuch.csv", "{custom}", "{custom}/schema.toml", "{custom}/network.toml", weird_value(rng)]
            )
        elif op == 2:
            node["schema"] = rng.choice(["nosuch.toml", "{custom}/s0.csv", "", weird_value(rng)])
        elif op == 3:
            node["policy"] = "policy.toml"
            files["policy.toml"] = toml_bytes(rng, mutate_policy(rng))
        elif op == 4:
            node[rng.choice(["table", "query", "appointments", "nosuch", "appointments_query"])] = weird_value(rng)
        elif op == 5:
            nodes.append(dict(node))
        elif op == 6:
            node.pop(rng.choice(["name", "data", "schema"]), None)
        elif op == 7:
            node["data"] = "sqlite:///{case}/db.sqlite"
            node[rng.choice(["table", "query"])] = rng.choice(["t", "select 1", "drop table x", ""])
        else:
            node["schema"] = "schema.toml"
            files["schema.toml"] = toml_bytes(rng, {"columns": _mutate_columns(rng)})
    top = {"node": nodes} if rng.random() < 0.9 else {"node": weird_value(rng)}
    files["network.toml"] = toml_bytes(rng, top)
    kind = rng.choice(KINDS)
    files["study.toml"] = tomli_w.dumps(ws.studies[kind]).encode()
    files["population.csv"] = (ws.custom / "population.csv").read_bytes()
    return Case("network", files, _run_argv("{case}/study.toml", "{case}/network.toml"), kind)


def mutate_policy(rng) -> dict:
    data = policy_template()
    data["rules"] = dict(data["rules"])
    data["exploratory"] = dict(data["exploratory"])
    fields_ = [
        "mode",
        "approved",
        "tasks",
        "max_task_age_minutes",
        "max_payload_mb",
        "rules",
        "exploratory",
        "nosuch",
    ]
    rules = [
        "suppress_max",
        "round_to",
        "min_rows",
        "min_events",
        "max_params_per_row",
        "min_level_count",
        "max_leverage",
        "max_combined_leverage",
        "min_subset_difference",
        "min_effective_rows",
        "max_abs_coefficient",
        "max_rounds_per_study",
        "max_studies_per_day",
        "max_refusals_per_day",
        "nosuch",
    ]
    for _ in range(rng.randrange(1, 5)):
        op = rng.randrange(6)
        if op == 0:
            data[rng.choice(fields_)] = weird_value(rng)
        elif op in (1, 2):
            table = rng.choice(["rules", "exploratory"])
            if isinstance(data.get(table), dict):
                data[table][rng.choice(rules)] = rng.choice(
                    [0, 1, 2, -1, 0.5, 1e9, 10**12, math.nan, math.inf, "7", True, 1000, 0.001, weird_value(rng)]
                )
        elif op == 3:
            data["mode"] = rng.choice(["approved", "exploratory", "APPROVED", ""])
        elif op == 4:
            data["approved"] = rng.choice([["0" * 64], ["x"], "abc", [1], ["a" * 64], [""]])
        else:
            data["tasks"] = rng.choice([["glm.prepare"], [], ["nosuch"], "glm.prepare", [""], [1]])
    # The state folder stays inside the case's folder whatever else is drawn.
    data["state_dir"] = rng.choice(["state", "state", "", "sub/state", 3, []])
    return data


def _policy_case(rng, ws):
    kind = rng.choice(KINDS)
    files = {
        "policy.toml": toml_bytes(rng, mutate_policy(rng)),
        "study.toml": tomli_w.dumps(ws.studies[kind]).encode(),
        "population.csv": (ws.custom / "population.csv").read_bytes(),
    }
    nodes = [
        {"name": n, "data": f"{ws.custom}/{n}.csv", "schema": f"{ws.custom}/schema.toml", "policy": "policy.toml"}
        for n in NODES
    ]
    files["network.toml"] = tomli_w.dumps({"node": nodes}).encode()
    if rng.random() < 0.3:
        return Case(
            "policy", files, ["node", "approve", "{case}/study.toml", "--policy", "{case}/policy.toml", "--yes"]
        )
    return Case("policy", files, _run_argv("{case}/study.toml", "{case}/network.toml"), kind)


# --------------------------------------------------------------------------- extracts


def _corrupt_text(rng, raw: bytes) -> bytes:
    op = rng.randrange(6)
    if op == 0:
        return b""
    if op == 1:
        return raw[: rng.randrange(len(raw) + 1)]
    if op == 2:
        return raw.split(b"\n", 1)[0] + b"\n"  # the header only
    if op == 3:
        return b"\xff\xfe\x00garbage\x00" + raw[:200]
    if op == 4:
        lines = raw.split(b"\n")
        i = rng.randrange(len(lines))
        lines[i] = lines[i] + b',"extra",,,' * rng.randrange(1, 3)
        return b"\n".join(lines)
    return raw.replace(b",", b";")


def corrupt_frame(rng, frame: pd.DataFrame) -> pd.DataFrame:
    frame, duplicate = frame.copy(), None
    for _ in range(rng.randrange(1, 4)):
        if not len(frame.columns):
            break
        col = rng.choice(list(frame.columns))
        op = rng.randrange(12)
        # One draw seeds the rows' own generator: hypothesis's buffer stays small.
        rows_rng = np.random.default_rng(rng.randrange(2**32))
        rows = frame.index[rows_rng.random(len(frame)) < rng.choice([0.01, 0.2, 1.0])]
        if op == 0:
            frame = frame.drop(columns=[col])
        elif op == 1:
            frame = frame.rename(columns={col: rng.choice(["", col.upper(), col + " ", "é", "Unnamed: 0"])})
        elif op == 2:
            frame[col] = frame[col].astype(object)
            frame.loc[rows, col] = rng.choice(["abc", "", "NaN", "inf", "-inf", "1e400", "1,5", "2016-02-30", "é"])
        elif op == 3:
            frame[col] = frame[col].astype(object)
            frame.loc[rows, col] = rng.choice([np.nan, np.inf, -np.inf, 1e308, -1e308, 2**62, -1, 0.5, None])
        elif op == 4:
            frame = frame.iloc[: rng.choice([0, 1, 2, 5, 9, 60])]
        elif op == 5:
            frame[col] = rng.choice([0, 1, np.nan, "a", 1e300])  # constant
        elif op == 6:
            frame = pd.concat([frame, frame.iloc[:5]], ignore_index=True)  # repeated rows
        elif op == 7:
            duplicate = rng.choice(["extra", col])
        elif op == 8:
            frame = frame.sample(frac=1.0, random_state=rng.randrange(10**6), axis=1)
        elif op == 9:
            frame[col] = frame[col].astype(str).str.pad(rng.choice([40, 2000]), fillchar="9")
        elif op == 10:
            frame.loc[rows, col] = None
        else:
            frame[col] = frame[col].iloc[::-1].to_numpy()
    if duplicate is not None:  # a column twice (or an extra one)
        frame.insert(0, duplicate, 1, allow_duplicates=True)
    return frame


def extract_bytes(rng, frame: pd.DataFrame, name: str) -> tuple[str, bytes]:
    """The frame as CSV or Parquet (maybe truncated or under the other's extension)."""
    fmt = rng.choice(["csv", "csv", "parquet"])
    if fmt == "parquet":
        buf = io.BytesIO()
        try:
            frame.columns = [str(c) for c in frame.columns]
            frame.astype({c: str for c in frame.columns if frame[c].dtype == object}).to_parquet(buf, index=False)
        except Exception:  # noqa: BLE001 - a frame pyarrow cannot write is written as CSV
            return f"{name}.csv", frame.to_csv(index=False).encode()
        raw = buf.getvalue()
        if rng.random() < 0.3:
            raw = raw[: rng.randrange(len(raw))]
        return rng.choice([f"{name}.parquet", f"{name}.parquet", f"{name}.csv"]), raw
    raw = frame.to_csv(index=False).encode()
    if rng.random() < 0.25:
        raw = _corrupt_text(rng, raw)
    return rng.choice([f"{name}.csv", f"{name}.csv", f"{name}.parquet"]), raw


def _network_of(ws_schema: str | None, data_names: dict[str, str]) -> bytes:
    nodes = []
    for node, data in data_names.items():
        entry = {"name": node, "data": data}
        if ws_schema:
            entry["schema"] = ws_schema
        nodes.append(entry)
    return tomli_w.dumps({"node": nodes}).encode()


def _extract_case(rng, ws):
    files, names = {}, {}
    for node in NODES:
        frame = pd.read_csv(ws.custom / f"{node}.csv")
        if node == "s0" or rng.random() < 0.3:
            frame = corrupt_frame(rng, frame)
        name, raw = extract_bytes(rng, frame, node)
        files[name], names[node] = raw, name
    kind = rng.choice(KINDS)
    files["study.toml"] = tomli_w.dumps(ws.studies[kind]).encode()
    files["population.csv"] = (ws.custom / "population.csv").read_bytes()
    files["network.toml"] = _network_of(str(ws.custom / "schema.toml"), names)
    if rng.random() < 0.25:
        return Case(
            "extract", files, ["node", "check", "--data", f"{{case}}/{names['s0']}", "--schema", "{custom}/schema.toml"]
        )
    return Case("extract", files, _run_argv("{case}/study.toml", "{case}/network.toml"), kind)


def _iapt_extract_case(rng, ws):
    files, names = {}, {}
    nodes = sorted(p.stem for p in ws.iapt.glob("service_*.csv"))
    for node in nodes:
        frame = pd.read_csv(ws.iapt / f"{node}.csv", dtype=str, keep_default_na=False)
        if node == nodes[0]:
            frame = corrupt_frame(rng, frame)
        name, raw = extract_bytes(rng, frame, node)
        files[name], names[node] = raw, name
    study = rng.choice(sorted(ws.iapt_studies))
    files["study.toml"] = tomli_w.dumps(ws.iapt_studies[study]).encode()
    files["population.csv"] = (ws.iapt / "population.csv").read_bytes()
    import tomllib

    base = tomllib.loads((ws.iapt / "network.toml").read_text())["node"]
    files["network.toml"] = tomli_w.dumps({"node": [{**n, "data": names[n["name"]]} for n in base]}).encode()
    if rng.random() < 0.25:
        return Case("iapt_extract", files, ["node", "check", "--data", f"{{case}}/{names[nodes[0]]}"])
    return Case("iapt_extract", files, _run_argv("{case}/study.toml", "{case}/network.toml"), study)


def edge_frame(rng, frame: pd.DataFrame, node: str) -> pd.DataFrame:
    """Rows that pass the schema but sit at an edge: constant or all-missing columns, a level
    at one node only, separation, huge or tiny values, few rows, no time after a change."""
    frame = frame.copy()
    for _ in range(rng.randrange(1, 3)):
        op = rng.randrange(16)
        if op == 0:
            col = rng.choice(["y", "t", "k", "x", "g", "svc", "sex", "n", "month", "w", "z"])
            frame[col] = frame[col].iloc[0] if len(frame) else None
        elif op == 1:
            frame[rng.choice(["x", "z", "k", "g", "t", "y", "w"])] = None
        elif op == 2 and node == "s0":
            frame["g"] = frame["g"].replace("c", "b")  # level c at the other node only
        elif op == 3:
            frame["y"] = (frame["x"] > 0).astype(int)  # separation
        elif op == 4:
            frame["x"] = frame["x"] * rng.choice([1e150, 1e-150, 1e300, -1e300])
        elif op == 5:
            frame["k"] = rng.choice([10**9, 10**15, 0])
        elif op == 6:
            frame = frame.iloc[: rng.choice([1, 10, 60, 120])]
        elif op == 7:
            frame["n"] = np.where(np.arange(len(frame)) % rng.choice([2, 50]) == 0, frame["n"], 0)
        elif op == 8:
            frame["month"] = rng.choice([frame["month"] % 12, frame["month"] * 0 + 23, frame["month"] // 2 + 12])
        elif op == 9:
            frame["w"] = rng.choice([0.0, 1e-200, 1e200])
        elif op == 10:
            frame["t"] = frame["y"]  # the exposure is the outcome
        elif op == 11:
            frame["z"] = frame["x"] * 2 + 1  # collinear
        elif op == 12:
            frame["referral_date"] = rng.choice(["2018-04-01", "2010-01-01", "2030-01-01"])
        elif op == 13:
            frame["t"] = (frame["x"] > rng.choice([0, 2, 3])).astype(int)
        elif op == 14:
            frame["x"] = pd.to_numeric(frame["x"]).astype(float).round(rng.choice([0, 1]))  # ties
        else:
            frame = frame.iloc[:0]  # no rows
    return frame


def _data_case(rng, ws):
    files, names = {}, {}
    for node in NODES:
        frame = pd.read_csv(ws.custom / f"{node}.csv")
        if node == "s0" or rng.random() < 0.5:
            frame = edge_frame(rng, frame, node)
        files[f"{node}.csv"], names[node] = frame.to_csv(index=False).encode(), f"{node}.csv"
    kind = rng.choice(KINDS)
    data = ws.studies[kind]
    if rng.random() < 0.4:
        data = mutate(rng, data, kind)
    files["study.toml"] = toml_bytes(rng, data) if rng.random() < 0.1 else tomli_w.dumps(data).encode()
    files["population.csv"] = (ws.custom / "population.csv").read_bytes()
    files["network.toml"] = _network_of(str(ws.custom / "schema.toml"), names)
    return Case("data", files, _run_argv("{case}/study.toml", "{case}/network.toml"), kind)


# --------------------------------------------------------------------------- running


@dataclass
class Outcome:
    kind: str  # success, clean, traceback, unclean
    code: int | None
    stderr: str
    warnings: list[str]
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.kind in ("success", "clean") and not self.warnings


#: Warnings a user never sees (Python hides them outside __main__ by default).
HIDDEN = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def reset_nodes(ws: Workspace, state: Path) -> None:
    """A fresh node state for every input (the nodes' memory of earlier releases would refuse
    most of them), keeping the workspace's loaded datasets."""
    from iaptnet.node import runtime

    os.environ["IAPTNET_STATE_DIR"] = str(state)
    root = str(ws.root)
    with runtime._RUNTIMES_LOCK:
        for config in list(runtime._RUNTIMES):
            if not str(config.data).startswith(root) or config.policy or "/cases/" in str(config.data):
                del runtime._RUNTIMES[config]
            else:
                rt = runtime._RUNTIMES[config]
                rt._state = None
                rt.prepared.clear()
                rt.augments.clear()
                rt.approvals.clear()
        runtime._STATES.clear()


def write_case(case: Case, ws: Workspace, folder: Path) -> list[str]:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    subst = {"{case}": str(folder), "{custom}": str(ws.custom), "{iapt}": str(ws.iapt)}

    def fill(text: str) -> str:
        for key, value in subst.items():
            text = text.replace(key, value)
        return text

    for name, raw in case.files.items():
        if name.endswith(".toml"):
            try:
                raw = fill(raw.decode()).encode()
            except UnicodeDecodeError:
                pass
        (folder / name).write_bytes(raw)
    return [fill(a) for a in case.argv]


def run_case(case: Case, ws: Workspace, folder: Path) -> Outcome:
    """Run one input through `iaptnet.cli.main` in this process and judge how it ended."""
    from iaptnet.cli import main

    argv = write_case(case, ws, folder)
    reset_nodes(ws, folder / "state")
    out_folder = folder / "out"
    err, out = io.StringIO(), io.StringIO()
    code, detail = None, ""
    logging.root.handlers.clear()  # main's basicConfig logs to this input's stderr
    failures = _Failures()
    logging.getLogger("iaptnet").addHandler(failures)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for category in HIDDEN:
            warnings.simplefilter("ignore", category)
        try:
            with _fd_capture(folder / "fd.txt"), contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                with _cwd(folder):
                    code = main(argv)
        except SystemExit as exc:  # argparse: not an input we draw
            code = exc.code if isinstance(exc.code, int) else 2
            detail = "SystemExit"
        except BaseException as exc:  # noqa: BLE001 - what the fuzz is looking for
            if isinstance(exc, KeyboardInterrupt):
                raise
            detail = "".join(traceback.format_exception(exc))
    logging.root.handlers.clear()
    logging.getLogger("iaptnet").removeHandler(failures)
    stderr = err.getvalue() + (folder / "fd.txt").read_text(errors="replace")  # C libraries print there
    if failures.records and not detail:
        detail = "a node failed with an exception (its log):\n" + "\n".join(failures.records)
    noted = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught]
    if detail and detail != "SystemExit":
        return Outcome("traceback", None, stderr, noted, detail)
    if "Traceback" in stderr:
        return Outcome("traceback", code, stderr, noted, stderr)
    if argv[:2] == ["node", "check"] and code == 1 and not stderr.strip():
        return Outcome("success", code, stderr, noted)  # the report says what fails validation
    if code == 0:
        return Outcome("success" if not stderr.strip() else "unclean", code, stderr, noted, "stderr on success")
    lines = stderr.strip().splitlines()
    written = out_folder.exists() and any(out_folder.iterdir())
    if len(lines) == 1 and lines[0].startswith("error: ") and not written:
        return Outcome("clean", code, stderr, noted)
    why = "wrote to --out before failing" if written else "not one line 'error: ...'"
    return Outcome("unclean", code, stderr, noted, why)


class _Failures(logging.Handler):
    """Exceptions a node logs where it turned them into "an internal error" for the
    coordinator (in-process, shown with -v only): a traceback the fuzz must see. Numerical
    failures the node reports as "cannot be computed" are answers, not failures."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and "could not be computed" not in record.getMessage():
            self.records.append(record.getMessage() + "\n" + "".join(traceback.format_exception(*record.exc_info)))


@contextlib.contextmanager
def _fd_capture(path: Path):
    """What C code (LAPACK, a driver) writes to the process's stdout and stderr, to a file."""
    sys.stdout.flush(), sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "wb") as sink:
        os.dup2(sink.fileno(), 1), os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])


@contextlib.contextmanager
def _cwd(folder: Path):
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def temporary_workspace() -> Workspace:
    return build_workspace(Path(tempfile.mkdtemp(prefix="iaptnet-fuzz-")))


if __name__ == "__main__":  # replay: python tests/fuzzcase.py TARGET SEED
    target, seed = sys.argv[1], int(sys.argv[2])
    ws = temporary_workspace()
    case = make_case(random.Random(seed), ws, target)
    outcome = run_case(case, ws, ws.root / "cases" / "0")
    print(case.argv, case.note)
    print(outcome.kind, outcome.code, outcome.stderr, outcome.detail, outcome.warnings, sep="\n")

"""Services are the network's, not the schema's (issue 14): `service_id` holds each service's
ODS code, its levels are the codes the network's nodes declare (sorted), they travel with the
study and its hash covers them, a node refuses data of a service it did not declare, and a
study with `service_id` in its formula is exact against statsmodels on the pooled rows for any
number of services."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
import statsmodels.formula
import statsmodels.formula.api as smf
import tomli_w

from iaptnet import synth
from iaptnet.cli import main
from iaptnet.coordinator.inprocess import run_inprocess
from iaptnet.coordinator.network import load_network, node_services
from iaptnet.coordinator.studies import load_study
from iaptnet.node.cohort import cohort_mask
from iaptnet.node.dataset import load_dataset
from iaptnet.protocol.errors import SpecError
from iaptnet.protocol.iapt_schema import iapt_analysis_schema
from iaptnet.protocol.schema import Schema
from iaptnet.protocol.study import StudySpec
from iaptnet.report import words

statsmodels.formula.options.formula_engine = "formulaic"

STUDY = {
    "name": "sessions_by_service",
    "family": "binomial",
    "where": "finished_treatment == 1 and case_first == 1",
    "formula": "reliable_recovery ~ n_treat + n_dna + sex + phq9_first + service_id",
    "exposure": "n_treat",
}


@pytest.fixture(scope="module")
def networks(tmp_path_factory):
    """Synthetic IAPT networks of 3 and 12 services (log-normal sizes, made-up codes)."""
    root = tmp_path_factory.mktemp("services")
    return {k: synth.generate_network(root / f"net{k}", services=k, patients=6_000 * k, seed=7) for k in (3, 12)}


def pooled_rows(network_path: Path, spec: StudySpec) -> pd.DataFrame:
    """Every node's rows as the node reads them, pooled, with service_id's levels the network's."""
    network = load_network(network_path)
    frames = [load_dataset(n["data"], services=node_services(n)).frame for n in network.nodes]
    pooled = pd.concat(frames, ignore_index=True)
    pooled["service_id"] = pd.Categorical(pooled["service_id"].astype(str), categories=sorted(network.services))
    return pooled[cohort_mask(pooled, spec.where_tree())]


# ------------------------------------------------------------------ the levels come from the network


def test_the_schema_takes_service_levels_from_the_network(networks, tmp_path):
    column = iapt_analysis_schema()["service_id"]
    assert column.network and column.levels == ()
    network = load_network(networks[12])
    codes = synth.service_codes(12)
    assert list(network.services) == sorted(codes)  # sorted, whatever the node order
    assert [network.services[c] for c in codes] == [f"service_{k}" for k in range(1, 13)]
    path = tmp_path / "study.toml"
    path.write_text(tomli_w.dumps(STUDY))
    spec = load_study(path, network.schema_paths, list(network.services)).spec
    assert spec.levels == {"service_id": sorted(codes)}
    assert spec.canonical()["levels"] == {"service_id": sorted(codes)}
    bound = iapt_analysis_schema().with_services(codes)
    assert spec.schema_fingerprint == bound.fingerprint != iapt_analysis_schema().fingerprint
    # The hash covers the services: another network (one service fewer) is another study.
    fewer = load_study(path, network.schema_paths, sorted(codes)[:-1]).spec
    assert fewer.hash != spec.hash
    assert StudySpec.from_wire(spec.to_wire()).hash == spec.hash  # and the codes travel with it


def test_a_schema_file_may_take_one_column_from_the_network(tmp_path):
    path = tmp_path / "schema.toml"
    path.write_text('[columns.site]\ntype = "categorical"\nlevels = "network"\n[columns.y]\ntype = "binary"\n')
    schema = Schema.load(path)
    assert schema.network_column == "site" and schema.network_levels() == {}
    assert schema.with_services(["B2", "A1"])["site"].levels == ("A1", "B2")
    path.write_text(
        '[columns.a]\ntype = "categorical"\nlevels = "network"\n[columns.b]\ntype = "categorical"\nlevels = "network"\n'
    )
    with pytest.raises(SpecError, match="only one column of a schema may take its levels from the network"):
        Schema.load(path)
    path.write_text('[columns.a]\ntype = "integer"\nlevels = "network"\n')
    with pytest.raises(SpecError, match='levels = "network" is only allowed for a categorical column'):
        Schema.load(path)


@pytest.mark.parametrize(
    "services, message",
    [
        (None, "field 'services' is required: the ODS codes of the services"),
        ("RRP", "expected a list of service codes"),
        (["rrp"], "'rrp' is not a service code"),
        (["RRP", "RRP"], "lists the service code 'RRP' twice"),
    ],
)
def test_network_file_mistakes_about_services(tmp_path, services, message):
    (tmp_path / "a.csv").write_text("service_id\nRRP\n")
    node = {"name": "a", "data": "a.csv"}
    if services is not None:
        node["services"] = services
    (tmp_path / "network.toml").write_text(tomli_w.dumps({"node": [node]}))
    with pytest.raises(SpecError, match=message) as err:
        load_network(tmp_path / "network.toml")
    assert not re.search(r"\. [A-Z]", str(err.value)) and str(err.value).endswith(".")  # one sentence


def test_a_service_belongs_to_one_node(tmp_path):
    (tmp_path / "a.csv").write_text("service_id\nRRP\n")
    nodes = [{"name": n, "data": "a.csv", "services": ["RRP"]} for n in ("a", "b")]
    (tmp_path / "network.toml").write_text(tomli_w.dumps({"node": nodes}))
    with pytest.raises(SpecError, match="the service 'RRP' is declared by both 'a' and 'b'"):
        load_network(tmp_path / "network.toml")


# ------------------------------------------------------------------ a node refuses what it did not declare


def test_a_node_holding_an_undeclared_service_refuses_with_one_sentence(networks, tmp_path, capsys):
    """service_2's extract also holds service_3's referrals: its node declares only its own
    code, so it refuses every task with one sentence, and the study stops naming it."""
    source = networks[3].parent
    folder = tmp_path / "net"
    folder.mkdir()
    codes = synth.service_codes(3)
    both = pd.concat([pd.read_parquet(source / "service_2.parquet"), pd.read_parquet(source / "service_3.parquet")])
    both.to_parquet(folder / "service_2.parquet")
    for k in (1, 3):
        (folder / f"service_{k}.parquet").write_bytes((source / f"service_{k}.parquet").read_bytes())
    nodes = [{"name": f"service_{k}", "data": f"service_{k}.parquet", "services": [codes[k - 1]]} for k in (1, 2, 3)]
    (folder / "network.toml").write_text(tomli_w.dumps({"node": nodes}))
    (tmp_path / "study.toml").write_text(tomli_w.dumps(STUDY))
    code = main(["run", str(tmp_path / "study.toml"), "--network", str(folder / "network.toml")])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    sentence = (
        "this node's data holds referrals of a service it does not declare in 'service_id' "
        f"(it declares {codes[1]}); declare every service whose referrals it holds, or leave their rows out."
    )
    assert f"service_2 failed: {sentence}" in err or sentence in err
    assert codes[2] not in err.replace(f"declares {codes[1]}", "")  # the stray code is not told
    # The node's operator sees it in `node check` (counts only).
    code = main(["node", "check", "--data", str(folder / "service_2.parquet"), "--services", codes[1]])
    out = capsys.readouterr().out
    assert code == 1 and "service_id" in out and "unknown level" in out and "does not declare" in out


def test_a_node_refuses_a_study_whose_services_leave_out_its_own(networks):
    """A coordinator that sends levels without this node's code (its rows would silently drop
    out of the service columns) is refused; so is a study without the network's codes."""
    node = load_network(networks[3]).nodes[0]
    dataset = load_dataset(node["data"], services=node_services(node))
    own = node_services(node)[0]
    others = sorted(c for c in synth.service_codes(3) if c != own)
    spec = StudySpec(name="s", formula="reliable_recovery ~ service_id", levels={"service_id": others})
    with pytest.raises(SpecError, match=f"leave out this node's own \\({own}\\)"):
        dataset.for_study(spec)
    with pytest.raises(SpecError, match="carries no service codes"):
        dataset.for_study(StudySpec(name="s", formula="reliable_recovery ~ service_id"))
    view = dataset.for_study(StudySpec(name="s", levels={"service_id": sorted(synth.service_codes(3))}))
    assert list(view.frame["service_id"].cat.categories) == sorted(synth.service_codes(3))
    assert list(view.schema["service_id"].levels) == sorted(synth.service_codes(3))


# ------------------------------------------------------------------ exact for any number of services


@pytest.mark.parametrize("services", [3, 12])
def test_exact_with_service_id_in_the_formula(networks, tmp_path, services):
    path = tmp_path / "study.toml"
    path.write_text(tomli_w.dumps(STUDY))
    network = load_network(networks[services])
    spec = load_study(path, network.schema_paths, list(network.services)).spec
    result = run_inprocess([path], networks[services])[0]
    rows = pooled_rows(networks[services], spec)
    needed = ["reliable_recovery", "n_treat", "n_dna", "sex", "phq9_first", "service_id"]
    ref = smf.glm(STUDY["formula"], rows.dropna(subset=needed), family=sm.families.Binomial()).fit(
        tol=1e-13, tol_criterion="params", maxiter=200
    )
    names = [t["term"] for t in result["terms"]]
    assert names == list(ref.params.index)
    assert sum(n.startswith("service_id[T.") for n in names) == services - 1
    assert result["n"] == int(ref.nobs)
    np.testing.assert_allclose([t["estimate"] for t in result["terms"]], ref.params.to_numpy(), rtol=1e-8)
    np.testing.assert_allclose([t["std_error"] for t in result["terms"]], ref.bse.to_numpy(), rtol=1e-8)
    np.testing.assert_allclose(result["deviance"], ref.deviance, rtol=1e-8)
    # The results name every service by the node that holds it.
    assert result["service_column"] == "service_id"
    assert result["services"] == load_network(networks[services]).services


def test_reports_name_services_by_their_nodes(networks, tmp_path, capsys):
    path = tmp_path / "study.toml"
    path.write_text(tomli_w.dumps(STUDY))
    out = tmp_path / "out"
    assert main(["run", str(path), "--network", str(networks[3]), "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    code = sorted(synth.service_codes(3))[1]
    node = load_network(networks[3]).services[code]
    assert f"service id: {words.service_name(node)} ({code})" in text
    result = json.loads((out / "results.json").read_text())
    assert result["services"][code] == node
    html = (out / "report.html").read_text()
    assert f"service id: {node.replace('_', ' ').capitalize()} ({code})" in html


def test_approve_hashes_the_study_with_the_network_services(networks, tmp_path, capsys):
    """A Trust approves the hash that runs: `approve --network` (or --services) binds the
    same codes as `iaptnet run`, and without them approve says what it needs."""
    study = tmp_path / "study.toml"
    study.write_text(tomli_w.dumps(STUDY))
    policy = tmp_path / "policy.toml"
    policy.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    network = load_network(networks[3])
    spec = load_study(study, network.schema_paths, list(network.services)).spec
    code = main(["node", "approve", str(study), "--policy", str(policy), "--yes"])
    assert code != 0 and "give exactly one of --services" in capsys.readouterr().err
    assert main(["node", "approve", str(study), "--policy", str(policy), "--network", str(networks[3]), "--yes"]) == 0
    assert spec.hash in tomllib.loads(policy.read_text())["approved"]
    codes = ",".join(synth.service_codes(3))
    assert main(["node", "approve", str(study), "--policy", str(policy), "--services", codes, "--yes"]) == 0
    assert "already approved" in capsys.readouterr().out

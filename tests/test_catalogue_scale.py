"""The catalogue on networks of other sizes than the paper's. Every node judges each release
against everything it released before on the same data (node/release_memory.py), so two
catalogue studies whose rows differ, within one level of a released margin, by 1-7 people are
refused, and rightly (their difference counts those people). The access studies share their
referrals so that this cannot happen at any size (checked on 60,000 referrals); the rest of the
catalogue is refused somewhere below the paper's size under other rules, so `iaptnet demo`
takes at least MIN_PATIENTS referrals, where the whole catalogue is run (paper_scale)."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from iaptnet import synth
from iaptnet.coordinator.catalogue import catalogue_paths
from iaptnet.coordinator.demo import DEFAULT_SEED, MIN_PATIENTS
from iaptnet.coordinator.inprocess import run_inprocess
from iaptnet.coordinator.network import load_network
from iaptnet.node.dataset import load_dataset
from iaptnet.protocol.errors import NetworkError

ACCESS = [p for p in catalogue_paths() if p.name.startswith("a")]
SMALL = 60_000  # 8 services of 4,000 to 11,000 referrals
PERIOD = ("2012-04-01", "2020-03-31")


@pytest.fixture(scope="module")
def small_network(tmp_path_factory):
    return synth.generate_network(tmp_path_factory.mktemp("small"), services=8, patients=SMALL, seed=DEFAULT_SEED)


def test_catalogue_access_studies_run_on_a_small_network(small_network):
    results = run_inprocess(ACCESS, small_network)
    assert [r["study"] for r in results] == [p.stem for p in ACCESS]
    by_study = {r["study"]: r for r in results}
    # a1, a2 and a4 count the same referrals, a3 those of them with an ethnic group recorded.
    assert by_study["a1_access_older_adults"]["n"] == by_study["a2_access_deprivation"]["n"]
    assert by_study["a4_access_need"]["n"] == by_study["a2_access_deprivation"]["n"]
    assert by_study["a3_access_groups"]["n"] < by_study["a2_access_deprivation"]["n"]


def test_older_adults_counted_with_and_without_a_deprivation_quintile_are_refused(small_network, tmp_path):
    """The demo's old failure, kept as the node's right answer: a1 counting every referral with
    an age group and sex, then a2 counting those of them with a deprivation quintile, would
    release two exact counts of referrals aged 65+ whose difference is the few aged 65+
    without a quintile."""
    a1 = next(p for p in ACCESS if p.stem == "a1_access_older_adults")
    a2 = next(p for p in ACCESS if p.stem == "a2_access_deprivation")
    text = a1.read_text()
    assert 'where = "imd_quintile is not missing"\n' in text
    old_a1 = tmp_path / a1.name
    old_a1.write_text(text.replace('where = "imd_quintile is not missing"\n', ""))

    # At some service of this network, 1 to 7 of the referrals aged 65+ have no quintile.
    few = {}
    for node in load_network(small_network).nodes:
        frame = load_dataset(node["data"]).frame
        counted = frame["referral_date"].between(*(pd.Timestamp(d) for d in PERIOD))
        counted &= frame["age_group"].notna() & frame["sex"].notna()
        older = counted & (frame["age_group"] == "65+")
        few[node["name"]] = int((older & frame["imd_quintile"].isna()).sum())
    assert any(0 < k < 8 for k in few.values()), few

    with pytest.raises(NetworkError) as refused:
        run_inprocess([old_a1, a2], small_network)
    message = str(refused.value)
    assert "fewer than 8 people" in message and "'a2_access_deprivation'" in message
    named = re.search(r"access\.counts: (.*?) refused", message).group(1)
    for name, k in few.items():
        if 0 < k < 8:
            assert name in named, (name, k, message)


@pytest.mark.paper_scale
@pytest.mark.parametrize("seed", [DEFAULT_SEED, 2])
def test_whole_catalogue_runs_at_the_smallest_size_the_demo_accepts(tmp_path, seed):
    """Every node answers every study (a refusal stops the run with NetworkError). Smaller
    networks are refused somewhere, irregularly: of 250,000 to 450,000 referrals in steps of
    50,000 each failed for one of these two seeds (CHANGELOG, docs/analyst/commands.md)."""
    network = synth.generate_network(tmp_path / "net", services=8, patients=MIN_PATIENTS, seed=seed)
    results = run_inprocess(catalogue_paths(), network)
    assert [r["study"] for r in results] == [p.stem for p in catalogue_paths()]

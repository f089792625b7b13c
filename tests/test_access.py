"""Access studies: referral rates and Poisson rate ratios against population denominators equal
the same analysis on the pooled rows (tests/reference_access.py, statsmodels and scipy) to
1e-8; nodes release only one-way margins, under their policy; displayed counts follow the
small-number rules with secondary suppression; bad input gets one clear sentence."""

from __future__ import annotations

import json

import glmcase
import numpy as np
import pandas as pd
import pytest
import tomli_w
from nodecase import Node, assert_nothing_released
from reference_access import reference_access

from iaptnet.cli import main
from iaptnet.coordinator.access import render
from iaptnet.coordinator.inprocess import run_inprocess
from iaptnet.coordinator.serverapp import load_wire_study
from iaptnet.coordinator.studies import load_study
from iaptnet.protocol import messages as m
from iaptnet.protocol.errors import ModelError, NetworkError
from iaptnet.protocol.kinds.access import TASK
from iaptnet.protocol.sdc import round_count as display_count
from iaptnet.protocol.sdc import suppress
from iaptnet.protocol.study import parse_study, read_study_file

AGES = ["18-24", "25-34", "35-44", "45-54", "55-64", "65+"]
SEXES = ["female", "male"]
ETHNIC = ["White", "Mixed", "Asian", "Black", "Other"]
IMD = ["1", "2", "3", "4", "5"]
COLUMNS = {
    "referral_date": {"type": "date"},
    "age_group": {"type": "categorical", "levels": AGES},
    "sex": {"type": "categorical", "levels": SEXES},
    "ethnicity_ons": {"type": "categorical", "levels": ETHNIC},
    "imd_quintile": {"type": "categorical", "levels": IMD},
    "source": {"type": "categorical", "levels": ["GP", "self", "other"]},
}
PERIOD = ["2016-04-01", "2019-03-31"]  # three whole years
SITES = {"east": 700, "north": 600, "south": 800, "west": 650}
AREAS = {"east": ["east"], "north": ["north"], "south": ["south"], "west": ["west_a", "west_b"]}


def make_sites(seed: int = 11, rare: dict | None = None) -> dict[str, pd.DataFrame]:
    """Referrals 2015-2019 (the period keeps about 60%); older adults and men referred less;
    ~5% missing per grouping variable. `rare`: {site: (column, level, rows)} plants a level
    held by only that many rows at that site."""
    rng = np.random.default_rng(seed)
    sites = {}
    for name, n in SITES.items():
        frame = pd.DataFrame(
            {
                "referral_date": pd.Timestamp("2015-01-01") + pd.to_timedelta(rng.integers(0, 5 * 365, n), unit="D"),
                "age_group": rng.choice(AGES, n, p=[0.2, 0.3, 0.2, 0.14, 0.1, 0.06]),
                "sex": rng.choice(SEXES, n, p=[0.65, 0.35]),
                "ethnicity_ons": rng.choice(ETHNIC, n, p=[0.55, 0.1, 0.15, 0.12, 0.08]),
                "imd_quintile": rng.choice(IMD, n, p=[0.3, 0.3, 0.2, 0.12, 0.08]),
                "source": rng.choice(["GP", "self", "other"], n, p=[0.45, 0.45, 0.1]),
            }
        ).astype(object)
        for col in ("sex", "ethnicity_ons", "imd_quintile"):
            frame.loc[rng.choice(n, n // 20, replace=False), col] = None
        if rare and name in rare:
            col, level, k = rare[name]
            frame[col] = frame[col].replace(level, AGES[0] if col == "age_group" else frame[col].dropna().iloc[0])
            frame.loc[frame.index[:k], col] = level
        frame["referral_date"] = pd.to_datetime(frame["referral_date"]).dt.strftime("%Y-%m-%d")
        sites[name] = frame
    return sites


def make_population(seed: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    index = pd.MultiIndex.from_product(
        [sorted(a for v in AREAS.values() for a in v), AGES, SEXES, ETHNIC, IMD],
        names=["area", "age_band", "sex", "ethnic_group", "imd_quintile"],
    )
    frame = index.to_frame(index=False)
    age_weight = frame["age_band"].map(dict(zip(AGES, [1, 1.6, 1.4, 1.2, 1.0, 1.3])))
    frame["population"] = (rng.integers(20, 400, len(frame)) * age_weight).round().astype(int)
    return frame


def write_network(folder, sites, policy: str | None = None):
    """Every node with the same policy, when one is given."""
    return glmcase.write_network(folder, sites, COLUMNS, {name: policy for name in sites} if policy else None)


def pooled(sites: dict[str, pd.DataFrame]) -> pd.DataFrame:
    frames = []
    for name, frame in sites.items():
        frame = frame.copy()
        frame["area"] = name
        frames.append(frame)
    rows = pd.concat(frames, ignore_index=True)
    rows["referral_date"] = pd.to_datetime(rows["referral_date"])
    for col, spec in COLUMNS.items():
        if spec["type"] == "categorical":
            rows[col] = pd.Categorical(rows[col], categories=spec["levels"])
    return rows


def study_file(folder, **fields):
    fields.setdefault("kind", "access")
    fields.setdefault("population", "population.csv")
    fields.setdefault("period", PERIOD)
    fields.setdefault("schema", "schema.toml")
    path = folder / f"{fields['name']}.toml"
    path.write_text(tomli_w.dumps(fields))
    return path


def run(folder, **fields) -> dict:
    return run_inprocess([study_file(folder, **fields)], folder / "network.toml")[0]


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    folder = tmp_path_factory.mktemp("accessnet")
    sites = make_sites()
    write_network(folder, sites)
    population = make_population()
    population.to_csv(folder / "population.csv", index=False)
    return folder, pooled(sites), population


def settings(by, **extra):
    out = {"by": by, "period": PERIOD, "years": 3.0, "nodes": list(SITES), "areas": AREAS}
    out.update(extra)
    return out


def assert_terms(terms: list[dict], ref, rtol=1e-8):
    assert [t["term"] for t in terms] == list(ref.params.index)
    np.testing.assert_allclose([t["estimate"] for t in terms], ref.params.to_numpy(), rtol=rtol, atol=0)
    np.testing.assert_allclose([t["std_error"] for t in terms], ref.bse.to_numpy(), rtol=rtol, atol=0)
    ci = ref.conf_int()
    np.testing.assert_allclose([t["ratio_low"] for t in terms], np.exp(ci[0].to_numpy()), rtol=1e-7)
    np.testing.assert_allclose([t["ratio_high"] for t in terms], np.exp(ci[1].to_numpy()), rtol=1e-7)
    np.testing.assert_allclose([t["p_value"] for t in terms], ref.pvalues.to_numpy(), rtol=1e-6, atol=1e-300)


def assert_rates(rows: list[dict], ref: pd.DataFrame, keys=("variable", "level")):
    got = pd.DataFrame(rows).set_index(list(keys))
    want = ref.set_index(list(keys))
    assert set(got.index) == set(want.index)
    want = want.loc[got.index]
    np.testing.assert_allclose(got["population"], want["population"], rtol=1e-12)
    np.testing.assert_allclose(got["person_years"], want["person_years"], rtol=1e-12)
    shown = got["referrals"].notna().to_numpy()
    for col in ("rate", "rate_low", "rate_high"):
        np.testing.assert_allclose(got[col].to_numpy(dtype=float)[shown], want[col].to_numpy()[shown], rtol=1e-10)
        assert got[col][~shown].isna().all()
    return got, want


# --------------------------------------------------------------------------- exactness


def test_rates_and_rate_ratios_equal_the_pooled_rows(network):
    folder, rows, population = network
    by = ["age_group", "sex", "ethnicity_ons", "imd_quintile"]
    result = run(
        folder, name="all_four", by=by, areas=AREAS, where='source in ["GP", "self"]', exposure="age_group[T.65+]"
    )
    ref = reference_access(rows, population, settings(by, where=lambda r: r["source"].isin(["GP", "self"])))
    assert result["n"] == ref["n"]
    assert result["cells"] == len(ref["cells"])
    assert_terms(result["terms"], ref["adjusted"])
    assert result["formula"] == "referrals ~ age_group + sex + ethnicity_ons + imd_quintile + area"
    np.testing.assert_allclose(
        result["lr_statistic"], ref["adjusted"].null_deviance - ref["adjusted"].deviance, rtol=1e-8
    )
    assert result["lr_df"] == ref["adjusted"].df_model
    crude = {m["name"]: m for m in result["models"]}
    for var in by:
        assert_terms(crude[f"crude {var}"]["terms"], ref["crude"][var])
    got, want = assert_rates(result["rates"], ref["rates"])
    # The network's counts are shown under the NHS rule; the crude rate ratios are the ratios of rates.
    assert list(got["referrals"]) == [display_count(v) for v in want["referrals"]]
    age = got.loc["age_group"]
    np.testing.assert_allclose(age["rate_ratio"], age["rate"] / age.loc["18-24", "rate"], rtol=1e-8)
    got, want = assert_rates(result["area_rates"], ref["area_rates"], keys=("area", "variable", "level"))
    assert list(got["referrals"]) == [display_count(v) for v in want["referrals"]]  # node rule = NHS rule
    exposure = result["exposure_term"]
    assert exposure["term"] == "age_group[T.65+]"
    np.testing.assert_allclose(exposure["ratio"], np.exp(ref["adjusted"].params["age_group[T.65+]"]), rtol=1e-8)
    assert result["deviance"] is None and result["aic"] is None  # they need every cell; see loglinear.py
    assert {n["name"] for n in result["nodes"]} == set(SITES) and all(n["contributed"] for n in result["nodes"])
    assert result["n_cohort"] >= result["n"] + result["n_missing"]
    json.dumps(result, allow_nan=False)  # plain JSON
    text = render(result)
    assert "age group: 65+" in text and "<- exposure" in text and "area: west" in text and "[T." not in text


def test_older_adults_against_18_to_64_without_area_effects(network):
    folder, rows, population = network
    merge = {"age_group": {"18-64": AGES[:5]}}
    result = run(
        folder,
        name="older",
        by=["age_group", "sex"],
        areas=AREAS,
        merge=merge,
        area_effects=False,
        exposure="age_group[T.65+]",
    )
    ref = reference_access(rows, population, settings(["age_group", "sex"], merge=merge, area_effects=False))
    assert_terms(result["terms"], ref["adjusted"])
    assert [r["level"] for r in result["rates"] if r["variable"] == "age_group"] == ["18-64", "65+"]
    assert result["exposure_term"]["ratio"] < 0.6  # the planted under-representation
    assert_rates(result["rates"], ref["rates"])


def test_single_years_of_age_and_ons_sex_codes_give_the_same_study(network, tmp_path):
    """A real ONS extract has single years of age (children and 90+ included) and sex codes."""
    folder, _, population = network
    banded = load_study(study_file(folder, name="banded", by=["age_group", "sex"], areas=AREAS))
    rows = []
    years = {
        "18-24": range(18, 25),
        "25-34": range(25, 35),
        "35-44": range(35, 45),
        "45-54": range(45, 55),
        "55-64": range(55, 65),
        "65+": [*range(65, 90), "90+"],
    }
    sex_code = {"male": "1", "female": "2"}
    summed = population.groupby(["area", "age_band", "sex"], as_index=False)["population"].sum()
    for row in summed.itertuples(index=False):
        ages = list(years[row.age_band])
        share = np.full(len(ages), row.population // len(ages))
        share[: row.population - share.sum()] += 1  # whole people, adding up exactly
        for age, p in zip(ages, share):
            rows.append((row.area, str(age), sex_code[row.sex], int(p)))
        if row.age_band == "18-24":
            rows.append((row.area, "7", sex_code[row.sex], 999))  # a child: not served, left out
    single = pd.DataFrame(rows, columns=["area", "age_band", "sex", "population"]).sample(frac=1, random_state=1)
    single.to_csv(tmp_path / "ons.csv", index=False)
    (tmp_path / "schema.toml").write_text((folder / "schema.toml").read_text())
    ons = load_study(study_file(tmp_path, name="banded", by=["age_group", "sex"], areas=AREAS, population="ons.csv"))
    assert ons.spec.hash == banded.spec.hash


# --------------------------------------------------------------------------- the study's identity


def test_the_table_travels_inside_the_study_and_its_digest_is_in_the_hash(network, tmp_path):
    folder, _, population = network
    path = study_file(folder, name="ident", by=["age_group"], areas=AREAS)
    loaded = load_study(path)
    data = read_study_file(path)
    assert data["population_csv"]["text"] == (folder / "population.csv").read_text()
    # The Flower hub re-parses the study from its data alone: same spec, same hash.
    hub = load_wire_study(
        {
            "source": str(path),
            "data": json.loads(json.dumps(data)),
            "hash": loaded.spec.hash,
            "schema": {"source": "schema.toml", "text": (folder / "schema.toml").read_text()},
        }
    )
    assert hub.spec.hash == loaded.spec.hash
    # Nodes get the digest, never the table.
    wire = json.dumps(loaded.spec.to_wire())
    assert loaded.parsed.population.digest in wire and "west_a,18-24" not in wire
    # The same denominators in another order: same study; other denominators: another study.
    (tmp_path / "schema.toml").write_text((folder / "schema.toml").read_text())
    population.sample(frac=1, random_state=2).to_csv(tmp_path / "population.csv", index=False)
    assert load_study(study_file(tmp_path, name="ident", by=["age_group"], areas=AREAS)).spec.hash == loaded.spec.hash
    changed = population.copy()
    changed.loc[0, "population"] += 1
    changed.to_csv(tmp_path / "population.csv", index=False)
    assert load_study(study_file(tmp_path, name="ident", by=["age_group"], areas=AREAS)).spec.hash != loaded.spec.hash


# --------------------------------------------------------------------------- what a node releases


def node_for(tmp_path, frame: pd.DataFrame, policy: str | None = None) -> Node:
    return Node(tmp_path / "node", frame, COLUMNS, policy=policy, name="east")


def access_task(node: Node, path) -> m.Task:
    data = read_study_file(path)
    spec, _ = parse_study(data, node.schema, str(path))
    return m.Task(kind=TASK, study_hash=spec.hash, payload={"models": {"m0": spec.to_wire()}})


def test_a_node_releases_only_one_way_margins(network, tmp_path):
    folder, _, population = network
    frame = make_sites()["east"]
    node = node_for(tmp_path, frame)
    population.to_csv(tmp_path / "node" / "population.csv", index=False)
    by = ["age_group", "sex", "imd_quintile"]
    reply = node.send(access_task(node, study_file(tmp_path / "node", name="rel", by=by, areas=AREAS)))
    assert reply.status == m.OK, reply.message
    assert sorted(reply.arrays) == sorted(f"margins/m0/{v}" for v in by)
    rows = frame[(frame.referral_date >= PERIOD[0]) & (frame.referral_date <= PERIOD[1])].dropna(subset=by)
    for var in by:
        counts = rows[var].value_counts().reindex(COLUMNS[var]["levels"], fill_value=0)
        np.testing.assert_array_equal(reply.arrays[f"margins/m0/{var}"], counts.to_numpy(dtype=float))
    assert reply.payload["access"]["m0"]["n_used"] == len(rows)
    table = reply.payload["counts"]["m0"]
    assert table["n_used"] == display_count(len(rows))
    assert table["age_group=65+"] == display_count((rows.age_group == "65+").sum())
    assert set(reply.payload) == {"access", "counts", "data_version"}
    entry = node.audit_entries()[-1]
    assert entry["status"] == "ok" and entry["kind"] == TASK


def test_a_trust_approves_the_study_with_its_denominators(network, tmp_path, capsys):
    folder, _, population = network
    node = node_for(tmp_path, make_sites()["east"], policy='mode = "approved"\napproved = []\n')
    population.to_csv(tmp_path / "node" / "population.csv", index=False)
    path = study_file(tmp_path / "node", name="appr", by=["age_group", "sex"], areas=AREAS)
    reply = node.send(access_task(node, path))
    assert_nothing_released(reply, rule="not_approved")
    assert (
        main(
            [
                "node",
                "approve",
                str(path),
                "--policy",
                str(tmp_path / "node" / "policy.toml"),
                "--schema",
                str(tmp_path / "node" / "schema.toml"),
                "--yes",
            ]
        )
        == 0
    )
    shown = capsys.readouterr().out
    assert "one-way margins" in shown and load_study(path).spec.hash in shown
    assert node.send(access_task(node, path)).status == m.OK


def test_a_rare_level_is_refused_by_name_and_a_merge_lets_the_study_run(tmp_path, network):
    _, _, population = network
    sites = make_sites(rare={"north": ("age_group", "65+", 3)})
    folder = tmp_path / "net"
    write_network(folder, sites)
    population.to_csv(folder / "population.csv", index=False)
    with pytest.raises(NetworkError) as err:
        run(folder, name="rare", by=["age_group"], areas=AREAS, period=["2015-01-01", "2019-12-31"])
    text = str(err.value)
    assert "north refused" in text and "level '65+' of age_group has fewer than 8 rows" in text
    assert "[merge.age_group]" in text
    merge = {"age_group": {"55+": ["55-64", "65+"]}}
    result = run(
        folder, name="rare_merged", by=["age_group"], areas=AREAS, merge=merge, period=["2015-01-01", "2019-12-31"]
    )
    ref = reference_access(
        pooled(sites), population, settings(["age_group"], merge=merge, period=["2015-01-01", "2019-12-31"], years=5.0)
    )
    assert_terms(result["terms"], ref["adjusted"])


def test_small_counts_are_suppressed_with_secondary_suppression(tmp_path, network):
    """A node whose policy suppresses up to 10: a level with 9 referrals there passes the model
    rules (exact margins for the fit) but is shown suppressed, and other cells are suppressed so
    that it cannot be recovered from its row and column totals."""
    _, _, population = network
    sites = make_sites(rare={"north": ("ethnicity_ons", "Other", 9)})
    folder = tmp_path / "net"
    write_network(folder, sites, policy='mode = "exploratory"\n[rules]\nsuppress_max = 10\n')
    population.to_csv(folder / "population.csv", index=False)
    period = ["2015-01-01", "2019-12-31"]
    result = run(folder, name="supp", by=["ethnicity_ons", "sex"], areas=AREAS, period=period)
    ref = reference_access(pooled(sites), population, settings(["ethnicity_ons", "sex"], period=period, years=5.0))
    assert_terms(result["terms"], ref["adjusted"])  # the fit still uses the exact margins
    cells = {(r["area"], r["variable"], r["level"]): r for r in result["area_rates"]}
    target = cells[("north", "ethnicity_ons", "Other")]
    assert target["referrals"] is None and target["rate"] is None and target["suppressed"] == "small number"
    assert result["suppression"]["secondary"] >= 2
    for var, levels in (("ethnicity_ons", ETHNIC), ("sex", SEXES)):
        grid = [
            [cells[(a, var, lv)]["referrals"] for lv in levels] + [cells[(a, "all", "all")]["referrals"]]
            for a in sorted(SITES)
        ]
        net = {(r["variable"], r["level"]): r["referrals"] for r in result["rates"]}
        grid.append([net[(var, lv)] for lv in levels] + [net[("all", "all")]])
        lines = [row for row in grid] + [list(col) for col in zip(*grid)]
        assert all(sum(v is None for v in line) != 1 for line in lines)
    secondary = [r for r in result["area_rates"] if r["suppressed"] == "secondary"]
    assert secondary and all(r["rate"] is None for r in secondary)
    assert "* suppressed" in render(result)
    for var, levels in (("ethnicity_ons", ETHNIC), ("sex", SEXES)):
        grid = [
            [cells[(a, var, lv)]["referrals"] for lv in levels] + [cells[(a, "all", "all")]["referrals"]]
            for a in sorted(SITES)
        ]
        grid.append([net[(var, lv)] for lv in levels] + [net[("all", "all")]])
        hidden = {(i, j) for i, row in enumerate(grid) for j, v in enumerate(row) if v is None}
        assert not hidden or undetermined(grid, hidden)


def undetermined(table, suppressed) -> bool:
    """Every suppressed entry can change while every row and column still adds up (the
    null space of the totals' equations over the suppressed entries touches each of them)."""
    rows, cols = len(table), len(table[0])
    hidden = sorted(suppressed)
    equations = []
    for i in range(rows):  # cells of row i minus its total
        equations.append([(1.0 if j < cols - 1 else -1.0) if a == i else 0.0 for a, j in hidden])
    for j in range(cols):
        equations.append([(1.0 if i < rows - 1 else -1.0) if b == j else 0.0 for i, b in hidden])
    a = np.array(equations)
    _, sv, vt = np.linalg.svd(a)
    null = vt[int(np.sum(sv > 1e-9)) :]
    return null.size > 0 and bool(np.all(np.abs(null).max(axis=0) > 1e-9))


@pytest.mark.parametrize("primary", [[(0, 1)], [(0, 1), (1, 2)], [(2, 0)], [(0, 3)], [(3, 3)], [(0, 0), (2, 2)]])
def test_secondary_suppression_leaves_no_suppressed_count_recoverable(primary):
    exact = np.array([[20, 3, 40, 12], [15, 30, 5, 9], [35, 8, 65, 4], [11, 13, 17, 6]])
    full = np.zeros((5, 5), dtype=int)
    full[:4, :4] = exact
    full[:4, 4] = exact.sum(axis=1)
    full[4, :4] = exact.sum(axis=0)
    full[4, 4] = exact.sum()
    values = {(i, j): int(full[i, j]) for i in range(5) for j in range(5)}
    relations = [((i, 4), [(i, j) for j in range(4)]) for i in range(5)]
    relations += [((4, j), [(i, j) for i in range(4)]) for j in range(5)]
    suppressed = suppress(values, set(primary), relations)  # the access display's algorithm (protocol/sdc.py)
    table = [[None if (i, j) in suppressed else values[(i, j)] for j in range(5)] for i in range(5)]
    assert suppressed > set(primary)
    assert undetermined(table, suppressed)
    assert all(sum(v is None for v in line) != 1 for line in table + [list(c) for c in zip(*table)])
    assert all(table[i][j] is None or table[i][j] == full[i][j] for i in range(5) for j in range(5))


def test_the_network_rule_for_counts():
    assert [display_count(n) for n in (0, 1, 7, 8, 12, 13, 1234)] == [0, None, None, 10, 10, 15, 1235]


# --------------------------------------------------------------------------- groups without population


def test_groups_without_population_leave_their_referrals_out(tmp_path, network):
    _, _, population = network
    sites = make_sites()
    folder = tmp_path / "net"
    write_network(folder, sites)
    zeroed = population.copy()
    # No 65+ women of quintile 5 in south (everywhere else they exist).
    hole = (
        (zeroed.area == "south") & (zeroed.age_band == "65+") & (zeroed.sex == "female") & (zeroed.imd_quintile == "5")
    )
    zeroed.loc[hole, "population"] = 0
    zeroed.to_csv(folder / "population.csv", index=False)
    by = ["age_group", "sex", "imd_quintile"]
    result = run(folder, name="holes", by=by, areas=AREAS, period=["2015-01-01", "2019-12-31"])
    ref = reference_access(pooled(sites), zeroed, settings(by, period=["2015-01-01", "2019-12-31"], years=5.0))
    assert result["n"] == ref["n"] and result["cells"] == len(ref["cells"])
    assert_terms(result["terms"], ref["adjusted"])
    assert_rates(result["rates"], ref["rates"])


def network_copy(network, tmp_path, population: pd.DataFrame):
    """The module's network in a folder of this test's own, with `population` as its table."""
    folder = network[0]
    local = tmp_path / "net"
    local.mkdir()
    for name in ("schema.toml", "network.toml", *(f"{s}.csv" for s in SITES)):
        (local / name).write_text((folder / name).read_text())
    population.to_csv(local / "population.csv", index=False)
    return local


# --------------------------------------------------------------------------- need


def make_need() -> pd.DataFrame:
    """Prevalence by age band and sex (women more, older people less, as in APMS)."""
    rows = [
        {
            "age_band": age,
            "sex": sex,
            "prevalence": (0.24 if sex == "female" else 0.14) * (0.6 if age == "65+" else 1.0) + 0.002 * i,
        }
        for i, (age, sex) in enumerate((a, x) for a in AGES for x in SEXES)
    ]
    return pd.DataFrame(rows)


def with_need(population: pd.DataFrame, need: pd.DataFrame) -> pd.DataFrame:
    """The population of people with need, row by row (what the reference divides by)."""
    merged = population.merge(need, on=["age_band", "sex"], how="left", validate="many_to_one")
    assert merged["prevalence"].notna().all()
    return merged.assign(population=merged["population"] * merged["prevalence"]).drop(columns="prevalence")


def assert_reference_at_its_estimate(fit):
    """The reference's SEs are its own estimate's: the inverse information at its parameters.
    (statsmodels' IRLS gives the covariance of the iterate before the last; stopped one step
    early on the deviance, that was 1.1e-8 off here: see reference_access.py.)"""
    X, offset = np.asarray(fit.model.exog), np.asarray(fit.model.offset)
    mu = np.exp(X @ fit.params.to_numpy() + offset)
    se = np.sqrt(np.diag(np.linalg.inv(X.T @ (X * mu[:, None]))))
    np.testing.assert_allclose(fit.bse.to_numpy(), se, rtol=1e-12, atol=0)


@pytest.mark.parametrize("by", [["age_group", "sex"], ["age_group", "imd_quintile"]])
def test_rates_against_need_equal_the_pooled_rows_with_population_times_prevalence(network, by):
    """With `need`, each population row counts its people times its group's prevalence, before
    summing to the study's groups (by age and deprivation, the prevalence by age and sex weights
    every row, not the margins)."""
    folder, rows, population = network
    need = make_need()
    need.to_csv(folder / "need.csv", index=False)
    result = run(folder, name="need_" + "_".join(by), by=by, areas=AREAS, need="need.csv", exposure="age_group[T.65+]")
    ref = reference_access(rows, with_need(population, need), settings(by))
    for fit in (ref["adjusted"], *ref["crude"].values()):
        assert_reference_at_its_estimate(fit)
    assert result["n"] == ref["n"] and result["cells"] == len(ref["cells"])
    assert_terms(result["terms"], ref["adjusted"])
    for var in by:
        assert_terms({m["name"]: m for m in result["models"]}[f"crude {var}"]["terms"], ref["crude"][var])
    assert_rates(result["rates"], ref["rates"])
    assert_rates(result["area_rates"], ref["area_rates"], keys=("area", "variable", "level"))
    assert result["offset"] == "log(population * prevalence * years)"
    assert result["need"]["source"] == "need.csv" and result["need"]["by"] == ["age_group", "sex"]
    assert "per 100,000 with need/yr" in render(result)
    # Against need, older adults (prevalence 0.6 times the others') are less under-represented.
    plain = run(folder, name="plain_" + "_".join(by), by=by, areas=AREAS, exposure="age_group[T.65+]")
    assert plain["need"] is None and plain["offset"] == "log(population * years)"
    assert result["exposure_term"]["ratio"] / plain["exposure_term"]["ratio"] > 1.3


def test_the_need_table_is_in_the_study_hash(network, tmp_path):
    folder, _, _ = network
    need = make_need()
    need.to_csv(folder / "need.csv", index=False)
    first = load_study(study_file(folder, name="hashed", by=["age_group", "sex"], areas=AREAS, need="need.csv"))
    need.loc[0, "prevalence"] += 0.01
    need.to_csv(folder / "need.csv", index=False)
    second = load_study(study_file(folder, name="hashed", by=["age_group", "sex"], areas=AREAS, need="need.csv"))
    assert first.spec.hash != second.spec.hash
    assert first.spec.params["need"]["sha256"] != second.spec.params["need"]["sha256"]


@pytest.mark.parametrize(
    "need_change, pop_change, expected",
    [
        (lambda n: n[n.age_band != "65+"], None, "has no prevalence for age_band '65+', sex 'female'"),
        (
            lambda n: n.assign(prevalence=n.prevalence * 100),
            None,
            "column 'prevalence' has '24.0'; it must be a proportion between 0 and 1",
        ),
        (lambda n: n.assign(region="London"), None, "has a column 'region' that is not a group column"),
        (lambda n: n.drop(columns="prevalence"), None, "has no column 'prevalence'"),
        (lambda n: pd.concat([n, n.head(1)]), None, "repeats the group of an earlier row"),
        (
            None,
            lambda p: p.groupby(["area", "age_band", "ethnic_group", "imd_quintile"], as_index=False)[
                "population"
            ].sum(),
            "has no column 'sex', which the need table",
        ),
    ],
)
def test_bad_need_tables_get_one_sentence(tmp_path, capsys, network, need_change, pop_change, expected):
    _, _, population = network
    local = network_copy(network, tmp_path, pop_change(population) if pop_change else population)
    need = make_need()
    (need_change(need) if need_change else need).to_csv(local / "need.csv", index=False)
    by = ["age_group", "imd_quintile"] if pop_change else ["age_group", "sex"]
    err = cli(local, tmp_path, capsys, name="badneed", by=by, areas=AREAS, need="need.csv")
    assert expected in err
    assert "need.csv" in err or "population.csv" in err


# --------------------------------------------------------------------------- bad input


def cli(folder, tmp_path, capsys, **fields):
    out = tmp_path / "out"
    code = main(
        ["run", str(study_file(folder, **fields)), "--network", str(folder / "network.toml"), "--out", str(out)]
    )
    err = capsys.readouterr().err.strip()
    assert code != 0 and err.startswith("error: ") and "Traceback" not in err and len(err.splitlines()) == 1
    assert not out.exists()
    return err


@pytest.mark.parametrize(
    "fields, csv_change, expected",
    [
        ({}, lambda p: p.drop(columns="sex"), "has no column 'sex' for 'sex' (field 'by')"),
        (
            {},
            lambda p: p.assign(sex=p.sex.replace("male", "man?")),
            "column 'sex' has 'man?', which is not a level of sex",
        ),
        ({}, lambda p: pd.concat([p, p.head(1)]), "repeats the group of an earlier row"),
        ({}, lambda p: p.assign(year=2019), "has a column 'year' that is not part of the layout"),
        (
            {},
            lambda p: p.assign(population=p.population.where(p.sex == "female", 0)),
            "has no population for sex 'male' in any area",
        ),
        (
            {"areas": {"west": ["west_a", "west_b"]}},
            lambda p: p[p.area != "north"],
            "has no rows for area 'north' (node north)",
        ),
        (
            {},
            lambda p: p[~((p.area == "south") & (p.age_band == "65+") & (p.sex == "male"))],
            "has no row for age_group '65+', sex 'male' in area 'south' (node south)",
        ),
        ({"by": ["age_group", "height"]}, None, "field 'by' names column 'height'"),
        ({"period": ["2019-01-01", "2016-01-01"]}, None, "field 'period' ends before it starts"),
        ({"period": "2016"}, None, "field 'period' must be the first and last referral dates"),
        ({"population": "nowhere.csv"}, None, "field 'population' names 'nowhere.csv', which does not exist"),
        ({"areas": {"west": ["atlantis"]}}, None, "field 'areas.west' names area 'atlantis'"),
        ({"exposure": "age_group[T.99]"}, None, "field 'exposure' must be a term of the adjusted model"),
        ({"colour": "red"}, None, "unknown field 'colour'"),
    ],
)
def test_bad_input_gets_one_sentence_naming_the_file_and_field(tmp_path, capsys, network, fields, csv_change, expected):
    _, _, population = network
    local = network_copy(network, tmp_path, csv_change(population) if csv_change else population)
    study = {"name": "bad", "by": ["age_group", "sex"], "areas": AREAS, **fields}
    err = cli(local, tmp_path, capsys, **study)
    assert expected in err
    assert ("population.csv" in err) or ("bad.toml" in err)


def test_a_level_without_referrals_is_a_clear_model_error(tmp_path, network):
    _, _, population = network
    sites = make_sites()
    for frame in sites.values():
        frame.loc[frame.age_group == "65+", "age_group"] = "55-64"
    folder = tmp_path / "net"
    write_network(folder, sites)
    population.to_csv(folder / "population.csv", index=False)
    with pytest.raises(ModelError, match=r"no referrals in the cohort have 'age_group\[T.65\+\]'"):
        run(folder, name="empty65", by=["age_group"], areas=AREAS)


# --------------------------------------------------------------------------- the IAPT dataset


def test_on_a_small_synthetic_iapt_network(tmp_path):
    """The built-in dataset (derived age_group, sex, ethnicity_ons, imd_quintile) and the
    network's own denominators; groups without population at this small scale included."""
    from iaptnet.node.dataset import load_dataset
    from iaptnet.synth import generate_network

    network = generate_network(tmp_path / "syn", services=8, patients=4000, seed=4)
    study = network.parent / "a.toml"
    by = ["age_group", "sex", "imd_quintile"]
    study.write_text(
        tomli_w.dumps(
            {
                "kind": "access",
                "name": "syn",
                "population": "population.csv",
                "by": by,
                "period": ["2012-04-01", "2020-03-31"],
                "exposure": "age_group[T.65+]",
            }
        )
    )
    result = run_inprocess([study], network)[0]
    names = [line.split('"')[1] for line in network.read_text().splitlines() if line.startswith("name =")]
    files = [line.split('"')[1] for line in network.read_text().splitlines() if line.startswith("data =")]
    frames = []
    for name, file in zip(names, files):
        frame = load_dataset(str(network.parent / file), None).frame
        frames.append(frame.assign(area=name))
    rows = pd.concat(frames, ignore_index=True)
    population = pd.read_csv(network.parent / "population.csv", dtype={"imd_quintile": str})
    ref = reference_access(
        rows, population, {"by": by, "period": ("2012-04-01", "2020-03-31"), "years": 8.0, "nodes": names}
    )
    assert result["n"] == ref["n"]
    assert_terms(result["terms"], ref["adjusted"])
    assert_rates(result["rates"], ref["rates"])
    assert result["exposure_term"]["ratio"] < 0.5  # older adults under-represented

    # Against the shipped illustrative need table (prevalence by age band and sex).
    from iaptnet.protocol.kinds.access import ILLUSTRATIVE_NEED

    need_study = network.parent / "need.toml"
    need_study.write_text(
        tomli_w.dumps(
            {
                "kind": "access",
                "name": "syn_need",
                "population": "population.csv",
                "need": "illustrative",
                "by": by,
                "period": ["2012-04-01", "2020-03-31"],
                "exposure": "age_group[T.65+]",
            }
        )
    )
    against_need = run_inprocess([need_study], network)[0]
    need = pd.read_csv(ILLUSTRATIVE_NEED)
    assert set(need["age_band"]) == set(AGES) and set(need["sex"]) == set(SEXES)
    ref = reference_access(
        rows,
        with_need(population, need),
        {"by": by, "period": ("2012-04-01", "2020-03-31"), "years": 8.0, "nodes": names},
    )
    assert against_need["need"]["source"] == "illustrative"
    assert_terms(against_need["terms"], ref["adjusted"])
    assert_rates(against_need["rates"], ref["rates"])

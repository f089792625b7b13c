"""Population denominators for the access analyses: adults living in each service's catchment.

The coordinator holds them as a plain CSV in ONS mid-year-estimate layout, one row per
area x age band x sex x ethnic group x IMD quintile:

    area,age_band,sex,ethnic_group,imd_quintile,population
    camden_islington,18-24,female,White,1,5099

Columns (codes are exactly these strings; each maps onto a derived variable of
iapt_derived.toml):
- area: the node name of the service whose catchment it is (network.toml `name`:
  camden_islington, barnet, ...; service_<k> for networks of other sizes).
- age_band: 18-24, 25-34, 35-44, 45-54, 55-64, 65+ (-> age_group; 65+ is 65 and over).
- sex: female, male (-> sex).
- ethnic_group: White, Mixed, Asian, Black, Other, the ONS 2011 five groups with Chinese counted
  as Asian (-> ethnicity_ons, *not* the NHS seven-level derived ethnic_group).
- imd_quintile: 1 (most deprived) .. 5, LSOA populations grouped by the IMD quintile of the LSOA
  (-> imd_quintile).
- population: whole number of adults in the cell, average over the study period.

One file serves every rate: the population of a group is the sum of its cells, e.g. the 65+
population of the network is the sum over areas, sexes, ethnic groups and quintiles of the
`65+` rows. Referrals span 8 financial years (2012-04..2020-03), so the annual referral rate
per 100,000 is 100,000 x referrals_g / (population_g x 8). Real ONS extracts (MYE by local
authority x age x sex, Census 2011 ethnicity, LSOA MYE by IMD quintile, joined to this grain)
go in the same layout (a real extract may leave out cells with no one in them).

How the synthetic table is built (consistent with the generated referrals, not sampled from
them, so it does not depend on the seed):
- each area's adults: params.POPULATION_ADULTS_8 (2.45 million in all), scaled by
  patients / PAPER_PATIENTS for other network sizes (k != 8 services: the scaled total split
  evenly, as the referrals are);
- within an area: age band x sex x (ethnic group, IMD quintile), with age
  (POPULATION_AGE_SHARES: 65+ is 14% of adults, 4.5% of referrals), sex (51% female) and the
  (ethnic group, quintile) table. That table starts from the generator's own expected referral
  table (BME more common in deprived quintiles) and is raked to the population's ethnic shares
  (POPULATION_ETHNIC_SHARES) and to the referrals' IMD profile (IMD_SHARES: Q1 38% ... Q5 3%),
  so that every quintile has the same referral rate in expectation ("similar access") and
  older adults' rate is ~0.29 times that of 18-64 year olds ("under-represented");
- counts are whole numbers that add up exactly to each area's total (largest remainder).

The areas all share one composition (the generator draws referrals' demographics independently
of the service); only their sizes, and so their referral rates, differ.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from . import params as P
from ._draw import exact_counts
from .network import service_names
from .population import ETHNIC_CODES, service_shares

COLUMNS = ("area", "age_band", "sex", "ethnic_group", "imd_quintile", "population")
AGE_BANDS = ("18-24", "25-34", "35-44", "45-54", "55-64", "65+")
SEXES = ("female", "male")
ETHNIC_GROUPS = ("White", "Mixed", "Asian", "Black", "Other")
IMD_QUINTILES = ("1", "2", "3", "4", "5")
#: NHS ethnic category -> ONS five groups (as the node derives ethnicity_ons).
ONS_GROUP = {
    **dict.fromkeys("ABC", "White"),
    **dict.fromkeys("DEFG", "Mixed"),
    **dict.fromkeys("HJKLR", "Asian"),
    **dict.fromkeys("MNP", "Black"),
    "S": "Other",
}
#: The shipped table, for the paper-scale network (483,683 referrals, 8 services).
SHIPPED = Path(__file__).with_name("population.csv")
FILENAME = "population.csv"


def referral_ethnic_imd() -> np.ndarray:
    """[ethnic group, IMD quintile] shares of referrals (known values) that the generator's
    population.py draws from: P(quintile) x P(ethnic group | quintile)."""
    shares = np.asarray(list(P.ETHNIC_CODES.values()))
    white = np.isin(np.asarray(ETHNIC_CODES), P.ETHNIC_WHITE)
    bme_share = shares[~white].sum() / shares.sum()
    mult = np.asarray(P.BME_BY_IMD)
    mult = mult / np.dot(mult, np.asarray(P.IMD_SHARES))
    p_bme = np.clip(bme_share * mult, 0, 1)  # by quintile
    group = np.asarray([ETHNIC_GROUPS.index(ONS_GROUP[code]) for code in ETHNIC_CODES])
    table = np.zeros((len(ETHNIC_GROUPS), len(IMD_QUINTILES)))
    for code_share, is_white, g in zip(shares, white, group):
        if is_white:
            table[g] += (1 - p_bme) * code_share / shares[white].sum()
        else:
            table[g] += p_bme * code_share / shares[~white].sum()
    return table * np.asarray(P.IMD_SHARES)[None, :]


def population_ethnic_imd(rounds: int = 200) -> np.ndarray:
    """[ethnic group, IMD quintile] shares of the population: the referral table raked to the
    population's ethnic shares and the referrals' IMD shares (iterative proportional fitting,
    which keeps the referral table's association between ethnicity and deprivation)."""
    table = referral_ethnic_imd()
    rows = np.asarray([P.POPULATION_ETHNIC_SHARES[g] for g in ETHNIC_GROUPS], dtype=float)
    rows = rows / rows.sum()
    cols = np.asarray(P.IMD_SHARES, dtype=float)
    cols = cols / cols.sum()
    for _ in range(rounds):
        table *= (rows / table.sum(axis=1))[:, None]
        table *= (cols / table.sum(axis=0))[None, :]
    return table


def area_totals(patients: int = P.PAPER_PATIENTS, services: int = P.PAPER_SERVICES) -> np.ndarray:
    """Adults per area for a network of this size (see the module docstring)."""
    scale = patients / P.PAPER_PATIENTS
    if services == P.PAPER_SERVICES:
        raw = np.asarray(P.POPULATION_ADULTS_8, dtype=float) * scale
    else:
        raw = sum(P.POPULATION_ADULTS_8) * scale * service_shares(services)
    return np.rint(raw).astype(np.int64)


def population_table(patients: int = P.PAPER_PATIENTS, services: int = P.PAPER_SERVICES) -> pd.DataFrame:
    """The denominators for a network of this size, rows in area, age band, sex, ethnic group,
    IMD quintile order; code columns as strings, population as int64."""
    age = np.asarray(P.POPULATION_AGE_SHARES, dtype=float)
    sex = np.asarray((P.POPULATION_FEMALE_SHARE, 1 - P.POPULATION_FEMALE_SHARE))
    cell_shares = (age[:, None, None] * sex[None, :, None] * population_ethnic_imd().ravel()[None, None, :]).ravel()
    names = service_names(services)
    counts = np.concatenate([exact_counts(int(total), cell_shares) for total in area_totals(patients, services)])
    grid = pd.MultiIndex.from_product([names, AGE_BANDS, SEXES, ETHNIC_GROUPS, IMD_QUINTILES], names=COLUMNS[:-1])
    frame = grid.to_frame(index=False)
    frame["population"] = counts.astype(np.int64)
    return frame


def population_csv(patients: int = P.PAPER_PATIENTS, services: int = P.PAPER_SERVICES) -> str:
    """The CSV text of population_table (header, "\\n" line ends, no quoting, no index)."""
    frame = population_table(patients, services)
    lines = [",".join(COLUMNS)]
    lines += [",".join(map(str, row)) for row in frame.itertuples(index=False, name=None)]
    return "\n".join(lines) + "\n"


def write_population(path: str | Path, patients: int = P.PAPER_PATIENTS, services: int = P.PAPER_SERVICES) -> Path:
    path = Path(path)
    path.write_text(population_csv(patients, services), encoding="utf-8", newline="")
    return path


def read_population(path: str | Path = SHIPPED) -> pd.DataFrame:
    """A denominators CSV with code columns as strings and population as int64."""
    dtype = {name: str for name in COLUMNS[:-1]}
    dtype["population"] = np.int64
    return pd.read_csv(path, dtype=dtype, keep_default_na=False)

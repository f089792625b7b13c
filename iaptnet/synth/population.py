"""Who is referred: demographics, deprivation, presenting problem and first-contact scores.

Everything here is the *true* value for each referral; what the extract shows as missing is
decided later (missing.py), after the outcome has been generated from these values.
"""

from __future__ import annotations

from functools import cache

import numpy as np
from scipy.special import expit, ndtri

from . import params as P
from ._draw import bernoulli, calibrate_intercept, categorical_rows, choice, exact_counts

ETHNIC_CODES = tuple(P.ETHNIC_CODES)
PROBLEM_CODES = tuple(P.PROBLEMS)
REFERRAL_SOURCE_CODES = tuple(P.REFERRAL_SOURCES)
SEXUAL_ORIENTATION_CODES = tuple(P.SEXUAL_ORIENTATION)

Cohort = dict[str, np.ndarray]


def service_shares(services: int) -> np.ndarray:
    """Each service's share of the referrals, in node order: the source study's for the
    paper network; log-normal sizes (params.SERVICE_SIZE_SIGMA) otherwise."""
    if services == P.PAPER_SERVICES:
        return np.asarray(P.SERVICE_SHARES_8)
    return _lognormal_shares(services)


@cache
def _lognormal_shares(services: int) -> np.ndarray:
    quantiles = ndtri((np.arange(services) + 0.5) / services)
    sizes = np.exp(P.SERVICE_SIZE_SIGMA * quantiles)
    order = np.random.default_rng([P.SERVICE_CODE_SEED, services, 1]).permutation(services)
    shares = sizes[order] / sizes.sum()
    shares.flags.writeable = False
    return shares


@cache
def service_codes(services: int) -> tuple[str, ...]:
    """Each service's code (its service_id), in node order: params.SERVICE_CODES_8 for the
    paper network; otherwise made-up ODS-style codes drawn once per network size."""
    if services == P.PAPER_SERVICES:
        return P.SERVICE_CODES_8
    second = "ABCDEFGHJKLMNPQRSTUVWXY"
    third = "0123456789ABCDEFGHJKLMNPQRSTUVWXYZ"
    pool = [f"Z{a}{b}" for a in second for b in third if f"Z{a}{b}" not in P.SERVICE_CODES_8]
    rng = np.random.default_rng([P.SERVICE_CODE_SEED, services])
    return tuple(pool[i] for i in rng.choice(len(pool), size=services, replace=False))


def draw_population(rng: np.random.Generator, n: int, services: int) -> Cohort:
    c: Cohort = {}
    counts = exact_counts(n, service_shares(services))
    c["service"] = np.repeat(np.arange(1, services + 1), counts)

    start = np.datetime64(P.REFERRAL_START)
    span = int((np.datetime64(P.REFERRAL_END) - start).astype(int)) + 1
    c["referral_day"] = rng.integers(0, span, size=n)

    _age(rng, c, n)
    c["female"] = bernoulli(rng, np.full(n, P.FEMALE_SHARE))
    _deprivation(rng, c, n, services)
    _ethnicity(rng, c, n)
    _employment(rng, c, n)
    c["ltc"] = bernoulli(rng, np.asarray(P.LTC_BY_AGE)[c["age_band"]])
    p_dis = P.DISABILITY_BASE + P.DISABILITY_LTC * c["ltc"]
    disabled = bernoulli(rng, p_dis)
    c["disability"] = np.where(disabled, rng.integers(0, len(P.DISABILITY_CODES), size=n), -1)
    c["sexual_orientation"] = choice(rng, n, list(P.SEXUAL_ORIENTATION.values()))
    c["referral_source"] = choice(rng, n, list(P.REFERRAL_SOURCES.values()))
    c["problem"] = choice(rng, n, list(P.PROBLEMS.values()))
    _baseline_scores(rng, c, n)
    # Psychotropic medication: more likely with more severe depression and with age.
    eta = 0.35 * (c["phq9_first"] - 15) / 6 + 0.25 * (c["age"] - 38) / 14
    b = calibrate_intercept(eta, P.PSYCHOTROPIC_SHARE)
    c["psychotropic"] = bernoulli(rng, expit(b + eta))
    return c


def _age(rng, c: Cohort, n: int) -> None:
    band = choice(rng, n, P.AGE_SHARES)
    lo = np.array([b[0] for b in P.AGE_BANDS])
    hi = np.array([b[1] for b in P.AGE_BANDS])
    c["age"] = lo[band] + np.floor(rng.random(n) * (hi[band] - lo[band] + 1)).astype(np.int64)
    c["age_band"] = band
    c["older"] = c["age"] >= 65
    c["young"] = c["age"] <= 24


def _deprivation(rng, c: Cohort, n: int, services: int) -> None:
    q = choice(rng, n, P.IMD_SHARES) + 1
    c["imd_quintile"] = q
    c["imd_decile"] = 2 * q - 1 + (rng.random(n) < 0.5)
    # A pool of 25 LSOAs per service and decile, numbered so that codes never collide.
    pick = rng.integers(0, 25, size=n)
    c["lsoa_number"] = 1 + ((c["service"] - 1) * 10 + (c["imd_decile"] - 1)) * 25 + pick


def _ethnicity(rng, c: Cohort, n: int) -> None:
    shares = np.asarray(list(P.ETHNIC_CODES.values()))
    white = np.isin(np.asarray(ETHNIC_CODES), P.ETHNIC_WHITE)
    bme_share = shares[~white].sum() / shares.sum()
    mult = np.asarray(P.BME_BY_IMD)
    mult = mult / np.dot(mult, np.asarray(P.IMD_SHARES))
    is_bme = bernoulli(rng, np.clip(bme_share * mult[c["imd_quintile"] - 1], 0, 1))
    white_idx = np.flatnonzero(white)
    bme_idx = np.flatnonzero(~white)
    w_pick = white_idx[choice(rng, n, shares[white])]
    b_pick = bme_idx[choice(rng, n, shares[~white])]
    c["ethnic"] = np.where(is_bme, b_pick, w_pick)


def _employment(rng, c: Cohort, n: int) -> None:
    base = np.asarray(P.EMPLOYMENT_BY_AGE)
    probs = base[c["age_band"]].copy()
    jobless = np.asarray(P.JOBLESS_BY_IMD)
    jobless = jobless / np.dot(jobless, np.asarray(P.IMD_SHARES))
    m = jobless[c["imd_quintile"] - 1]
    for k in (1, 3, 5):  # 02 unemployed, 04 long-term sick, 06 not working
        probs[:, k] *= m
    c["employment"] = categorical_rows(rng, probs)
    emp = c["employment"]
    c["neet"] = c["young"] & np.isin(emp, (1, 3, 4, 5, 6))
    c["unemployed"] = emp == 1


def _baseline_scores(rng, c: Cohort, n: int) -> None:
    corr = np.asarray(P.SCORE_CORR)
    z = rng.standard_normal((n, 3)) @ np.linalg.cholesky(corr).T
    mean = np.asarray(P.SCORE_MEAN)
    sd = np.asarray(P.SCORE_SD)
    x = mean + z * sd
    x[:, 0] += P.OLDER_PHQ_SHIFT * c["older"]
    x[:, 2] += P.LTC_WSAS_SHIFT * c["ltc"]
    # Deprivation goes with a little more severity; the problem shapes the profile [A].
    x[:, 0] += 0.6 * (c["imd_quintile"] == 1) + 0.3 * (c["imd_quintile"] == 2)
    x[:, 1] += 0.4 * (c["imd_quintile"] == 1)
    code = np.asarray(PROBLEM_CODES)[c["problem"]]
    depression = np.isin(code, ("F32", "F33"))
    anxiety = np.isin(code, ("F41.1", "F41.0", "F40.0", "F40.1", "F40.2", "F42", "F43.1", "F45.2", "BDD", "F40-F43"))
    x[:, 0] += 1.0 * depression - 1.0 * anxiety
    x[:, 1] += -0.6 * depression + 0.6 * anxiety
    c["phq9_first"] = np.clip(np.rint(x[:, 0]), 0, P.PHQ_MAX).astype(np.int64)
    c["gad7_first"] = np.clip(np.rint(x[:, 1]), 0, P.GAD_MAX).astype(np.int64)
    c["wsas_first"] = np.clip(np.rint(x[:, 2]), 0, P.WSAS_MAX).astype(np.int64)

"""What happens after referral: the funnel, treatment received, waits, dates and end codes.

Order of draws: entering treatment; attrition (end code 43 / 47) among entrants with its planted
odds ratios; finishing (two or more sessions), much less likely after dropping out; intensity,
missed appointments (with the secular trend and the planted SMS-reminder step, reminders.py) and
sessions; the primary therapy, matched or not to NICE guidance; then dates and end codes
consistent with all of that.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit

from ..protocol.iapt_schema import LOW_INTENSITY_THERAPIES
from . import params as P
from ._draw import bernoulli, calibrate_intercept, choice, neg_binomial
from .nice import match_matrix
from .population import PROBLEM_CODES, Cohort
from .reminders import dna_retention, referral_month

THERAPY_CODES = tuple(P.THERAPY_SHARES)
_THERAPY_IS_LI = np.isin(np.asarray(THERAPY_CODES), LOW_INTENSITY_THERAPIES)
#: [problem, therapy]: 1 matched, 0 mismatched, -1 no guideline.
NICE_TABLE = match_matrix(PROBLEM_CODES, THERAPY_CODES)


def _allowed(k: int, is_li: bool, mismatch: bool) -> np.ndarray:
    """Therapies a referral with problem k, LI/HI primary and mismatch wish can receive."""
    allowed = _THERAPY_IS_LI == is_li
    table = NICE_TABLE[k]
    if table[0] >= 0:  # a guideline applies
        chosen = allowed & (table == (0 if mismatch else 1))
        allowed = chosen if chosen.any() else allowed
    return allowed


def _mismatch_share(k: int) -> float:
    from .nice import PROBLEM_GROUP

    return P.MISMATCH_BY_GROUP.get(PROBLEM_GROUP[PROBLEM_CODES[k]], 0.0)


def _raked_weights(rounds: int = 100) -> np.ndarray:
    """Sampling weights whose expected shares, within LI and within HI, come close to the
    targets: damped iterative proportional fitting on the exact expectation (no data), with
    each weight kept within 1/4..4 times its target because the mismatch steering forces some
    small therapies above their share and no weights meet every target exactly."""
    target = np.asarray(list(P.THERAPY_SHARES.values()), dtype=float)
    for is_li in (True, False):
        cls = _THERAPY_IS_LI == is_li
        target[cls] /= target[cls].sum()
    problem_share = np.asarray(list(P.PROBLEMS.values()))
    problem_share = problem_share / problem_share.sum()
    w = target.copy()
    for _ in range(rounds):
        expected = np.zeros_like(w)
        for k, pk in enumerate(problem_share):
            ms = _mismatch_share(k)
            for is_li in (True, False):
                for mis, pm in ((False, 1 - ms), (True, ms)):
                    if pm == 0:
                        continue
                    a = _allowed(k, is_li, mis)
                    expected += pk * pm * np.where(a, w, 0.0) / w[a].sum()
        w = np.clip(w * np.sqrt(target / np.maximum(expected, 1e-12)), target / 4, target * 4)
    return w


_THERAPY_WEIGHTS = _raked_weights()

NOT_TREATED_CODES = {
    "10": 0.15,
    "11": 0.10,
    "12": 0.10,
    "13": 0.10,
    "14": 0.25,
    "16": 0.15,
    "17": 0.002,
    "50": 0.10,
    "95": 0.048,
}
TREATED_V15 = {"42": 0.80, "40": 0.07, "41": 0.03, "44": 0.04, "45": 0.002, "98": 0.058}
TREATED_V20 = {"46": 0.80, "48": 0.10, "49": 0.002, "96": 0.098}
END_CODES = tuple(NOT_TREATED_CODES) + ("43", "47") + tuple(TREATED_V15) + tuple(TREATED_V20)


def draw_pathway(rng: np.random.Generator, c: Cohort) -> None:
    n = len(c["age"])
    imd1 = c["imd_quintile"] == 1
    effects = dict(older=c["older"], young=c["young"], neet=c["neet"], imd1=imd1, unemployed=c["unemployed"])

    eta = sum(v * effects[k] for k, v in P.ENTER_LOG_OR.items())
    b = calibrate_intercept(eta, 1 - P.SHARE_NEVER)
    entered = bernoulli(rng, expit(b + eta))

    # Attrition among entrants: older OR 0.48, NEET OR 1.31 (planted conditional on F-like
    # covariates: deprivation and youth raise it a little too).
    eta = (
        P.ATTRITION_LOG_OR["older"] * c["older"]
        + P.ATTRITION_LOG_OR["neet"] * c["neet"]
        + 0.15 * imd1
        + 0.10 * c["young"]
    )
    b = calibrate_intercept(eta[entered], P.ATTRITION_SHARE)
    attrition = entered & bernoulli(rng, expit(b + eta))

    eta = sum(v * effects[k] for k, v in P.FINISH_LOG_OR.items()) + P.FINISH_GIVEN_ATTRITION_LOG_OR * attrition
    b = calibrate_intercept(eta[entered], P.SHARE_FINISHED / (1 - P.SHARE_NEVER))
    finished = entered & bernoulli(rng, expit(b + eta))
    one = entered & ~finished

    # Intensity: finishers LI / HI / stepped; a single session cannot be stepped.
    intensity = np.full(n, -1)
    intensity[finished] = choice(rng, int(finished.sum()), P.INTENSITY_SHARES)
    intensity[one] = choice(rng, int(one.sum()), (P.ONE_SESSION_LI, 1 - P.ONE_SESSION_LI))

    # Missed appointments first: hurdle (any?) then 1 + negative binomial tail. A latent
    # engagement lowers DNAs; missed appointments then cut the course short (fewer sessions).
    # This is the count engagement alone would give (`would_miss`); the secular trend and the
    # service's SMS reminders (reminders.py) then keep each missed appointment with probability
    # `keep` (the others were cancelled ahead instead), which multiplies the odds of a missed
    # appointment by exactly the planted shift. The hurdle is calibrated on the kept count:
    # P(none kept) = 1 - p_any * P(at least one of 1 + NB kept).
    engage = rng.standard_normal(n)
    keep = dna_retention(c["service"], referral_month(c["referral_day"]), int(c["service"].max()))
    eta = (
        P.DNA_LOG_OR["imd1"] * imd1
        + P.DNA_LOG_OR["imd2"] * (c["imd_quintile"] == 2)
        + P.DNA_LOG_OR["young"] * c["young"]
        + P.DNA_LOG_OR["neet"] * c["neet"]
        + P.DNA_LOG_OR["older"] * c["older"]
        + P.DNA_LOG_OR["age10"] * (c["age"] - 38) / 10
        + P.ENGAGE_DNA * engage
    )
    tail_mean = np.where(finished, P.DNA_EXTRA_MEAN, 0.4) * np.exp(0.5 * P.ENGAGE_DNA * engage)
    size_dna = P.DNA_EXTRA_SIZE
    any_kept = 1 - (1 - keep) * (1 + tail_mean * keep / size_dna) ** (-size_dna)
    p_any = np.zeros(n)
    for group, share in ((finished, P.DNA_ZERO), (one, 0.40), (~entered, 0.30)):
        b = calibrate_intercept(eta[group], 1 - share, weights=any_kept[group])
        p_any[group] = expit(b + eta[group])
    any_dna = bernoulli(rng, p_any)
    would_miss = np.where(any_dna, 1 + neg_binomial(rng, tail_mean, size_dna), 0)
    n_dna = rng.binomial(would_miss, keep)

    # Sessions among finishers: 2 + negative binomial by intensity, scaled by age, NEET and
    # the missed appointments engagement led to (normalised so each intensity keeps its mean).
    n_treat = np.zeros(n, dtype=np.int64)
    n_treat[one] = 1
    mean = np.asarray(P.SESSIONS_MEAN)[intensity.clip(0)]
    sd = np.asarray(P.SESSIONS_SD)[intensity.clip(0)]
    extra_mean = mean - 2
    size = extra_mean**2 / np.maximum(sd**2 - extra_mean, 0.5)
    log_scale = P.SESSIONS_AGE * (c["age"] - 38) + np.log(P.SESSIONS_NEET) * c["neet"] + P.SESSIONS_PER_DNA * would_miss
    scale = np.exp(log_scale)
    for k in range(len(P.INTENSITY_LEVELS)):
        rows = finished & (intensity == k)
        if rows.any():
            scale[rows] /= scale[rows].mean()
    lam = rng.gamma(shape=size, scale=extra_mean * scale / size)
    extra = rng.poisson(lam)
    n_treat[finished] = 2 + extra[finished]

    scheduled = n_treat + n_dna + 1  # + the assessment
    # Appointments kept from being missed were cancelled ahead by the patient.
    n_cancel_pt = rng.poisson(P.CANCEL_PT_RATE * scheduled) + (would_miss - n_dna)
    n_cancel_prov = rng.poisson(P.CANCEL_PROV_RATE * scheduled)

    therapy, mismatch = _primary_therapy(rng, c["problem"], intensity, entered)

    wait = np.where(entered, np.rint(np.exp(np.log(P.WAIT_MEDIAN) + P.WAIT_SIGMA * rng.standard_normal(n))), -1)
    wait = wait.astype(np.int64)
    first_day = np.where(entered, c["referral_day"] + wait, -1)
    gap = rng.uniform(7.0, 12.0, size=n)
    end_finished = first_day + np.rint((n_treat - 1) * gap + rng.integers(0, 15, size=n))
    end_one = first_day + rng.integers(0, 29, size=n)
    end_never = c["referral_day"] + np.rint(np.exp(np.log(28) + 0.5 * rng.standard_normal(n)))
    discharge_day = np.where(finished, end_finished, np.where(one, end_one, end_never))
    discharge_day = discharge_day.astype(np.int64)

    c.update(
        entered=entered,
        attrition=attrition,
        finished=finished,
        intensity=intensity,
        n_treat=n_treat,
        n_dna=n_dna,
        n_cancel_pt=n_cancel_pt,
        n_cancel_prov=n_cancel_prov,
        therapy=therapy,
        nice_mismatch=mismatch,
        wait_days=wait,
        first_treatment_day=first_day,
        discharge_day=discharge_day,
    )
    c["end_code"] = _end_codes(rng, c)


def _primary_therapy(rng, problem: np.ndarray, intensity: np.ndarray, entered: np.ndarray):
    """Therapy with most sessions: LI for LI, HI for HI, mostly HI when stepped. For problems
    with a guideline, a share (MISMATCH_BY_GROUP) get a therapy NICE does not recommend.
    Returns (therapy index or -1, mismatch 1/0 or -1 where no guideline)."""
    n = len(problem)
    li = (intensity == 0) | ((intensity == 2) & (rng.random(n) < P.STEPPED_PRIMARY_LI))
    share = np.asarray([_mismatch_share(k) for k in range(len(PROBLEM_CODES))])
    want_mismatch = rng.random(n) < share[problem]
    therapy = np.full(n, -1, dtype=np.int64)
    # One draw per (problem, LI/HI, mismatch) group: 15 x 2 x 2 groups, never a row loop.
    for k in range(len(PROBLEM_CODES)):
        for is_li in (True, False):
            for mis in (False, True):
                rows = np.flatnonzero(entered & (problem == k) & (li == is_li) & (want_mismatch == mis))
                if rows.size == 0:
                    continue
                w = np.where(_allowed(k, is_li, mis), _THERAPY_WEIGHTS, 0.0)
                therapy[rows] = rng.choice(len(w), size=rows.size, p=w / w.sum())
    mismatch = np.full(n, -1, dtype=np.int64)
    has = therapy >= 0
    table_value = NICE_TABLE[problem[has], therapy[has]]
    mismatch[has] = np.where(table_value < 0, -1, 1 - table_value)
    return therapy, mismatch


def _end_codes(rng, c: Cohort) -> np.ndarray:
    """Index into END_CODES: v1.5 codes for discharges before April 2020, v2.0 from then."""
    n = len(c["age"])
    v2_from = int((np.datetime64(P.V2_FROM) - np.datetime64(P.REFERRAL_START)).astype(int))
    v2 = c["discharge_day"] >= v2_from
    out = np.full(n, -1, dtype=np.int64)
    never = ~c["entered"]
    out[never] = _draw_codes(rng, NOT_TREATED_CODES, int(never.sum()))
    dropout = c["attrition"]
    out[dropout & ~v2] = END_CODES.index("43")
    out[dropout & v2] = END_CODES.index("47")
    rest = c["entered"] & ~dropout
    for mask, table in ((rest & ~v2, TREATED_V15), (rest & v2, TREATED_V20)):
        out[mask] = _draw_codes(rng, table, int(mask.sum()))
    return out


def _draw_codes(rng, table: dict[str, float], size: int) -> np.ndarray:
    index = np.asarray([END_CODES.index(code) for code in table])
    return index[choice(rng, size, list(table.values()))]

"""The planted outcome model and the last scores that carry it.

1. Reliable recovery Y for finishers at caseness from the conditional logistic model of
   docs/reference/synthetic.md#outcome-model, written in the derived variables the catalogue models use, so that the fully
   adjusted models recover the planted odds ratios. The intercept is calibrated so that
   P(Y) = 0.46 in that population. Y is drawn by balanced (systematic) sampling within strata
   unless params.OUTCOME_SAMPLING says "independent" (see there).
2. The other flags for all finishers: reliable deterioration (6%, NEET odds 1.41 among all
   finishers) and reliable improvement (65% overall, including every Y = 1).
3. Last PHQ-9 / GAD-7 scores sampled by rejection so that re-deriving the flags from the scores
   with the §B.2 rules gives back exactly the planted flags; then last WSAS.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit

from . import params as P
from ._draw import bernoulli, calibrate_intercept
from .population import ETHNIC_CODES, Cohort

# Flag categories for finishers (what the last scores must show).
NONE, RECOVERED, IMPROVED, DETERIORATED, UNCHANGED = -1, 0, 1, 2, 3


def linear_predictor(c: Cohort) -> np.ndarray:
    """The planted logit of reliable recovery without intercept and service effect."""
    b = P.OUTCOME_LOG_OR
    q = c["imd_quintile"]
    eth = np.asarray(ETHNIC_CODES)[c["ethnic"]]
    mismatch = np.where(c["nice_mismatch"] == 1, 1.0, 0.0)
    return (
        b["n_treat"] * c["n_treat"]
        + b["n_dna"] * c["n_dna"]
        + b["nice_mismatch"] * mismatch
        + b["older_adult"] * c["older"]
        + b["neet"] * c["neet"]
        + b["imd2"] * (q == 2)
        + b["imd3"] * (q == 3)
        + b["imd4"] * (q == 4)
        + b["imd5"] * (q == 5)
        + b["asian"] * np.isin(eth, ("H", "J", "K", "L"))
        + b["other_ethnic"] * np.isin(eth, ("R", "S"))
        + b["white_other"] * (eth == "C")
        + b["phq9_first"] * (c["phq9_first"] - 15)
        + b["gad7_first"] * (c["gad7_first"] - 13.5)
        + b["wsas_first"] * (c["wsas_first"] - 19)
        + b["ltc"] * c["ltc"]
        + b["unemployed_25plus"] * (c["unemployed"] & (c["age"] >= 25))
        + b["psychotropic_med"] * c["psychotropic"]
        + b["wait_weeks"] * np.where(c["wait_days"] >= 0, c["wait_days"], 0) / 7
    )


def case_first(c: Cohort) -> np.ndarray:
    return (c["phq9_first"] >= P.PHQ_CUT) | (c["gad7_first"] >= P.GAD_CUT)


def draw_outcomes(
    rng: np.random.Generator, c: Cohort, services: int, masks: dict[str, np.ndarray] | None = None
) -> None:
    """Plant the outcomes. `masks` (the MCAR masks, drawn independently of every value) only
    stratify the balanced draw of Y; the outcome itself depends on true values alone."""
    n = len(c["age"])
    fin = c["finished"]
    case = case_first(c)
    eligible = fin & case
    u_service = rng.normal(0.0, P.SERVICE_SD, size=services)
    eta = linear_predictor(c) + u_service[c["service"] - 1]
    b0 = calibrate_intercept(eta[eligible], P.OUTCOME_TARGET)
    p = expit(b0 + eta)
    if P.OUTCOME_SAMPLING == "balanced":
        recovered = np.zeros(n, dtype=bool)
        rows = np.flatnonzero(eligible)
        recovered[rows] = balanced_bernoulli(rng, p[rows], _strata(c, masks, rows))
    else:
        recovered = eligible & bernoulli(rng, p)

    f_p, f_g = c["phq9_first"], c["gad7_first"]
    can_drop = (f_p >= P.PHQ_RCI) | (f_g >= P.GAD_RCI)
    can_rise = (f_p + P.PHQ_RCI <= P.PHQ_MAX) | (f_g + P.GAD_RCI <= P.GAD_MAX)
    # Improved but still at caseness needs a drop on one measure and caseness (without a
    # reliable rise) on the same or the other one.
    same = (f_p - P.PHQ_RCI >= P.PHQ_CUT) | (f_g - P.GAD_RCI >= P.GAD_CUT)
    cross = ((f_p >= P.PHQ_RCI) & (f_g + P.GAD_RCI - 1 >= P.GAD_CUT)) | (
        (f_g >= P.GAD_RCI) & (f_p + P.PHQ_RCI - 1 >= P.PHQ_CUT)
    )
    can_improve = np.where(case, same | cross, can_drop)

    # Deterioration: its planted odds ratio holds among all finishers (where the source study
    # measured it), not only among those who did not recover. Recovery and deterioration exclude
    # each other, so a finisher who did not recover deteriorates with probability q / (1 - p),
    # q the planted deterioration probability and p the recovery one: overall P = q.
    rest = fin & ~recovered
    eta_d = P.DETERIORATION_LOG_OR["neet"] * c["neet"]
    able = fin & can_rise
    b = calibrate_intercept(eta_d[able], P.DETERIORATION_SHARE * fin.sum() / max(able.sum(), 1))
    p_recover = np.where(eligible, p, 0.0)
    p_rest = np.minimum(expit(b + eta_d) / np.maximum(1.0 - p_recover, 1e-12), 1.0)
    deteriorated = rest & can_rise & bernoulli(rng, p_rest)

    pool = rest & ~deteriorated & can_improve
    need = P.IMPROVEMENT_SHARE * fin.sum() - recovered.sum()
    eta_i = np.log(1.34) * c["older"]
    b = calibrate_intercept(eta_i[pool], float(np.clip(need / max(pool.sum(), 1), 0.001, 0.999)))
    improved = pool & bernoulli(rng, expit(b + eta_i))

    flag = np.full(n, NONE)
    flag[fin] = UNCHANGED
    flag[improved] = IMPROVED
    flag[deteriorated] = DETERIORATED
    flag[recovered] = RECOVERED

    phq_last, gad_last = _last_scores(rng, c, flag, case)
    # One-session entrants: the score at their only treatment session.
    one = c["entered"] & ~fin
    phq_last[one] = np.clip(f_p[one] + np.rint(rng.normal(-1.0, 3.0, one.sum())), 0, P.PHQ_MAX)
    gad_last[one] = np.clip(f_g[one] + np.rint(rng.normal(-1.0, 2.5, one.sum())), 0, P.GAD_MAX)
    wsas_last = np.full(n, -1, dtype=np.int64)
    ent = c["entered"]
    change = 1.1 * (phq_last - f_p) + rng.normal(0.0, 4.0, n)
    wsas_last[ent] = np.clip(np.rint(c["wsas_first"] + change), 0, P.WSAS_MAX)[ent]

    c.update(
        case_first=case,
        reliable_recovery=np.where(eligible, recovered.astype(np.int64), -1),
        outcome_flag=flag,
        phq9_last=phq_last,
        gad7_last=gad_last,
        wsas_last=wsas_last,
        outcome_intercept=np.full(n, b0),
        service_effect=u_service[c["service"] - 1],
    )


def balanced_bernoulli(rng: np.random.Generator, p: np.ndarray, keys: list[np.ndarray]) -> np.ndarray:
    """Bernoulli(p) draws by systematic sampling: rows sorted by the stratum keys (first key
    most significant) and, within a stratum, in random order; a row succeeds where the running
    sum of p crosses an integer offset by one uniform. Each row keeps P(success) = p exactly,
    and the number of successes in every stratum (indeed in every run of the order) is its
    expected number within one."""
    order = np.lexsort([rng.random(len(p))] + keys[::-1])
    crossings = np.floor(np.cumsum(p[order]) + rng.random())
    hits = np.diff(crossings, prepend=0.0) > 0
    out = np.empty(len(p), dtype=bool)
    out[order] = hits
    return out


def _strata(c: Cohort, masks: dict[str, np.ndarray] | None, rows: np.ndarray) -> list[np.ndarray]:
    """Strata for the balanced draw: complete-case pattern of the catalogue models, service,
    retired, then the binary and categorical exposures of D3-D6 and missed appointments."""
    keys = []
    if masks is not None:
        model = np.zeros(len(c["age"]), dtype=bool)
        for name in (
            "gender",
            "ethnicity",
            "imd",
            "ltc",
            "disability",
            "psychotropic",
            "wsas",
            "referral_source",
            "last_scores",
        ):
            model |= masks[name]
        pattern = np.where(model, 2, np.where(masks["employment"], 1, 0))
        keys.append(pattern[rows])
    retired = c["employment"] == 7  # 08: nearly collinear with older_adult in D4
    for key in (
        c["service"],
        retired,
        c["older"],
        c["young"],
        c["neet"],
        c["imd_quintile"],
        c["nice_mismatch"],
        np.minimum(c["n_dna"], 4),
    ):
        keys.append(key[rows])
    return [np.asarray(k, dtype=np.int64) for k in keys]


def flags_from_scores(f_p, f_g, l_p, l_g, case):
    """The §B.2 rules (GAD-7 as the anxiety measure): returns the flag category per row."""
    imp = (f_p - l_p >= P.PHQ_RCI) | (f_g - l_g >= P.GAD_RCI)
    det = (l_p - f_p >= P.PHQ_RCI) | (l_g - f_g >= P.GAD_RCI)
    ri = imp & ~det
    rd = det & ~imp
    case_last = (l_p >= P.PHQ_CUT) | (l_g >= P.GAD_CUT)
    out = np.full(len(f_p), UNCHANGED)
    out[ri] = IMPROVED
    out[ri & case & ~case_last] = RECOVERED
    out[rd] = DETERIORATED
    return out


# Proposal for each category: last = a * first + b + N(0, s), per measure (PHQ, GAD).
_PROPOSAL = {
    RECOVERED: ((0.25, 0.5, 2.5), (0.25, 0.5, 2.0)),
    IMPROVED: ((0.55, 0.0, 3.0), (0.55, 0.0, 2.5)),
    UNCHANGED: ((0.85, 0.5, 2.5), (0.85, 0.5, 2.0)),
    DETERIORATED: ((1.0, 5.0, 3.0), (1.0, 3.5, 2.5)),
}


def _last_scores(rng, c: Cohort, flag: np.ndarray, case: np.ndarray):
    """Rejection sampling: propose last scores from the category's proposal and keep those
    whose re-derived flag equals the planted one. Rows still open after the proposal rounds
    draw uniformly among every score pair that gives their flag (the pools in draw_outcomes
    guarantee there is one)."""
    n = len(flag)
    f_p, f_g = c["phq9_first"], c["gad7_first"]
    l_p = np.full(n, -1, dtype=np.int64)
    l_g = np.full(n, -1, dtype=np.int64)
    open_rows = np.flatnonzero(flag != NONE)
    for _ in range(30):
        if open_rows.size == 0:
            break
        fl = flag[open_rows]
        fp, fg = f_p[open_rows], f_g[open_rows]
        cp = np.zeros((open_rows.size, 3))
        cg = np.zeros((open_rows.size, 3))
        for cat, (pp, pg) in _PROPOSAL.items():
            m = fl == cat
            cp[m], cg[m] = pp, pg
        prop_p = cp[:, 0] * fp + cp[:, 1] + cp[:, 2] * rng.standard_normal(fp.size)
        prop_g = cg[:, 0] * fg + cg[:, 1] + cg[:, 2] * rng.standard_normal(fg.size)
        prop_p = np.clip(np.rint(prop_p), 0, P.PHQ_MAX).astype(np.int64)
        prop_g = np.clip(np.rint(prop_g), 0, P.GAD_MAX).astype(np.int64)
        ok = flags_from_scores(fp, fg, prop_p, prop_g, case[open_rows]) == fl
        rows = open_rows[ok]
        l_p[rows], l_g[rows] = prop_p[ok], prop_g[ok]
        open_rows = open_rows[~ok]
    # Exhaustive fallback over the 28 x 22 score grid, in chunks.
    grid_p, grid_g = np.meshgrid(np.arange(P.PHQ_MAX + 1), np.arange(P.GAD_MAX + 1), indexing="ij")
    grid_p, grid_g = grid_p.ravel(), grid_g.ravel()
    for chunk in np.array_split(open_rows, max(1, open_rows.size // 2000)):
        if chunk.size == 0:
            continue
        k = chunk.size
        fp = np.repeat(f_p[chunk], grid_p.size)
        fg = np.repeat(f_g[chunk], grid_p.size)
        lp = np.tile(grid_p, k)
        lg = np.tile(grid_g, k)
        ok = (
            flags_from_scores(fp, fg, lp, lg, np.repeat(case[chunk], grid_p.size))
            == np.repeat(flag[chunk], grid_p.size)
        ).reshape(k, grid_p.size)
        if not ok.any(axis=1).all():  # pragma: no cover - the pools guarantee feasibility
            raise RuntimeError("synth: a finisher has no last scores matching its planted flags")
        pick = np.argmax(np.where(ok, rng.random(ok.shape), -1.0), axis=1)
        l_p[chunk], l_g[chunk] = grid_p[pick], grid_g[pick]
    return l_p, l_g

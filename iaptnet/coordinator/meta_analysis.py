"""Pooling one coefficient's estimates from k studies (here: nodes): fixed effect and random
effects (DerSimonian-Laird and REML), with Q, I^2, tau^2 and a prediction interval.

- Fixed effect (inverse variance) and Cochran's Q: statsmodels' `combine_effects`.
- tau^2, DerSimonian-Laird: statsmodels' moment estimate (Q - (k-1)) / (sum w - sum w^2 / sum w),
  truncated at 0 as DerSimonian and Laird define it (`combine_effects` leaves it negative when
  Q < k - 1, which would give negative weights).
- tau^2, REML: statsmodels offers DL and Paule-Mandel but no REML; it is the root of the
  restricted log-likelihood's score, found by scipy's brentq (0 when the score is not positive
  at 0), which is exact to machine precision, unlike a bounded minimiser of the likelihood.
- Random-effects estimate: weights 1 / (v_i + tau^2); Wald (normal) CI and test.
- I^2 = tau^2 / (tau^2 + s^2) with s^2 the "typical" within-study variance
  (k-1) sum w / ((sum w)^2 - sum w^2) (Higgins & Thompson 2002; as R's metafor); for DL this
  equals (Q - (k-1)) / Q.
- H^2 = (tau^2 + s^2) / s^2, as metafor reports it for a random-effects fit.
- 95% prediction interval for a new node's effect: mu +/- t_{k-2} sqrt(tau^2 + SE(mu)^2)
  (Higgins, Thompson & Spiegelhalter 2009); needs k >= 3.
- `ci = "hksj"` (Hartung-Knapp-Sidik-Jonkman, for few studies), as metafor's
  `rma(..., test = "knha")`: SE(mu)^2 = sum w (y - mu)^2 / ((k - 1) sum w) with
  w = 1 / (v + tau^2), the statistic on t with k - 1 df, no truncation of the scale factor
  (metafor's test = "adhoc" would truncate it at 1); the prediction interval takes that SE.
  `ci = "normal"` (the default) is the Wald interval above.
- Q-profile 95% CI for tau^2 (Viechtbauer 2007), as metafor's `confint(rma_fit)` (type "QP"):
  the tau^2 where the generalised Q(tau^2) = sum w (y - mu)^2 equals the chi-square quantiles
  on k - 1 df (Q decreases in tau^2: the upper quantile gives the lower bound), found by brentq
  on [0, max(100, 10 tau^2)] with metafor's edge rules (`tau2_qprofile`).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import optimize, stats
from statsmodels.stats.meta_analysis import combine_effects

from ..protocol.kinds.meta import CI_METHODS

Z975 = float(stats.norm.ppf(0.975))


def fixed_effect(effect: np.ndarray, variance: np.ndarray) -> dict:
    """Inverse-variance pooled estimate with Cochran's Q (and Higgins' I^2 from Q)."""
    effect, variance = _checked(effect, variance)
    k = effect.size
    if k == 1:
        out = _summary(float(effect[0]), math.sqrt(float(variance[0])))
        out.update(k=1, Q=0.0, Q_df=0, Q_p_value=None, I2=None)
        return out
    res = _combine_dl(effect, variance)
    q = float(res.q)
    out = _summary(float(res.mean_effect_fe), float(res.sd_eff_w_fe))
    out.update(
        k=k, Q=q, Q_df=k - 1, Q_p_value=float(stats.chi2.sf(q, k - 1)), I2=max(0.0, (q - (k - 1)) / q) if q > 0 else 0.0
    )
    return out


def tau2_dl(effect: np.ndarray, variance: np.ndarray) -> float:
    """DerSimonian-Laird moment estimate of tau^2, truncated at 0."""
    effect, variance = _checked(effect, variance)
    return max(0.0, float(_combine_dl(effect, variance).tau2))


def _combine_dl(effect: np.ndarray, variance: np.ndarray):
    """statsmodels' `combine_effects` with DL. It also computes its own HKSJ variance from the
    untruncated (possibly negative) DL tau^2, whose square root warns when Q < k - 1; that
    number is not used here, so the warning is silenced."""
    with np.errstate(invalid="ignore"):
        return combine_effects(effect, variance, method_re="dl")


def reml_score(tau2: float, effect: np.ndarray, variance: np.ndarray) -> float:
    """d/d tau^2 of the restricted log-likelihood (up to a factor 1/2)."""
    w = 1.0 / (variance + tau2)
    mu = np.sum(w * effect) / np.sum(w)
    return float(np.sum(w * w * (effect - mu) ** 2) - np.sum(w) + np.sum(w * w) / np.sum(w))


def tau2_reml(effect: np.ndarray, variance: np.ndarray) -> float:
    """REML estimate of tau^2: the root of the restricted score on [0, inf), or 0."""
    effect, variance = _checked(effect, variance)
    if effect.size < 2 or reml_score(0.0, effect, variance) <= 0.0:
        return 0.0
    upper = max(float(np.var(effect)) * 2.0, float(variance.max()), 1e-12)
    for _ in range(200):
        if reml_score(upper, effect, variance) < 0.0:
            break
        upper *= 4.0
    return float(
        optimize.brentq(
            reml_score, 0.0, upper, args=(effect, variance), xtol=1e-300, rtol=4 * np.finfo(float).eps, maxiter=500
        )
    )


def random_effects(effect: np.ndarray, variance: np.ndarray, tau2: float, method: str, ci: str = "normal") -> dict:
    """The random-effects summary at a given tau^2, with the Wald (`ci = "normal"`) or the
    Hartung-Knapp-Sidik-Jonkman (`ci = "hksj"`, t on k - 1 df) interval."""
    effect, variance = _checked(effect, variance)
    if ci not in CI_METHODS:
        raise ValueError(f"ci must be one of {', '.join(CI_METHODS)}")
    k = effect.size
    w = 1.0 / (variance + tau2)
    mu = float(np.sum(w * effect) / np.sum(w))
    if ci == "hksj":
        if k < 2:
            raise ValueError("the HKSJ interval needs k >= 2")
        se = float(math.sqrt(np.sum(w * (effect - mu) ** 2) / ((k - 1) * np.sum(w))))
        out = _summary(mu, se, df=k - 1)
    else:
        se = float(math.sqrt(1.0 / np.sum(w)))
        out = _summary(mu, se)
    w0 = 1.0 / variance
    q = float(np.sum(w0 * (effect - np.sum(w0 * effect) / np.sum(w0)) ** 2))
    typical = _typical_variance(variance) if k > 1 else math.nan
    out.update(
        method=method,
        ci=ci,
        df=k - 1 if ci == "hksj" else None,
        k=k,
        tau2=float(tau2),
        tau=math.sqrt(tau2),
        I2=float(tau2 / (tau2 + typical)) if k > 1 else None,
        H2=float((tau2 + typical) / typical) if k > 1 else None,
        Q=q,
        Q_df=k - 1,
        Q_p_value=float(stats.chi2.sf(q, k - 1)) if k > 1 else None,
        weights=(w / np.sum(w)).tolist(),
    )
    if k >= 3:
        half = float(stats.t.ppf(0.975, k - 2)) * math.sqrt(tau2 + se * se)
        out.update(prediction_low=mu - half, prediction_high=mu + half)
    else:
        out.update(prediction_low=None, prediction_high=None)
    return out


def meta_analyse(effect, variance, ci: str = "normal") -> dict:
    """Fixed effect, DL and REML random effects of k >= 2 estimates; `ci` is the REML
    entry's interval ("normal" or "hksj"; fixed effect and DL keep the Wald interval)."""
    effect, variance = _checked(effect, variance)
    return {
        "fixed": fixed_effect(effect, variance),
        "random_dl": random_effects(effect, variance, tau2_dl(effect, variance), "DerSimonian-Laird"),
        "random_reml": random_effects(effect, variance, tau2_reml(effect, variance), "REML", ci),
    }


def q_generalised(tau2: float, effect: np.ndarray, variance: np.ndarray) -> float:
    """The generalised Q statistic at tau^2: sum w (y - mu)^2, w = 1 / (v + tau^2), mu the
    weighted mean (Cochran's Q at tau^2 = 0); it decreases as tau^2 grows."""
    w = 1.0 / (variance + tau2)
    mu = np.sum(w * effect) / np.sum(w)
    return float(np.sum(w * (effect - mu) ** 2))


def tau2_qprofile(effect, variance, tau2: float, level: float = 0.95) -> dict:
    """The Q-profile confidence interval for tau^2 (and tau, I^2, H^2), as metafor's
    `confint.rma.uni(type = "QP")` for a fit whose estimate is `tau2`.

    The search range is [0, max(100, 10 tau2)] (metafor's tau2.min and tau2.max). With
    chi-square quantiles q_lo < q_hi on k - 1 df (2.5% and 97.5% for level 0.95):

    - Q(0) < q_lo: even tau^2 = 0 fits too well; the interval is the empty set, reported as
      [0, 0] with `empty` (metafor's ci.null; its signs "<").
    - otherwise the upper bound solves Q = q_lo, or is the range's end when Q there is still
      above q_lo (`upper_sign` ">", metafor prints ">100");
    - the lower bound solves Q = q_hi; it is 0 when Q(0) < q_hi, and the range's end when Q
      there is still above q_hi (both bounds, signs ">").

    Bounds are the roots of Q(tau^2) - q by brentq, to machine precision. I^2 and H^2 follow
    from each bound with the typical within-study variance s^2: tau^2 / (tau^2 + s^2) and
    tau^2 / s^2 + 1."""
    effect, variance = _checked(effect, variance)
    k = effect.size
    if k < 2:
        raise ValueError("the Q-profile interval needs k >= 2")
    alpha = 1.0 - level
    crit_hi = float(stats.chi2.isf(alpha / 2, k - 1))
    crit_lo = float(stats.chi2.ppf(alpha / 2, k - 1))
    search_min, search_max = 0.0, max(100.0, 10.0 * tau2)

    def root(crit: float) -> float:
        return float(
            optimize.brentq(
                lambda t: q_generalised(t, effect, variance) - crit,
                search_min,
                search_max,
                xtol=1e-300,
                rtol=4 * np.finfo(float).eps,
                maxiter=1000,
            )
        )

    q_min = q_generalised(search_min, effect, variance)
    q_max = q_generalised(search_max, effect, variance)
    empty, lower_sign, upper_sign = False, "", ""
    if q_min < crit_lo:
        low = high = search_min
        empty, lower_sign, upper_sign = True, "<", "<"
    else:
        if q_max > crit_lo:
            high, upper_sign = search_max, ">"
        else:
            high = root(crit_lo)
    if q_max > crit_hi:
        low = high = search_max
        lower_sign, upper_sign = ">", ">"
    elif q_min < crit_hi:
        low = search_min
    else:
        low = root(crit_hi)
    typical = _typical_variance(variance)
    out = {
        "method": "Q-profile",
        "level": level,
        "tau2_low": low,
        "tau2_high": high,
        "tau_low": math.sqrt(low),
        "tau_high": math.sqrt(high),
        "I2_low": low / (typical + low),
        "I2_high": high / (typical + high),
        "H2_low": low / typical + 1.0,
        "H2_high": high / typical + 1.0,
        "empty": empty,
        "lower_sign": lower_sign,
        "upper_sign": upper_sign,
        "search_max": search_max,
        "note": None,
    }
    if empty:
        out["note"] = (
            f"Q = {q_min:.3g} is below the {100 * alpha / 2:g}% quantile of chi-square on {k - 1} df even at "
            "tau2 = 0, so the Q-profile interval is empty (reported as 0 to 0, as metafor does)"
        )
    elif lower_sign == ">":
        out["note"] = f"both bounds lie above the searched range (tau2 up to {search_max:.6g})"
    elif upper_sign == ">":
        out["note"] = f"the upper bound lies above the searched range (tau2 up to {search_max:.6g})"
    return out


def _typical_variance(variance: np.ndarray) -> float:
    """Higgins & Thompson's typical within-study variance (k-1) sum w / ((sum w)^2 - sum w^2)."""
    w0 = 1.0 / variance
    return float((variance.size - 1) * np.sum(w0) / (np.sum(w0) ** 2 - np.sum(w0 * w0)))


def _summary(estimate: float, se: float, df: int | None = None) -> dict:
    """Estimate, SE, statistic, two-sided p-value and 95% interval: normal, or t on df."""
    dist = stats.norm if df is None else stats.t(df)
    if se > 0:
        statistic = estimate / se
    else:  # HKSJ with identical estimates: the scale factor is 0, as metafor reports it
        statistic = math.copysign(math.inf, estimate) if estimate else math.nan
    crit = Z975 if df is None else float(dist.ppf(0.975))
    return {
        "estimate": estimate,
        "std_error": se,
        "statistic": statistic,
        "p_value": float(2.0 * dist.sf(abs(statistic))) if not math.isnan(statistic) else math.nan,
        "conf_low": estimate - crit * se,
        "conf_high": estimate + crit * se,
    }


def _checked(effect, variance) -> tuple[np.ndarray, np.ndarray]:
    effect = np.asarray(effect, dtype=float)
    variance = np.asarray(variance, dtype=float)
    if effect.shape != variance.shape or effect.ndim != 1 or effect.size == 0:
        raise ValueError("one estimate and one variance per study")
    if not (np.all(np.isfinite(effect)) and np.all(np.isfinite(variance)) and np.all(variance > 0)):
        raise ValueError("estimates must be finite and variances positive")
    return effect, variance

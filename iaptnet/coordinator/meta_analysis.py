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
- 95% prediction interval for a new node's effect: mu +/- t_{k-2} sqrt(tau^2 + SE(mu)^2)
  (Higgins, Thompson & Spiegelhalter 2009); needs k >= 3.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import optimize, stats
from statsmodels.stats.meta_analysis import combine_effects

Z975 = float(stats.norm.ppf(0.975))


def fixed_effect(effect: np.ndarray, variance: np.ndarray) -> dict:
    """Inverse-variance pooled estimate with Cochran's Q (and Higgins' I^2 from Q)."""
    effect, variance = _checked(effect, variance)
    k = effect.size
    if k == 1:
        out = _summary(float(effect[0]), math.sqrt(float(variance[0])))
        out.update(k=1, Q=0.0, Q_df=0, Q_p_value=None, I2=None)
        return out
    res = combine_effects(effect, variance, method_re="dl")
    q = float(res.q)
    out = _summary(float(res.mean_effect_fe), float(res.sd_eff_w_fe))
    out.update(
        k=k, Q=q, Q_df=k - 1, Q_p_value=float(stats.chi2.sf(q, k - 1)), I2=max(0.0, (q - (k - 1)) / q) if q > 0 else 0.0
    )
    return out


def tau2_dl(effect: np.ndarray, variance: np.ndarray) -> float:
    """DerSimonian-Laird moment estimate of tau^2, truncated at 0."""
    effect, variance = _checked(effect, variance)
    return max(0.0, float(combine_effects(effect, variance, method_re="dl").tau2))


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


def random_effects(effect: np.ndarray, variance: np.ndarray, tau2: float, method: str) -> dict:
    """The random-effects summary at a given tau^2."""
    effect, variance = _checked(effect, variance)
    k = effect.size
    w = 1.0 / (variance + tau2)
    mu = float(np.sum(w * effect) / np.sum(w))
    se = float(math.sqrt(1.0 / np.sum(w)))
    out = _summary(mu, se)
    w0 = 1.0 / variance
    q = float(np.sum(w0 * (effect - np.sum(w0 * effect) / np.sum(w0)) ** 2))
    typical = (k - 1) * np.sum(w0) / (np.sum(w0) ** 2 - np.sum(w0 * w0)) if k > 1 else math.nan
    out.update(
        method=method,
        k=k,
        tau2=float(tau2),
        tau=math.sqrt(tau2),
        I2=float(tau2 / (tau2 + typical)) if k > 1 else None,
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


def meta_analyse(effect, variance) -> dict:
    """Fixed effect, DL and REML random effects of k >= 2 estimates."""
    effect, variance = _checked(effect, variance)
    return {
        "fixed": fixed_effect(effect, variance),
        "random_dl": random_effects(effect, variance, tau2_dl(effect, variance), "DerSimonian-Laird"),
        "random_reml": random_effects(effect, variance, tau2_reml(effect, variance), "REML"),
    }


def _summary(estimate: float, se: float) -> dict:
    z = estimate / se
    return {
        "estimate": estimate,
        "std_error": se,
        "statistic": z,
        "p_value": float(2.0 * stats.norm.sf(abs(z))),
        "conf_low": estimate - Z975 * se,
        "conf_high": estimate + Z975 * se,
    }


def _checked(effect, variance) -> tuple[np.ndarray, np.ndarray]:
    effect = np.asarray(effect, dtype=float)
    variance = np.asarray(variance, dtype=float)
    if effect.shape != variance.shape or effect.ndim != 1 or effect.size == 0:
        raise ValueError("one estimate and one variance per study")
    if not (np.all(np.isfinite(effect)) and np.all(np.isfinite(variance)) and np.all(variance > 0)):
        raise ValueError("estimates must be finite and variances positive")
    return effect, variance

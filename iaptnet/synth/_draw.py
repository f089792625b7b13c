"""Small vectorised sampling helpers shared by the generator modules."""

from __future__ import annotations

import numpy as np
from scipy.special import expit


def calibrate_intercept(
    eta: np.ndarray, target: float, iterations: int = 60, weights: np.ndarray | None = None
) -> float:
    """b such that mean(expit(b + eta)) == target (Newton on a monotone function); with
    `weights` w (in 0..1), b such that mean(w * expit(b + eta)) == target."""
    if eta.size == 0:
        return 0.0
    w = 1.0 if weights is None else np.asarray(weights, dtype=float)
    start = min(target / max(float(np.mean(w)), 1e-12), 1 - 1e-9)
    b = float(np.log(start / (1 - start)) - np.mean(eta))
    for _ in range(iterations):
        p = expit(b + eta)
        wp = p if weights is None else w * p
        gap = wp.mean() - target
        slope = np.mean(wp * (1 - p))
        if abs(gap) < 1e-13 or slope <= 0:
            break
        b -= gap / slope
    return b


def bernoulli(rng: np.random.Generator, p: np.ndarray) -> np.ndarray:
    return rng.random(p.shape) < p


def categorical_rows(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One draw per row from a row-wise probability matrix (rows need not be normalised)."""
    cum = np.cumsum(probs, axis=1)
    u = rng.random(len(probs)) * cum[:, -1]
    idx = (cum < u[:, None]).sum(axis=1)
    return np.minimum(idx, probs.shape[1] - 1)


def choice(rng: np.random.Generator, n: int, weights) -> np.ndarray:
    """n indices drawn with probability proportional to `weights`."""
    w = np.asarray(weights, dtype=float)
    return rng.choice(len(w), size=n, p=w / w.sum())


def neg_binomial(rng: np.random.Generator, mean: np.ndarray, size: float) -> np.ndarray:
    """Negative binomial counts with the given means and size (gamma-Poisson mixture)."""
    mean = np.asarray(mean, dtype=float)
    lam = rng.gamma(shape=size, scale=np.maximum(mean, 1e-12) / size)
    return rng.poisson(lam)


def exact_counts(n: int, shares) -> np.ndarray:
    """Split n into integer counts proportional to `shares` (largest remainder)."""
    shares = np.asarray(shares, dtype=float)
    raw = n * shares / shares.sum()
    counts = np.floor(raw).astype(np.int64)
    short = n - counts.sum()
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[:short]] += 1
    return counts

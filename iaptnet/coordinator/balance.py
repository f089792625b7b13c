"""Pooling the nodes' group moments, and covariate balance as standardised mean differences.

Each node sends, per exposure group, (n, mean, M2) of a block of columns (the logit of the
propensity score and the propensity model's design columns); they are pooled exactly with
Chan's formula in node-name order. IPTW nodes also send (sum of weights, weighted means).

One SMD definition throughout (Austin 2009; Stuart 2010):

    SMD = (mean_exposed - mean_control) / sqrt((s²_exposed + s²_control) / 2)

with the group variances s² (n - 1 denominator) of the cohort before matching or weighting,
for both the before and the after SMD, so a change in the SMD is a change in the means only.
After matching the difference is the mean of the pair differences (= the difference of the
matched groups' means); after weighting, of the weighted means.
A column that is constant in both groups has no SMD (None).
"""

from __future__ import annotations

import numpy as np

from ..protocol.errors import NetworkError

BALANCE_THRESHOLD = 0.1  # |SMD| below this counts as balanced (docs/reference/domain.md#psm)


def pool_moments(parts: list[tuple[float, np.ndarray, np.ndarray]]) -> tuple[float, np.ndarray, np.ndarray]:
    """Chan et al.'s pairwise update over (n, mean, M2) blocks, in the order given."""
    n, mean, m2 = 0.0, None, None
    for nk, meank, m2k in parts:
        meank, m2k = np.asarray(meank, dtype=float), np.asarray(m2k, dtype=float)
        if mean is None:
            mean, m2 = np.zeros_like(meank), np.zeros_like(m2k)
        if nk == 0:
            continue
        delta = meank - mean
        total = n + nk
        mean = mean + delta * (nk / total)
        m2 = m2 + m2k + delta * delta * (n * nk / total)
        n = total
    if mean is None:
        raise NetworkError("no node sent the moments the study needs.")
    return n, mean, m2


def pool_weighted_means(parts: list[tuple[float, np.ndarray]]) -> tuple[float, np.ndarray]:
    """(total weight, weighted mean) from each node's (sum of weights, weighted mean)."""
    total, mean = 0.0, None
    for wk, meank in parts:
        meank = np.asarray(meank, dtype=float)
        if mean is None:
            mean = np.zeros_like(meank)
        if wk == 0:
            continue
        total += wk
        mean = mean + (meank - mean) * (wk / total)
    return total, mean


def variances(pooled: tuple[float, np.ndarray, np.ndarray]) -> np.ndarray:
    n, _, m2 = pooled
    return m2 / (n - 1.0) if n > 1 else np.full(m2.shape, np.nan)


def smd(difference: np.ndarray, var_exposed: np.ndarray, var_control: np.ndarray) -> np.ndarray:
    """The standardised mean difference per column (NaN where both groups are constant)."""
    denominator = np.sqrt((var_exposed + var_control) / 2.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = difference / denominator
    out[~(denominator > 0)] = np.nan
    return out


def balance_rows(
    names: list[str], keep: list[int], before: dict, difference_after: np.ndarray, after_means: dict | None = None
) -> list[dict]:
    """One row per kept column: group means, their difference and the SMD before; the
    difference and the SMD after (and, after weighting, the weighted group means).

    `before`: {"exposed": (n, mean, M2), "control": ...} of the cohort; `difference_after`:
    mean exposed minus mean control after matching (the mean of the pair differences) or
    weighting; `after_means`: {"exposed": mean, "control": mean} after weighting."""
    var1, var0 = variances(before["exposed"]), variances(before["control"])
    difference_before = before["exposed"][1] - before["control"][1]
    smd_before = smd(difference_before, var1, var0)
    smd_after = smd(difference_after, var1, var0)
    rows = []
    for j in keep:
        row = {
            "term": names[j],
            "mean_exposed_before": float(before["exposed"][1][j]),
            "mean_control_before": float(before["control"][1][j]),
            "difference_before": float(difference_before[j]),
            "smd_before": _number(smd_before[j]),
            "difference_after": float(difference_after[j]),
            "smd_after": _number(smd_after[j]),
        }
        if after_means is not None:
            row["mean_exposed_after"] = float(after_means["exposed"][j])
            row["mean_control_after"] = float(after_means["control"][j])
        rows.append(row)
    return rows


def balance_summary(rows: list[dict], definition: str) -> dict:
    """Largest |SMD| before and after (the propensity score's own row left out) and whether
    every covariate is below the threshold after."""
    covariates = [r for r in rows if r["term"] != "ps_logit"]

    def largest(key):
        values = [abs(r[key]) for r in covariates if r[key] is not None]
        return max(values) if values else None

    after = largest("smd_after")
    return {
        "threshold": BALANCE_THRESHOLD,
        "max_abs_smd_before": largest("smd_before"),
        "max_abs_smd_after": after,
        "balanced": after is not None and after < BALANCE_THRESHOLD,
        "imbalanced_terms": [
            r["term"] for r in covariates if r["smd_after"] is not None and abs(r["smd_after"]) >= BALANCE_THRESHOLD
        ],
        "definition": definition,
    }


def _number(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None

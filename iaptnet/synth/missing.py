"""Which values the extract leaves unrecorded (docs/reference/synthetic.md#missingness).

Applied after the outcomes were generated from the true values, and missing completely at
random: each mask is independent of every value in the data, so complete-case analysis stays
unbiased. Covariates recorded together at first contact tend to be missing together: their
masks share a latent Gaussian factor (correlation MISSING_COPULA_RHO), which changes how many
complete cases there are but not the per-column rates or the MCAR property.
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtri

from . import params as P


def covariate_missing() -> dict[str, float]:
    """Column group -> share missing, for the masks that share the latent factor."""
    return {
        "gender": P.GENDER_MISSING,
        "ethnicity": P.ETHNIC_MISSING,
        "employment": P.EMPLOYMENT_MISSING,
        "imd": P.IMD_MISSING,
        "ltc": P.LTC_MISSING,
        "disability": P.DISABILITY_MISSING,
        "psychotropic": P.PSYCHOTROPIC_MISSING,
        "wsas": P.WSAS_MISSING,
        "referral_source": P.REFERRAL_SOURCE_MISSING,
        "sexual_orientation": P.SEXUAL_ORIENTATION_MISSING,
    }


def draw_masks(
    rng: np.random.Generator, n: int, finished: np.ndarray, rho: float | None = None
) -> dict[str, np.ndarray]:
    """Boolean masks (True = not recorded). `finished` only selects who can lose the last
    scores (2% of finishers), which is fixed by design before any outcome is seen."""
    rho = P.MISSING_COPULA_RHO if rho is None else rho
    shared = rng.standard_normal(n)
    masks: dict[str, np.ndarray] = {}
    for name, share in covariate_missing().items():
        z = np.sqrt(rho) * shared + np.sqrt(1.0 - rho) * rng.standard_normal(n)
        masks[name] = z < ndtri(share)
    masks["last_scores"] = finished & (rng.random(n) < P.SCORES_MISSING_FINISHERS)
    return masks

"""The node half of CR2 (cov_type = "CR2"): the bias-reduced cluster sandwich and the sums its
Satterthwaite degrees of freedom need, from this node's clusters, as p-dimensional sums.

clubSandwich's CR2 for a glm (vcovCR.glm with its default working model) adjusts each
cluster's estimating function by A_j = Theta_j^1/2 G_j^-1/2 Theta_j^1/2, where Theta_j is the
diagonal of the variance function over the prior weights (v / w) and

    G_j = Theta_j (I - H_jj) Theta_j,   H_jj = Y_j M Y_j',   Y_j = W_j^1/2 X_j,

M = (X'WX)^-1 the pooled inverse information (W the IRLS weights w d^2 / v). H_jj has rank at
most p, but Theta_j does not commute with it (unless the variance is constant within the
cluster: a Gaussian model without prior weights), so G_j^-1/2 is not a rank-p correction of
a diagonal matrix. It is applied to the p columns of Y_j without forming any n_j x n_j matrix:

    G^-1/2 = (2/pi) int_0^inf (G + t^2)^-1 dt  ~  sum_q alpha_q (G + sigma_q)^-1,

a quadrature with real positive shifts (t = sqrt(lo) sc(u | 1 - lo/hi), the midpoint rule in u,
converging like exp(-2 pi^2 N / log(16 hi / lo)) for a spectrum within [lo, hi]; Hale, Higham
and Trefethen's elliptic substitution), its accuracy checked on the scalar function over
[lo, hi] before it is used (which bounds the matrix error: G is symmetric). Each resolvent is
a diagonal minus a rank-p term (Woodbury):

    (G + s)^-1 Y = D^-1 [Y + (theta o Y) Mh K^-1 Mh G1],   D = Theta^2 + s,
    K = I - Mh (Y' Theta^2 D^-1 Y) Mh,   G1 = Y' Theta D^-1 Y,   Mh = M^1/2,

so one shift costs two weighted Gram matrices and one n_j x p product.

With Z_j = G_j^-1/2 Y_j the node's per-cluster pieces are the adjusted score c_j = Z_j'
(theta^1/2 o r_j) (r = y - mu), F_j = Z_j' Theta^2 Z_j and K_j = Z_j' Theta Y_j; what it
releases are sums over its clusters (docs/methods/glm.md#cr2 derives them):

- the meat, sum_j c_j c_j' (p x p);
- per coefficient i, with m_i = M e_i, a_ji = m_i' F_j m_i, u_ji = K_j' m_i and
  b_ji = u_ji' M u_ji: sum_j (a_ji - b_ji) and sum_j (a_ji^2 - 2 a_ji b_ji) (2 p numbers);
- per coefficient i, S_i = sum_j u_ji u_ji' (p x p, for the pairs of clusters).

M comes from the coordinator (the pooled inverse information of the converged fit). The node
checks that it could be one: symmetric positive definite, and no larger than the inverse of
this node's own information (M^1/2 I_k M^1/2 <= 1 + 1e-6), since the pooled information
includes the node's own.
"""

from __future__ import annotations

import math

import numpy as np

from ..protocol.errors import DataError
from .disclosure import Refusal, Violation

#: The quadrature's target: the largest relative error of its scalar function over [lo, hi].
QUADRATURE_TOL = 1e-13
MAX_SHIFTS = 96
#: The pooled information includes this node's own: M^1/2 I_k M^1/2 may exceed 1 by rounding
#: (the coordinator's M is from the information of the iterate before the last step) only.
CONSISTENCY_TOL = 1e-6
#: A cluster whose share of the information in some direction is above 1 - ALONE determines
#: that direction (nearly) alone: at 1, (I - H_jj)^-1/2 does not exist, and short of it the
#: Satterthwaite degrees of freedom of the terms involved are a difference of two numbers of
#: size 1 / (1 - share) (float64 keeps them to about 1e-16 / (1 - share)^2 relative: 1e-10 at
#: this limit; they are then about 1, the term known from that cluster alone).
ALONE = 1e-3


def shifts(lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    """(sigma, alpha) with x^-1/2 ~ sum alpha / (x + sigma) to QUADRATURE_TOL relative on
    [lo, hi] (0 < lo <= hi), checked on a grid of the interval; DataError if it cannot be."""
    from scipy import special

    if not (0.0 < lo <= hi and math.isfinite(hi)):
        raise DataError("the CR2 adjustment cannot be computed for this model (a cluster's spectrum is degenerate).")
    if lo / hi < 1e-15:
        raise _ill_conditioned()
    grid = np.concatenate([np.geomspace(lo, hi, 2001), [lo, hi]])
    par = 1.0 - lo / hi  # the parameter of the elliptic functions: 1 - k'^2
    comp = 1.0 - par  # k'^2 as the parameter rounds, so that K and sn, cn, dn agree
    big_k = float(special.ellipkm1(comp))
    n = 4
    while n <= MAX_SHIFTS:
        u = (np.arange(1, n + 1) - 0.5) * big_k / n
        # Beyond K/2 from K - u (cn is small near K): sn(u) = cd(K - u), cn(u) = k' sd(K - u),
        # dn(u) = k' nd(K - u), which keeps the shifts accurate when hi / lo is large.
        far = u > big_k / 2
        sn, cn, dn, _ = special.ellipj(np.where(far, big_k - u, u), par)
        scale = (2.0 / np.pi) * (big_k / n) * math.sqrt(lo)
        with np.errstate(divide="ignore", invalid="ignore"):
            sigma = np.where(far, lo * cn**2 / (comp * sn**2), lo * (sn / cn) ** 2)
            alpha = np.where(far, scale * dn / (math.sqrt(comp) * sn**2), scale * dn / cn**2)
        approx = np.sum(alpha[None, :] / (grid[:, None] + sigma[None, :]), axis=1)
        if float(np.max(np.abs(approx * np.sqrt(grid) - 1.0))) <= QUADRATURE_TOL:
            return sigma, alpha
        n += 4
    raise _ill_conditioned()


def _ill_conditioned() -> Refusal:
    return Refusal(
        Violation(
            "cr2_cluster_alone",
            "the CR2 adjustment of a cluster at this node is too ill-conditioned to compute exactly "
            "(some fitted means are extremely close to their bounds, or a cluster nearly alone "
            "determines a combination of the terms)",
            fix='cluster more coarsely, drop terms that nearly only one cluster has, or use cov_type = "cluster"',
        )
    )


def sqrt_psd(M: np.ndarray) -> tuple[np.ndarray, float]:
    """(M^1/2, smallest eigenvalue) of a symmetric matrix."""
    values, vectors = np.linalg.eigh(M)
    return (vectors * np.sqrt(np.maximum(values, 0.0))) @ vectors.T, float(values[0])


def check_bread(M: np.ndarray, information: np.ndarray, label: str) -> np.ndarray:
    """M^1/2 once M is known to be a possible pooled inverse information for this node."""
    if not np.all(np.isfinite(M)):
        raise DataError("the covariance sent for the CR2 adjustment is not finite.")
    scale = float(np.max(np.abs(np.diag(M)))) if M.size else 0.0
    Mh, smallest = sqrt_psd(M)
    if not scale > 0.0 or not smallest > 1e-14 * scale:
        raise DataError("the covariance sent for the CR2 adjustment is not positive definite.")
    share = float(np.linalg.eigvalsh(Mh @ information @ Mh)[-1]) if information.size else 0.0
    if not share <= 1.0 + CONSISTENCY_TOL:
        raise Refusal(
            Violation(
                "cr2_covariance",
                "the covariance sent for the CR2 adjustment is larger than the inverse of this node's own "
                "information, so it is not a pooled fit's: it would weigh this node's rows more than they weigh",
                model=label,
            )
        )
    return Mh


def cluster_pieces(theta: np.ndarray, Y: np.ndarray, resid: np.ndarray, Mh: np.ndarray, label: str):
    """(c_j, F_j, K_j) for one cluster: theta = v / w, Y = W^1/2 X and the response residuals
    of its rows, Mh = M^1/2."""
    p = Y.shape[1]
    B = Y @ Mh
    share = float(np.linalg.eigvalsh(B.T @ B)[-1]) if p else 0.0
    if not share <= 1.0 - ALONE:
        raise Refusal(
            Violation(
                "cr2_cluster_alone",
                "a cluster at this node alone (or all but alone: more than 99.9% of the information) "
                "determines a combination of the model's terms (for example a level or a cluster-level "
                "term that only it has), so its CR2 adjustment is undefined",
                model=label,
                fix='drop the terms only one cluster has, cluster more coarsely, or use cov_type = "cluster"',
            )
        )
    t2 = theta * theta
    sigma, alpha = shifts(float(t2.min()) * (1.0 - share), float(t2.max()))
    TY = theta[:, None] * Y
    Z = np.zeros_like(Y)
    eye = np.eye(p)
    for s, a in zip(sigma, alpha):
        inv = 1.0 / (t2 + s)
        G1 = Y.T @ (TY * inv[:, None])  # Y' Theta D^-1 Y
        R2 = TY * np.sqrt(inv)[:, None]
        G2 = R2.T @ R2  # Y' Theta^2 D^-1 Y
        K = eye - Mh @ G2 @ Mh
        Q = Mh @ np.linalg.solve(K, Mh @ G1)
        Z += (a * inv)[:, None] * (Y + TY @ Q)
    c = Z.T @ (np.sqrt(theta) * resid)
    TZ = theta[:, None] * Z
    return c, TZ.T @ TZ, Z.T @ TY


def node_sums(pieces: list, M: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """This node's release from its clusters' (c_j, F_j, K_j): the meat sum_j c_j c_j' (p x p),
    (sum_j (a_ji - b_ji), sum_j (a_ji^2 - 2 a_ji b_ji)) over coefficients i (2 p), and
    S_i = sum_j u_ji u_ji' (p x p x p, i first)."""
    p = M.shape[0]
    meat = np.zeros((p, p))
    trace = np.zeros(p)
    square = np.zeros(p)
    cross = np.zeros((p, p, p))
    for c, F, K in pieces:
        meat += np.outer(c, c)
        a = np.einsum("ki,kl,li->i", M, F, M)  # m_i' F m_i
        U = K.T @ M  # column i: u_i = K' m_i
        b = np.einsum("ki,kl,li->i", U, M, U)  # u_i' M u_i
        trace += a - b
        square += a * a - 2.0 * a * b
        cross += np.einsum("ai,bi->iab", U, U)
    return meat, np.concatenate([trace, square]), cross


# --------------------------------------------------------------------------- a model's clusters


def _kept(design) -> np.ndarray:
    """The rows a model's statistics rest on: those with a positive prior weight."""
    return design.weights > 0 if design.weights is not None else np.ones(design.n, dtype=bool)


def cluster_count(design) -> int:
    """Clusters with rows of positive prior weight (those the CR2 sums cover)."""
    if design.clusters is None or design.n == 0:
        return 0
    return int(np.unique(design.clusters[_kept(design)]).size)


def cluster_digests(design, spec) -> list[str]:
    """A digest of each cluster's value (salted with the study's hash, so that digests do not
    link across studies), for the coordinator to refuse a cluster whose rows lie at two
    nodes. Sent only with the model's release, after its clusters pass the size rules; it
    hides nothing from a coordinator that can list the candidate values (docs/governance/
    privacy/glm.md)."""
    import hashlib

    if design.clusters is None or design.n == 0 or design.cluster_labels is None:
        return []
    out = []
    for code in np.unique(design.clusters[_kept(design)]):
        value = design.cluster_labels[int(code)]
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            value = int(value)
        text = f"{spec.hash}:{spec.cluster}:{value}"
        out.append(hashlib.sha256(text.encode()).hexdigest()[:24])
    return sorted(out)


def node_release(design, family, beta: np.ndarray, active: np.ndarray, bread: np.ndarray, label: str):
    """This node's CR2 sums (meat, traces, pair matrices; node_sums) at coefficients `beta`,
    with the coordinator's pooled inverse information `bread` over the `active` columns.

    Refused (before anything is computed on a cluster) when `bread` could not be a pooled
    fit's (check_bread), when a row's leverage under it is above max_leverage (the adjustment
    would amplify that row's residual as the leverage rule guards a model's sums), or when a
    cluster alone determines a combination of the terms (cluster_pieces)."""
    from .disclosure import task_rules

    X = design.X
    p_all = X.shape[1]
    if active.shape != (p_all,) or bread.shape != (int(active.sum()),) * 2:
        raise DataError("the round's CR2 request does not match the model's columns.")
    if family.name not in ("binomial", "poisson", "gaussian"):
        raise DataError("CR2 sums are computed for binomial, poisson and gaussian models.")
    keep = _kept(design)
    Xk = X[keep]
    if design.n and np.any(Xk[:, ~active] != 0):
        raise DataError("the round's CR2 request leaves out a column this node has rows of.")
    k = int(active.sum())
    if not np.any(keep):
        return np.zeros((k, k)), np.zeros(2 * k), np.zeros((k, k, k))
    eta = Xk @ beta + design.offset[keep]
    with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
        mu = family.mean(eta)
        variance = np.asarray(family.variance(mu), dtype=float) * np.ones_like(mu)
        w = design.weights[keep] if design.weights is not None else np.ones_like(mu)
        # Canonical links (the three families): d mu / d eta is the variance function, so the
        # IRLS weight w d^2 / v is w v, and the working model's variance theta = v / w.
        theta = variance / w
        Y = np.sqrt(w * variance)[:, None] * Xk[:, active]
        resid = design.y[keep] - mu
    if not (np.all(np.isfinite(theta)) and np.all(np.isfinite(Y)) and np.all(np.isfinite(resid))):
        raise DataError("the CR2 sums are not finite at the coefficients sent.")
    Mh = check_bread(bread, Y.T @ Y, label)
    rules = task_rules()
    leverage = float(np.max(np.einsum("ij,ij->i", Y @ Mh, Y @ Mh)))
    if rules.max_leverage < 1.0 and not leverage <= rules.max_leverage:
        raise Refusal(
            Violation(
                "max_leverage",
                "at the covariance sent, one row's leverage in the pooled fit is above the limit "
                "(its CR2 adjustment would set that person apart)",
                rules.max_leverage,
                model=label,
                fix="drop terms that nearly duplicate each other, or merge rare combinations of levels",
            )
        )
    codes = design.clusters[keep]
    order = np.argsort(codes, kind="stable")
    bounds = np.flatnonzero(np.r_[True, codes[order][1:] != codes[order][:-1], True])
    pieces = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        rows = order[start:stop]
        pieces.append(cluster_pieces(theta[rows], Y[rows], resid[rows], Mh, label))
    return node_sums(pieces, bread)

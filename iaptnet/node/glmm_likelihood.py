"""The numbers behind a random-intercept GLM round at a node (node/glmm.py declares them).

Binomial and poisson (canonical links). Group g's rows have linear predictors
eta_j = a_j + sigma u with a_j = x_j'beta + offset_j and u ~ N(0, 1), so its marginal likelihood
is L_g = int prod_j f(y_j | eta_j) phi(u) du. With h(u) = sum_j log f(y_j | a_j + sigma u) - u^2/2,
its mode u* (a 1-D Newton per group) and c = -h''(u*) = 1 + sigma^2 sum_j W_j(u*), adaptive
Gauss-Hermite quadrature with K points z_k and weights w_k (for the standard normal) is

    log L_g = -1/2 log c + log sum_k w_k exp(h(u* + z_k / sqrt(c)) + z_k^2 / 2)    (+ const)

and K = 1 (z = 0, w = 1) is the Laplace approximation h(u*) - 1/2 log c, lme4's nAGQ = 1. The
node returns the sums over its groups of log L_g and of its exact gradient and Hessian in
(beta, sigma). They are computed by forward-mode differentiation to second order ("jets":
value, gradient, Hessian per group): the mode's dependence on the parameters comes from two
Newton steps taken in jet arithmetic from the converged mode (the Newton map's derivative in u
vanishes at its fixed point, so after one step the gradient of u* is exact and after two its
Hessian is). Each row enters through sums over its group of f(eta_j) and f(eta_j) x_j, and
through one weighted X'X over all rows (see `Jet`).

Gaussian: closed forms. With theta = sigma_b / sigma, V_g = I + theta^2 1 1' and
w_g = theta^2 / (1 + n_g theta^2), Z_g' V_g^-1 Z_g = Z_g'Z_g - w_g s_g s_g' (s_g = Z_g'1), and
log det V_g = log(1 + n_g theta^2); their first two derivatives in theta follow from w_g's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse
from scipy import special

#: The Newton iteration for a group's mode stops when every step is below this (relative).
MODE_TOL = 1e-13
MODE_MAX_ITER = 200


def gauss_hermite(k: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of the k-point Gauss-Hermite rule for the standard normal density
    (sum w = 1); k = 1 is the Laplace approximation's single point at the mode."""
    if k == 1:
        return np.zeros(1), np.ones(1)
    nodes, weights = np.polynomial.hermite_e.hermegauss(k)
    return nodes, weights / math.sqrt(2.0 * math.pi)


@dataclass
class Groups:
    """A design's rows by group: the indicator matrix (groups x rows) and group sizes."""

    codes: np.ndarray
    n_groups: int
    indicator: scipy.sparse.csr_matrix = field(init=False)
    sizes: np.ndarray = field(init=False)

    def __post_init__(self):
        n = self.codes.size
        self.indicator = scipy.sparse.csr_matrix((np.ones(n), (self.codes, np.arange(n))), shape=(self.n_groups, n))
        self.sizes = np.bincount(self.codes, minlength=self.n_groups).astype(float)

    def sum(self, values: np.ndarray) -> np.ndarray:
        """Per group sums of a row vector (n,) or of a row matrix's rows (n, k)."""
        return np.asarray(self.indicator @ values)


# ----------------------------------------------------------------------------- families


def row_derivatives(family: str, y: np.ndarray, eta: np.ndarray, orders: int) -> list[np.ndarray]:
    """[l, l', l'', ...] up to the `orders`-th derivative in eta of each row's log-likelihood
    (canonical link; poisson with its log y! so that the sum is the log-likelihood)."""
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        if family == "binomial":
            mu = special.expit(eta)
            w = mu * (1.0 - mu)
            out = [y * eta - np.logaddexp(0.0, eta), y - mu, -w]
            if orders >= 3:
                out.append(-w * (1.0 - 2.0 * mu))
            if orders >= 4:
                out.append(-w * (1.0 - 6.0 * w))
        elif family == "poisson":
            mu = np.exp(eta)
            out = [y * eta - mu - special.gammaln(y + 1.0), y - mu, -mu]
            out += [-mu] * max(0, orders - 2)
        else:
            raise ValueError(f"no random-intercept likelihood for family {family!r}")
    return out[: orders + 1]


def fitted(family: str, eta: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", under="ignore"):
        return special.expit(eta) if family == "binomial" else np.exp(eta)


# ----------------------------------------------------------------------------- modes


def modes(family: str, y: np.ndarray, a: np.ndarray, groups: Groups, sigma: float) -> np.ndarray:
    """Each group's mode u* of h(u) = sum_j l(a_j + sigma u) - u^2/2 (strictly concave):
    Newton's method with step halving, every group at once."""
    u = np.zeros(groups.n_groups)
    if sigma == 0.0:
        return u

    def objective(u):
        return groups.sum(row_derivatives(family, y, a + sigma * u[groups.codes], 0)[0]) - 0.5 * u * u

    h = objective(u)
    for _ in range(MODE_MAX_ITER):
        _, d1, d2 = row_derivatives(family, y, a + sigma * u[groups.codes], 2)
        grad = sigma * groups.sum(d1) - u
        curv = sigma * sigma * groups.sum(d2) - 1.0
        step = -grad / curv
        t = np.ones_like(u)
        for _ in range(60):
            trial = u + t * step
            h_trial = objective(trial)
            worse = ~(h_trial >= h - 1e-12 * (np.abs(h) + 1.0))
            if not worse.any():
                break
            t = np.where(worse, t / 2.0, t)
        u, h = trial, h_trial
        if np.all(np.abs(t * step) <= MODE_TOL * (1.0 + np.abs(u))):
            break
    return u


# ----------------------------------------------------------------------------- jets


class Jet:
    """Per-group values with their gradient (groups, m) and Hessian (groups, m, m) in the
    round's parameters.

    A group's Hessian also holds sums over its rows of f(eta_j) x_j x_j' (p x p each). Those
    are kept unevaluated, as `lazy` terms {key: (row weights f, per-group coefficient c)}: every
    operation on jets combines Hessians linearly with per-group coefficients, so the pooled
    Hessian needs them only as one sum over all rows, X' diag(sum_t c_t[group] f_t) X, formed
    once in `total` (instead of a p x p sum per group for every term)."""

    __slots__ = ("v", "g", "H", "lazy")

    def __init__(self, v, g, H, lazy=None):
        self.v, self.g, self.H = v, g, H
        self.lazy = lazy or {}

    @classmethod
    def constant(cls, v: np.ndarray, m: int) -> Jet:
        return cls(v, np.zeros((v.size, m)), np.zeros((v.size, m, m)))

    @staticmethod
    def _combine(*parts) -> dict:
        """The lazy terms of a linear combination: parts are (lazy, coefficient) pairs."""
        out: dict = {}
        for lazy, c in parts:
            for key, (w, coef) in lazy.items():
                out[key] = (w, out[key][1] + coef * c) if key in out else (w, coef * c)
        return out

    def __add__(self, other):
        if isinstance(other, Jet):
            lazy = self._combine((self.lazy, 1.0), (other.lazy, 1.0))
            return Jet(self.v + other.v, self.g + other.g, self.H + other.H, lazy)
        return Jet(self.v + other, self.g, self.H, self.lazy)

    def __sub__(self, other):
        if isinstance(other, Jet):
            lazy = self._combine((self.lazy, 1.0), (other.lazy, -1.0))
            return Jet(self.v - other.v, self.g - other.g, self.H - other.H, lazy)
        return Jet(self.v - other, self.g, self.H, self.lazy)

    def __mul__(self, other):
        if isinstance(other, Jet):
            cross = np.einsum("ci,cj->cij", self.g, other.g)
            return Jet(
                self.v * other.v,
                self.g * other.v[:, None] + other.g * self.v[:, None],
                self.H * other.v[:, None, None] + other.H * self.v[:, None, None] + cross + cross.transpose(0, 2, 1),
                self._combine((self.lazy, other.v), (other.lazy, self.v)),
            )
        return Jet(self.v * other, self.g * other, self.H * other, self._combine((self.lazy, other)))

    __rmul__ = __mul__

    def apply(self, f0, f1, f2) -> Jet:
        """f(self) from f, f' and f'' at self.v."""
        return Jet(
            f0,
            self.g * f1[:, None],
            self.H * f1[:, None, None] + np.einsum("ci,cj->cij", self.g, self.g) * f2[:, None, None],
            self._combine((self.lazy, f1)),
        )

    def reciprocal(self) -> Jet:
        r = 1.0 / self.v
        return self.apply(r, -r * r, 2.0 * r * r * r)

    def __truediv__(self, other):
        return self * other.reciprocal()

    def log(self) -> Jet:
        r = 1.0 / self.v
        return self.apply(np.log(self.v), r, -r * r)

    def exp(self) -> Jet:
        e = np.exp(self.v)
        return self.apply(e, e, e)

    def rsqrt(self) -> Jet:
        r = self.v**-0.5
        return self.apply(r, -0.5 * r / self.v, 0.75 * r / (self.v * self.v))

    def square(self) -> Jet:
        return self * self

    def total(self, design: GroupDesign) -> tuple[float, np.ndarray, np.ndarray]:
        """The sums over the groups: value, gradient and Hessian (the lazy terms as one
        weighted X'X over the design's rows)."""
        hessian = self.H.sum(axis=0)
        if self.lazy:
            codes = design.groups.codes
            weights = np.zeros(codes.size)
            for w, coef in self.lazy.values():
                weights += np.asarray(coef)[codes] * w if np.ndim(coef) else coef * w
            p = design.p
            hessian[:p, :p] += design.X.T @ (design.X * weights[:, None])
        return float(self.v.sum()), self.g.sum(axis=0), hessian


@dataclass
class GroupDesign:
    """What a round needs of a design: rows (X, y, offset) and their groups."""

    X: np.ndarray
    y: np.ndarray
    offset: np.ndarray
    groups: Groups

    @property
    def p(self) -> int:
        return self.X.shape[1]


def _pad(g: np.ndarray) -> np.ndarray:
    """Per-group vectors over beta extended with sigma's coordinate (0)."""
    return np.concatenate([g, np.zeros((g.shape[0], 1))], axis=1)


class MarginalLikelihood:
    """The log marginal likelihood of a design's groups at (beta, sigma), with its exact
    gradient and Hessian."""

    def __init__(self, design: GroupDesign, family: str, nagq: int):
        self.design, self.family, self.nagq = design, family, nagq
        self.nodes, self.weights = gauss_hermite(nagq)

    def evaluate(self, beta: np.ndarray, sigma: float):
        """(sum log L_g, gradient, Hessian, per-row weights at the mode and averaged over the
        quadrature points) at (beta, sigma)."""
        d = self.design
        groups = d.groups
        m = d.p + 1
        c = groups.n_groups
        a = d.X @ beta + d.offset
        u_star = modes(self.family, d.y, a, groups, sigma)
        e_sigma = np.zeros((c, m))
        e_sigma[:, -1] = 1.0
        sig = Jet(np.full(c, sigma), e_sigma, np.zeros((c, m, m)))

        def group_sum(derivs: list[np.ndarray], su: Jet) -> Jet:
            """Jet of sum_j f(eta_j) over each group from f, f', f'' per row, at
            eta_j = a_j + (sigma u)_g: eta_j's gradient is x_j + delta_g, its Hessian K_g."""
            f0, f1, f2 = derivs
            delta = su.g
            s0, s1, s2 = groups.sum(f0), groups.sum(f1), groups.sum(f2)
            x1 = _pad(groups.sum(f1[:, None] * d.X))
            x2 = _pad(groups.sum(f2[:, None] * d.X))
            cross = np.einsum("ci,cj->cij", x2, delta)
            H = (
                cross
                + cross.transpose(0, 2, 1)
                + s2[:, None, None] * np.einsum("ci,cj->cij", delta, delta)
                + s1[:, None, None] * su.H
            )
            lazy = Jet._combine(({id(f2): (f2, 1.0)}, 1.0), (su.lazy, s1))
            return Jet(s0, x1 + s1[:, None] * delta, H, lazy)

        def at(u: Jet):
            su = sig * u
            return a + su.v[groups.codes], su

        def newton(u: Jet) -> Jet:
            eta, su = at(u)
            derivs = row_derivatives(self.family, d.y, eta, 4)
            score = sig * group_sum(derivs[1:4], su) - u
            curvature = sig.square() * group_sum(derivs[2:5], su) - 1.0
            return u - score / curvature

        u = newton(newton(Jet.constant(u_star, m)))
        eta, su = at(u)
        derivs = row_derivatives(self.family, d.y, eta, 4)
        curvature = (sig.square() * group_sum(derivs[2:5], su)) * -1.0 + 1.0
        mode_mu = fitted(self.family, eta)
        if self.nagq == 1:
            total = group_sum(derivs[0:3], su) - u.square() * 0.5 - curvature.log() * 0.5
            averaged = mode_mu
        else:
            scale = curvature.rsqrt()
            terms = []
            etas = []
            for z, w in zip(self.nodes, self.weights):
                uk = u + scale * z
                eta_k, su_k = at(uk)
                etas.append(eta_k)
                hk = group_sum(row_derivatives(self.family, d.y, eta_k, 2), su_k) - uk.square() * 0.5
                terms.append(hk + (0.5 * z * z + math.log(w)))
            top = np.max(np.stack([t.v for t in terms]), axis=0)
            inner = None
            for t in terms:
                e = (t - top).exp()
                inner = e if inner is None else inner + e
            total = inner.log() + top + scale.log()
            # The quadrature points' shares of each group's integral, for the averaged means.
            shares = np.stack([np.exp(t.v - top) for t in terms]) / inner.v
            averaged = sum(shares[k][groups.codes] * fitted(self.family, etas[k]) for k in range(len(terms)))
        value, gradient, hessian = total.total(d)
        return value, gradient, hessian, _row_weights(self.family, mode_mu, -derivs[2], averaged, self.nagq)

    def row_weights(self, beta: np.ndarray, sigma: float) -> dict[str, np.ndarray]:
        """The per-row weights `evaluate` declares, without the derivatives (for the rounds
        answered before)."""
        d = self.design
        groups = d.groups
        a = d.X @ beta + d.offset
        u = modes(self.family, d.y, a, groups, sigma)
        eta = a + sigma * u[groups.codes]
        _, _, d2 = row_derivatives(self.family, d.y, eta, 2)
        mode_mu = fitted(self.family, eta)
        averaged = mode_mu
        if self.nagq > 1:
            scale = (1.0 - sigma * sigma * groups.sum(d2)) ** -0.5
            logs, etas = [], []
            for z, w in zip(self.nodes, self.weights):
                uk = u + scale * z
                eta_k = a + sigma * uk[groups.codes]
                etas.append(eta_k)
                h = groups.sum(row_derivatives(self.family, d.y, eta_k, 0)[0]) - 0.5 * uk * uk
                logs.append(h + 0.5 * z * z + math.log(w))
            logs = np.stack(logs)
            shares = np.exp(logs - logs.max(axis=0))
            shares /= shares.sum(axis=0)
            averaged = sum(shares[k][groups.codes] * fitted(self.family, etas[k]) for k in range(len(etas)))
        return _row_weights(self.family, mode_mu, -d2, averaged, self.nagq)


def _row_weights(family: str, mu: np.ndarray, information: np.ndarray, averaged: np.ndarray, nagq: int) -> dict:
    weights = {"fitted": mu, "information": information}
    if family == "binomial":
        weights["fitted complement"] = 1.0 - mu
    if nagq > 1:
        weights["fitted, averaged over the group's intercept"] = averaged
    return weights


# ----------------------------------------------------------------------------- gaussian


def gaussian_sums(design: GroupDesign, theta: float):
    """(Z'V^-1 Z and its first two derivatives in theta, as three (p+1, p+1) matrices;
    sum_g log(1 + n_g theta^2) with its first two derivatives), Z = [X, y - offset]."""
    Z = np.column_stack([design.X, design.y - design.offset])
    S = design.groups.sum(Z)
    n = design.groups.sizes
    t2 = theta * theta
    q = 1.0 + n * t2
    w0 = t2 / q
    w1 = 2.0 * theta / (q * q)
    w2 = (2.0 - 6.0 * n * t2) / (q * q * q)
    gram = Z.T @ Z
    cross = [gram - (S * w0[:, None]).T @ S, -(S * w1[:, None]).T @ S, -(S * w2[:, None]).T @ S]
    logdet = np.array(
        [np.sum(np.log1p(n * t2)), np.sum(2.0 * n * theta / q), np.sum(2.0 * n * (1.0 - n * t2) / (q * q))]
    )
    return cross, logdet

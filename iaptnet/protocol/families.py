"""GLM families with their canonical links, as small numpy objects.

Both halves need them: the node evaluates means, scores, working weights and deviances on its
rows; the coordinator computes log-likelihoods and AIC from pooled sums. Formulas follow
statsmodels so that every pooled quantity matches a statsmodels fit on the pooled rows.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.special

FAMILIES = ("binomial", "gaussian", "poisson")


class Family:
    name: str
    link_name: str
    ratio_name: str | None = None  # "odds ratio" / "rate ratio" where exp(beta) means one
    has_dispersion = False

    def mean(self, eta: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def working(self, y: np.ndarray, eta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return (mu, w, r): weights and score residuals so that score = X'r and
        Fisher information = X' diag(w) X. Canonical links: r = y - mu, w = Var(mu)."""
        raise NotImplementedError

    def deviance(
        self, y: np.ndarray, mu: np.ndarray, eta: np.ndarray | None = None, weights: np.ndarray | None = None
    ) -> float:
        """Sum of (prior-weighted) unit deviances."""
        raise NotImplementedError

    def pearson(self, y: np.ndarray, mu: np.ndarray, weights: np.ndarray | None = None) -> float:
        return float(np.sum(_w(weights) * (y - mu) ** 2 / self.variance(mu)))

    def variance(self, mu: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def loglike_sum(
        self, y: np.ndarray, mu: np.ndarray, eta: np.ndarray | None = None, weights: np.ndarray | None = None
    ) -> float:
        """Sum over rows of the log-likelihood terms (prior weights as statsmodels'
        var_weights). Gaussian returns 0.5 * sum(log w) instead: its llf needs only n, the
        residual sum of squares (the deviance) and that."""
        raise NotImplementedError

    def deviance_and_loglike(self, y, mu, eta=None, weights=None) -> tuple[float, float]:
        """Both sums of a round in one call (a family may share the work)."""
        return self.deviance(y, mu, eta, weights), self.loglike_sum(y, mu, eta, weights)

    def llf(self, loglike_sum: float, n: int, deviance: float) -> float:
        return loglike_sum

    def check_outcome(self, y: np.ndarray) -> str | None:
        """A plain-words problem with the outcome values, or None."""
        return None


class Binomial(Family):
    name = "binomial"
    link_name = "logit"
    ratio_name = "odds ratio"

    def mean(self, eta):
        return _expit(eta)

    def working(self, y, eta):
        mu = _expit(eta)
        w = mu * (1.0 - mu)
        return mu, w, y - mu

    def variance(self, mu):
        return mu * (1.0 - mu)

    def deviance(self, y, mu, eta=None, weights=None):
        # y is 0/1, so the saturated log-likelihood is 0; from eta when known, which stays
        # finite where mu rounds to exactly 0 or 1.
        if eta is None:
            eta = np.log(mu) - np.log1p(-mu)
        unit = np.logaddexp(0.0, np.where(y > 0, -eta, eta))
        return float(2.0 * np.sum(_w(weights) * unit))

    def loglike_sum(self, y, mu, eta=None, weights=None):
        return -0.5 * self.deviance(y, mu, eta, weights)

    def deviance_and_loglike(self, y, mu, eta=None, weights=None):
        deviance = self.deviance(y, mu, eta, weights)
        return deviance, -0.5 * deviance

    def check_outcome(self, y):
        if np.any((y != 0) & (y != 1)):
            return "a binomial outcome must be 0 or 1"
        return None


class Poisson(Family):
    name = "poisson"
    link_name = "log"
    ratio_name = "rate ratio"

    def mean(self, eta):
        return np.exp(eta)

    def working(self, y, eta):
        mu = np.exp(eta)
        return mu, mu, y - mu

    def variance(self, mu):
        return mu

    def deviance(self, y, mu, eta=None, weights=None):
        ylogy = np.where(y > 0, y * np.log(np.where(y > 0, y, 1.0) / mu), 0.0)
        return float(2.0 * np.sum(_w(weights) * (ylogy - (y - mu))))

    def loglike_sum(self, y, mu, eta=None, weights=None):
        if weights is None:
            return float(np.sum(y * np.log(mu) - mu) - _sum_log_factorial(y))
        return float(np.sum(weights * (y * np.log(mu) - mu)) - _sum_log_factorial(y, weights))

    def check_outcome(self, y):
        if np.any(y < 0):
            return "a poisson outcome must be a count (zero or more)"
        return None


class Gaussian(Family):
    name = "gaussian"
    link_name = "identity"
    has_dispersion = True

    def mean(self, eta):
        return eta

    def working(self, y, eta):
        return eta, np.ones_like(eta), y - eta

    def variance(self, mu):
        return np.ones_like(mu)

    def deviance(self, y, mu, eta=None, weights=None):
        return float(np.sum(_w(weights) * (y - mu) ** 2))

    def loglike_sum(self, y, mu, eta=None, weights=None):
        return 0.0 if weights is None else float(0.5 * np.sum(np.log(weights)))

    def llf(self, loglike_sum, n, deviance):
        # statsmodels: the Gaussian/identity llf is the concentrated one, at the ML scale
        # (weighted RSS) / n; prior weights add 0.5 * sum(log w).
        scale = deviance / n
        return -0.5 * n * (math.log(2 * math.pi * scale) + 1.0) + loglike_sum


_FAMILIES = {"binomial": Binomial(), "gaussian": Gaussian(), "poisson": Poisson()}


def get_family(name: str) -> Family:
    return _FAMILIES[name]


def _expit(eta: np.ndarray) -> np.ndarray:
    """The logistic function, stable at both tails (scipy's ufunc)."""
    return scipy.special.expit(np.asarray(eta, dtype=float))


def _sum_log_factorial(y: np.ndarray, weights: np.ndarray | None = None) -> float:
    """sum(w * lgamma(y + 1)) over few distinct counts, without scipy."""
    values, inverse = np.unique(y, return_inverse=True)
    table = np.array([math.lgamma(v + 1.0) for v in values.tolist()])
    return float(np.sum(_w(weights) * table[inverse]))


def _w(weights: np.ndarray | None):
    return 1.0 if weights is None else weights

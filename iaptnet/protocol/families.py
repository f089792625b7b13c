"""GLM families with their canonical links, as small numpy objects.

Both halves need them: the node evaluates means, scores, working weights and deviances on its
rows; the coordinator computes log-likelihoods and AIC from pooled sums. Formulas follow
statsmodels so that every pooled quantity matches a statsmodels fit on the pooled rows.
"""

from __future__ import annotations

import math

import numpy as np

FAMILIES = ("binomial", "gaussian", "poisson")
#: The families of a GLM study (`kind = "glm"`): the above and the negative binomial, whose
#: dispersion theta is estimated with the coefficients (the other kinds fit the above only).
GLM_FAMILIES = (*FAMILIES, "negative_binomial")

#: The range of theta a node evaluates a negative binomial model at (docs/governance/privacy/glm.md):
#: beyond 1e6, theta + y rounds a count's low bits away (at 2^58 every count below 32 adds
#: nothing), so sums at such theta would count the rows above a threshold; at either end the
#: model is a Poisson one or a degenerate one, never an answer.
THETA_MIN = 1e-6
THETA_MAX = 1e6


def _special():
    """scipy.special, imported on first use: the command line reads study files (which name
    a family) without paying for scipy's import."""
    import scipy.special

    return scipy.special


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


class NegativeBinomial(Family):
    """NB2 with log link at a given theta: Var(y) = mu + mu^2 / theta (alpha = 1 / theta), as
    R's MASS::negative.binomial(theta) and statsmodels' NegativeBinomial(alpha = 1 / theta).
    Given theta it is a GLM (the log link is not its canonical one: the information is the
    expected one, as glm.nb's IRLS and its standard errors use); `theta_sums` gives what the
    theta step needs (MASS::theta.ml's score and its derivative)."""

    name = "negative_binomial"
    link_name = "log"
    ratio_name = "rate ratio"

    def __init__(self, theta: float = 1.0):
        self.theta = float(theta)

    def at(self, theta: float) -> NegativeBinomial:
        return NegativeBinomial(theta)

    def mean(self, eta):
        return np.exp(eta)

    def working(self, y, eta):
        mu = np.exp(eta)
        share = self.theta / (self.theta + mu)  # theta / (theta + mu): the outcome's weight
        return mu, mu * share, (y - mu) * share

    def variance(self, mu):
        return mu + mu * mu / self.theta

    def deviance(self, y, mu, eta=None, weights=None):
        th = self.theta
        ylogy = np.where(y > 0, y * np.log(np.where(y > 0, y, 1.0) / mu), 0.0)
        unit = ylogy - (y + th) * np.log((y + th) / (mu + th))
        return float(2.0 * np.sum(_w(weights) * unit))

    def loglike_sum(self, y, mu, eta=None, weights=None):
        # MASS::glm.nb's loglik: lgamma(th + y) - lgamma(th) - lgamma(y + 1) + th log th
        # + y log mu - (th + y) log(th + mu).
        th = self.theta
        terms = (
            _special().gammaln(th + y)
            - math.lgamma(th)
            - _special().gammaln(y + 1.0)
            + th * math.log(th)
            + np.where(y > 0, y * np.log(mu), 0.0)
            - (th + y) * np.log(th + mu)
        )
        return float(np.sum(_w(weights) * terms))

    def theta_sums(self, y, mu, weights=None) -> tuple[float, float]:
        """(d loglik / d theta, d^2 loglik / d theta^2) summed over rows at fixed mu."""
        th = self.theta
        score = (
            _special().digamma(y + th)
            - _special().digamma(th)
            + math.log(th)
            + 1.0
            - np.log(th + mu)
            - (y + th) / (th + mu)
        )
        second = (
            _special().polygamma(1, y + th)
            - _special().polygamma(1, th)
            + 1.0 / th
            - 2.0 / (th + mu)
            + (y + th) / (th + mu) ** 2
        )
        w = _w(weights)
        return float(np.sum(w * score)), float(np.sum(w * second))

    def check_outcome(self, y):
        if np.any(y < 0):
            return "a negative binomial outcome must be a count (zero or more)"
        return None


_FAMILIES = {"binomial": Binomial(), "gaussian": Gaussian(), "poisson": Poisson()}


def get_family(name: str) -> Family:
    """The family by name; a negative binomial one is a new object at theta = 1 (each model
    keeps its own theta: `family.at(theta)`)."""
    if name == "negative_binomial":
        return NegativeBinomial()
    return _FAMILIES[name]


def _expit(eta: np.ndarray) -> np.ndarray:
    """The logistic function, stable at both tails (scipy's ufunc)."""
    return _special().expit(np.asarray(eta, dtype=float))


def _sum_log_factorial(y: np.ndarray, weights: np.ndarray | None = None) -> float:
    """sum(w * lgamma(y + 1)) over few distinct counts, without scipy."""
    values, inverse = np.unique(y, return_inverse=True)
    table = np.array([math.lgamma(v + 1.0) for v in values.tolist()])
    return float(np.sum(_w(weights) * table[inverse]))


def _w(weights: np.ndarray | None):
    return 1.0 if weights is None else weights

"""Poisson log-linear rate models fitted from one-way margins and known exposures.

The model of an access study is a Poisson GLM on the cell table (area x groups): referrals
y_c with mean mu_c = person-years_c x exp(x_c'b), x_c treatment-coded main effects of the
grouping variables (and area). Its log-likelihood is b'X'y - sum_c mu_c + terms free of b, so
the maximum-likelihood estimate, the information X' diag(mu) X and every likelihood-ratio
statistic between such models depend on the referrals only through X'y: the total and the
referrals per level of each variable (per area: each node's own margins). The coordinator
holds the person-years, so it iterates Newton's method here, with no further round to the
nodes, and reaches exactly the estimate statsmodels finds on the pooled cell table.

The deviance, the log-likelihood and AIC themselves also depend on sum y log y and
sum y * offset over cells, i.e. on the full cross-classification, which nodes do not release;
they are not computed. The likelihood-ratio statistic against the intercept-only model is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from ..protocol.errors import ModelError

STEP_TOL = 1e-8  # converged when every Newton step is below this many standard errors
MAX_ITER = 60
MAX_HALVINGS = 30


@dataclass
class CellTable:
    """One row per (area, group): the exposure of each cell and the levels it has."""

    areas: list[str]  # the model's area levels (node names), in order
    by: tuple[str, ...]
    levels: dict[str, tuple[str, ...]]
    area_of: np.ndarray  # per cell: index into areas
    groups: list[tuple[str, ...]]  # per cell: the level of each grouping variable
    person_years: np.ndarray


@dataclass
class Design:
    names: list[str]
    X: np.ndarray
    sources: list[tuple]  # per column: ("Intercept",), (variable, level) or ("area", name)


@dataclass
class LoglinearFit:
    names: list[str]
    beta: np.ndarray
    cov: np.ndarray
    iterations: int
    objective: float  # sum(mu) - b'X'y at the estimate (minus the log-likelihood, up to constants)


def design(cells: CellTable, terms: list[str]) -> Design:
    """Intercept, then treatment-coded columns of each term in order (statsmodels' names)."""
    n = len(cells.groups)
    names, columns, sources = ["Intercept"], [np.ones(n)], [("Intercept",)]
    for term in terms:
        if term == "area":
            for k, area in enumerate(cells.areas[1:], start=1):
                names.append(f"area[T.{area}]")
                columns.append((cells.area_of == k).astype(float))
                sources.append(("area", area))
            continue
        j = cells.by.index(term)
        values = np.array([g[j] for g in cells.groups], dtype=object)
        for level in cells.levels[term][1:]:
            names.append(f"{term}[T.{level}]")
            columns.append((values == level).astype(float))
            sources.append((term, level))
    return Design(names, np.column_stack(columns), sources)


def sufficient_statistics(
    dsg: Design, margins: dict[str, dict[str, np.ndarray]], levels: dict[str, tuple[str, ...]], totals: dict[str, float]
) -> np.ndarray:
    """X'y from each area's total and margins (areas in the order their replies were summed)."""
    out = np.zeros(len(dsg.names))
    for k, source in enumerate(dsg.sources):
        if source[0] == "Intercept":
            out[k] = sum(totals.values())
        elif source[0] == "area":
            out[k] = totals[source[1]]
        else:
            var, level = source
            i = levels[var].index(level)
            out[k] = sum(m[var][i] for m in margins.values())
    return out


def fit(dsg: Design, person_years: np.ndarray, xty: np.ndarray, label: str) -> LoglinearFit:
    """Newton-Raphson (= IRLS) to a step below 1e-8 standard errors, halving when the
    objective rises; the estimate includes the last step and the covariance is the inverse
    information there. ModelError for a level without referrals (its rate ratio is 0)."""
    for name, value in zip(dsg.names[1:], xty[1:]):
        if value == 0:
            raise ModelError(
                f"model '{label}': no referrals in the cohort have '{name}', so its rate ratio is 0 and "
                "cannot be estimated on the log scale; merge that level with another (or, for an area, "
                "set area_effects = false)."
            )
    # A variable's reference level holds the referrals its other levels do not: none there
    # makes every other level's rate ratio infinite (the fit would run off to it).
    terms: dict[str, list[int]] = {}
    for k, source in enumerate(dsg.sources):
        if source[0] != "Intercept":
            terms.setdefault(source[0], []).append(k)
    for var, ks in terms.items():
        if xty[0] - sum(xty[k] for k in ks) < 0.5:
            raise ModelError(
                f"model '{label}': no referrals in the cohort are in the first (reference) "
                f"{'area' if var == 'area' else f'level of {var!r}'}, so the other rate ratios are infinite; "
                "merge that level with another (or, for an area, set area_effects = false)."
            )
    X, offset = dsg.X, np.log(person_years)
    beta = np.zeros(X.shape[1])
    beta[0] = np.log(xty[0] / person_years.sum())
    objective = _objective(X, offset, xty, beta)
    halvings = 0
    for iteration in range(1, MAX_ITER + 1):
        mu = np.exp(X @ beta + offset)
        cov = _inverse(X.T @ (X * mu[:, None]), label)
        step = cov @ (xty - X.T @ mu)
        if np.all(np.abs(step) < STEP_TOL * np.sqrt(np.diag(cov))):
            beta = beta + step
            mu = np.exp(X @ beta + offset)
            cov = _inverse(X.T @ (X * mu[:, None]), label)
            return LoglinearFit(list(dsg.names), beta, cov, iteration, _objective(X, offset, xty, beta))
        new = beta + step
        new_objective = _objective(X, offset, xty, new)
        while new_objective > objective + 1e-12 * abs(objective):
            halvings += 1
            if halvings > MAX_HALVINGS:
                raise ModelError(
                    f"model '{label}': the fit did not converge (the likelihood kept falling after step-halving)."
                )
            step = step / 2.0
            new = beta + step
            new_objective = _objective(X, offset, xty, new)
        beta, objective = new, new_objective
    raise ModelError(f"model '{label}': the fit did not converge in {MAX_ITER} iterations.")


def null_objective(person_years: np.ndarray, total: float) -> float:
    """The objective of the intercept-only model at its estimate log(total / person-years)."""
    return total - total * float(np.log(total / person_years.sum()))


def _objective(X: np.ndarray, offset: np.ndarray, xty: np.ndarray, beta: np.ndarray) -> float:
    with np.errstate(over="ignore"):
        return float(np.exp(X @ beta + offset).sum() - beta @ xty)


def _inverse(info: np.ndarray, label: str) -> np.ndarray:
    try:
        return scipy.linalg.cho_solve(scipy.linalg.cho_factor(info), np.eye(info.shape[0]))
    except (np.linalg.LinAlgError, ValueError):
        raise ModelError(
            f"model '{label}': the information matrix is singular; the grouping variables may be "
            "collinear (one determines another) in the population table."
        ) from None

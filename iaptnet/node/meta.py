"""The node half of a meta study (`kind = "meta"`): this node's own fit of the model.

`meta.local_fit` fits the study's model (with service fixed effects, protocol/kinds/meta.py)
on this node's rows alone, to convergence, and releases for the exposure column only its
estimate and standard error (model-based or HC0 sandwich, as the study says): what a
fixed-effect or random-effects meta-analysis of the nodes needs, and nothing more.

Columns this node cannot estimate are dropped first, in formula order as R's glm does: levels
with no rows here (all-zero columns) and columns that are linear combinations of earlier ones,
such as the service term at a node that holds one service (constant, so aliased with the
intercept). The exposure's estimate is the same whichever aliased column is dropped, unless
the exposure itself is aliased: then it is not estimable here, which is released as such.

Disclosure: a model statistic over the model's rows, judged by the Trust's model rules
(minimum rows and events, parameters per row, rows per level, leverage, subset rule) like the
GLM's prepare step, which already releases this node's local information matrix and I*b for
the same design; the exposure's local estimate and variance follow from those, so this task
adds no new kind of disclosure. A Trust that does not want its own estimate shown leaves
`meta.local_fit` out of its policy's `tasks`: the study then reports the node as refusing and
pools the others.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from ..protocol.errors import DataError
from ..protocol.families import get_family
from ..protocol.kinds import meta as protocol
from . import glm
from .design import DesignedModel, build_design, study_frame
from .disclosure import Release, require_rows, task_rules
from .registry import handler

MAX_ITER = 100
STEP_TOL = 1e-10  # converged when every Newton step is below this many standard errors
RUNAWAY = 30.0  # a non-intercept coefficient this large means (quasi-)separation here


@handler(protocol.TASK, studies="payload")
def meta_local_fit(runtime, task) -> Release:
    dataset = runtime.dataset
    key, spec = glm.single_study(task.payload, dataset.schema, "meta")
    dataset = dataset.for_study(spec)  # the service column with the network's levels
    local = protocol.check_at_node(spec, dataset.schema)
    design = build_design(
        study_frame(dataset.frame, local, runtime.augments),
        dataset.schema,
        local,
        gate=lambda rows: require_rows(rows, local.name, task_rules()),
    )
    family = get_family(local.family)
    problem = family.check_outcome(design.y) if design.n else None
    if problem:
        raise DataError(f"model '{spec.name}': {problem}.")
    release = Release()
    section = release.model(key, glm.model_facts(local.name, design, local.family))
    section.value("has_rows", design.n > 0)
    fit = fit_exposure(design, family, spec.exposure, spec.cov_type) if design.n else None
    section.value("estimable", fit is not None)
    if fit is not None:
        # Its estimate rests on the fit's row weights, at coefficients this node chose: judged
        # as a round's (an offset's exponential can put them on a few rows).
        section.rests_on(glm.row_weights(fit["design"], family, fit["beta"], robust=spec.cov_type == "HC0"))
        section.value("estimate", fit["estimate"])
        section.value("std_error", fit["std_error"])
        section.value("dropped", fit["dropped"])
    release.public("data_version", dataset.data_version)
    return release


def estimable_columns(X: np.ndarray, tol: float = 1e-9) -> np.ndarray:
    """Columns kept in formula order: non-zero here and not a linear combination of the
    columns kept before them (a greedy pivoted Cholesky of the column-scaled X'X)."""
    p = X.shape[1]
    norms = np.sqrt(np.einsum("ij,ij->j", X, X))
    keep = np.zeros(p, dtype=bool)
    nonzero = norms > 0
    if not nonzero.any():
        return keep
    Z = X[:, nonzero] / norms[nonzero]
    gram = Z.T @ Z
    chosen: list[int] = []
    for j in range(gram.shape[0]):
        if chosen:
            sub = gram[np.ix_(chosen, chosen)]
            coef = _solve_pos(sub, gram[chosen, j])
            residual = gram[j, j] - gram[j, chosen] @ coef
        else:
            residual = gram[j, j]
        if residual > tol:
            chosen.append(j)
    keep[np.flatnonzero(nonzero)[chosen]] = True
    return keep


def fit_exposure(design: DesignedModel, family, exposure: str, cov_type: str) -> dict | None:
    """This node's maximum-likelihood fit; the exposure's estimate and standard error, or None
    when the exposure cannot be estimated from these rows alone."""
    if exposure not in design.names:
        raise DataError(f"the exposure '{exposure}' is not a column of the model's design.")
    keep = estimable_columns(design.X)
    j = design.names.index(exposure)
    if not keep[j] or design.n <= int(keep.sum()):
        return None
    names = [n for n, k in zip(design.names, keep) if k]
    sub = DesignedModel(
        names,
        np.ascontiguousarray(design.X[:, keep]),
        design.y,
        design.offset,
        design.n_cohort,
        design.n_missing,
        design.mask,
        [],
        design.weights,
        design.clusters,
    )
    beta = _newton(sub, family)
    if beta is None:
        return None
    _, info, stats = glm.evaluate(sub, family, beta)
    cov = _inverse(info)
    if cov is None:
        return None
    if cov_type == "HC0":
        cov = cov @ glm.meat(sub, family, beta, "HC0") @ cov
    elif family.has_dispersion:
        cov = cov * stats[1] / (sub.n - len(names))
    i = names.index(exposure)
    se = float(np.sqrt(cov[i, i]))
    if not np.isfinite(se) or se <= 0:
        return None
    return {
        "estimate": float(beta[i]),
        "std_error": se,
        "dropped": [n for n, k in zip(design.names, keep) if not k],
        "design": sub,
        "beta": beta,
    }


def _newton(design: DesignedModel, family) -> np.ndarray | None:
    """Newton-Raphson (IRLS) from statsmodels' start, with step-halving, to convergence."""
    X, y = design.X, design.y
    pw = design.weights if design.weights is not None else 1.0
    mu = glm._starting_mu(family.name, y)
    z = glm.family_link(family.name, mu) - design.offset + (y - mu) / family.variance(mu)
    w = family.variance(mu) * pw
    try:
        beta = _solve_pos(X.T @ (X * w[:, None]), X.T @ (w * z))
    except (np.linalg.LinAlgError, ValueError):
        return None
    intercept = np.array([n == "Intercept" for n in design.names])
    previous = None
    for _ in range(MAX_ITER):
        score, info, stats = glm.evaluate(design, family, beta)
        dev = stats[0]
        if previous is not None and not (dev <= previous[1] + 1e-10 * (abs(previous[1]) + 1.0)):
            beta = (beta + previous[0]) / 2.0  # the deviance rose: halve the step
            continue
        cov = _inverse(info)
        if cov is None:
            return None
        step = cov @ score
        se = np.sqrt(np.diag(cov))
        if not np.all(np.isfinite(step)) or not np.all(se > 0):
            return None
        previous = (beta, dev)
        beta = beta + step
        if np.any(np.abs(beta[~intercept]) > RUNAWAY):
            return None
        if np.all(np.abs(step) < STEP_TOL * se):
            return beta
    return None


def _solve_pos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a x = b for a positive definite a, by its Cholesky factor: as scipy.linalg.solve with
    assume_a="pos" (LinAlgError when a is not positive definite), without the LinAlgWarning
    it prints for an ill-conditioned a (the callers judge that themselves)."""
    return scipy.linalg.cho_solve(scipy.linalg.cho_factor(a), b)


def _inverse(info: np.ndarray) -> np.ndarray | None:
    """Inverse of a positive definite information matrix, via its unit-diagonal scaling
    (columns such as days and indicators differ in scale by many orders of magnitude)."""
    d = np.sqrt(np.diag(info))
    if not np.all(np.isfinite(d)) or np.any(d <= 0):
        return None
    try:
        chol = scipy.linalg.cho_factor(info / np.outer(d, d))
        scaled = scipy.linalg.cho_solve(chol, np.eye(len(d)))
    except (np.linalg.LinAlgError, ValueError):
        return None
    return scaled / np.outer(d, d)

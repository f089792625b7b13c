"""The node half of the exact federated GLM: what leaves the node for a regression.

- `glm.moments`: for centred/scaled terms, (n, mean, centred sum of squares) of the inner
  expression, so the coordinator can pool them exactly (Chan's formula).
- `glm.prepare`: filter, complete cases and design matrix, built once per study and kept; the
  reply has the model's shape (column names, rows used, rows dropped as missing, rows with a
  non-zero value per column) and a local fit for the warm start: the information matrix I_k at
  the local estimate b_k and the vector I_k b_k.
- `glm.round`: for each model's beta, the score X'r, the information X'WX (upper triangle)
  and the deviance, Pearson statistic and log-likelihood sum of the node's rows.

Each model has a companion null model (intercept only, same rows, same offset), fitted in the
same rounds, for the null deviance.
"""

from __future__ import annotations

import numpy as np

from ..protocol.errors import DataError
from ..protocol.families import get_family
from ..protocol.formula_check import check_formula
from ..protocol.messages import pack_upper
from ..protocol.study import StudySpec
from .design import DesignedModel, build_design, evaluate_expression, model_rows, stateful_arguments

LOCAL_MAX_ITER = 25
NULL_SUFFIX = ".null"


def studies_from_payload(payload: dict) -> dict[str, StudySpec]:
    models = payload.get("models")
    if not isinstance(models, dict) or not models:
        raise DataError("the task lists no models.")
    return {key: StudySpec.from_wire(spec) for key, spec in models.items()}


def moments(dataset, payload: dict) -> dict[str, np.ndarray]:
    """(n, mean, M2) of each centred/scaled expression over the model's complete cases."""
    out = {}
    for key, spec in studies_from_payload(payload).items():
        parsed = check_formula(spec.formula, dataset.schema, spec.family, spec.source)
        rows, _, _ = model_rows(dataset.frame, spec, parsed)
        for i, (expr, inner) in enumerate(stateful_arguments(parsed).items()):
            values = evaluate_expression(rows, inner) if len(rows) else np.zeros(0)
            n = float(len(values))
            mean = float(values.mean()) if n else 0.0
            m2 = float(np.sum((values - mean) ** 2)) if n else 0.0
            out[f"moments/{key}/{i}"] = np.array([n, mean, m2])
    return out


def prepare(dataset, payload: dict) -> tuple[dict[str, DesignedModel], dict, dict[str, np.ndarray]]:
    """Design every model of the task; return (designs, reply payload, reply arrays)."""
    specs = studies_from_payload(payload)
    states = payload.get("transform_state", {})
    designs: dict[str, DesignedModel] = {}
    shapes: dict[str, dict] = {}
    arrays: dict[str, np.ndarray] = {}
    for key, spec in specs.items():
        design = build_design(dataset.frame, dataset.schema, spec, states.get(key))
        family = get_family(spec.family)
        problem = family.check_outcome(design.y) if design.n else None
        if problem:
            raise DataError(f"model '{spec.name}': {problem}.")
        designs[key] = design
        designs[key + NULL_SUFFIX] = _null_design(design)
        shapes[key] = {
            "columns": design.names,
            "n_cohort": design.n_cohort,
            "n_used": design.n,
            "n_missing": design.n_missing,
            "events": float(design.y.sum()) if spec.family != "gaussian" else None,
            "nnz": np.count_nonzero(design.X, axis=0).tolist(),
        }
        if spec.family == "binomial":
            # Per 0/1 column: is it an indicator, and how many of its rows have the outcome.
            # Lets the coordinator name a perfectly predicting level before iterating.
            nonzero = design.X != 0
            shapes[key]["indicator"] = np.all((design.X == 0) | (design.X == 1), axis=0).tolist()
            shapes[key]["events_nnz"] = (design.y @ nonzero).tolist() if design.n else [0.0] * design.X.shape[1]
        for model_key in (key, key + NULL_SUFFIX):
            info, ibeta = local_fit(designs[model_key], family)
            arrays[f"local_info/{model_key}"] = pack_upper(info)
            arrays[f"local_ibeta/{model_key}"] = ibeta
    return designs, {"models": shapes}, arrays


def round_contributions(designs: dict[str, DesignedModel], families: dict[str, str],
                        betas: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Score, packed information and [deviance, pearson, loglike sum, boundary rows] per model."""
    out = {}
    for key, beta in betas.items():
        design = designs[key]
        if beta.shape != (design.X.shape[1],):
            raise DataError(f"model '{key}': expected {design.X.shape[1]} coefficients, received {beta.size}.")
        if not np.all(np.isfinite(beta)):
            raise DataError(f"model '{key}': the coefficients sent are not finite.")
        family = get_family(families[key])
        score, info, stats = evaluate(design, family, beta)
        out[f"score/{key}"] = score
        out[f"info/{key}"] = pack_upper(info)
        out[f"stats/{key}"] = stats
    return out


def evaluate(design: DesignedModel, family, beta: np.ndarray):
    X = design.X
    eta = X @ beta + design.offset
    mu, w, r = family.working(design.y, eta)
    score = X.T @ r
    info = X.T @ (X * w[:, None])
    dev = family.deviance(design.y, mu, eta)
    pearson = family.pearson(design.y, mu) if design.n else 0.0
    llsum = family.loglike_sum(design.y, mu, eta) if design.n else 0.0
    boundary = float(np.count_nonzero(np.abs(eta) > 30.0)) if family.name == "binomial" else 0.0
    return score, info, np.array([dev, pearson, llsum, boundary])


def local_fit(design: DesignedModel, family) -> tuple[np.ndarray, np.ndarray]:
    """This node's own maximum-likelihood fit, for the coordinator's warm start.

    Returns (I_k, I_k b_k) at the local estimate b_k. Columns the node cannot estimate
    (levels it has no rows of, local separation) get the minimum-norm solution; they carry
    little or no information, so the pooled combination sum(I_k)^-1 sum(I_k b_k) is still a
    good start.
    """
    X, y, off = design.X, design.y, design.offset
    p = X.shape[1]
    if design.n == 0:
        return np.zeros((p, p)), np.zeros(p)
    mu = _starting_mu(family.name, y)
    eta = family_link(family.name, mu)
    beta = np.zeros(p)
    for it in range(LOCAL_MAX_ITER):
        if it == 0:
            w = family.variance(mu)
            z = eta - off + (y - mu) / w
            info = X.T @ (X * w[:, None])
            rhs = X.T @ (w * z)
            new = np.linalg.lstsq(info, rhs, rcond=None)[0]
        else:
            eta = X @ beta + off
            mu, w, r = family.working(y, eta)
            info = X.T @ (X * w[:, None])
            step = np.linalg.lstsq(info, X.T @ r, rcond=None)[0]
            new = beta + step
        if not np.all(np.isfinite(new)):
            break
        converged = np.max(np.abs(new - beta)) < 1e-8 * (1.0 + np.max(np.abs(new)))
        beta = new
        if converged or np.max(np.abs(beta)) > 50:
            break
    eta = X @ beta + off
    _, w, _ = family.working(y, eta)
    info = X.T @ (X * w[:, None])
    return info, info @ beta


def _starting_mu(family: str, y: np.ndarray) -> np.ndarray:
    # As statsmodels: binomial (y + 0.5) / 2, poisson (y + mean(y)) / 2, gaussian y.
    if family == "binomial":
        return (y + 0.5) / 2.0
    if family == "poisson":
        return (y + y.mean()) / 2.0 + 1e-8
    return y.astype(float)


def family_link(family: str, mu: np.ndarray) -> np.ndarray:
    if family == "binomial":
        return np.log(mu / (1.0 - mu))
    if family == "poisson":
        return np.log(mu)
    return mu


def _null_design(design: DesignedModel) -> DesignedModel:
    return DesignedModel(["Intercept"], np.ones((design.n, 1)), design.y, design.offset,
                         design.n_cohort, design.n_missing)

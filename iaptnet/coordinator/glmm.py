"""The coordinator half of the random-intercept GLM: it maximises the marginal likelihood
from the nodes' sums over their groups (docs/methods/glm.md#random-intercept).

1. `glmm.moments` (only if the formula centres or scales): pooled means and SDs, as the GLM's.
2. `glmm.prepare`: the nodes' designs must agree; no group may be at two nodes (their tags);
   columns with no rows are dropped, collinear ones stop the study; the start is the pooled GLM
   warm start (sum I_k)^-1 sum I_k b_k, with sigma = 1 (lme4's start for theta).
3. `glmm.round` until converged.
   - Binomial and poisson: Newton-Raphson on the log marginal likelihood (Laplace or adaptive
     Gauss-Hermite, per group at the nodes) in (beta, sigma), with its exact gradient and
     Hessian summed over the nodes; where the Hessian is not negative definite the step uses
     its eigenvalues' absolute values; a step that lowers the likelihood is halved. Converged
     when every step is below 1e-8 standard errors. The covariance of beta is the beta block of
     the inverse of minus the Hessian in (sigma, beta): what lme4's vcov() computes from its
     finite-difference Hessian of the deviance.
   - Gaussian: Newton on lme4's profiled deviance in theta = sigma_b / sigma (ML or REML),
     from the nodes' Z'V^-1 Z and log det V with their first two derivatives in theta; then
     beta = A^-1 b, sigma^2 = r^2 / n (REML: / (n - p)) and cov(beta) = sigma^2 A^-1, as lmer.

The node half is node/glmm.py; the wire contract protocol/kinds/glmm.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
from scipy import special

from ..protocol import messages as m
from ..protocol.errors import ModelError, NetworkError
from ..protocol.families import Family, get_family
from ..protocol.kinds import glmm as protocol
from ..protocol.study import StudySpec
from .glm import _check_collinear, _solve_start, pooled_transform_state
from .replies import check_replies, sum_replies
from .results import Z975, node_lines, provenance, term_lines
from .runner import node_status
from .session import Session

KEY = "m0"
STEP_TOL = 1e-8  # converged when every Newton step is below this many standard errors
MAX_ROUNDS = 40
MAX_HALVINGS = 20
#: A round moves sigma (or theta) by at most this factor up or down: Newton's step far from the
#: optimum can overshoot, and the halving then has less to undo.
MAX_SCALE_STEP = 4.0


@dataclass
class MixedFit:
    """What the coordinator knows about a random-intercept model, during and after the fit."""

    spec: StudySpec
    family: Family
    ri: protocol.RandomIntercept
    names: list[str] = field(default_factory=list)
    active: np.ndarray | None = None
    n: int = 0
    n_missing: int = 0
    n_cohort: int = 0
    events: float | None = None
    n_groups: int = 0
    dropped: list[dict] = field(default_factory=list)
    node_counts: dict[str, dict] = field(default_factory=dict)
    node_stats: dict[str, dict] = field(default_factory=dict)
    groups_at: dict[str, int] = field(default_factory=dict)  # node -> its number of groups
    node_nnz: dict[str, np.ndarray] = field(default_factory=dict)  # node -> its rows per column
    beta: np.ndarray | None = None  # over the active columns
    sigma: float = 1.0  # the random intercept's SD (gaussian: theta = sigma_b / sigma)
    llf: float = float("nan")
    cov: np.ndarray | None = None  # of beta
    residual_variance: float | None = None  # gaussian
    iterations: int = 0
    halvings: int = 0
    converged: bool = False

    @property
    def active_names(self) -> list[str]:
        return [n for n, a in zip(self.names, self.active) if a]

    @property
    def rank(self) -> int:
        return int(self.active.sum())

    @property
    def spec_name(self) -> str:
        return self.spec.name


# --------------------------------------------------------------------------- running a study


def run_study(
    grid, study, *, engine: str, progress=None, timeout: float | None = 300.0, poll_interval: float = 0.0
) -> dict:
    spec = study.spec
    session = Session(
        grid, spec.hash, min_nodes=spec.min_nodes, timeout=timeout, poll_interval=poll_interval, progress=progress
    )
    fit = fit_mixed(session, spec, list(study.parsed.stateful))
    active = {n.name for n in session.active}
    fit.node_counts = {k: v for k, v in fit.node_counts.items() if k in active}
    return build_results(fit, engine=engine, node_status=node_status(session, fit.node_counts), rounds=session.round)


def fit_mixed(session: Session, spec: StudySpec, stateful: Sequence[str] = ()) -> MixedFit:
    ri = protocol.settings(spec)
    fit = MixedFit(spec, get_family(spec.family), ri)
    wire = {KEY: spec.to_wire()}
    state = pooled_transform_state(session, wire, {KEY: list(stateful)}, protocol.MOMENTS)[0] if stateful else {}
    replies = session.ask(protocol.PREPARE, {"models": wire, "transform_state": state})
    check_replies(replies)
    for reply in replies:
        session.node_named(reply.node).data_version = str(reply.payload.get("data_version", ""))
    start = _absorb_prepare(fit, replies)
    if fit.family.name == "gaussian":
        _fit_gaussian(session, fit)
    else:
        _fit_glmm(session, fit, start)
    _count_contributors(fit, session)
    return fit


def _absorb_prepare(fit: MixedFit, replies: list[m.Reply]) -> np.ndarray:
    """The design's shape and totals from the nodes, the groups checked, and the start."""
    spec = fit.spec
    shapes = [r.payload["models"][KEY] for r in replies]
    names = shapes[0]["columns"]
    for reply, shape in zip(replies, shapes):
        if shape["columns"] != names:
            raise NetworkError(
                f"model '{spec.name}': node {reply.node} builds different design columns from node "
                f"{replies[0].node}; do they serve the same schema and software version?"
            )
    fit.names = list(names)
    fit.node_stats = {r.node: {"n_used": s["n_used"], "events": s["events"]} for r, s in zip(replies, shapes)}
    keys = (
        ("n_used", "n_cohort", "n_missing")
        if fit.family.name == "gaussian"
        else ("n_used", "events", "n_cohort", "n_missing")
    )
    fit.node_counts = {r.node: {k: r.payload.get("counts", {}).get(KEY, {}).get(k) for k in keys} for r in replies}
    fit.groups_at = {r.node: int(s["n_groups"]) for r, s in zip(replies, shapes)}
    fit.node_nnz = {r.node: np.asarray(s["nnz"], dtype=float) for r, s in zip(replies, shapes)}
    _set_totals(fit)
    _check_groups(fit, replies, shapes)
    if fit.n == 0:
        raise ModelError(
            f"model '{spec.name}': the cohort is empty: no rows match the filter with every model variable recorded."
        )
    nnz = np.sum([s["nnz"] for s in shapes], axis=0)
    fit.active = nnz > 0
    for j in np.flatnonzero(~fit.active):
        fit.dropped.append(
            {"term": names[j], "reason": "no rows in the cohort have this term (a level absent from the cohort)"}
        )
    if spec.exposure and spec.exposure in names and not fit.active[names.index(spec.exposure)]:
        raise ModelError(f"model '{spec.name}': the exposure term '{spec.exposure}' has no rows in the cohort.")
    if fit.family.name == "binomial" and (fit.events == 0 or fit.events == fit.n):
        raise ModelError(
            f"model '{spec.name}': the outcome takes a single value in the whole cohort, so there is nothing to model."
        )
    if fit.n <= fit.rank + 1:
        raise ModelError(
            f"model '{spec.name}': the cohort has {fit.n} rows for {fit.rank} coefficients and a variance; it needs more rows."
        )
    if fit.n_groups < 2:
        raise ModelError(
            f"model '{spec.name}': the random intercept '{fit.ri.column}' has {fit.n_groups} group in the cohort; "
            "a variance between groups needs at least two."
        )
    p = len(names)
    info = m.unpack_upper(sum_replies(replies, protocol.local_info_key(KEY)), p)
    ibeta = sum_replies(replies, protocol.local_ibeta_key(KEY))
    _check_collinear(fit, info)
    a = fit.active
    return _solve_start(info[np.ix_(a, a)], ibeta[a])


def _set_totals(fit: MixedFit) -> None:
    fit.n = sum(int(s["n_used"]) for s in fit.node_stats.values())
    fit.n_missing = sum(int(c.get("n_missing") or 0) for c in fit.node_counts.values())
    fit.n_cohort = fit.n + fit.n_missing
    if fit.family.name != "gaussian":
        fit.events = sum(float(s["events"]) for s in fit.node_stats.values())
    fit.n_groups = sum(fit.groups_at.get(node, 0) for node in fit.node_stats)


def _check_groups(fit: MixedFit, replies: list[m.Reply], shapes: list[dict]) -> None:
    """No group may have rows at two nodes: each node's sums must be over whole groups."""
    seen: dict[str, str] = {}
    shared: dict[tuple[str, str], int] = {}
    for reply, shape in zip(replies, shapes):
        tags = shape.get("group_tags")
        if not isinstance(tags, list) or len(tags) != int(shape["n_groups"]) or len(set(tags)) != len(tags):
            raise NetworkError(f"model '{fit.spec.name}': node {reply.node} sent its groups malformed.")
        for tag in tags:
            if tag in seen:
                pair = (seen[tag], reply.node)
                shared[pair] = shared.get(pair, 0) + 1
            else:
                seen[tag] = reply.node
    if shared:
        (first, second), count = next(iter(shared.items()))
        total = sum(shared.values())
        also = "" if len(shared) == 1 else f" (and other pairs of nodes: {total} groups in all)"
        raise ModelError(
            f"model '{fit.spec.name}': {count} group(s) of the random intercept '{fit.ri.column}' have rows at both "
            f"{first} and {second}{also}; a group must lie within one node, so that each node's sums are over whole "
            "groups. Use a column whose groups each service holds alone (e.g. clinics within services), or the "
            "service itself."
        )


def _count_contributors(fit: MixedFit, session: Session) -> None:
    """If a node left after prepare (min_nodes), counts cover only the contributors."""
    active = {n.name for n in session.active}
    fit.node_counts = {k: v for k, v in fit.node_counts.items() if k in active}
    fit.node_stats = {k: v for k, v in fit.node_stats.items() if k in active}
    _set_totals(fit)


# --------------------------------------------------------------------------- binomial, poisson


def _ask_glmm(session: Session, fit: MixedFit, x: np.ndarray):
    """One round at x = (beta over the active columns, sigma): the summed log marginal
    likelihood, gradient and Hessian over the active columns and sigma, and x again (without
    the columns only a node that left had rows for)."""
    full = np.zeros(len(fit.names))
    full[fit.active] = x[:-1]
    replies = session.ask(protocol.ROUND, {"models": [KEY]}, {protocol.parameters_key(KEY): np.append(full, x[-1])})
    check_replies(replies)
    kept = _lose_nodes(fit, session)
    if kept is not None:
        x = np.append(x[:-1][kept], x[-1])
    mine = [r for r in replies if r.node in fit.node_stats]
    p = len(fit.names)
    keep = np.append(fit.active, True)
    value = float(sum_replies(mine, protocol.loglik_key(KEY))[0])
    gradient = sum_replies(mine, protocol.gradient_key(KEY))[keep]
    hessian = m.unpack_upper(sum_replies(mine, protocol.hessian_key(KEY)), p + 1)[np.ix_(keep, keep)]
    return value, gradient, hessian, x, kept is not None


def _lose_nodes(fit: MixedFit, session: Session) -> np.ndarray | None:
    """After a node left (min_nodes let the study go on): its rows and groups leave the totals,
    and the columns only it had rows for leave the model. Returns which of the active columns
    stay, or None if no node left."""
    active = {n.name for n in session.active}
    lost = sorted(name for name in fit.node_stats if name not in active)
    if not lost:
        return None
    for name in lost:
        fit.node_stats.pop(name)
        fit.node_counts.pop(name, None)
    _set_totals(fit)
    nnz = np.sum([fit.node_nnz[name] for name in fit.node_stats], axis=0)
    still = fit.active & (nnz > 0)
    why = session.left(lost)
    for j in np.flatnonzero(fit.active & ~still):
        fit.dropped.append({"term": fit.names[j], "reason": f"only the rows of a node that left had this term ({why})"})
    kept = still[fit.active]
    fit.active = still
    return kept


def _fit_glmm(session: Session, fit: MixedFit, beta: np.ndarray) -> None:
    x = np.append(beta, 1.0)
    prev_x, prev_value, last_sigma, to_zero = None, None, 1.0, False
    while True:
        value, gradient, hessian, x, lost = _ask_glmm(session, fit, x)
        if lost:  # the likelihood is now over fewer groups: no comparison with the last round
            prev_x, prev_value = None, None
        if prev_value is not None and value < prev_value - 1e-10 * (abs(prev_value) + 1.0):
            fit.halvings += 1
            if fit.halvings > MAX_HALVINGS:
                raise ModelError(
                    f"model '{fit.spec.name}': the fit did not converge (the likelihood kept falling after "
                    f"{MAX_HALVINGS} step-halvings)."
                )
            x = (x + prev_x) / 2.0
            continue
        fit.iterations += 1
        try:
            values, vectors = np.linalg.eigh(-hessian)
        except np.linalg.LinAlgError:
            values = np.array([np.nan])
        if not np.all(np.isfinite(values)) or values[-1] <= 0:
            raise ModelError(
                f"model '{fit.spec.name}': the likelihood's curvature is not finite or vanishes; "
                "the design may be collinear or the outcome perfectly predicted."
            )
        definite = values[0] > 1e-12 * values[-1]
        floor = np.maximum(np.abs(values), 1e-8 * values[-1])
        step = vectors @ ((vectors.T @ gradient) / floor)
        cov = (vectors / floor) @ vectors.T
        se = np.sqrt(np.diag(cov))
        sigma = float(x[-1])
        if sigma == 0.0 and hessian[-1, -1] >= 0:
            # The likelihood is even in sigma, so its slope at sigma = 0 is 0; there it is not a
            # maximum along sigma, so the optimum lies inside: sigma starts again above 0.
            step[-1] = last_sigma / 2.0
            definite = False
        if definite and np.all(np.abs(step) < STEP_TOL * se):
            x = x + step
            if abs(x[-1]) < STEP_TOL * se[-1]:
                x[-1] = 0.0  # within the tolerance of the boundary: lme4's singular fit
            fit.beta, fit.sigma = x[:-1], abs(float(x[-1]))
            fit.cov = cov[:-1, :-1]
            fit.llf = value
            fit.converged = True
            return
        _check_divergence(fit, x, se)
        if sigma > 0:
            last_sigma = sigma
            step, to_zero = _sigma_step(step, sigma, to_zero)
        prev_x, prev_value = x.copy(), value
        x = x + step


def _sigma_step(step: np.ndarray, sigma: float, to_zero: bool) -> tuple[np.ndarray, bool]:
    """Newton's step for (beta, sigma) with sigma's part limited: it moves by at most a factor
    MAX_SCALE_STEP up or down. A step that would take sigma to 0 or below (Newton's steps far
    from the optimum overshoot) moves it down by that factor, or, if `to_zero` (the last step
    wanted the same), to exactly 0: the boundary, lme4's singular fit, which the next round
    checks. Returns the step and whether it wanted 0."""
    wanted = sigma + step[-1]
    wants_zero = wanted <= 0
    if wants_zero and to_zero:
        target = 0.0
    else:
        target = float(np.clip(wanted, sigma / MAX_SCALE_STEP, sigma * MAX_SCALE_STEP))
    if target != wanted:
        step = step * ((target - sigma) / step[-1])
        step[-1] = target - sigma
    return step, wants_zero


def _check_divergence(fit: MixedFit, x: np.ndarray, se: np.ndarray) -> None:
    names = fit.active_names
    runaway = [
        names[i]
        for i in range(len(names))
        if names[i] != "Intercept" and ((abs(x[i]) > 5 and se[i] > 10) or abs(x[i]) > 30)
    ]
    if runaway and fit.iterations >= 3:
        listed = ", ".join(f"'{t}'" for t in runaway[:6])
        raise ModelError(
            f"model '{fit.spec.name}': perfect or quasi-perfect separation: the estimates for {listed} run off "
            "to infinity; merge levels or drop those terms."
        )
    if fit.iterations >= MAX_ROUNDS:
        raise ModelError(f"model '{fit.spec.name}': the fit did not converge in {MAX_ROUNDS} rounds.")


# --------------------------------------------------------------------------- gaussian


def _ask_gaussian(session: Session, fit: MixedFit, theta: float):
    replies = session.ask(protocol.ROUND, {"models": [KEY]}, {protocol.parameters_key(KEY): np.array([theta])})
    check_replies(replies)
    _lose_nodes(fit, session)
    mine = [r for r in replies if r.node in fit.node_stats]
    p = len(fit.names)
    keep = np.append(fit.active, True)
    cross = [m.unpack_upper(sum_replies(mine, protocol.cross_key(KEY, d)), p + 1)[np.ix_(keep, keep)] for d in range(3)]
    return cross, sum_replies(mine, protocol.logdet_key(KEY))


def profiled_deviance(cross: list[np.ndarray], logdet: np.ndarray, n: int, reml: bool):
    """lme4's profiled deviance (ML) or REML criterion at theta with its first two derivatives,
    and (beta, r^2, A^-1) there, from Z'V^-1 Z (Z = [X, y]) and log det V with theirs."""
    M0, M1, M2 = cross
    A, b, c = M0[:-1, :-1], M0[:-1, -1], M0[-1, -1]
    A1, b1, c1 = M1[:-1, :-1], M1[:-1, -1], M1[-1, -1]
    A2, b2, c2 = M2[:-1, :-1], M2[:-1, -1], M2[-1, -1]
    chol = scipy.linalg.cho_factor(A)
    inv = scipy.linalg.cho_solve(chol, np.eye(A.shape[0]))
    beta = inv @ b
    r2 = c - b @ beta
    u = b1 - A1 @ beta
    r2_1 = c1 - 2.0 * b1 @ beta + beta @ A1 @ beta
    r2_2 = c2 - 2.0 * b2 @ beta + beta @ A2 @ beta - 2.0 * u @ inv @ u
    p = A.shape[0]
    dof = n - p if reml else n
    dev = logdet[0] + dof * (1.0 + math.log(2.0 * math.pi * r2 / dof))
    d1 = logdet[1] + dof * r2_1 / r2
    d2 = logdet[2] + dof * (r2_2 / r2 - (r2_1 / r2) ** 2)
    if reml:
        dev += 2.0 * float(np.sum(np.log(np.diag(chol[0]))))
        IA1 = inv @ A1
        d1 += float(np.trace(IA1))
        d2 += float(np.trace(inv @ A2) - np.sum(IA1 * IA1.T))
    return dev, d1, d2, beta, r2, inv


def _fit_gaussian(session: Session, fit: MixedFit) -> None:
    theta, prev_theta, prev_dev = 1.0, None, None
    reml = fit.ri.reml
    while True:
        before = fit.n
        cross, logdet = _ask_gaussian(session, fit, theta)
        n = fit.n
        if n != before:  # a node left: the deviance is now over fewer rows
            prev_theta, prev_dev = None, None
        try:
            dev, d1, d2, beta, r2, inv = profiled_deviance(cross, logdet, n, reml)
        except (np.linalg.LinAlgError, ValueError):
            raise ModelError(
                f"model '{fit.spec.name}': the design became singular during the fit; it may be collinear."
            ) from None
        if not r2 > 0:
            raise ModelError(
                f"model '{fit.spec.name}': the model fits the outcome exactly (no residual variance); is the "
                "outcome computed from the terms?"
            )
        if prev_dev is not None and dev > prev_dev + 1e-10 * (abs(prev_dev) + 1.0):
            fit.halvings += 1
            if fit.halvings > MAX_HALVINGS:
                raise ModelError(
                    f"model '{fit.spec.name}': the fit did not converge (the deviance kept rising after "
                    f"{MAX_HALVINGS} step-halvings)."
                )
            theta = (theta + prev_theta) / 2.0
            continue
        fit.iterations += 1
        if d2 > 0:
            step = -d1 / d2
            if abs(step) < STEP_TOL * math.sqrt(2.0 / d2):
                break
        else:
            step = -math.copysign(max(theta, 0.1), d1)  # not yet where the deviance is convex
        if theta > 0:  # (to exactly 0, the boundary, when Newton's step would reach it)
            step = (
                -theta
                if theta + step <= 0
                else float(np.clip(step, theta / MAX_SCALE_STEP - theta, theta * MAX_SCALE_STEP - theta))
            )
        if fit.iterations >= MAX_ROUNDS:
            raise ModelError(f"model '{fit.spec.name}': the fit did not converge in {MAX_ROUNDS} rounds.")
        prev_theta, prev_dev = theta, dev
        theta = abs(theta + step)
    dof = n - len(beta) if reml else n
    fit.beta = beta
    fit.residual_variance = r2 / dof
    fit.sigma = theta  # theta at which beta and sigma^2 were computed (its step was below tolerance)
    fit.cov = fit.residual_variance * inv
    fit.llf = -dev / 2.0
    fit.converged = True


# --------------------------------------------------------------------------- results


def variance_components(fit: MixedFit) -> list[dict]:
    if fit.family.name == "gaussian":
        residual = fit.residual_variance
        between = fit.sigma**2 * residual
        return [
            {"group": fit.ri.column, "variance": between, "std_dev": math.sqrt(between)},
            {"group": "Residual", "variance": residual, "std_dev": math.sqrt(residual)},
        ]
    return [{"group": fit.ri.column, "variance": fit.sigma**2, "std_dev": fit.sigma}]


def term_rows(fit: MixedFit) -> list[dict]:
    """The terms as a GLM's (docs/analyst/results.md): Wald z, normal p-value and interval."""
    se = np.sqrt(np.diag(fit.cov))
    rows = []
    for name, b, s in zip(fit.active_names, fit.beta, se):
        z = b / s
        row = {
            "term": name,
            "estimate": float(b),
            "std_error": float(s),
            "statistic": float(z),
            "df": None,
            "p_value": float(2.0 * special.ndtr(-abs(z))),
            "conf_low": float(b - Z975 * s),
            "conf_high": float(b + Z975 * s),
        }
        if fit.family.ratio_name:
            row["ratio"] = math.exp(row["estimate"])
            row["ratio_low"] = math.exp(row["conf_low"])
            row["ratio_high"] = math.exp(row["conf_high"])
        rows.append(row)
    return rows


def build_results(fit: MixedFit, *, engine: str, node_status: list[dict], rounds: int) -> dict:
    spec = fit.spec
    terms = term_rows(fit)
    gaussian = fit.family.name == "gaussian"
    # Estimated parameters as lme4 counts them: the coefficients, the group variance and
    # (gaussian) the residual variance.
    k = fit.rank + 1 + gaussian
    return {
        "study": spec.name,
        "title": spec.title,
        "study_hash": spec.hash,
        "kind": spec.kind,
        "family": fit.family.name,
        "link": fit.family.link_name,
        "ratio_name": fit.family.ratio_name,
        "formula": spec.formula,
        "where": spec.where,
        "offset": spec.offset,
        "exposure": spec.exposure,
        "exposure_term": next((t for t in terms if t["term"] == spec.exposure), None),
        "random_intercept": fit.ri.column,
        **({"reml": fit.ri.reml} if gaussian else {"nagq": fit.ri.nagq}),
        "n_groups": fit.n_groups,
        "variance_components": variance_components(fit),
        "n": fit.n,
        "n_missing": fit.n_missing,
        "n_cohort": fit.n_cohort,
        "events": fit.events,
        "converged": fit.converged,
        "iterations": fit.iterations,
        "rounds": rounds,
        "deviance": None,
        "null_deviance": None,
        "pearson_chi2": None,
        "scale": fit.residual_variance if gaussian else 1.0,
        "cov_type": "nonrobust",
        "n_clusters": None,
        "weights": None,
        "df_model": fit.rank - 1,
        "df_resid": fit.n - fit.rank,
        "llf": fit.llf,
        "aic": -2.0 * fit.llf + 2.0 * k,
        "dropped_terms": fit.dropped,
        "nodes": node_status,
        "terms": terms,
        **provenance(spec, engine),
    }


def render(result: dict) -> str:
    """The terminal report of a random-intercept model."""
    gaussian = result["family"] == "gaussian"
    how = (
        ("REML" if result.get("reml") else "ML")
        if gaussian
        else ("Laplace" if result.get("nagq", 1) == 1 else f"adaptive Gauss-Hermite, {result['nagq']} points")
    )
    title = result.get("title") or result["study"]
    lines = [
        f"{title}  [{result['family']}/{result['link']}, random intercept per {result['random_intercept']}, {how}]  "
        f"study {result['study_hash'][:12]}",
        f"  n = {result['n']:,} used in {result['n_groups']:,} groups ({result['n_missing']:,} dropped for missing "
        f"values, cohort {result['n_cohort']:,}); log-likelihood {result['llf']:.4f}, AIC {result['aic']:.2f}; "
        f"{result['iterations']} Newton rounds",
    ]
    for vc in result["variance_components"]:
        lines.append(f"  variance {vc['group']:<20} {vc['variance']:.6g} (std dev {vc['std_dev']:.6g})")
    lines.extend(node_lines(result))
    lines.extend(term_lines(result))
    return "\n".join(lines)

"""The coordinator half of the exact federated GLM: how the pooled fit iterates.

Pooled Newton-Raphson (= IRLS for canonical links) on sums of the nodes' scores and
information matrices, which equal the pooled rows' own, so the fixed point is exactly the
pooled-rows maximum-likelihood estimate. Several models share every round (one message per
node per round carries every model still iterating). The fit:

1. `glm.moments` (only if a formula centres or scales): pooled mean and SD for the transform.
2. `glm.prepare`: nodes build their designs; the coordinator checks the nodes agree on the
   columns, drops columns no node has rows for (levels absent from the cohort), stops on an
   empty cohort, a perfectly predicting level, or collinear terms (naming them), and warm-starts
   from the nodes' local fits: beta0 = (sum I_k)^-1 sum I_k b_k.
3. `glm.round` until the Newton step is below 1e-8 standard errors for every coefficient,
   halving the step when the deviance rises. The reported estimate includes that last step.

A negative binomial model estimates theta with the coefficients, to the joint maximum of the
likelihood that MASS::glm.nb reaches by alternating IRLS and theta.ml: every round takes a
Fisher scoring step for the coefficients at the current theta and a Newton step for log theta
at the current means (from the nodes' theta score and its derivative), both at once, halving
both while the log-likelihood falls, until both steps are below 1e-8 standard errors. The
coefficients' covariance is the inverse information at the final theta (given theta, as
glm.nb's); theta's standard error is theta.ml's, 1 / sqrt(-d^2 loglik / d theta^2) at the final
means. Its null model (for the null deviance) is fitted at the model's final theta, as glm.nb's.

The node half is node/glm.py; the wire contract (task names, array keys) protocol/kinds/glm.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.linalg

from ..protocol import messages as m
from ..protocol.errors import ModelError, NetworkError
from ..protocol.families import THETA_MAX, THETA_MIN, Family, get_family
from ..protocol.kinds import glm as protocol
from ..protocol.kinds.glm import NULL_SUFFIX
from ..protocol.study import StudySpec, marginal_contrast, marginal_label
from .checkpoint import BatchCheckpoint
from .cr2 import cr2_round
from .replies import check_replies, models_left, sum_replies
from .resume import restore, snapshot
from .session import Session, _names

STEP_TOL = 1e-8  # converged when every Newton step is below this many standard errors
# A robust model's round asks the nodes for the middle term of its sandwich (`meat`, as large as
# the information) only when the fit may converge in it: the last step was below this many
# standard errors (Newton's next is about its square), and in every round of a Gaussian model
# or of a model whose rows one node holds (their start is the optimum). A round that converges
# without it is asked again at the same estimate with it: the same numbers, one more round.
MEAT_AHEAD = 1e-2
MAX_ROUNDS = 40
MAX_HALVINGS = 20
# A residual deviance below this share of the null deviance is an exact fit up to rounding
# (R² = 1 to 20 digits, beyond float64's 16): a dispersion family's scale is then zero.
EXACT_FIT = 1e-20
# A negative binomial round moves log theta by at most this much (a factor e^2): Newton's step
# from a start far from the optimum can overshoot, and the halving then has less to undo.
MAX_LOG_THETA_STEP = 2.0


@dataclass
class ModelFit:
    """Everything the coordinator knows about one model, during and after the fit."""

    key: str
    spec: StudySpec
    family: Family
    names: list[str] = field(default_factory=list)
    active: np.ndarray | None = None
    beta: np.ndarray | None = None
    prev_beta: np.ndarray | None = None
    prev_dev: float | None = None
    iterations: int = 0
    halvings: int = 0
    converged: bool = False
    n: int = 0
    n_missing: int = 0
    n_cohort: int = 0
    events: float | None = None
    dropped: list[dict] = field(default_factory=list)
    deviance: float = float("nan")
    pearson: float = float("nan")
    loglike_sum: float = float("nan")
    cov: np.ndarray | None = None  # unscaled inverse information over active columns
    meat: np.ndarray | None = None  # sum of score outer products (robust covariances)
    last_ratio: float | None = None  # the last Newton step's largest |step| / SE (None: no step yet)
    meat_due: bool = False  # converged without the middle term: the same round again with it
    n_clusters: int = 0
    node_counts: dict[str, dict] = field(default_factory=dict)  # per node, small-number rules applied
    node_stats: dict[str, dict] = field(default_factory=dict)  # per node, exact n_used and events
    null: ModelFit | None = None
    holders: list[str] = field(default_factory=list)  # nodes whose rows the model rests on
    # Per node, from its prepare reply: rows per column (nnz), clusters, indicator columns'
    # events, and its local information (packed): what a node's leaving takes away.
    node_shapes: dict[str, dict] = field(default_factory=dict)
    node_info: dict[str, np.ndarray] = field(default_factory=dict)
    # Negative binomial models: log theta (its null model: the one its last round was sent at),
    # the previous round's and its log-likelihood (for step-halving), and d^2 loglik / d theta^2
    # at the final round (theta's standard error).
    # A study's `marginal` exposures: the nodes' summed marginal sums at the final estimate, by
    # exposure column (protocol.marginal_key's layout).
    marginal_sums: dict[str, np.ndarray] = field(default_factory=dict)
    log_theta: float | None = None
    prev_log_theta: float | None = None
    prev_llf: float | None = None
    theta_second: float = float("nan")
    # cov_type = "CR2": Satterthwaite degrees of freedom per active coefficient (coordinator/cr2.py).
    df: np.ndarray | None = None

    @property
    def theta(self) -> float | None:
        return None if self.log_theta is None else float(np.exp(self.log_theta))

    @property
    def theta_std_error(self) -> float | None:
        """theta.ml's standard error: 1 / sqrt(-d^2 loglik / d theta^2) at the final means."""
        if self.log_theta is None:
            return None
        return float(1.0 / np.sqrt(-self.theta_second)) if self.theta_second < 0 else float("nan")

    @property
    def active_names(self) -> list[str]:
        return [n for n, a in zip(self.names, self.active) if a]

    @property
    def rank(self) -> int:
        return int(self.active.sum())

    @property
    def scale(self) -> float:
        if self.family.has_dispersion:
            return self.pearson / (self.n - self.rank)
        return 1.0

    @property
    def llf(self) -> float:
        return self.family.llf(self.loglike_sum, self.n, self.deviance)

    @property
    def covariance(self) -> np.ndarray:
        """Covariance of the active estimates, as statsmodels computes it for `cov_type`:
        the scaled inverse information, the sandwich (HC0), or the cluster sandwich with
        statsmodels' small-sample factor G/(G-1) * (n-1)/(n-p); for "CR2", clubSandwich's
        bias-reduced sandwich (its meat from the CR2 round: coordinator/cr2.py)."""
        kind = self.spec.cov_type
        if kind == "nonrobust":
            return self.cov * self.scale
        sandwich = self.cov @ self.meat @ self.cov
        if kind == "cluster":
            g = self.n_clusters
            sandwich = sandwich * (g / (g - 1.0)) * ((self.n - 1.0) / (self.n - self.rank))
        return sandwich


def fit_models(
    session: Session,
    specs: dict[str, StudySpec],
    stateful: dict[str, list[str]],
    optional: frozenset[str] = frozenset(),
    checkpoint: BatchCheckpoint | None = None,
) -> dict[str, ModelFit]:
    """Fit every model of a batch on the session's nodes; keys are model keys ("m0", ...).

    A node may decline a model named in `optional` when its rows are below its minimum (0
    included: the same answer); the model is then fitted on the nodes that hold it
    (`ModelFit.holders`), and the caller decides whether that is the model it asked for (an
    its study's per-group models: the nodes whose count table shows no rows of the group).

    A node that leaves the study (the session lets it go when the study's `min_nodes` allows)
    takes its rows with it, at any point: its sums leave every later round, the columns only
    it had rows for are dropped (`_continue_without`), and the fit goes on to the remaining
    nodes' own pooled estimate. A model that centres or scales is prepared again on the
    remaining nodes, since its pooled means and SDs included the lost node's rows.

    With a `checkpoint`, the state after every round is saved, and a saved state is taken up
    once the nodes have prepared again: the fit goes on from the saved round
    (coordinator/resume.py)."""
    earlier: dict[str, ModelFit] = {}
    resume = checkpoint.load() if checkpoint is not None else None
    while True:
        given = resume.get("transform_state") if resume and any(stateful.values()) else None
        prepared = _prepare_fits(session, specs, stateful, optional, earlier, given)
        if prepared is None:  # a node left between the moments and the prepare: centre without it
            continue
        fits, transform_state = prepared
        if resume is not None:
            why = restore(session, fits, resume)
            resume = None
            if why is None:
                checkpoint.resumed(session.round)
            else:
                checkpoint.not_applied(why)
                if given is not None:
                    continue  # centred with the checkpoint's pooled moments: start afresh
        save = (lambda: checkpoint.save(snapshot(session, fits, transform_state))) if checkpoint else None
        if _iterate(session, fits, stateful, save):
            break
        earlier = fits  # a node left a model that centres or scales: prepare again without it
    for fit in fits.values():
        _check_exact_fit(fit)
    _count_contributors(fits, session)
    return fits


def _prepare_fits(
    session, specs, stateful, optional, earlier, given: dict | None = None
) -> tuple[dict[str, ModelFit], dict] | None:
    """`glm.moments` (if a formula centres or scales; not with the pooled moments `given` by a
    checkpoint) and `glm.prepare` on the session's active nodes: the models and the pooled
    moments; None if a node left between the two (the moments then included its rows)."""
    fits = {key: ModelFit(key, spec, get_family(spec.family)) for key, spec in specs.items()}
    models_wire = {key: spec.to_wire() for key, spec in specs.items()}
    transform_state, moment_nodes = {}, None
    if given is not None:
        transform_state = given
    elif any(stateful.values()):
        transform_state, moment_nodes = pooled_transform_state(session, models_wire, stateful)
    payload = {"models": models_wire, "transform_state": transform_state}
    if optional:
        payload["optional"] = sorted(optional)
    replies = session.ask(protocol.PREPARE, payload)
    check_replies(replies)
    if moment_nodes is not None and {r.node for r in replies} != moment_nodes:
        return None
    for reply in replies:
        session.node_named(reply.node).data_version = str(reply.payload.get("data_version", ""))
    for fit in fits.values():
        declined = {r.node for r in replies if fit.key in (r.payload.get("declined") or [])}
        if declined and fit.key not in optional:
            raise NetworkError(
                f"model '{fit.spec.name}': nodes {', '.join(sorted(declined))} declined a model they must answer."
            )
        fit.holders = [r.node for r in replies if r.node not in declined]
        if not fit.holders:
            raise ModelError(f"model '{fit.spec.name}': no node holds enough rows of it.")
        before = earlier.get(fit.key)
        _absorb_prepare(
            fit, [r for r in replies if r.node in fit.holders], session, before.node_shapes if before else {}
        )
    return fits, transform_state


def _iterate(session: Session, fits: dict[str, ModelFit], stateful: dict[str, list[str]], save=None) -> bool:
    """Newton rounds (and the marginal round) until every model has converged on the nodes
    that remain. False if a node left a model that centres or scales (prepare again).
    `save()`, when given, keeps the state after each Newton round (a checkpoint)."""
    all_fits = []
    for fit in fits.values():
        all_fits.extend([fit, fit.null])
    while True:
        pending = [f for f in all_fits if not f.converged]
        if not pending:
            lost = _marginal_round(session, fits) or cr2_round(session, fits)
            if not lost:
                return True
            if any(stateful.get(key) for key in lost):
                return False
            for key in lost:
                _continue_without(fits[key], session, [])
            continue
        arrays = {protocol.beta_key(f.key): _round_vector(f, fits) for f in pending}
        payload = {"models": [f.key for f in pending], "meat": [f.key for f in pending if _meat_ahead(f)]}
        replies = session.ask(protocol.ROUND, payload, arrays)
        check_replies(replies)
        lost = models_left(fits, session)
        if any(stateful.get(key) for key in lost):
            return False
        for fit in pending:
            main = fits[fit.key.removesuffix(NULL_SUFFIX)]
            if main.key in lost:
                continue  # (below: its step is taken without the node that left)
            mine = [r for r in replies if r.node in main.holders]
            score = sum_replies(mine, protocol.score_key(fit.key))
            info = m.unpack_upper(sum_replies(mine, protocol.info_key(fit.key)), len(fit.names))
            stats = sum_replies(mine, protocol.stats_key(fit.key))
            meat = None
            if fit.key in payload["meat"]:
                meat = m.unpack_upper(sum_replies(mine, protocol.meat_key(fit.key)), len(fit.names))
            if fit.log_theta is None:
                _newton_update(fit, score, info, stats, meat)
            elif fit is main:
                _nb_update(fit, score, info, stats, sum_replies(mine, protocol.theta_key(fit.key)), meat)
            else:
                _nb_null_update(fit, main, score, info, stats)
        for key in lost:
            fit = fits[key]
            _continue_without(fit, session, replies if fit in pending else [])
        if save is not None:
            save()


def _robust(fit: ModelFit) -> bool:
    """Whether the model's covariance is a sandwich whose middle term the nodes sum (the null
    model's never is)."""
    return fit.spec.cov_type in ("HC0", "cluster") and not fit.key.endswith(NULL_SUFFIX)


def _meat_ahead(fit: ModelFit) -> bool:
    """Whether this round asks for the robust middle term (MEAT_AHEAD)."""
    if not _robust(fit):
        return False
    if fit.meat_due or (fit.last_ratio is not None and fit.last_ratio < MEAT_AHEAD):
        return True
    # A Gaussian model's start (the nodes' local fits pooled) is its optimum; with one node the
    # start is that node's own fit, the optimum of any family.
    return fit.family.name == "gaussian" or len(fit.holders) == 1


def _continue_without(fit: ModelFit, session: Session, replies: list[m.Reply]) -> None:
    """A node holding rows of this model left the study: the model goes on from the remaining
    nodes' rows alone. Its counts and totals lose the node's; the columns only the node had
    rows for are dropped, and so is a column that the remaining rows make a combination of the
    others (a categorical term whose reference level only the node held: its first remaining
    level becomes the reference, as a fit on the remaining rows alone would choose); each is
    listed in `dropped_terms` naming the node. The model and its null model iterate again from
    their current estimates, with one constrained Newton step from this round's replies when
    it had some, until they converge on the remaining nodes' pooled estimate."""
    active = {n.name for n in session.active}
    gone = [h for h in fit.holders if h not in active]
    fit.holders = [h for h in fit.holders if h in active]
    left = session.left(gone)
    if not fit.holders:
        raise ModelError(f"model '{fit.spec.name}': no node that holds its rows remains ({left}).")
    shapes = [fit.node_shapes[h] for h in fit.holders]
    fit.node_stats = {k: v for k, v in fit.node_stats.items() if k in active}
    fit.node_counts = {k: v for k, v in fit.node_counts.items() if k in active}
    for target in (fit, fit.null):
        _set_totals(target, fit.node_stats, fit.node_counts)
    was = fit.active.copy()
    nnz = np.sum([s["nnz"] for s in shapes], axis=0)
    for j in np.flatnonzero(was & (nnz == 0)):
        had = [h for h in gone if fit.node_shapes[h]["nnz"][j] > 0]
        fit.dropped.append(
            {"term": fit.names[j], "reason": f"only {_names(had)} had rows with this term ({session.left(had)})"}
        )
    fit.active = was & (nnz > 0)
    _check_remaining(fit, shapes)
    mine = [r for r in replies if r.node in fit.holders]
    p = len(fit.names)
    if mine:  # the information at the current estimate, from the remaining nodes
        info = m.unpack_upper(sum_replies(mine, protocol.info_key(fit.key)), p)
    else:
        info = m.unpack_upper(np.sum([fit.node_info[h] for h in fit.holders], axis=0), p)
    for j in _aliased(info, fit.active, fit.names):
        fit.active[j] = False
        fit.dropped.append(
            {
                "term": fit.names[j],
                "reason": f"a linear combination of the other terms in the remaining nodes' rows ({left})",
            }
        )
    if fit.n <= fit.rank:
        raise ModelError(
            f"model '{fit.spec.name}': the {fit.n} rows that remain ({left}) are too few for {fit.rank} coefficients."
        )
    beta = fit.beta.copy()
    gone_cols = was & ~fit.active
    if mine:  # Newton's step in the remaining columns, the dropped ones set to zero
        score = sum_replies(mine, protocol.score_key(fit.key))
        a = fit.active
        rhs = score[a] + info[np.ix_(a, gone_cols)] @ beta[gone_cols]
        try:
            beta[a] += _solve_pos(info[np.ix_(a, a)], rhs)
        except (np.linalg.LinAlgError, ValueError):
            pass  # (the next round's step starts from the current estimate)
    beta[~fit.active] = 0.0
    fit.beta = beta if np.all(np.isfinite(beta)) else np.where(fit.active, fit.beta, 0.0)
    for target in (fit, fit.null):
        target.converged = False
        target.prev_beta = target.prev_dev = target.prev_llf = target.prev_log_theta = None
        target.halvings = 0
        target.cov = target.meat = None
        target.last_ratio, target.meat_due = None, False
    fit.marginal_sums = {}
    exact = _null_intercept(fit)
    if exact is not None:
        fit.null.beta = np.array([exact])


def _check_remaining(fit: ModelFit, shapes: list[dict]) -> None:
    """What the prepare checks of the whole cohort, checked again on the remaining nodes' rows."""
    spec = fit.spec
    if fit.n == 0:
        raise ModelError(f"model '{spec.name}': no rows remain once the nodes that left are taken out.")
    if spec.cov_type in ("cluster", "CR2"):
        fit.n_clusters = sum(int(s["n_clusters"]) for s in shapes)
        if fit.n_clusters < 2:
            raise ModelError(f"model '{spec.name}': cluster-robust standard errors need at least two clusters.")
    if spec.exposure and spec.exposure in fit.names and not fit.active[fit.names.index(spec.exposure)]:
        raise ModelError(f"model '{spec.name}': the exposure term '{spec.exposure}' has no rows in the cohort.")
    if fit.family.name == "binomial":
        if fit.events == 0 or fit.events == fit.n:
            raise ModelError(
                f"model '{spec.name}': the outcome takes a single value in the whole cohort, so there is nothing to model."
            )
        _check_level_separation(fit, shapes)


def _aliased(info: np.ndarray, active: np.ndarray, names: list[str]) -> list[int]:
    """Active columns that are a linear combination of others in `info` (X'WX): the intercept
    is kept first, then the columns from the last to the first, each kept if it adds to the
    span of those kept (the same 1e-9 tolerance as `_check_collinear`). Of a categorical
    term's levels this drops the first, as treatment coding of the remaining levels would."""
    order = [j for j in np.flatnonzero(active) if names[j] == "Intercept"]
    order += [j for j in np.flatnonzero(active)[::-1] if names[j] != "Intercept"]
    kept: list[int] = []
    out: list[int] = []
    for j in order:
        d = info[j, j]
        if d <= 0:
            out.append(int(j))
            continue
        if kept:
            sub = info[np.ix_(kept, kept)]
            cross = info[kept, j]
            try:
                residual = d - cross @ _solve_pos(sub, cross)
            except (np.linalg.LinAlgError, ValueError):
                residual = 0.0
            if residual <= 1e-9 * d:
                out.append(int(j))
                continue
        kept.append(int(j))
    return sorted(out)


def _marginal_round(session: Session, fits: dict[str, ModelFit]) -> list[str]:
    """For models with `marginal` exposures, one more round at the final estimate: each node
    returns, per exposure, the sums of its rows' fitted means with the exposure set to 1 and to
    0 and their gradients (p-vectors), judged like any round's. Returns the models a node
    holding their rows left during that round (to be fitted again without it)."""
    asked = {
        key: [marginal_label(m) for m in fit.spec.marginal]
        for key, fit in fits.items()
        if fit.spec.marginal and not fit.marginal_sums
    }
    if not asked:
        return []
    for key in asked:
        for entry in fits[key].spec.marginal:
            _check_settable(fits[key], entry)
    arrays = {protocol.beta_key(key): _round_vector(fits[key], fits) for key in asked}
    replies = session.ask(protocol.ROUND, {"models": list(asked), "marginal": asked}, arrays)
    check_replies(replies)
    lost = models_left(fits, session)
    if lost:
        return lost
    for key, terms in asked.items():
        fit = fits[key]
        mine = [r for r in replies if r.node in fit.holders]
        fit.marginal_sums = {term: sum_replies(mine, protocol.marginal_key(key, i)) for i, term in enumerate(terms)}
    return []


def _check_settable(fit: ModelFit, entry) -> None:
    """A `marginal` entry's exposure must be estimable at the values it is set to: a binary or
    numeric column's own coefficient, a categorical level's (the reference level has none);
    ModelError otherwise (a coefficient the fit left out would be taken as 0)."""
    column, values = marginal_contrast(entry)
    if isinstance(entry, str):
        if column not in fit.active_names:
            raise ModelError(
                f"model '{fit.spec.name}': the marginal exposure '{column}' has no rows with a value of 1 "
                "in the cohort, so its effect cannot be standardised."
            )
        return
    for value in values:
        if isinstance(value, str):
            names = [f"{column}[T.{value}]", f"C({column})[T.{value}]"]
            lost = [n for n in names if n in fit.names and n not in fit.active_names]
            what = f"level '{value}' of '{column}' has no rows in the cohort (or is aliased)"
        else:
            lost = [column] if column not in fit.active_names else []
            what = f"exposure '{column}' has no estimable coefficient in the cohort"
        if lost:
            raise ModelError(
                f"model '{fit.spec.name}': the marginal contrast '{marginal_label(entry)}' cannot be standardised: "
                f"the {what}."
            )


def _round_vector(fit: ModelFit, fits: dict[str, ModelFit]) -> np.ndarray:
    """What a round sends for a model: its coefficients; a negative binomial model's followed
    by log theta (its null model's: the model's current one)."""
    if fit.log_theta is None:
        return fit.beta
    main = fits[fit.key.removesuffix(NULL_SUFFIX)]
    if fit is not main:
        fit.log_theta = main.log_theta
    return np.append(fit.beta, fit.log_theta)


def _check_exact_fit(fit: ModelFit) -> None:
    """A gaussian model whose terms give the outcome exactly has zero scale: its standard
    errors are zero and its log-likelihood infinite (statsmodels gives both, with warnings),
    which no reader should be handed as a result."""
    if fit.family.has_dispersion and fit.deviance <= EXACT_FIT * fit.null.deviance:
        raise ModelError(
            f"model '{fit.spec.name}': the model fits the outcome exactly (no residual deviance), so its "
            "scale is zero and no standard error can be estimated; is the outcome computed from the terms?"
        )


def _count_contributors(fits: dict[str, ModelFit], session: Session) -> None:
    """If a node dropped out after prepare (min_nodes), counts cover only the contributors."""
    active = {n.name for n in session.active}
    for fit in fits.values():
        fit.node_counts = {k: v for k, v in fit.node_counts.items() if k in active}
        fit.node_stats = {k: v for k, v in fit.node_stats.items() if k in active}
        for target in (fit, fit.null):
            _set_totals(target, fit.node_stats, fit.node_counts)


def _set_totals(fit: ModelFit, stats: dict[str, dict], counts: dict[str, dict]) -> None:
    """n and events are exact (model statistics); rows dropped as missing are the sum of the
    nodes' counts under their small-number rules (suppressed counts add nothing)."""
    fit.n = sum(int(s["n_used"]) for s in stats.values())
    fit.n_missing = sum(int(c.get("n_missing") or 0) for c in counts.values())
    fit.n_cohort = fit.n + fit.n_missing
    if fit.family.name != "gaussian":
        fit.events = sum(float(s["events"]) for s in stats.values())


def pooled_transform_state(session, models_wire, stateful, task: str = protocol.MOMENTS) -> tuple[dict, set[str]]:
    """Pool (n, mean, M2) per centred/scaled expression with Chan's formula; exact. Also
    returns the nodes pooled. `task`: the kind's moments task (glm.moments, glmm.moments)."""
    replies = session.ask(task, {"models": models_wire})
    check_replies(replies)
    state: dict[str, dict] = {}
    for key, exprs in stateful.items():
        name = models_wire[key].get("name", key)
        state[key] = {}
        for i, expr in enumerate(exprs):
            n = mean = m2 = 0.0
            for reply in replies:
                nk, meank, m2k = reply.arrays[protocol.moments_key(key, i)]
                if nk == 0:
                    continue
                delta = meank - mean
                total = n + nk
                mean = mean + delta * nk / total
                m2 = m2 + m2k + delta * delta * n * nk / total
                n = total
            if n < 2:
                raise ModelError(f"model '{name}': too few rows to centre or scale '{expr}'.")
            entry = {"ddof": 1, "center": mean, "scale": None}
            if expr.replace(" ", "").startswith("scale("):
                entry["scale"] = float(np.sqrt(m2 / (n - 1)))
            state[key][expr] = entry
    return state, {r.node for r in replies}


def _absorb_prepare(
    fit: ModelFit, replies: list[m.Reply], session: Session | None = None, earlier: dict[str, dict] | None = None
) -> None:
    """The prepare replies of the nodes holding a model. `earlier`: the nodes' prepare shapes
    from before a node left (a model that centres or scales is prepared again), to name in
    `dropped_terms` the node that took a column's rows with it."""
    spec = fit.spec
    lost = session.lost if session is not None else []
    shapes = [r.payload["models"][fit.key] for r in replies]
    names = shapes[0]["columns"]
    for reply, shape in zip(replies, shapes):
        if shape["columns"] != names:
            raise NetworkError(
                f"model '{spec.name}': node {reply.node} builds different design columns from node {replies[0].node}; do they serve the same schema and software version?"
            )
    fit.names = list(names)
    p = len(names)
    fit.node_shapes = {r.node: s for r, s in zip(replies, shapes)}
    fit.node_info = {r.node: r.arrays[protocol.local_info_key(fit.key)] for r in replies}
    fit.node_stats = {r.node: {"n_used": s["n_used"], "events": s["events"]} for r, s in zip(replies, shapes)}
    fit.node_counts = {}
    for reply in replies:
        table = reply.payload.get("counts", {}).get(fit.key, {})
        keys = (
            ("n_used", "events", "n_cohort", "n_missing")
            if fit.family.name != "gaussian"
            else ("n_used", "n_cohort", "n_missing")
        )
        fit.node_counts[reply.node] = {k: table.get(k) for k in keys}
    _set_totals(fit, fit.node_stats, fit.node_counts)
    if fit.n == 0:
        raise ModelError(
            f"model '{spec.name}': the cohort is empty: no rows match the filter with every model variable recorded."
        )
    if p == 0:
        raise ModelError(f"model '{spec.name}': the formula has no terms.")
    nnz = np.sum([s["nnz"] for s in shapes], axis=0)
    fit.active = nnz > 0
    _check_clusters_within_nodes(fit, replies, shapes)
    if spec.cov_type in ("cluster", "CR2"):
        fit.n_clusters = sum(int(s["n_clusters"]) for s in shapes)
        if fit.n_clusters < 2:
            raise ModelError(f"model '{spec.name}': cluster-robust standard errors need at least two clusters.")
    for j in np.flatnonzero(~fit.active):
        had = [n for n in lost if n in (earlier or {}) and earlier[n]["nnz"][j] > 0]
        if had:
            reason = f"only {_names(had)} had rows with this term ({session.left(had)})"
        elif lost:
            reason = (
                f"no rows of the remaining nodes' cohort have this term (a level absent from it; {session.left(lost)})"
            )
        else:
            reason = "no rows in the cohort have this term (a level absent from the cohort)"
        fit.dropped.append({"term": names[j], "reason": reason})
    if spec.exposure and spec.exposure in names and not fit.active[names.index(spec.exposure)]:
        raise ModelError(f"model '{spec.name}': the exposure term '{spec.exposure}' has no rows in the cohort.")
    if fit.family.name == "binomial":
        if fit.events == 0 or fit.events == fit.n:
            raise ModelError(
                f"model '{spec.name}': the outcome takes a single value in the whole cohort, so there is nothing to model."
            )
        _check_level_separation(fit, shapes)
    if fit.n <= fit.rank:
        raise ModelError(
            f"model '{spec.name}': the cohort has {fit.n} rows for {fit.rank} coefficients; it needs more rows than coefficients."
        )
    info = m.unpack_upper(sum_replies(replies, protocol.local_info_key(fit.key)), p)
    ibeta = sum_replies(replies, protocol.local_ibeta_key(fit.key))
    if lost:  # (as when a node leaves mid-study: a reference level only it held)
        for j in _aliased(info, fit.active, fit.names):
            fit.active[j] = False
            fit.dropped.append(
                {
                    "term": names[j],
                    "reason": f"a linear combination of the other terms in the remaining nodes' rows ({session.left(lost)})",
                }
            )
    _check_collinear(fit, info)
    fit.beta = np.zeros(p)
    fit.beta[fit.active] = _solve_start(info[np.ix_(fit.active, fit.active)], ibeta[fit.active])
    if fit.family.name == "negative_binomial":
        # The coefficients start from the nodes' Poisson fits (as glm.nb's from a Poisson
        # glm), theta at 1: Newton's steps on log theta reach it in a few rounds.
        fit.log_theta = 0.0
    fit.null = _null_fit(fit, replies)


def _check_clusters_within_nodes(fit: ModelFit, replies: list[m.Reply], shapes: list[dict]) -> None:
    """Cluster-robust SEs sum each node's per-cluster sums: a cluster whose rows lie at two
    nodes would be two clusters (its cross-node products missing). The nodes send a salted
    digest of each cluster's value (clusters they make themselves, e.g. matched pairs, are
    theirs alone and send none); a digest at two nodes stops the study."""
    if fit.spec.cov_type not in ("cluster", "CR2"):
        return
    seen: dict[str, str] = {}
    shared: dict[tuple[str, str], int] = {}
    for reply, shape in zip(replies, shapes):
        for digest in shape.get("cluster_digests") or []:
            if digest in seen and seen[digest] != reply.node:
                pair = (seen[digest], reply.node)
                shared[pair] = shared.get(pair, 0) + 1
            seen.setdefault(digest, reply.node)
    if shared:
        (a, b), count = next(iter(shared.items()))
        more = f" (and {len(shared) - 1} more pairs of nodes)" if len(shared) > 1 else ""
        raise ModelError(
            f"model '{fit.spec.name}': {count} cluster(s) of '{fit.spec.cluster}' have rows at both node {a} and "
            f"node {b}{more}; cluster-robust standard errors need every cluster within one node (its rows at two "
            "nodes would count as two clusters). Cluster on a column nested in the nodes, such as the service."
        )


def _check_level_separation(fit: ModelFit, shapes: list[dict]) -> None:
    """A 0/1 column whose rows all share one outcome value makes the MLE infinite."""
    if "events_nnz" not in shapes[0]:
        return
    events_nnz = np.sum([s["events_nnz"] for s in shapes], axis=0)
    indicator = np.all([s["indicator"] for s in shapes], axis=0)
    nnz = np.sum([s["nnz"] for s in shapes], axis=0)
    bad = [
        fit.names[j]
        for j in range(len(fit.names))
        if fit.active[j]
        and indicator[j]
        and fit.names[j] != "Intercept"
        and (events_nnz[j] == 0 or events_nnz[j] == nnz[j])
    ]
    if bad:
        listed = ", ".join(f"'{b}'" for b in bad)
        raise ModelError(
            f"model '{fit.spec.name}': perfect separation: every row with {listed} has the same outcome, so its odds ratio is infinite; merge that level with another or drop the term."
        )


def _check_collinear(fit: ModelFit, info: np.ndarray) -> None:
    a = fit.active
    sub = info[np.ix_(a, a)]
    d = np.sqrt(np.diag(sub))
    if np.any(d == 0):
        return
    scaled = sub / np.outer(d, d)
    _, r, piv = scipy.linalg.qr(scaled, pivoting=True)
    diag = np.abs(np.diag(r))
    rank = int(np.sum(diag > 1e-9 * diag[0]))
    if rank == len(diag):
        return
    names = [n for n, keep in zip(fit.names, a) if keep]
    basis, aliased = piv[:rank], piv[rank:]
    j = aliased[0]
    coef = np.linalg.lstsq(scaled[np.ix_(basis, basis)], scaled[basis, j], rcond=None)[0]
    partners = [names[basis[i]] for i in np.argsort(-np.abs(coef)) if abs(coef[i]) > 1e-6][:6]
    others = ", ".join(f"'{p}'" for p in partners) or "the intercept"
    also = f" ({len(aliased) - 1} more term(s) are also collinear)" if len(aliased) > 1 else ""
    raise ModelError(
        f"model '{fit.spec.name}': the design is collinear: '{names[j]}' is a linear combination of {others}{also}; drop one of them or merge levels."
    )


def _solve_start(info: np.ndarray, ibeta: np.ndarray) -> np.ndarray:
    try:
        beta = _solve_pos(info, ibeta)
    except (np.linalg.LinAlgError, ValueError):
        return np.zeros(len(ibeta))
    if not np.all(np.isfinite(beta)) or np.max(np.abs(beta)) > 50:
        return np.zeros(len(ibeta))
    return beta


def _solve_pos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a x = b for a positive definite a, by its Cholesky factor: scipy.linalg.solve with
    assume_a="pos" (LinAlgError when a is not positive definite), without the LinAlgWarning
    it prints beside the answer for an ill-conditioned a (collinearity is judged on its own)."""
    return scipy.linalg.cho_solve(scipy.linalg.cho_factor(a), b)


def _null_fit(fit: ModelFit, replies: list[m.Reply]) -> ModelFit:
    null = ModelFit(
        fit.key + NULL_SUFFIX,
        fit.spec,
        fit.family,
        names=["Intercept"],
        active=np.array([True]),
        n=fit.n,
        n_missing=fit.n_missing,
        n_cohort=fit.n_cohort,
        events=fit.events,
    )
    info = sum_replies(replies, protocol.local_info_key(null.key)).reshape(1, 1)
    ibeta = sum_replies(replies, protocol.local_ibeta_key(null.key))
    null.beta = _solve_start(info, ibeta)
    null.log_theta = fit.log_theta
    exact = _null_intercept(fit)
    if exact is not None:
        null.beta = np.array([exact])
    return null


def _null_intercept(fit: ModelFit) -> float | None:
    """The intercept-only MLE in closed form where there is one: with a canonical link, no
    offset and no prior weights the fitted mean is the pooled mean of y, known exactly from
    the nodes' n and sum of y. Started there, the null model converges in its first round
    (which still checks it and gives the null deviance) instead of iterating beside the
    model."""
    if fit.spec.offset or fit.spec.weights or not fit.n:
        return None
    mean = fit.events / fit.n if fit.events is not None else None
    if fit.family.name == "binomial" and mean is not None and 0.0 < mean < 1.0:
        return float(np.log(mean) - np.log1p(-mean))
    if fit.family.name in ("poisson", "negative_binomial") and mean is not None and mean > 0.0:
        return float(np.log(mean))  # (the negative binomial's at every theta)
    return None


def _newton_update(
    fit: ModelFit, score: np.ndarray, info: np.ndarray, stats: np.ndarray, meat: np.ndarray | None = None
) -> None:
    dev = float(stats[0])
    if fit.prev_dev is not None and dev > fit.prev_dev + 1e-10 * (abs(fit.prev_dev) + 1.0):
        fit.halvings += 1
        if fit.halvings > MAX_HALVINGS:
            raise ModelError(
                f"model '{fit.spec.name}': the fit did not converge (the deviance kept rising after {MAX_HALVINGS} step-halvings)."
            )
        fit.beta = (fit.beta + fit.prev_beta) / 2.0
        return
    a = fit.active
    sub = info[np.ix_(a, a)]
    try:
        chol = scipy.linalg.cho_factor(sub)
        cov = scipy.linalg.cho_solve(chol, np.eye(sub.shape[0]))
    except (np.linalg.LinAlgError, ValueError):
        raise ModelError(
            f"model '{fit.spec.name}': the information matrix became singular during the fit; the design may be collinear or the outcome perfectly predicted."
        ) from None
    step = cov @ score[a]
    se = np.sqrt(np.diag(cov))
    largest = float(np.max(np.abs(step) / se, initial=0.0))  # (NaN stays NaN: not converged)
    if largest < STEP_TOL and _robust(fit) and meat is None:
        fit.meat_due = True  # the same step again, with the middle term (MEAT_AHEAD)
        return
    fit.iterations += 1
    fit.last_ratio = largest
    if largest < STEP_TOL:
        fit.beta = fit.beta.copy()
        fit.beta[a] += step
        fit.converged = True
        fit.cov = cov
        if meat is not None:
            fit.meat = meat[np.ix_(a, a)]
        fit.deviance, fit.pearson, fit.loglike_sum = float(stats[0]), float(stats[1]), float(stats[2])
        return
    _check_divergence(fit, se)
    fit.prev_beta, fit.prev_dev = fit.beta.copy(), dev
    fit.beta = fit.beta.copy()
    fit.beta[a] += step


def _nb_update(
    fit: ModelFit,
    score: np.ndarray,
    info: np.ndarray,
    stats: np.ndarray,
    theta_sums: np.ndarray,
    meat: np.ndarray | None = None,
) -> None:
    """One round of a negative binomial model: a scoring step for the coefficients at the
    current theta and a Newton step for log theta at the current means, together; both halved
    while the log-likelihood falls. Converged when both are below STEP_TOL standard errors."""
    llf = float(stats[2])
    if fit.prev_llf is not None and llf < fit.prev_llf - 1e-10 * (abs(fit.prev_llf) + 1.0):
        fit.halvings += 1
        if fit.halvings > MAX_HALVINGS:
            raise ModelError(
                f"model '{fit.spec.name}': the fit did not converge (the log-likelihood kept falling after {MAX_HALVINGS} step-halvings)."
            )
        fit.beta = (fit.beta + fit.prev_beta) / 2.0
        fit.log_theta = (fit.log_theta + fit.prev_log_theta) / 2.0
        return
    a = fit.active
    sub = info[np.ix_(a, a)]
    try:
        chol = scipy.linalg.cho_factor(sub)
        cov = scipy.linalg.cho_solve(chol, np.eye(sub.shape[0]))
    except (np.linalg.LinAlgError, ValueError):
        raise ModelError(
            f"model '{fit.spec.name}': the information matrix became singular during the fit; the design may be collinear."
        ) from None
    step = cov @ score[a]
    se = np.sqrt(np.diag(cov))
    # log theta: d loglik / d log theta = theta U, d^2 / d log theta^2 = theta^2 H + theta U.
    theta = float(np.exp(fit.log_theta))
    u, h = float(theta_sums[0]), float(theta_sums[1])
    gradient, curvature = theta * u, theta * theta * h + theta * u
    concave = curvature < 0
    log_step = -gradient / curvature if concave else float(np.sign(gradient)) * MAX_LOG_THETA_STEP
    log_step = float(np.clip(log_step, -MAX_LOG_THETA_STEP, MAX_LOG_THETA_STEP))
    tol = STEP_TOL / 10  # (linear convergence: what is left is about a tenth of the last step)
    # The largest step of the coefficients and of log theta, in standard errors (NaN stays NaN).
    largest = float(np.max(np.append(np.abs(step) / se, abs(log_step) * np.sqrt(abs(curvature)))))
    if concave and largest < tol and _robust(fit) and meat is None:
        fit.meat_due = True  # the same step again, with the middle term (MEAT_AHEAD)
        return
    fit.iterations += 1
    fit.last_ratio = largest
    if concave and largest < tol:
        fit.beta = fit.beta.copy()
        fit.beta[a] += step
        fit.log_theta += log_step
        fit.converged = True
        fit.cov = cov
        if meat is not None:
            fit.meat = meat[np.ix_(a, a)]
        fit.deviance, fit.pearson, fit.loglike_sum = float(stats[0]), float(stats[1]), llf
        fit.theta_second = h
        return
    new_log_theta = fit.log_theta + log_step
    low, high = float(np.log(THETA_MIN)), float(np.log(THETA_MAX))
    if new_log_theta > high:
        if fit.log_theta >= high - 1e-12:
            raise ModelError(
                f"model '{fit.spec.name}': theta grows beyond {THETA_MAX:g}: the counts vary no more than a "
                'Poisson model\'s (no over-dispersion), so theta is infinite; fit family = "poisson".'
            )
        new_log_theta = high
    elif new_log_theta < low:
        if fit.log_theta <= low + 1e-12:
            raise ModelError(
                f"model '{fit.spec.name}': theta falls below {THETA_MIN:g} (alpha above {1 / THETA_MIN:g}): the "
                "counts are too dispersed for a negative binomial model; check the outcome for extreme values."
            )
        new_log_theta = low
    _check_divergence(fit, se)
    fit.prev_beta, fit.prev_log_theta, fit.prev_llf = fit.beta.copy(), fit.log_theta, llf
    fit.beta = fit.beta.copy()
    fit.beta[a] += step
    fit.log_theta = new_log_theta


def _nb_null_update(null: ModelFit, main: ModelFit, score, info, stats) -> None:
    """A negative binomial model's null model, at the model's theta of each round: converged
    once its step is small at the model's final theta (one round after the model, at most)."""
    if null.prev_log_theta != null.log_theta:
        null.prev_dev = None  # deviances at different thetas are not compared
    null.prev_log_theta = null.log_theta
    _newton_update(null, score, info, stats)
    if null.converged and not (main.converged and null.log_theta == main.log_theta):
        null.converged = False


def _check_divergence(fit: ModelFit, se: np.ndarray) -> None:
    names = fit.active_names
    beta = fit.beta[fit.active]
    if fit.family.name != "gaussian":
        runaway = [
            names[i]
            for i in range(len(names))
            if names[i] != "Intercept" and ((abs(beta[i]) > 5 and se[i] > 10) or abs(beta[i]) > 30)
        ]
        if runaway and fit.iterations >= 3:
            listed = ", ".join(f"'{t}'" for t in runaway[:6])
            raise ModelError(
                f"model '{fit.spec.name}': perfect or quasi-perfect separation: the estimates for {listed} run off to infinity; merge levels or drop those terms."
            )
    if fit.iterations >= MAX_ROUNDS:
        raise ModelError(f"model '{fit.spec.name}': the fit did not converge in {MAX_ROUNDS} rounds.")

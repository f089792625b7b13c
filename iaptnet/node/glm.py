"""The node half of the exact federated GLM: what leaves the node for a regression.

- `glm.moments`: for centred/scaled terms, (n, mean, centred sum of squares) of the inner
  expression, so the coordinator can pool them exactly (Chan's formula).
- `glm.prepare`: filter, merges, complete cases and design matrix, built once per study and
  kept; the reply has the model's shape (column names, rows used, events, rows with a non-zero
  value per column and, for binomial models, events among them) and a local fit for the warm
  start: the information matrix I_k at the local estimate b_k and the vector I_k b_k; and a
  count table (rows used, events, rows in the cohort, rows dropped as missing) under the
  small-number rules, for display.
- `glm.round`: for each model's beta, the score X'r, the information X'WX (upper triangle)
  and the deviance, Pearson statistic and log-likelihood sum of the node's rows; for a
  negative binomial model (whose beta ends with log theta) also the theta score and its
  derivative over the same rows, at a theta within [THETA_MIN, THETA_MAX].

Each model has a companion null model (intercept only, same rows, same offset), fitted in the
same rounds, for the null deviance.

The task handlers are at the end of this module; the wire contract (task names, keys) is
protocol/kinds/glm.py.

Everything is declared to the node's policy (node/disclosure.py): the model statistics are
exact (a pooled fit equal to statsmodels needs them exact) and guarded by the model rules over
each model's facts; the per-round statistics are also declared with the row weights they sum
over (IRLS weights and fitted means), so coefficients that single out a few rows are refused.
"""

from __future__ import annotations

import math

import numpy as np

from ..protocol.errors import DataError
from ..protocol.families import THETA_MAX, THETA_MIN, get_family
from ..protocol.formula_check import check_formula
from ..protocol.kinds import MODULES as KIND_MODULES
from ..protocol.kinds import glm as protocol
from ..protocol.kinds import glmm as glmm_protocol
from ..protocol.kinds.glm import NULL_SUFFIX, studies_from_payload
from ..protocol.messages import pack_upper
from ..protocol.study import CR2_FAMILIES, StudySpec, check_at_node
from . import cr2
from .design import DesignedModel, build_design, evaluate_expression, model_selection, stateful_arguments, study_frame
from .disclosure import LevelCount, ModelFacts, Refusal, Release, Violation, require_rows, task_rules
from .registry import handler
from .runtime import NodeRuntime, PreparedStudy

LOCAL_MAX_ITER = 25


def single_study(payload: dict, schema, what: str) -> tuple[str, StudySpec]:
    """The one study of a task that carries exactly one (meta, its, ...), checked against this
    node's schema."""
    specs = studies_from_payload(payload)
    if len(specs) != 1:
        raise DataError(f"a task of kind '{what}' carries exactly one study.")
    key, spec = next(iter(specs.items()))
    check_at_node(spec, schema)
    return key, spec


def plain_glm(spec: StudySpec) -> StudySpec:
    """`spec` when it is a GLM study or a GLM another study derives, without a random intercept.

    - A study of another kind (psm, iptw, meta, its, access, table) is approved under its hash
      as that kind: its formula fitted as a GLM would be a model the Trust never approved (a
      psm or iptw study's outcome model on the whole cohort, unmatched and unweighted), so the
      glm.* tasks refuse it; the GLMs such a study derives are of kind "glm" and name it
      (`params["derived_from"]`, checked at the gate: protocol/study.py's `approval_hash`).
    - A model that reads columns this node computed for a study (`augment`: matched pairs,
      weights, segments) must be one that study derives: otherwise, under the exploratory
      policy, a coordinator could fit those private columns in a model of its own choosing.
    - A study with a random intercept (its `params`, protocol/kinds/glmm.py) is a mixed model,
      approved as such under its hash: the glm.* tasks would release a plain GLM's statistics
      for it, so they refuse it (its tasks are glmm.*)."""
    if spec.kind != "glm":
        kind = f"kind '{spec.kind}'" if spec.kind in KIND_MODULES else "another kind"  # never echo any text sent
        raise DataError(
            f"model '{spec.name}' is a study of {kind}, which its own tasks compute: the glm tasks fit GLM studies "
            "and the models a study derives."
        )
    params = spec.params if isinstance(spec.params, dict) else {}
    if spec.augment and not isinstance(params.get("derived_from"), dict):
        raise DataError(
            f"model '{spec.name}' reads columns this node computed for a study but names no study that derives it, "
            "so the glm tasks do not fit it."
        )
    if any(name in params for name in glmm_protocol.FIELDS):
        raise DataError(
            f"model '{spec.name}' has a random intercept, which a plain GLM's tasks would leave out: it is fitted by "
            "the glmm tasks."
        )
    return spec


def moments(dataset, payload: dict, release: Release, augments=None) -> None:
    """(n, mean, M2) of each centred/scaled expression over the model's complete cases."""
    for key, spec in studies_from_payload(payload).items():
        plain_glm(spec)
        view = dataset.for_study(spec)  # the service column with the network's levels
        check_at_node(spec, view.schema)
        parsed = check_formula(spec.formula, spec.schema_with_augment(view.schema), spec.family, spec.source)
        rows, used, _, _ = model_selection(study_frame(view.frame, spec, augments), spec, parsed)
        require_rows(used, spec.name, task_rules())
        facts = ModelFacts(spec.name, used)
        section = release.model(key, facts, group="moments")
        for i, (_expr, inner) in enumerate(stateful_arguments(parsed).items()):
            values = evaluate_expression(rows, inner) if len(rows) else np.zeros(0)
            facts.columns.append((inner, values))
            n = float(len(values))
            mean = float(values.mean()) if n else 0.0
            m2 = float(np.sum((values - mean) ** 2)) if n else 0.0
            section.array(protocol.moments_key(key, i), np.array([n, mean, m2]))


def model_facts(
    label: str, design: DesignedModel, family: str, clusters_chosen: bool = False, clusters_sized: bool = False
) -> ModelFacts:
    """What the policy judges a model by (kept at the node): its rows (those with a positive
    prior weight), events, levels, leverage, prior weights and offset, and the columns its
    statistics sum over for the differencing audit: each 0/1 design column as an indicator,
    every other one (and the offset) as values; with prior weights every column, the
    intercept included, is a weighted column."""
    events = None
    if family == "binomial":
        events = int(np.count_nonzero(design.y == 1))
    elif family in ("poisson", "negative_binomial"):
        events = int(np.count_nonzero(design.y > 0))
    mask = np.asarray(design.mask, dtype=bool).copy()
    positions = np.flatnonzero(mask)
    keep = np.ones(design.n, dtype=bool)
    if design.weights is not None and design.n:
        keep = design.weights > 0
        mask[positions[~keep]] = False
        positions = positions[keep]
    indicators, columns = [], []
    if design.n:
        X = design.X[keep]
        w = design.weights[keep] if design.weights is not None else None
        if w is not None:
            columns.append(("prior weights", w))
        present = np.any(X != 0, axis=0)
        binary = np.all((X == 0) | (X == 1), axis=0) if w is None else np.zeros(X.shape[1], dtype=bool)
        for j, name in enumerate(design.names):
            if name == "Intercept" or not present[j]:
                continue
            col = X[:, j]
            if binary[j]:
                indicators.append((name, positions[col == 1]))
            else:
                columns.append((name, col * w if w is not None else col))
        off = design.offset[keep]
        if off.size and np.any(off != off[0]):
            columns.append(("offset", off * w if w is not None else off))
    levels = list(design.levels)
    if clusters_chosen and design.clusters is not None and design.n:
        # Cluster-robust SEs release, at coefficients the coordinator chooses, a quadratic sum
        # per cluster: a cluster of a few people, on a column the analyst chose, is their sums.
        # Judged like levels (never named: a cluster's value is a row's), and remembered as
        # row sets. (Clusters the node makes itself, a propensity study's matched pairs, are
        # never known to the analyst, who cannot weigh one against another.)
        clusters = design.clusters[keep]
        counts = np.bincount(clusters)
        # CR2's adjusted sums are a model's statistics of each cluster's rows (`clusters_sized`):
        # such a cluster is held to min_rows as well.
        levels += [
            LevelCount("the clusters", None, int(c), cluster=True, model_sized=clusters_sized) for c in counts if c
        ]
        indicators += [("cluster", positions[clusters == c]) for c in np.flatnonzero(counts)]
    return ModelFacts(
        label,
        mask,
        parameters=design.parameters,
        family=family,
        events=events,
        levels=levels,
        max_leverage=design.max_leverage(),
        indicators=indicators,
        columns=columns,
        weights=design.weights,
        offset=design.offset if design.n and np.any(design.offset != 0) else None,
    )


def prepare(dataset, payload: dict, release: Release, augments=None):
    """Design every model of the task and declare what the reply releases.

    Returns (designs, facts, local estimates) keyed by model key, null models included."""
    specs = studies_from_payload(payload)
    states = payload.get("transform_state", {})
    if not isinstance(states, dict):
        raise DataError("the task's transform state is not a table.")
    optional = payload.get("optional") or []
    if not isinstance(optional, list) or not all(isinstance(k, str) and k in specs for k in optional):
        raise DataError("the task's optional models are not keys of its models.")
    designs: dict[str, DesignedModel] = {}
    facts: dict[str, ModelFacts] = {}
    local: dict[str, np.ndarray] = {}
    declined: list[str] = []
    for key, spec in specs.items():
        plain_glm(spec)
        view = dataset.for_study(spec)  # the service column with the network's levels
        try:
            design = build_design(
                study_frame(view.frame, spec, augments),
                view.schema,
                spec,
                states.get(key),
                gate=lambda rows, name=spec.name: require_rows(rows, name, task_rules()),
                counterfactual=spec.marginal,
            )
        except Refusal as refusal:
            if key not in optional or refusal.rule != "min_rows":
                raise
            declined.append(key)  # the same answer for 0 rows and for a few
            continue
        family = get_family(spec.family)
        if spec.cov_type == "CR2" and spec.family not in CR2_FAMILIES:
            raise DataError(
                f"model '{spec.name}': CR2 standard errors are computed for {', '.join(CR2_FAMILIES)} models."
            )
        problem = family.check_outcome(design.y) if design.n else None
        if problem:
            raise DataError(f"model '{spec.name}': {problem}.")
        designs[key] = design
        designs[key + NULL_SUFFIX] = _null_design(design)
        chosen = spec.cluster is not None and spec.cluster in dataset.schema
        facts[key] = model_facts(
            spec.name, design, spec.family, clusters_chosen=chosen, clusters_sized=spec.cov_type == "CR2"
        )
        facts[key + NULL_SUFFIX] = facts[key]
        section = release.model(key, facts[key])
        section.value("columns", list(design.names))
        section.value("n_used", design.n)
        section.value("events", float(design.y.sum()) if spec.family != "gaussian" else None)
        section.value("nnz", np.count_nonzero(design.X, axis=0).tolist())
        if spec.cov_type == "cluster":
            section.value("n_clusters", design.n_clusters)
        elif spec.cov_type == "CR2":
            section.value("n_clusters", cr2.cluster_count(design))
        if spec.cov_type in ("cluster", "CR2") and chosen:
            # Whether two nodes hold rows of one cluster (the sandwich would count it twice).
            section.value("cluster_digests", cr2.cluster_digests(design, spec))
        if spec.family == "binomial":
            # Per 0/1 column: is it an indicator, and how many of its rows have the outcome.
            # Lets the coordinator name a perfectly predicting level before iterating.
            nonzero = design.X != 0
            section.value("indicator", np.all((design.X == 0) | (design.X == 1), axis=0).tolist())
            section.value("events_nnz", (design.y @ nonzero).tolist() if design.n else [0.0] * design.X.shape[1])
        nb = family.name == "negative_binomial"
        for model_key in (key, key + NULL_SUFFIX):
            # A negative binomial model starts, as glm.nb does, from the Poisson fit.
            info, ibeta, local[model_key], weights = local_fit(
                designs[model_key], get_family("poisson") if nb else family
            )
            null = model_key.endswith(NULL_SUFFIX)
            section.rests_on({f"{name} of the null model" if null else name: w for name, w in weights.items()})
            if nb:  # the node's own fit has a theta too (kept for the history, not released)
                theta = local_theta(designs[model_key], local[model_key])
                local[model_key] = np.append(local[model_key], math.log(theta))
            section.array(protocol.local_info_key(model_key), pack_upper(info))
            section.array(protocol.local_ibeta_key(model_key), ibeta)
        release_counts(release, key, design, spec.family)
    if declined:
        release.public("declined", declined)
    return designs, facts, local


def round_contributions(
    prepared,
    betas: dict[str, np.ndarray],
    release: Release,
    marginal: dict[str, list[str]] | None = None,
    cr2_request: dict | None = None,
    meat_request: set[str] | None = None,
) -> None:
    """Declare score, packed information and [deviance, pearson, loglike sum]
    per model, with the row weights they sum over and those of the rounds answered before;
    with `marginal`, the standardised fitted means of the models' exposures set to 1 and 0;
    with `cr2_request` ({key: (active columns, pooled inverse information)}), the sums of a
    CR2 model's clusters (node/cr2.py); for the robust models in `meat_request`, the middle
    term of their sandwich. (A robust model's squared residuals are judged in every round,
    asked or not: what the node judges never depends on what this round happens to ask.)"""
    marginal = marginal or {}
    cr2_request = cr2_request or {}
    meat_request = meat_request or set()
    if any(prepared.cov_types.get(key) not in ("HC0", "cluster") for key in meat_request & set(betas)):
        raise DataError("the round asks for the robust middle term of a model that has no robust SEs in this round.")
    if any(prepared.cov_types.get(key) != "CR2" or key not in betas for key in cr2_request):
        raise DataError("the round asks for CR2 sums of a model that is not a CR2 model of this round.")
    for key, beta in betas.items():
        design = prepared.designs[key]
        family = get_family(prepared.families[key])
        nb = family.name == "negative_binomial"
        expected = design.X.shape[1] + nb
        if beta.shape != (expected,):
            raise DataError(f"model '{key}': expected {expected} coefficients, received {beta.size}.")
        cov_type = prepared.cov_types.get(key, "nonrobust")
        beta = np.asarray(beta, dtype=float)
        finite = bool(np.all(np.isfinite(beta)))
        if nb and finite:
            family = _at_theta(family, beta, prepared.facts[key].label)
        weights, history = {}, {}
        # The HC0 middle term sum r_i^2 x_i x_i' is X'WX with W = r^2 at coefficients the
        # coordinator chose: its weights are judged like the IRLS weights, Gaussian models too.
        robust = cov_type == "HC0"
        exposures = marginal.get(key, [])
        if any(term not in design.counterfactual for term in exposures):
            raise DataError(f"model '{key}': the round asks for marginal effects of a term the study did not name.")
        if finite and (family.name != "gaussian" or robust) and design.n:
            weights = row_weights(design, family, beta, robust)
            history = _history_weights(prepared, key, design, family, robust)
        if finite and family.name != "gaussian" and design.n:
            for term in exposures:  # the counterfactual fitted means are weights of their sums,
                weights.update(counterfactual_weights(design, family, beta[:-1] if nb else beta, term))
                # compared with the same at every round answered before (and the node's own fit)
                for previous in prepared.history.get(key, []):
                    if previous.shape == beta.shape:
                        at = family.at(float(np.exp(np.clip(previous[-1], -700, 700)))) if nb else family
                        for name, v in counterfactual_weights(
                            design, at, previous[:-1] if nb else previous, term
                        ).items():
                            history.setdefault(name, []).append(v)
        section = release.round(
            key,
            prepared.facts[key],
            coefficients=beta,
            weights=weights,
            history=history,
            bounded=family.name != "gaussian",
        )
        if finite:
            coefficients = beta[:-1] if nb else beta
            score, info, stats = evaluate(design, family, coefficients)
            section.array(protocol.score_key(key), score)
            section.array(protocol.info_key(key), pack_upper(info))
            section.array(protocol.stats_key(key), stats)
            if key in meat_request:
                section.array(protocol.meat_key(key), pack_upper(meat(design, family, coefficients, cov_type)))
            if key in cr2_request:
                active, bread = cr2_request[key]
                sums = cr2.node_release(design, family, coefficients, active, bread, prepared.facts[key].label)
                section.array(protocol.cr2_meat_key(key), pack_upper(sums[0]))
                section.array(protocol.cr2_trace_key(key), sums[1])
                section.array(protocol.cr2_cross_key(key), np.concatenate([pack_upper(s) for s in sums[2]]))
            if nb and not key.endswith(NULL_SUFFIX):
                # Sums over the same rows as the score (prior weight 0: nothing), at the theta
                # judged above; their outcome weights are among the round's weights.
                section.array(protocol.theta_key(key), np.array(theta_sums(design, family, coefficients)))
            for i, term in enumerate(exposures):
                section.array(protocol.marginal_key(key, i), marginal_sums(design, family, coefficients, term))
        release.after(lambda key=key, beta=beta, weights=weights: _remember_round(prepared, key, beta, weights))


def _counterfactual_means(design: DesignedModel, family, beta: np.ndarray, term: str):
    """(mu1, dmu/deta at 1, X1, mu0, dmu/deta at 0, X0) with the marginal entry `term`'s
    exposure set to 1 and 0 (a contrast: to its first and second value)."""
    out = []
    for Z in design.counterfactual[term]:
        with np.errstate(over="ignore", invalid="ignore"):
            eta = Z @ beta + design.offset
            mu = family.mean(eta)
            slope = {"binomial": mu * (1.0 - mu), "gaussian": np.ones_like(mu)}.get(family.name, mu)
        out += [mu, slope, Z]
    return out


def counterfactual_weights(design: DesignedModel, family, beta: np.ndarray, term: str) -> dict[str, np.ndarray]:
    """The row weights of the marginal sums: the fitted means with the exposure set to 1 and to
    0, or to a contrast's two values (and, for binomial, their derivatives), judged like a
    round's fitted means."""
    mu1, slope1, _, mu0, slope0, _ = _counterfactual_means(design, family, beta, term)
    one, zero = design.settings.get(term) or (f"{term} = 1", f"{term} = 0")
    out = {f"fitted with {one}": mu1, f"fitted with {zero}": mu0}
    if family.name == "binomial":
        out[f"information with {one}"] = slope1
        out[f"information with {zero}"] = slope0
    return out


def marginal_sums(design: DesignedModel, family, beta: np.ndarray, term: str) -> np.ndarray:
    """(sum w mu1, sum w mu0, sum w, sum w mu'(eta1) x1, sum w mu'(eta0) x0) over the model's
    rows, w the prior weights (rows of weight 0 add nothing)."""
    p = design.X.shape[1]
    if design.n == 0:
        return np.zeros(3 + 2 * p)
    mu1, slope1, X1, mu0, slope0, X0 = _counterfactual_means(design, family, beta, term)
    w = design.weights if design.weights is not None else np.ones(design.n)
    return np.concatenate([[w @ mu1, w @ mu0, w.sum()], X1.T @ (w * slope1), X0.T @ (w * slope0)])


def _at_theta(family, vector: np.ndarray, label: str):
    """The negative binomial family at the theta a round's vector ends with (its log), which
    must lie within [THETA_MIN, THETA_MAX]: beyond, theta + y drops a count's low bits and the
    sums would count the rows above a threshold (docs/governance/privacy/glm.md)."""
    log_theta = float(vector[-1])
    if not math.log(THETA_MIN) <= log_theta <= math.log(THETA_MAX):
        raise Refusal(
            Violation(
                "theta_range",
                f"the negative binomial theta sent lies outside {THETA_MIN:g} to {THETA_MAX:g}",
                THETA_MAX,
                model=label,
                fix='a theta beyond 1e6 is a Poisson model: fit family = "poisson"',
            )
        )
    return family.at(math.exp(log_theta))


def theta_sums(design: DesignedModel, family, beta: np.ndarray) -> tuple[float, float]:
    """The theta score and its derivative over the model's rows (prior-weighted)."""
    if design.n == 0:
        return 0.0, 0.0
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        mu = np.exp(design.X @ beta + design.offset)
        return family.theta_sums(design.y, mu, design.weights)


def local_theta(design: DesignedModel, beta: np.ndarray) -> float:
    """The node's own theta at its own fit (theta.ml from the moment estimate): its rounds are
    part of the history later rounds are compared with, never released."""
    from ..protocol.families import NegativeBinomial

    theta = 1.0
    if design.n:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            mu = np.exp(design.X @ beta + design.offset)
            moments = float(np.sum((design.y / mu - 1.0) ** 2))
            theta = design.n / moments if moments > 0 else THETA_MAX
            for _ in range(LOCAL_MAX_ITER):
                theta = min(max(abs(theta), THETA_MIN), THETA_MAX)
                score, second = NegativeBinomial(theta).theta_sums(design.y, mu, design.weights)
                if not (np.isfinite(score) and np.isfinite(second)) or second >= 0:
                    break
                step = -score / second
                theta += step
                if abs(step) < 1e-4 * theta:
                    break
    return float(min(max(theta, THETA_MIN), THETA_MAX)) if np.isfinite(theta) else 1.0


def _remember_round(prepared, key: str, beta: np.ndarray, weights: dict) -> None:
    """An answered round joins the history the next rounds are compared with; its weights
    are kept so they need not be computed again."""
    prepared.history.setdefault(key, []).append(beta.copy())
    if weights:
        prepared.weight_cache.setdefault(key, []).append(weights)


def _history_weights(
    prepared, key: str, design: DesignedModel, family, robust: bool = False
) -> dict[str, list[np.ndarray]]:
    """The weights at every coefficient vector answered before (and the node's own fit),
    computed once each and cached."""
    previous = prepared.history.get(key, [])
    cache = prepared.weight_cache.setdefault(key, [])
    if len(cache) < len(previous):
        missing = row_weights_many(design, family, previous[len(cache) :], robust)
        for j in range(len(previous) - len(cache)):
            cache.append({name: vectors[j] for name, vectors in missing.items()})
    out: dict[str, list[np.ndarray]] = {}
    for entry in cache:
        for name, vector in entry.items():
            out.setdefault(name, []).append(vector)
    return out


#: The name of the HC0 middle term's row weights in a round's declaration.
SQUARED_RESIDUALS = "squared residual"


def row_weights(design: DesignedModel, family, beta: np.ndarray, robust: bool = False) -> dict[str, np.ndarray]:
    """The row weights a round's statistics are sums over: the IRLS weights W of X'WX, and
    for the score X'(y - mu) the fitted means (and 1 - mu for binomial: X'1 is known); with
    HC0 robust SEs, the squared residuals of the middle term (Gaussian models: only those,
    their W is constant). A negative binomial model's `beta` ends with log theta (and
    `family` is at that theta)."""
    if family.name == "negative_binomial":
        beta = beta[:-1]
    return _weights_at(design, family, design.X @ beta + design.offset, robust)


def row_weights_many(
    design: DesignedModel, family, betas: list[np.ndarray], robust: bool = False
) -> dict[str, list[np.ndarray]]:
    """The same weights at each of several coefficient vectors (rounds answered before)."""
    out: dict[str, list[np.ndarray]] = {}
    if design.n == 0:
        return out
    nb = family.name == "negative_binomial"
    coefficients = [b[:-1] for b in betas] if nb else betas
    etas = design.X @ np.column_stack(coefficients) + design.offset[:, None]
    for j in range(etas.shape[1]):
        at = family.at(float(np.exp(np.clip(betas[j][-1], -700, 700)))) if nb else family
        for name, v in _weights_at(design, at, etas[:, j], robust).items():
            out.setdefault(name, []).append(v)
    return out


def _weights_at(design: DesignedModel, family, eta: np.ndarray, robust: bool = False) -> dict[str, np.ndarray]:
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        mu, w, r = family.working(design.y, eta)
        if design.weights is not None:
            r = r * design.weights
    out = {} if family.name == "gaussian" else {"information": w}
    if family.name == "binomial":
        out["fitted"] = mu
        out["fitted complement"] = 1.0 - mu
    elif family.name == "poisson":
        out["fitted"] = mu
    elif family.name == "negative_binomial":
        # The score weighs each row's outcome by theta / (theta + mu), the theta score by
        # 1 / (theta + mu) and its derivative by the square: small for rows of large fitted
        # means, so weights the coordinator can concentrate on a few rows through theta and
        # beta together (a tiny theta makes them theta / mu), judged like the fitted means.
        out["fitted"] = mu
        with np.errstate(over="ignore", invalid="ignore"):
            share = family.theta / (family.theta + mu)
        out["outcome"] = share
        out["outcome curvature"] = share * share
    if robust:
        with np.errstate(over="ignore", invalid="ignore"):
            out[SQUARED_RESIDUALS] = r * r
    return out


def evaluate(design: DesignedModel, family, beta: np.ndarray):
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return _evaluate(design, family, beta)


def _evaluate(design: DesignedModel, family, beta: np.ndarray):
    X, pw = design.X, design.weights
    eta = X @ beta + design.offset
    mu, w, r = family.working(design.y, eta)
    if pw is not None:
        w, r = w * pw, r * pw
    score = X.T @ r
    info = weighted_gram(X, w)
    if design.n:
        dev, llsum = family.deviance_and_loglike(design.y, mu, eta, pw)
        pearson = family.pearson(design.y, mu, pw)
    else:
        dev, llsum, pearson = family.deviance(design.y, mu, eta, pw), 0.0, 0.0
    return score, info, np.array([dev, pearson, llsum])


def meat(design: DesignedModel, family, beta: np.ndarray, cov_type: str) -> np.ndarray:
    """The middle of the sandwich: sum of outer products of score contributions, per row
    (HC0) or per cluster (each cluster lies within this node, so the pooled sum is exact)."""
    X = design.X
    p = X.shape[1]
    if design.n == 0:
        return np.zeros((p, p))
    with np.errstate(over="ignore", invalid="ignore"):
        _, _, r = family.working(design.y, X @ beta + design.offset)
    if design.weights is not None:
        r = r * design.weights
    if cov_type == "HC0":
        return weighted_gram(X, r * r)
    order = np.argsort(design.clusters, kind="stable")
    codes = design.clusters[order]
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    per_cluster = np.add.reduceat(X[order] * r[order, None], starts, axis=0)
    return per_cluster.T @ per_cluster


def release_counts(release: Release, key: str, design: DesignedModel, family: str) -> None:
    """A model's count table (rows used, events, cohort, dropped as missing), under the
    small-number rules (rounded, small counts suppressed) like every table."""
    table = release.table(key, group="counts")
    table.count("n_used", design.n)
    if family != "gaussian":
        table.count("events", float(design.y.sum()))
    table.count("n_cohort", design.n_cohort)
    table.count("n_missing", design.n_missing)


@np.errstate(over="ignore", invalid="ignore", divide="ignore")  # a fit that runs off ends below; sums are judged finite
def local_fit(design: DesignedModel, family) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """This node's own maximum-likelihood fit, for the coordinator's warm start.

    Returns (I_k, I_k b_k, b_k, weights) at the local estimate b_k (b_k itself is not released,
    but the coordinator can compute it, so later rounds are compared with it). `weights` are
    the row weights the released sums rest on, at b_k and at the step I_k was taken at: the
    caller has them judged as a round's (an offset such as 8 * age puts a log-link fit's whole
    weight on the oldest few, at coefficients no coordinator sent). Columns the node cannot estimate
    (levels it has no rows of, local separation) get the minimum-norm solution; they carry
    little or no information, so the pooled combination sum(I_k)^-1 sum(I_k b_k) is still a
    good start.
    """
    X, y, off = design.X, design.y, design.offset
    pw = design.weights if design.weights is not None else 1.0
    p = X.shape[1]
    if design.n == 0:
        return np.zeros((p, p)), np.zeros(p), np.zeros(p), {}
    mu = _starting_mu(family.name, y)
    eta = family_link(family.name, mu)
    beta = np.zeros(p)
    info = None
    info_at = None  # the coefficients of I_k's step (None: the start, whose weights rest on y alone)
    for it in range(LOCAL_MAX_ITER):
        if it == 0:
            w = family.variance(mu) * pw
            z = eta - off + (y - mu) / family.variance(mu)
            # Binomial and gaussian start with one weight for every row: X'X, shared with
            # the leverage check, scaled.
            step_info = w[0] * design.gram() if np.all(w == w[0]) else weighted_gram(X, w)
            new = _min_norm_solution(step_info, X.T @ (w * z))
        else:
            mu, w, r = family.working(y, X @ beta + off)
            step_info = weighted_gram(X, w * pw)
            new = beta + _min_norm_solution(step_info, X.T @ (r * pw))
        if not np.all(np.isfinite(new)):
            break
        info, info_at = step_info, (beta if it else None)
        # A warm start needs no more precision than this: a node's own estimate differs from
        # the pooled one by far more (sampling noise), and the pooled Newton rounds polish
        # it (the catalogue takes the same number of rounds at 1e-4).
        converged = np.max(np.abs(new - beta)) < 1e-2 * (1.0 + np.max(np.abs(new)))
        beta = new
        if converged or np.max(np.abs(beta)) > 50:
            break
    if info is None or np.max(np.abs(beta)) > 50 or not np.all(np.isfinite(beta)):
        _, w, _ = family.working(y, X @ beta + off)
        info, info_at = weighted_gram(X, w * pw), beta
    # Otherwise I_k is the information of the last step, taken within 1e-4 of b_k: the
    # coordinator only needs a consistent pair (I_k, I_k b_k) to combine, and it saves one
    # pass over the rows.
    weights = row_weights(design, family, beta)
    if info_at is not None and info_at is not beta:
        weights |= {f"{name} (step before)": v for name, v in row_weights(design, family, info_at).items()}
    return info, info @ beta, beta, weights


def _min_norm_solution(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """lstsq's minimum-norm solution of a x = b; NaN when a or b is not finite (values near a
    float's limits), which ends the local fit, rather than LAPACK's complaint on the terminal."""
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return np.full(a.shape[1], np.nan)
    return np.linalg.lstsq(a, b, rcond=None)[0]


def weighted_gram(X: np.ndarray, w: np.ndarray) -> np.ndarray:
    """X'WX for non-negative weights, as (sqrt(W)X)'(sqrt(W)X): numpy hands A.T @ A to
    BLAS's symmetric rank-k update, which does half the work of a general product."""
    A = X * np.sqrt(w)[:, None]
    return A.T @ A


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
    return DesignedModel(
        ["Intercept"],
        np.ones((design.n, 1)),
        design.y,
        design.offset,
        design.n_cohort,
        design.n_missing,
        design.mask,
        [],
        weights=design.weights,
    )


# --------------------------------------------------------------------------- the task handlers


@handler(protocol.MOMENTS, studies="payload")
def glm_moments(runtime: NodeRuntime, task) -> Release:
    release = Release()
    moments(runtime.dataset, task.payload, release, runtime.augments)
    return release


@handler(protocol.PREPARE, studies="payload")
def glm_prepare(runtime: NodeRuntime, task) -> Release:
    """Designs built once and kept (PreparedStudy) for the rounds; the rounds this node
    answered for the study before (a restart) join the history the probing defence uses."""
    dataset = runtime.dataset
    release = Release()
    designs, facts, local = prepare(dataset, task.payload, release, runtime.augments)
    families, cov_types = {}, {}
    for key, spec in studies_from_payload(task.payload).items():
        families[key] = families[key + NULL_SUFFIX] = spec.family
        cov_types[key] = spec.cov_type
    release.public("data_version", dataset.data_version)
    declined = {k for k in families if k not in designs}  # optional models too small here
    answered = runtime.memory.answered_rounds(task.study_hash, dataset.data_version)
    history = {key: [beta, *(b for b in answered.get(key, []) if b.shape == beta.shape)] for key, beta in local.items()}
    prepared = PreparedStudy(
        designs=designs, families=families, cov_types=cov_types, facts=facts, history=history, declined=declined
    )
    release.after(lambda: runtime.remember(task.study_hash, prepared))
    return release


@handler(protocol.ROUND, studies="prepared")
def glm_round(runtime: NodeRuntime, task) -> Release:
    prepared = runtime.recall(task.study_hash)
    if type(prepared) is not PreparedStudy:  # a random intercept's (glmm.prepare), a table's (describe)
        labels = sorted({f.label for f in prepared.facts.values()})
        what = "model " + ", ".join(f"'{label}'" for label in labels[:3]) if labels else "the study"
        raise DataError(
            f"{what} was not prepared by glm.prepare (a model with a random intercept is fitted by glmm.round), "
            "so glm.round does not continue it."
        )
    prepared.rounds += 1
    betas = protocol.betas_from_arrays(task.arrays)
    meat_request = protocol.meat_from_payload(task.payload)
    unknown = (set(betas) | meat_request) - set(prepared.designs) - prepared.declined
    if unknown:
        raise DataError("the task names a model this study did not prepare.")
    betas = {k: v for k, v in betas.items() if k in prepared.designs}  # nothing for declined models
    release = Release()
    round_contributions(
        prepared,
        betas,
        release,
        protocol.marginal_from_payload(task.payload),
        protocol.cr2_from_payload(task.payload, task.arrays),
        meat_request,
    )
    version = runtime.dataset.data_version
    release.remember(lambda: runtime.memory.remember_rounds(task.study_hash, version, betas))
    return release

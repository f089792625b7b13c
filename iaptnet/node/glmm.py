"""The node half of the random-intercept GLM (a GLM study with `random_intercept = COLUMN`).

- `glmm.prepare`: the design (as glm.prepare's, the group column among the complete-case
  columns), judged by the model rules plus one: every group of the random intercept must have
  at least `min_level_count` rows (a round's sums depend on each group's rows together, so a
  group of a few people would be their statistic); the groups' row sets join the differencing
  audit like design columns. The reply has the design's shape, the number of groups and a tag
  per group (sha256 of the study hash and the group's value: the coordinator refuses a group
  found at two nodes), and the node's own GLM fit for the warm start.
- `glmm.round`: at (beta, sigma) the sums over the node's groups of the log marginal likelihood
  and its exact gradient and Hessian (node/glmm_likelihood.py), declared with the row weights
  they rest on (fitted means and information weights at each group's mode, and for quadrature
  the fitted means averaged over its points), judged like a GLM round's against every round
  answered before; gaussian: at theta, Z'V^-1 Z and log det V with their derivatives (closed
  form, no per-round weights: as a gaussian GLM's, they depend on theta through known algebra).

The wire contract is protocol/kinds/glmm.py.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from ..protocol.errors import DataError
from ..protocol.families import get_family
from ..protocol.kinds import glmm as protocol
from ..protocol.kinds.glm import studies_from_payload
from ..protocol.messages import pack_upper
from .design import apply_merges, build_design, study_frame
from .disclosure import LevelCount, Release, require_rows, task_rules
from .glm import local_fit, model_facts, moments, release_counts
from .glmm_likelihood import GroupDesign, Groups, MarginalLikelihood, gaussian_sums
from .registry import handler
from .runtime import NodeRuntime, PreparedStudy

#: How a refusal names a group below the minimum (never by its value).
GROUP_WHAT = "a group of the random intercept"


@dataclass
class MixedPrepared(PreparedStudy):
    """A prepared random-intercept study: per model its groups' design and likelihood."""

    mixed: dict = field(default_factory=dict)  # model key -> (RandomIntercept, GroupDesign)


def group_tag(study_hash: str, value) -> str:
    """What a node says of one group: the same at every node for the same value, and nothing
    else about it."""
    return hashlib.sha256(f"{study_hash}:{value}".encode()).hexdigest()[:32]


def prepare(runtime: NodeRuntime, task, release: Release) -> MixedPrepared:
    dataset = runtime.dataset
    specs = studies_from_payload(task.payload)
    states = task.payload.get("transform_state", {})
    if not isinstance(states, dict):
        raise DataError("the task's transform state is not a table.")
    prepared = MixedPrepared(designs={}, families={})
    for key, spec in specs.items():
        view = dataset.for_study(spec)  # the service column with the network's levels
        ri = protocol.node_settings(spec, view.schema)
        # The design as a GLM's, with the group column among the columns a row needs.
        grouped = replace(spec, params={}, cluster=ri.column, cov_type="cluster")
        design = build_design(
            study_frame(view.frame, spec, runtime.augments),
            view.schema,
            grouped,
            states.get(key),
            gate=lambda rows, name=spec.name: require_rows(rows, name, task_rules()),
        )
        family = get_family(spec.family)
        problem = family.check_outcome(design.y) if design.n else None
        if problem:
            raise DataError(f"model '{spec.name}': {problem}.")
        # The groups of the design's rows (in their order), level merges applied.
        column = apply_merges(view.frame.loc[design.mask, [ri.column]], spec)[ri.column]
        codes, values = pd.factorize(column, sort=True)
        facts = model_facts(spec.name, design, spec.family)
        positions = np.flatnonzero(design.mask)
        counts = np.bincount(codes, minlength=len(values))
        facts.levels += [LevelCount(ri.column, None, int(c), cluster=True, what=GROUP_WHAT) for c in counts]
        facts.indicators += [("group", positions[codes == g]) for g in range(len(values))]
        section = release.model(key, facts)
        section.value("columns", list(design.names))
        section.value("n_used", design.n)
        section.value("events", float(design.y.sum()) if spec.family != "gaussian" else None)
        section.value("nnz", np.count_nonzero(design.X, axis=0).tolist())
        section.value("n_groups", len(values))
        section.value("group_tags", sorted(group_tag(task.study_hash, _plain(v)) for v in values))
        info, ibeta, local, weights = local_fit(design, family)
        section.rests_on(weights)
        section.array(protocol.local_info_key(key), pack_upper(info))
        section.array(protocol.local_ibeta_key(key), ibeta)
        release_counts(release, key, design, spec.family)
        prepared.designs[key] = design
        prepared.families[key] = spec.family
        prepared.facts[key] = facts
        prepared.history[key] = [np.append(local, 0.0)] if spec.family != "gaussian" else []
        groups = Groups(codes, len(values))
        prepared.mixed[key] = (ri, GroupDesign(design.X, design.y, design.offset, groups))
    return prepared


def _plain(value) -> str:
    """A group's value as the same text at every node (an integer column's 7 and 7.0 alike)."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    if isinstance(value, (np.integer,)):
        return str(int(value))
    return str(value)


def round_contributions(prepared: MixedPrepared, parameters: dict[str, np.ndarray], release: Release) -> None:
    for key, vector in parameters.items():
        if key not in prepared.mixed:
            raise DataError("the task names a model this study did not prepare.")
        ri, design = prepared.mixed[key]
        family = prepared.families[key]
        vector = np.asarray(vector, dtype=float)
        expected = 1 if family == "gaussian" else design.p + 1
        if vector.shape != (expected,):
            raise DataError(f"model '{key}': expected {expected} parameters, received {vector.size}.")
        finite = bool(np.all(np.isfinite(vector)))
        if finite and vector[-1] < 0:
            raise DataError(f"model '{key}': the random intercept's standard deviation sent is negative.")
        facts = prepared.facts[key]
        if family == "gaussian":
            # (The size rule leaves no node without rows, so every node has groups.)
            section = release.round(key, facts, coefficients=vector, weights={}, bounded=True)
            if finite:
                cross, logdet = gaussian_sums(design, float(vector[0]))
                for order, matrix in enumerate(cross):
                    section.array(protocol.cross_key(key, order), pack_upper(matrix))
                section.array(protocol.logdet_key(key), logdet)
            continue
        likelihood = MarginalLikelihood(design, family, ri.nagq)
        weights, history, sums = {}, {}, None
        if finite:
            with np.errstate(all="ignore"):
                sums = likelihood.evaluate(vector[:-1], float(vector[-1]))
            weights = sums[3]
            history = _history_weights(prepared, key, likelihood)
        section = release.round(key, facts, coefficients=vector, weights=weights, history=history, bounded=True)
        if finite:
            section.array(protocol.loglik_key(key), np.array([sums[0]]))
            section.array(protocol.gradient_key(key), sums[1])
            section.array(protocol.hessian_key(key), pack_upper(sums[2]))
        release.after(lambda key=key, vector=vector, weights=weights: _remember_round(prepared, key, vector, weights))


def _history_weights(prepared: MixedPrepared, key: str, likelihood: MarginalLikelihood) -> dict:
    """The row weights at every parameter vector answered before (and the node's own GLM fit,
    at sigma = 0), computed once each and cached."""
    previous = prepared.history.get(key, [])
    cache = prepared.weight_cache.setdefault(key, [])
    for vector in previous[len(cache) :]:
        with np.errstate(all="ignore"):
            cache.append(likelihood.row_weights(vector[:-1], float(vector[-1])))
    out: dict[str, list[np.ndarray]] = {}
    for entry in cache:
        for name, v in entry.items():
            out.setdefault(name, []).append(v)
    return out


def _remember_round(prepared: MixedPrepared, key: str, vector: np.ndarray, weights: dict) -> None:
    prepared.history.setdefault(key, []).append(vector.copy())
    if weights:
        prepared.weight_cache.setdefault(key, []).append(weights)


# --------------------------------------------------------------------------- the task handlers


def _grouped_payload(payload: dict, schema) -> dict:
    """The task's studies with each random intercept's column among the columns a row needs,
    for the GLM's moments (the approval was checked on the studies as sent)."""
    models = {}
    for key, spec in studies_from_payload(payload).items():
        ri = protocol.node_settings(spec, schema)
        models[key] = replace(spec, params={}, cluster=ri.column, cov_type="cluster").to_wire()
    return {**payload, "models": models}


@handler(protocol.MOMENTS, studies="payload")
def glmm_moments(runtime: NodeRuntime, task) -> Release:
    """glm.moments over the rows the model uses (those with a group)."""
    release = Release()
    moments(runtime.dataset, _grouped_payload(task.payload, runtime.dataset.schema), release, runtime.augments)
    return release


@handler(protocol.PREPARE, studies="payload")
def glmm_prepare(runtime: NodeRuntime, task) -> Release:
    """Designs built once and kept for the rounds; rounds this node answered for the study
    before (a restart) join the history the probing defence uses."""
    release = Release()
    prepared = prepare(runtime, task, release)
    release.public("data_version", runtime.dataset.data_version)
    answered = runtime.memory.answered_rounds(task.study_hash, runtime.dataset.data_version)
    for key, (_, design) in prepared.mixed.items():
        size = 1 if prepared.families[key] == "gaussian" else design.p + 1
        prepared.history[key] += [v for v in answered.get(key, []) if v.shape == (size,)]
    release.after(lambda: runtime.remember(task.study_hash, prepared))
    return release


@handler(protocol.ROUND, studies="prepared")
def glmm_round(runtime: NodeRuntime, task) -> Release:
    prepared = runtime.recall(task.study_hash)
    if not isinstance(prepared, MixedPrepared):
        raise DataError("the study was not prepared for a random intercept.")
    prepared.rounds += 1
    prefix = protocol.parameters_key("")
    parameters = {k[len(prefix) :]: v for k, v in task.arrays.items() if k.startswith(prefix)}
    if not parameters or len(parameters) != len(task.arrays):
        raise DataError("the task's parameters are not one array per prepared model.")
    release = Release()
    round_contributions(prepared, parameters, release)
    version = runtime.dataset.data_version
    release.remember(lambda: runtime.memory.remember_rounds(task.study_hash, version, parameters))
    return release

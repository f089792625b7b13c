"""Handlers for the GLM task kinds: glue between the dispatcher and node/glm.py.

Each handler returns a `disclosure.Release` (what it wants to release, declared); the
dispatcher judges it against the policy, audits it and builds the reply.
"""

from __future__ import annotations

from ..protocol import messages as m
from ..protocol.errors import DataError
from . import glm
from .disclosure import Release
from .handlers import handler
from .runtime import NodeRuntime, PreparedStudy

MAX_BETAS = 128


@handler(m.GLM_MOMENTS, studies="payload")
def glm_moments(runtime: NodeRuntime, task: m.Task) -> Release:
    release = Release()
    glm.moments(runtime.dataset, task.payload, release, runtime.augments)
    return release


@handler(m.GLM_PREPARE, studies="payload")
def glm_prepare(runtime: NodeRuntime, task: m.Task) -> Release:
    dataset = runtime.dataset
    release = Release()
    designs, facts, local = glm.prepare(dataset, task.payload, release, runtime.augments)
    families, cov_types = {}, {}
    for key, spec in glm.studies_from_payload(task.payload).items():
        families[key] = families[key + glm.NULL_SUFFIX] = spec.family
        cov_types[key] = spec.cov_type
    release.public("data_version", dataset.data_version)
    declined = {k for k in families if k not in designs}  # optional models too small here
    answered = runtime.memory.answered_rounds(task.study_hash, dataset.data_version)
    history = {key: [beta, *(b for b in answered.get(key, []) if b.shape == beta.shape)] for key, beta in local.items()}
    prepared = PreparedStudy(designs=designs, families=families, cov_types=cov_types, facts=facts,
                             history=history, declined=declined)
    release.after(lambda: runtime.remember(task.study_hash, prepared))
    return release


@handler(m.GLM_ROUND, studies="prepared")
def glm_round(runtime: NodeRuntime, task: m.Task) -> Release:
    prepared = runtime.recall(task.study_hash)
    prepared.rounds += 1
    betas = {k[len("beta/"):]: v for k, v in task.arrays.items() if k.startswith("beta/")}
    if not betas or len(betas) > MAX_BETAS or len(betas) != len(task.arrays):
        raise DataError("the task's coefficients are not one array per prepared model.")
    unknown = set(betas) - set(prepared.designs) - prepared.declined
    if unknown:
        raise DataError("the task names a model this study did not prepare.")
    betas = {k: v for k, v in betas.items() if k in prepared.designs}  # nothing for declined models
    release = Release()
    glm.round_contributions(prepared, betas, release)
    version = runtime.dataset.data_version
    release.remember(lambda: runtime.memory.remember_rounds(task.study_hash, version, betas))
    return release

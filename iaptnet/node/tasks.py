"""Handlers for the GLM task kinds: glue between the dispatcher and node/glm.py."""

from __future__ import annotations

from ..protocol import messages as m
from . import glm
from .handlers import handler
from .runtime import NodeRuntime, PreparedStudy


@handler(m.GLM_MOMENTS)
def glm_moments(runtime: NodeRuntime, task: m.Task) -> m.Reply:
    return m.Reply(status=m.OK, node=runtime.name, arrays=glm.moments(runtime.dataset, task.payload))


@handler(m.GLM_PREPARE)
def glm_prepare(runtime: NodeRuntime, task: m.Task) -> m.Reply:
    dataset = runtime.dataset
    designs, payload, arrays = glm.prepare(dataset, task.payload)
    families = {}
    for key, spec in glm.studies_from_payload(task.payload).items():
        families[key] = families[key + glm.NULL_SUFFIX] = spec.family
    runtime.remember(task.study_hash, PreparedStudy(designs=designs, families=families))
    payload["data_version"] = dataset.data_version
    return m.Reply(status=m.OK, node=runtime.name, payload=payload, arrays=arrays)


@handler(m.GLM_ROUND)
def glm_round(runtime: NodeRuntime, task: m.Task) -> m.Reply:
    prepared = runtime.recall(task.study_hash)
    prepared.rounds += 1
    betas = {k[len("beta/"):]: v for k, v in task.arrays.items() if k.startswith("beta/")}
    unknown = set(betas) - set(prepared.designs)
    if unknown:
        from ..protocol.errors import DataError
        raise DataError("the task names a model this study did not prepare.")
    arrays = glm.round_contributions(prepared.designs, prepared.families, betas)
    return m.Reply(status=m.OK, node=runtime.name, arrays=arrays)

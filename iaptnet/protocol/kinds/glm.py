"""The GLM's wire contract: task names, payload and array keys, shared by its node half
(node/glm.py) and its coordinator half (coordinator/glm.py). Pure: no I/O, no pandas.

One GLM run is three task kinds (docs/developer/architecture.md draws one round):

- `glm.moments` (only with `center()`/`scale()`): per model, per centred expression i, the
  array `moments/<model>/<i>` = (n, mean, centred sum of squares);
- `glm.prepare`: payload `models` (model key -> study in wire form) and `optional` (model keys
  a node may decline as too small); per model `local_info/<key>` (packed upper triangle) and
  `local_ibeta/<key>`, for the model and for its null model (key + NULL_SUFFIX);
- `glm.round`: task arrays `beta/<key>`; reply arrays `score/<key>`, `info/<key>` (packed),
  `stats/<key>` = (deviance, Pearson statistic, log-likelihood sum) and, for the models its
  payload lists in `meat` (robust SEs: cov_type "HC0" or "cluster", asked only in the rounds
  that may converge), `meat/<key>` (packed). A negative binomial model's `beta/<key>` is its coefficients followed
  by log theta (its null model's: the intercept and the model's log theta), and its reply adds
  `theta/<key>` = (d loglik / d theta, d^2 loglik / d theta^2) (not for the null model).
  A round whose payload has `marginal` ({model key: [entry label, ...]}, once the model has
  converged; a label is protocol/study.py's `marginal_label` of one of the study's `marginal`
  entries: the binary column's name, or `column A vs B` for a contrast) adds per entry i
  `marginal/<key>/<i>` = (sum w mu1, sum w mu0, sum w, then the p-vectors sum w mu'(eta1) x1
  and sum w mu'(eta0) x0): the fitted means and their gradients with the exposure set to 1 and
  to 0 (a contrast: to A and to B) for every row (w the prior weights, else 1).
  A round whose payload has `cr2` ({model key: the active-column mask as 0/1}, once a
  cov_type = "CR2" model has converged) carries besides `bread/<key>`, the pooled inverse
  information over the active columns (packed), and adds `cr2_meat/<key>` (packed, active
  columns), `cr2_trace/<key>` (2 p-vectors) and `cr2_cross/<key>` (p packed p x p matrices):
  node/cr2.py's sums over the node's clusters.
- `glm.prepare` with cov_type "cluster" or "CR2" on a dataset column also answers
  `cluster_digests`: a salted digest of each cluster's value, so that the coordinator can
  refuse clusters that span nodes.

The task's study hash is `batch_hash` of its models' hashes (every kind's tasks carry their
studies the same way, as `models`).
"""

from __future__ import annotations

import hashlib

from ..errors import DataError, SpecError

MOMENTS = "glm.moments"
PREPARE = "glm.prepare"
ROUND = "glm.round"
TASKS = (MOMENTS, PREPARE, ROUND)

#: Each model's companion (intercept only, same rows and offset), for the null deviance.
NULL_SUFFIX = ".null"
#: Models one task may carry; coefficient vectors one round may carry (a model and its null).
MAX_MODELS = 64
MAX_BETAS = 2 * MAX_MODELS


def batch_hash(hashes: list[str]) -> str:
    """The identity of studies run together: one study's own hash, else the sha256 of theirs."""
    if len(hashes) == 1:
        return hashes[0]
    return hashlib.sha256(":".join(hashes).encode()).hexdigest()


def null_key(key: str) -> str:
    return key + NULL_SUFFIX


def moments_key(model: str, i: int) -> str:
    return f"moments/{model}/{i}"


def local_info_key(model: str) -> str:
    return f"local_info/{model}"


def local_ibeta_key(model: str) -> str:
    return f"local_ibeta/{model}"


def beta_key(model: str) -> str:
    return f"beta/{model}"


def score_key(model: str) -> str:
    return f"score/{model}"


def info_key(model: str) -> str:
    return f"info/{model}"


def stats_key(model: str) -> str:
    return f"stats/{model}"


def meat_key(model: str) -> str:
    return f"meat/{model}"


def theta_key(model: str) -> str:
    return f"theta/{model}"


def marginal_key(model: str, i: int) -> str:
    return f"marginal/{model}/{i}"


def bread_key(model: str) -> str:
    return f"bread/{model}"


def cr2_meat_key(model: str) -> str:
    return f"cr2_meat/{model}"


def cr2_trace_key(model: str) -> str:
    return f"cr2_trace/{model}"


def cr2_cross_key(model: str) -> str:
    return f"cr2_cross/{model}"


def cr2_from_payload(payload: dict, arrays: dict) -> dict:
    """A round's `cr2` request: {model key: (active mask, pooled inverse information over the
    active columns)}; DataError unless each is well formed."""
    import numpy as np

    from ..messages import unpack_upper

    request = payload.get("cr2") or {}
    if not isinstance(request, dict) or len(request) > MAX_MODELS:
        raise DataError("the round's CR2 request is not a table of models.")
    out = {}
    for key, mask in request.items():
        if (
            not isinstance(key, str)
            or not isinstance(mask, list)
            or not 0 < len(mask) <= 10_000
            or not all(v in (0, 1) and not isinstance(v, float) for v in mask)
        ):
            raise DataError("the round's CR2 request does not give each model's active columns.")
        active = np.array(mask, dtype=bool)
        k = int(active.sum())
        packed = arrays.get(bread_key(key))
        if packed is None or np.shape(packed) != (k * (k + 1) // 2,) or k == 0:
            raise DataError("the round's CR2 request does not carry a covariance of its active columns.")
        out[key] = (active, unpack_upper(np.asarray(packed, dtype=float), k))
    return out


def marginal_from_payload(payload: dict) -> dict[str, list[str]]:
    """A round's `marginal` request: {model key: [entry label, ...]}; DataError otherwise."""
    marginal = payload.get("marginal") or {}
    if not isinstance(marginal, dict) or not all(
        isinstance(k, str) and isinstance(v, list) and 0 < len(v) <= 10 and all(isinstance(t, str) for t in v)
        for k, v in marginal.items()
    ):
        raise DataError("the round's marginal request is not a table of exposure lists.")
    return marginal


def meat_from_payload(payload: dict) -> set[str]:
    """The model keys whose robust middle term a round asks for; DataError unless a list of keys."""
    meat = payload.get("meat") or []
    if not isinstance(meat, list) or not all(isinstance(k, str) for k in meat):
        raise DataError("the round's meat request is not a list of model keys.")
    return set(meat)


def betas_from_arrays(arrays: dict) -> dict:
    """A round task's coefficient vectors by model key; DataError unless every array is one."""
    prefix = beta_key("")
    betas = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
    breads = [k for k in arrays if k.startswith(bread_key("")) and k[len(bread_key("")) :] in betas]
    if not betas or len(betas) > MAX_BETAS or len(betas) + len(breads) != len(arrays):
        raise DataError("the task's coefficients are not one array per prepared model.")
    return betas


def studies_from_payload(payload: dict) -> dict:
    """The studies a task carries, by model key (StudySpec, from their wire form)."""
    from ..study import StudySpec

    models = payload.get("models")
    if not isinstance(models, dict) or not models:
        raise DataError("the task lists no models.")
    if len(models) > MAX_MODELS or not all(isinstance(k, str) and 0 < len(k) <= 32 for k in models):
        raise DataError(f"the task lists more than {MAX_MODELS} models or names one badly.")
    return {key: StudySpec.from_wire(spec) for key, spec in models.items()}


def parse(data: dict, schema, source: str):
    """A GLM study file: (StudySpec, ParsedFormula). A random intercept's fields
    (protocol/kinds/glmm.py) are checked there and carried in the spec's params."""
    from ..study import parse_glm_study
    from .glmm import split_fields, with_random_intercept

    if not isinstance(data, dict):
        raise SpecError(f"{source}: a study is a table of fields.")
    data, mixed = split_fields(data, source)
    spec, parsed = parse_glm_study(data, schema, source)
    if mixed is not None:
        spec = with_random_intercept(spec, mixed, parsed, schema, source)
    return spec, parsed

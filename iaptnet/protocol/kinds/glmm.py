"""The random-intercept GLM's wire contract (a GLM study with `random_intercept = COLUMN`),
shared by its node half (node/glmm.py) and its coordinator half (coordinator/glmm.py). Pure: no
I/O, no pandas. docs/methods/glm.md#random-intercept has the statistics.

The study fields (parsed with the GLM's, protocol/kinds/glm.py's `parse`):

- `random_intercept = "COLUMN"`: a categorical or integer column; its values are the groups
  (clusters) of the intercept b_g ~ N(0, sigma^2). A group must lie within one node.
- `nagq = N` (binomial and poisson, 1 to 25, default 1 = Laplace): adaptive Gauss-Hermite
  points per group for the marginal likelihood, as lme4::glmer's nAGQ.
- `reml = true` (gaussian only, default false): the restricted likelihood, as lmer's default;
  false is lmer(REML = FALSE).

They travel in the study's `params` ({"random_intercept", "nagq"} or, gaussian,
{"random_intercept", "reml"}), so they are part of the study hash.

One fit is two task kinds, after a third when the formula centres or scales:

- `glmm.moments`: as glm.moments (protocol/kinds/glm.py's `moments_key`), over the rows with a
  group (the rows the model uses);
- `glmm.prepare`: payload `models` (one model key -> the study in wire form) and
  `transform_state`; the reply has, per model, the design's columns, rows used, events, rows with
  a non-zero value per column, the number of groups and a tag per group (sha256 of the study
  hash and the group's value: the coordinator checks that no group is at two nodes), and the
  node's own GLM fit for the warm start (`local_info/<key>`, packed, and `local_ibeta/<key>`,
  as glm.prepare's); and a count table (rows used, events, in the cohort, dropped as missing).
- `glmm.round`: task array `parameters/<key>`. Binomial and poisson: (beta, sigma), sigma >= 0
  the random intercept's standard deviation; the reply's `loglik/<key>` (1 value), `gradient/<key>`
  (p + 1) and `hessian/<key>` (packed upper triangle, (p + 1) x (p + 1)) are the sums over the
  node's groups of the log marginal likelihood (Laplace or adaptive Gauss-Hermite) and its exact
  first and second derivatives in (beta, sigma). Gaussian: (theta,), theta = sigma_b / sigma >= 0
  (lme4's theta); the reply's `cross/<key>/<d>` (d = 0, 1, 2; packed, (p + 1) x (p + 1)) is the
  d-th derivative in theta of Z'V^-1 Z over the node's groups, Z = [X, y - offset] and
  V = I + theta^2 Z_g Z_g' (unit residual variance), and `logdet/<key>` the sum over groups of
  log(1 + n_g theta^2) with its first two derivatives.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import DataError, SpecError

MOMENTS = "glmm.moments"
PREPARE = "glmm.prepare"
ROUND = "glmm.round"
TASKS = (MOMENTS, PREPARE, ROUND)

#: The study fields this module adds to a GLM study.
FIELDS = ("random_intercept", "nagq", "reml")
FAMILIES = ("binomial", "poisson", "gaussian")
MAX_NAGQ = 25
#: Column types whose values can name a group.
GROUP_TYPES = ("categorical", "integer")


@dataclass(frozen=True)
class RandomIntercept:
    column: str
    nagq: int = 1
    reml: bool = False


def parameters_key(model: str) -> str:
    return f"parameters/{model}"


def loglik_key(model: str) -> str:
    return f"loglik/{model}"


def gradient_key(model: str) -> str:
    return f"gradient/{model}"


def hessian_key(model: str) -> str:
    return f"hessian/{model}"


def cross_key(model: str, order: int) -> str:
    return f"cross/{model}/{order}"


def logdet_key(model: str) -> str:
    return f"logdet/{model}"


def local_info_key(model: str) -> str:
    return f"local_info/{model}"


def local_ibeta_key(model: str) -> str:
    return f"local_ibeta/{model}"


def settings(spec) -> RandomIntercept | None:
    """The random intercept of a GLM study, or None for a GLM without one."""
    params = spec.params if isinstance(spec.params, dict) else {}
    column = params.get("random_intercept")
    if column is None:
        return None
    return RandomIntercept(str(column), int(params.get("nagq", 1)), bool(params.get("reml", False)))


def split_fields(data: dict, source: str) -> tuple[dict, dict | None]:
    """A GLM study's data without this module's fields, and those fields (None without
    `random_intercept`); `nagq` or `reml` alone is a mistake named here."""
    present = {k: data[k] for k in FIELDS if k in data}
    if not present:
        return data, None
    if "random_intercept" not in present:
        name = next(iter(present))
        raise SpecError(f"{source}: field '{name}' applies only with random_intercept = \"COLUMN\".")
    return {k: v for k, v in data.items() if k not in FIELDS}, present


def with_random_intercept(spec, fields: dict, parsed, schema, source: str):
    """The GLM study `spec` with its random intercept checked (against the schema, the family
    and the estimation options) and put in its params."""
    column = fields["random_intercept"]
    if not isinstance(column, str) or column not in schema or schema[column].type not in GROUP_TYPES:
        raise SpecError(
            f"{source}: field 'random_intercept' must name a categorical or integer column of the dataset "
            f"'{schema.name}' whose values are the groups (e.g. a clinic or a therapist)."
        )
    if column == parsed.outcome or column in parsed.columns:
        raise SpecError(
            f"{source}: field 'random_intercept' names '{column}', which the formula uses too; a column is "
            "either a term or the groups of the random intercept."
        )
    if spec.family not in FAMILIES:
        raise SpecError(
            f'{source}: field \'random_intercept\' needs family = "binomial", "poisson" or "gaussian", '
            f"not {spec.family!r}."
        )
    for name, present, why in (
        ("weights", spec.weights is not None, "prior weights"),
        ("cov_type", spec.cov_type != "nonrobust", "a robust covariance"),
        ("marginal", bool(spec.marginal), "standardised risks"),
    ):
        if present:
            raise SpecError(
                f"{source}: field '{name}' cannot be combined with random_intercept ({why} of a random-intercept "
                "model are not available)."
            )
    params = {"random_intercept": column}
    if spec.family == "gaussian":
        if "nagq" in fields and fields["nagq"] != 1:
            raise SpecError(
                f"{source}: field 'nagq' applies to binomial and poisson models (a gaussian model's likelihood "
                "is exact without quadrature)."
            )
        reml = fields.get("reml", False)
        if not isinstance(reml, bool):
            raise SpecError(f"{source}: field 'reml' must be true or false.")
        params["reml"] = reml
    else:
        if "reml" in fields:
            raise SpecError(f"{source}: field 'reml' applies to gaussian models only.")
        nagq = fields.get("nagq", 1)
        if isinstance(nagq, bool) or not isinstance(nagq, int) or not 1 <= nagq <= MAX_NAGQ:
            raise SpecError(
                f"{source}: field 'nagq' must be a whole number from 1 (the Laplace approximation) to {MAX_NAGQ} "
                "(adaptive Gauss-Hermite points)."
            )
        params["nagq"] = nagq
    return replace(spec, params={**spec.params, **params})


def node_settings(spec, schema) -> RandomIntercept:
    """A node's re-check of a study received for a random-intercept task (DataError otherwise)."""
    if spec.kind != "glm":
        raise DataError("a random-intercept task carries a GLM study.")
    ri = settings(spec)
    if ri is None:
        raise DataError("the study has no random intercept.")
    keys = {"random_intercept", "reml"} if spec.family == "gaussian" else {"random_intercept", "nagq"}
    if set(spec.params) != keys:
        raise DataError("the study's random-intercept settings are malformed.")
    column = schema[ri.column] if ri.column in schema else None
    if column is None or column.type not in GROUP_TYPES:
        raise DataError("the study's random intercept does not name a categorical or integer column.")
    if spec.family not in FAMILIES or spec.weights is not None or spec.cov_type != "nonrobust" or spec.marginal:
        raise DataError("the study's random intercept is combined with options it does not support.")
    if not isinstance(spec.params.get("reml", False), bool) or not (
        spec.family == "gaussian" or (type(spec.params["nagq"]) is int and 1 <= spec.params["nagq"] <= MAX_NAGQ)
    ):
        raise DataError("the study's random-intercept settings are malformed.")
    return ri


def describe(spec, rules) -> list[str]:
    """Lines for `iaptnet node approve` about what a random-intercept study adds."""
    ri = settings(spec)
    if ri is None:
        return []
    how = (
        ("restricted (REML)" if ri.reml else "maximum") + " likelihood, exact per group"
        if spec.family == "gaussian"
        else ("the Laplace approximation" if ri.nagq == 1 else f"adaptive Gauss-Hermite quadrature, {ri.nagq} points")
    )
    return [
        f"  random     an intercept per group of '{ri.column}' ({how})",
        "  releases   per group of at least "
        f"{rules.min_level_count} rows only: a tag of each group's value (so that a group at two nodes is found),",
        "             then per round sums over the groups of the marginal likelihood and its derivatives",
    ]

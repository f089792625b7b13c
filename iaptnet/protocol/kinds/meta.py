"""`kind = "meta"`: heterogeneity between nodes of one GLM's exposure effect.

A meta study is a GLM study (family, formula, where, offset, weights, cov_type, merges) with a
required `exposure` (the design column it is about) and a `service` column (default
`service_id`, categorical). It is run two ways (coordinator/meta.py):

- two-stage: each node fits the model on its own rows (node/meta.py) and releases the
  exposure's estimate and standard error, which the coordinator pools by fixed-effect and
  random-effects meta-analysis;
- one-stage: the exact federated GLM of the formula without the service term, and with it
  (service fixed effects), fitted together.

`ci` chooses the REML random-effects interval: "normal" (Wald, the default) or "hksj"
(Hartung-Knapp-Sidik-Jonkman, t on k - 1 df, for few services). It is coordinator-side (the
nodes release the same either way) but part of the study hash, stored in `params` only when
it is not the default, so that studies without it keep their hashes.

This module derives the models both halves need from the study alone, so that the node and the
coordinator build the same ones and a Trust can approve every hash the study sends
(`approval_hashes`). Pure: no I/O, no pandas.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, replace

from ..errors import SpecError
from ..families import FAMILIES
from ..formula_check import ParsedFormula, check_formula, holding_ast_lock, parse_formula
from ..schema import Schema
from ..study import COMMON_KEYS, StudySpec, check_estimation, check_offset, common_fields

KEYS = COMMON_KEYS | {"family", "formula", "offset", "weights", "cov_type", "service", "ci"}
#: The task kind of each node's own fit (node/meta.py).
TASK = "meta.local_fit"
COV_TYPES = ("nonrobust", "HC0")
DEFAULT_SERVICE = "service_id"
#: The study field `ci`: the REML random-effects interval (coordinator/meta_analysis.py).
CI_METHODS = ("normal", "hksj")
DEFAULT_CI = "normal"


@dataclass(frozen=True)
class MetaParsed:
    """What the coordinator half needs: the formulas of the two one-stage models."""

    one_stage: ParsedFormula
    service_fe: ParsedFormula

    @property
    def stateful(self) -> tuple[str, ...]:  # LoadedStudy users may read it; meta has none
        return ()


def parse(data: dict, schema: Schema, source: str) -> tuple[StudySpec, MetaParsed]:
    fields = common_fields(data, schema, source, KEYS)
    for key in ("family", "formula"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise SpecError(f"{source}: field '{key}' is required and must be a non-empty string.")
    family = data["family"]
    if family not in FAMILIES:
        raise SpecError(f"{source}: field 'family' must be one of {', '.join(FAMILIES)}, got {family!r}.")
    parsed = check_formula(data["formula"], schema, family, source)
    if parsed.stateful:
        raise SpecError(
            f"{source}: field 'formula' uses center() or scale(), which a meta study does not support "
            "(each node's own fit would centre on its own rows); centre by hand, e.g. I(age - 40)."
        )
    if not parsed.has_intercept:
        raise SpecError(
            f"{source}: field 'formula' must keep the intercept in a meta study (each node's fit needs its own)."
        )
    if not fields["exposure"]:
        raise SpecError(
            f"{source}: field 'exposure' is required in a meta study: the design column whose "
            'effect is compared between nodes, e.g. "n_treat" or "imd_quintile[T.5]".'
        )
    offset = data.get("offset")
    if offset is not None:
        check_offset(offset, schema, source)
        if family == "binomial":
            raise SpecError(f"{source}: field 'offset' is not supported for a binomial model.")
    if data.get("cov_type", "nonrobust") not in COV_TYPES:
        raise SpecError(
            f'{source}: field \'cov_type\' must be "nonrobust" or "HC0" in a meta study '
            "(each node's own fit has one service, so clusters by service cannot be used)."
        )
    weights, cov_type, _ = check_estimation({k: data[k] for k in ("weights", "cov_type") if k in data}, schema, source)
    service = data.get("service", DEFAULT_SERVICE)
    if not isinstance(service, str) or service not in schema or not schema[service].is_categorical:
        raise SpecError(
            f"{source}: field 'service' must name a categorical column of the dataset "
            f"'{schema.name}' (the service whose fixed effects the one-stage model adds), e.g. \"service_id\"."
        )
    if service in fields["merge"]:
        raise SpecError(
            f"{source}: field 'merge' merges levels of the service column '{service}'; a meta study compares services as they are."
        )
    ci = data.get("ci", DEFAULT_CI)
    if ci not in CI_METHODS:
        raise SpecError(
            f'{source}: field \'ci\' must be "normal" (Wald, the default) or "hksj" (Hartung-Knapp-Sidik-Jonkman, '
            f"t on k - 1 df) for the REML random-effects interval; got {ci!r}."
        )
    without, _ = split_service_term(data["formula"], service, source)
    _check_exposure(fields["exposure"], without, schema, fields["merge"], source)
    spec = StudySpec(
        family=family,
        formula=data["formula"],
        offset=offset,
        weights=weights,
        cov_type=cov_type,
        params={"service": service, **({"ci": ci} if ci != DEFAULT_CI else {})},
        **fields,
    )
    one, fe = model_specs(spec)
    return spec, MetaParsed(
        check_formula(one.formula, schema, family, source), check_formula(fe.formula, schema, family, source)
    )


def split_service_term(formula: str, service: str, source: str = "study") -> tuple[str, bool]:
    """(the formula without the service main effect, whether it had one). The service column
    may appear only as a main effect (`service_id` or `C(service_id)`)."""
    parts = parse_formula(formula, source)
    outcome = str(parts.outcome_factor.expr)
    kept, found, intercept = [], False, False
    for term in parts.rhs_terms:
        exprs = [str(f.expr) for f in term.factors]
        if exprs == ["1"]:
            intercept = True
            continue
        if len(exprs) == 1 and exprs[0].replace(" ", "") in (service, f"C({service})"):
            found = True
            continue
        if any(service in _names(e) for e in exprs):
            raise SpecError(
                f"{source}: field 'formula' uses the service column '{service}' other than as a main "
                "effect; a meta study compares the exposure between services, so write it as a main effect only."
            )
        kept.append(":".join(exprs))
    rhs = " + ".join(kept) if kept else "1"
    return f"{outcome} ~ {rhs}" if intercept else f"{outcome} ~ 0 + {rhs}", found


@holding_ast_lock
def _names(expr: str) -> set[str]:
    try:
        return {n.id for n in ast.walk(ast.parse(expr, mode="eval")) if isinstance(n, ast.Name)}
    except SyntaxError:
        return {expr}


def _check_exposure(exposure: str, formula: str, schema: Schema, merge: dict, source: str) -> None:
    """The exposure names a design column of the formula: a numeric term as written
    (`n_treat`, `I(age / 10)`, `a:b`) or a level of a categorical one (`imd_quintile[T.5]`)."""
    parts = parse_formula(formula, source)
    terms = {":".join(str(f.expr).replace(" ", "") for f in t.factors) for t in parts.rhs_terms}
    name = exposure.replace(" ", "")
    if name in terms:
        column = name[2:-1] if name.startswith("C(") else name
        if column in schema and schema[column].is_categorical:
            raise SpecError(
                f"{source}: field 'exposure' names the categorical term '{exposure}'; name one of its "
                f'levels, e.g. "{exposure}[T.{_levels(column, schema, merge)[-1]}]".'
            )
        return
    if name.endswith("]") and "[T." in name:
        base, level = name[:-1].split("[T.", 1)
        column = base[2:-1] if base.startswith("C(") else base
        if base in terms and column in schema and schema[column].is_categorical:
            levels = _levels(column, schema, merge)
            if level in levels[1:]:
                return
            raise SpecError(
                f"{source}: field 'exposure' names level '{level}' of '{column}', which is not one of its "
                f"non-reference levels ({', '.join(levels[1:])})."
            )
    raise SpecError(
        f"{source}: field 'exposure' must be a term of the formula (without the service term), "
        f'e.g. "n_treat" or "imd_quintile[T.5]"; got {exposure!r}.'
    )


def _levels(column: str, schema: Schema, merge: dict) -> list[str]:
    from ..study import merged_levels

    levels = list(schema[column].levels)
    return merged_levels(levels, merge[column])[0] if column in merge else levels


def model_specs(spec: StudySpec) -> tuple[StudySpec, StudySpec]:
    """The two one-stage GLMs: without the service term, and with service fixed effects. Each
    names the study in `params["derived_from"]`, so that a Trust that approved the study answers
    them too (protocol/study.py: `approval_hash`, checked by `parent_of`)."""
    if spec.kind != "meta" or not isinstance(spec.params, dict) or "service" not in spec.params:
        raise SpecError(f"{spec.source}: the study is not a meta study.")
    service = spec.params["service"]
    without, had = split_service_term(spec.formula, service, spec.source)
    with_fe = spec.formula if had else f"{spec.formula} + {service}"
    link = spec.canonical()
    base = replace(spec, kind="glm", title="", description="", reference={})
    return (
        replace(
            base, name=f"{spec.name} (one-stage)", formula=without, params={"derived_from": link, "step": "one_stage"}
        ),
        replace(
            base,
            name=f"{spec.name} (one-stage, service fixed effects)",
            formula=with_fe,
            params={"derived_from": link, "step": "one_stage_service_fe"},
        ),
    )


def parent_of(spec: StudySpec) -> StudySpec:
    """The meta study a one-stage model belongs to (checked: the study derives exactly it)."""
    link = spec.params.get("derived_from") if isinstance(spec.params, dict) else None
    if not isinstance(link, dict):
        raise SpecError(f"{spec.source}: the model is not part of a meta study.")
    parent = StudySpec.from_wire(link, spec.source)
    if all(d.canonical() != spec.canonical() for d in model_specs(parent)):
        raise SpecError(f"{spec.source}: the model '{spec.name}' is not one the study '{parent.name}' derives.")
    return parent


def local_spec(spec: StudySpec) -> StudySpec:
    """The model a node fits on its own rows: the service fixed-effects model; the node drops
    the columns it cannot estimate (the service term is constant within a one-service node)."""
    return replace(model_specs(spec)[1], name=f"{spec.name} (this node's own fit)", params={})


def check_at_node(spec: StudySpec, schema: Schema) -> StudySpec:
    """A node re-derives what it fits from the study it received; returns the local model."""
    if spec.kind != "meta":
        raise SpecError(f"{spec.source}: the task does not carry a meta study.")
    service = spec.params.get("service") if isinstance(spec.params, dict) else None
    if (
        set(spec.params) - {"ci"} != {"service"}
        or spec.params.get("ci", DEFAULT_CI) not in CI_METHODS
        or not isinstance(service, str)
        or service not in schema
        or not schema[service].is_categorical
    ):
        raise SpecError(f"{spec.source}: the meta study's settings are not valid here.")
    if spec.cov_type not in COV_TYPES or not spec.exposure:
        raise SpecError(f"{spec.source}: the meta study's exposure or cov_type is not valid here.")
    local = local_spec(spec)
    parsed = check_formula(local.formula, schema, local.family, spec.source)
    if parsed.stateful:
        raise SpecError(f"{spec.source}: a meta study may not use center() or scale().")
    return local


def approval_hashes(spec: StudySpec) -> list[str]:
    """Every study hash the study's tasks carry: the meta study itself (its per-node fits) and
    its two one-stage models. Approving the study's own hash is enough (each model names the
    study, and a node checks the derivation); these are listed for tools that go hash by hash."""
    return [spec.hash, *(s.hash for s in model_specs(spec))]


def describe(spec: StudySpec, rules) -> list[str]:
    """For a Trust's `iaptnet node approve`: what the study computes and what the node releases."""
    one, fe = model_specs(spec)
    lines = [
        f"  model      {spec.family} GLM: {' '.join(spec.formula.split())}",
        f"  exposure   {spec.exposure}, compared between services ('{spec.params['service']}')",
        f"  one-stage  {' '.join(one.formula.split())}; and {' '.join(fe.formula.split())}",
        "  pooled     fixed effect, DerSimonian-Laird and REML random effects "
        + ("(REML with the HKSJ interval)" if spec.params.get("ci") == "hksj" else "(Wald intervals)")
        + ", Q-profile CI for tau2; by the coordinator from the nodes' own estimates",
        "",
        "what this node releases for it (every reply is checked against the policy first):",
        "  own fit   the exposure's estimate and standard error from this node's rows alone (or",
        "            'not estimable'), and which design columns it dropped; nothing else",
        "  models    the two one-stage models as any GLM (rows used and events exactly, its own fit,",
        "            per-round score, information matrix and deviance)",
        f"  refused   under {rules.min_rows} rows, under {rules.min_events} events or non-events, a level with "
        f"1-{rules.min_level_count - 1} rows,",
        f"            rows differing by 1-{rules.min_subset_difference - 1} people from the whole dataset or an earlier release",
        f"  opt out   leave '{TASK}' out of the policy's tasks to withhold this node's own estimate",
    ]
    return lines

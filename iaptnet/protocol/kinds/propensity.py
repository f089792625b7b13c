"""Propensity-score studies: `kind = "psm"` (matching) and `kind = "iptw"` (weighting).

A study names the outcome, a binary exposure and the covariates of the propensity model:

    kind = "psm"                       # or "iptw"
    name = "p1_nice_mismatch_psm"
    where = "finished_treatment == 1 and case_first == 1"
    outcome = "reliable_recovery"
    exposure = "nice_mismatch"         # a binary (0/1) column
    covariates = "n_treat + n_dna + age_group + ..."   # right-hand side of the PS model
    family = "binomial"                # the outcome model's family (default binomial)
    adjust_outcome = false             # also adjust the outcome model for the covariates
    caliper = 0.2                      # psm: in SDs of the logit of the PS
    estimand = "ATE"                   # iptw: "ATE" or "ATT"
    stabilized = false                 # iptw: stabilised ATE weights

The study runs as two GLMs of the exact federated machinery, both derived from it here (pure,
so the node can check a derivation): the propensity model `exposure ~ covariates` and the
outcome model `outcome ~ exposure` on the matched set (SEs clustered on the matched pair) or
with the inverse-probability weights (robust HC0 SEs). Both use the same cohort: the filter,
the outcome recorded, and complete cases of the exposure and covariates. Each derived model
carries the study in `params["derived_from"]`, so a Trust that approved the study's hash
answers its models too (protocol/study.py: `approval_hash`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import cohort_filter
from ..errors import SpecError
from ..families import FAMILIES
from ..formula_check import ParsedFormula, check_formula
from ..schema import Schema
from ..study import COMMON_KEYS, StudySpec, common_fields

KIND_KEYS = {
    "psm": {"caliper"},
    "iptw": {"estimand", "stabilized"},
}
SHARED_KEYS = {"outcome", "covariates", "family", "adjust_outcome"}
#: Every field a propensity-score study may have (psm and iptw).
KEYS = COMMON_KEYS | SHARED_KEYS | KIND_KEYS["psm"] | KIND_KEYS["iptw"]
ESTIMANDS = ("ATE", "ATT")
DEFAULT_CALIPER = 0.2
MAX_CALIPER = 10.0

#: Task kinds of the node half (node/propensity.py).
TASK_SCORE = "propensity.score"
TASK_MATCH = "propensity.match"


# Reply arrays of propensity.score, per group ("exposed", "control"); node/propensity.py writes
# them, coordinator/propensity.py reads them.
def logit_key(group: str) -> str:
    """(n, mean, centred sum of squares) of the propensity logit in the group."""
    return f"logit/{group}"


def before_key(group: str, part: str) -> str:
    """The balance rows' `part` ("n", "mean", "m2") before matching or weighting."""
    return f"before/{group}/{part}"


def weights_key(group: str) -> str:
    """(sum of weights, sum of squared weights) of the group (iptw)."""
    return f"weights/{group}"


def weighted_mean_key(group: str) -> str:
    """The balance rows' weighted means in the group (iptw)."""
    return f"weighted/{group}/mean"


#: Columns a node computes for the study and keeps (never released).
PAIR_COLUMN = "pair_id"
WEIGHT_COLUMN = "iptw_weight"
LOGIT_COLUMN = "ps_logit"


@dataclass(frozen=True)
class PropensityParsed:
    """What the coordinator half needs: the two derived models' parsed formulas."""

    ps: ParsedFormula
    outcome_model: ParsedFormula

    # Generic views, as a ParsedFormula gives for a GLM study (e.g. for describing a study).
    @property
    def outcome(self) -> str:
        return self.outcome_model.outcome

    @property
    def columns(self) -> frozenset[str]:
        return self.ps.columns | {self.ps.outcome} | self.outcome_model.columns

    @property
    def stateful(self) -> tuple[str, ...]:
        return self.ps.stateful


def parse(data: dict, schema: Schema, source: str) -> tuple[StudySpec, PropensityParsed]:
    kind = data.get("kind")
    allowed = COMMON_KEYS | SHARED_KEYS | KIND_KEYS[kind]
    for other, keys in KIND_KEYS.items():
        if other != kind:
            extra = sorted(keys & set(data))
            if extra:
                raise SpecError(f"{source}: field '{extra[0]}' applies only to kind = \"{other}\".")
    fields = common_fields(data, schema, source, allowed)
    outcome = _column_field(data, "outcome", schema, source)
    exposure = _column_field(data, "exposure", schema, source)
    if schema[exposure].type != "binary":
        raise SpecError(
            f"{source}: field 'exposure' names the {schema[exposure].type} column '{exposure}'; "
            "a propensity-score study needs a binary (0/1) exposure."
        )
    if exposure == outcome:
        raise SpecError(f"{source}: fields 'exposure' and 'outcome' name the same column '{exposure}'.")
    family = data.get("family", "binomial")
    if family not in FAMILIES:
        raise SpecError(f"{source}: field 'family' must be one of {', '.join(FAMILIES)}, got {family!r}.")
    covariates = data.get("covariates")
    if not isinstance(covariates, str) or not covariates.strip() or "~" in covariates:
        raise SpecError(
            f"{source}: field 'covariates' is required: the right-hand side of the propensity "
            'model, e.g. "age_group + sex + phq9_first".'
        )
    covariates = " ".join(covariates.split())
    try:
        ps = _formula(f"{exposure} ~ {covariates}", schema, "binomial", source, "covariates")
    except SpecError as exc:
        # (the formula check words it as the propensity model's outcome used as a term)
        if f"uses the outcome '{exposure}' as a term" in str(exc):
            raise _covariate_error(source, "exposure", exposure) from None
        raise
    if outcome in ps.columns:
        raise _covariate_error(source, "outcome", outcome)
    adjust = data.get("adjust_outcome", False)
    if not isinstance(adjust, bool):
        raise SpecError(f"{source}: field 'adjust_outcome' must be true or false.")
    params = {"outcome": outcome, "covariates": covariates, "adjust_outcome": adjust}
    if kind == "psm":
        caliper = data.get("caliper", DEFAULT_CALIPER)
        if isinstance(caliper, bool) or not isinstance(caliper, (int, float)) or not 0 < caliper <= MAX_CALIPER:
            raise SpecError(
                f"{source}: field 'caliper' must be a number above 0 and at most {MAX_CALIPER:g} "
                "(standard deviations of the logit of the propensity score)."
            )
        params["caliper"] = float(caliper)
    else:
        estimand = data.get("estimand", "ATE")
        if estimand not in ESTIMANDS:
            raise SpecError(f'{source}: field \'estimand\' must be "ATE" or "ATT", got {estimand!r}.')
        stabilized = data.get("stabilized", False)
        if not isinstance(stabilized, bool):
            raise SpecError(f"{source}: field 'stabilized' must be true or false.")
        if stabilized and estimand != "ATE":
            raise SpecError(
                f"{source}: field 'stabilized' applies to ATE weights only (ATT weights are already 1 for the exposed)."
            )
        params.update(estimand=estimand, stabilized=stabilized)
    spec = StudySpec(
        family=family, formula=outcome_formula(outcome, exposure, covariates, adjust), params=params, **fields
    )
    outcome_parsed = _formula(spec.formula, schema, family, source, "outcome")
    return spec, PropensityParsed(ps, outcome_parsed)


def _covariate_error(source: str, what: str, column: str) -> SpecError:
    return SpecError(
        f"{source}: field 'covariates' uses the {what} '{column}'; the propensity model's "
        "covariates must not include the exposure or the outcome."
    )


def _column_field(data: dict, key: str, schema: Schema, source: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value.strip():
        raise SpecError(f"{source}: field '{key}' is required and must name a column.")
    if value not in schema:
        raise SpecError(
            f"{source}: field '{key}' names column '{value}', which the dataset '{schema.name}' does not have."
        )
    if not schema[value].in_models:
        raise SpecError(
            f"{source}: field '{key}' names the {schema[value].type} column '{value}', which cannot appear in a model."
        )
    return value


def _formula(text: str, schema: Schema, family: str, source: str, field: str) -> ParsedFormula:
    try:
        return check_formula(text, schema, family, source)
    except SpecError as exc:
        raise SpecError(str(exc).replace("field 'formula'", f"field '{field}'")) from None


def outcome_formula(outcome: str, exposure: str, covariates: str, adjust: bool) -> str:
    return f"{outcome} ~ {exposure}" + (f" + {covariates}" if adjust else "")


def cohort_where(parent: StudySpec) -> str:
    """The study's cohort filter with the outcome required: the propensity model then uses the
    same rows as the outcome model (complete cases of exposure and covariates)."""
    outcome = parent.params["outcome"]
    text = f"({parent.where}) and {outcome} is not missing" if parent.where else f"{outcome} is not missing"
    return cohort_filter.render(cohort_filter.parse(text))


def state_key(parent: StudySpec) -> str:
    """Where a node keeps the columns it computed for the study (scores, pairs, weights)."""
    return f"propensity-{parent.hash[:32]}"


def derived_specs(parent: StudySpec) -> dict[str, StudySpec]:
    """The study's two GLMs, derived deterministically: "ps" and "outcome"."""
    if parent.kind not in KIND_KEYS:
        raise SpecError(f"{parent.source}: the study is not a propensity-score study.")
    params = parent.params
    try:
        outcome, covariates = params["outcome"], params["covariates"]
        adjust = bool(params["adjust_outcome"])
    except (KeyError, TypeError):
        raise SpecError(f"{parent.source}: the study's propensity-score settings are incomplete.") from None
    exposure = parent.exposure
    where = cohort_where(parent)
    common = dict(
        where=where,
        min_nodes=parent.min_nodes,
        merge=parent.merge,
        dataset=parent.dataset,
        schema_fingerprint=parent.schema_fingerprint,
        source=parent.source,
        levels=parent.levels,
    )
    link = parent.canonical()
    ps = StudySpec(
        name=f"{parent.name} (propensity model)",
        family="binomial",
        formula=f"{exposure} ~ {covariates}",
        params={"derived_from": link, "step": "propensity"},
        **common,
    )
    augment_columns = {PAIR_COLUMN: "integer"} if parent.kind == "psm" else {WEIGHT_COLUMN: "numeric"}
    estimation = (
        {"cov_type": "cluster", "cluster": PAIR_COLUMN}
        if parent.kind == "psm"
        else {"cov_type": "HC0", "weights": WEIGHT_COLUMN}
    )
    outcome_spec = StudySpec(
        name=f"{parent.name} (outcome model)",
        family=parent.family,
        formula=outcome_formula(outcome, exposure, covariates, adjust),
        exposure=exposure,
        augment={"state": state_key(parent), "columns": augment_columns},
        params={"derived_from": link, "step": "outcome"},
        **estimation,
        **common,
    )
    return {"ps": ps, "outcome": outcome_spec}


def parent_of(spec: StudySpec) -> StudySpec:
    """The propensity-score study a derived model belongs to (checked: it derives the model)."""
    link = spec.params.get("derived_from") if isinstance(spec.params, dict) else None
    if not isinstance(link, dict):
        raise SpecError(f"{spec.source}: the model is not part of a propensity-score study.")
    parent = StudySpec.from_wire(link, spec.source)
    derived = derived_specs(parent)
    if all(d.canonical() != spec.canonical() for d in derived.values()):
        raise SpecError(f"{spec.source}: the model '{spec.name}' is not one the study '{parent.name}' derives.")
    return parent


def approval_hashes(spec: StudySpec) -> list[str]:
    """Every study hash the study's tasks carry: the propensity model's (its fit, scoring and
    matching) and the outcome model's. Approving the study's own hash is enough (each derived
    model names the study and a node checks the derivation: `parent_of`); these are listed for
    tools that approve hash by hash."""
    models = derived_specs(spec)
    return [spec.hash, models["ps"].hash, models["outcome"].hash]


def describe(spec: StudySpec, rules) -> list[str]:
    """For a Trust's `iaptnet node approve`: what the study computes and what the node releases."""
    p = spec.params
    if spec.kind == "psm":
        method = (
            f"1:1 nearest-neighbour matching on the logit of the propensity score, without "
            f"replacement, caliper {p['caliper']:g} SD, within this node's rows"
        )
        outcome = "on the matched set, standard errors clustered on the matched pair"
    else:
        method = (
            f"inverse probability of treatment weights ({p['estimand']}{', stabilised' if p['stabilized'] else ''})"
        )
        outcome = "weighted, robust (HC0) standard errors"
    lines = [
        f"  method     {method}",
        f"  propensity binomial GLM: {spec.exposure} ~ {p['covariates']}",
        f"  outcome    {spec.family} GLM: {spec.formula}, {outcome}",
        "",
        "what this node releases for it (every reply is checked against the policy first):",
        "  models    the propensity and outcome models as any GLM (rows used and events exactly, its own",
        "            fit, per-round score, information matrix and deviance)",
        "  scores    per exposure group: n, mean and spread of the score's logit and of every design column",
        "            (balance before); refused if the coefficients sent make the logits single out a few rows",
    ]
    if spec.kind == "psm":
        lines += [
            "  matching  the number of pairs and, per design column, the sum of exposed-minus-control pair",
            f"            differences; matching counts (1-{rules.suppress_max} suppressed, others rounded to {rules.round_to})",
            "  kept      the scores and pair ids stay at the node",
            f"  refused   the exposed, the controls or the matched set differing by 1-{rules.min_subset_difference - 1} people",
            f"            from the cohort or an earlier release; a matched set under {rules.min_rows} rows or {rules.min_events} pairs",
        ]
    else:
        lines += [
            "  weights   per exposure group their sum and sum of squares, and weighted means of every design",
            "            column (balance after); refused if the weights rest on or single out a few rows",
            "  kept      the scores and weights stay at the node",
            f"  refused   the exposed or the controls differing by 1-{rules.min_subset_difference - 1} people from an earlier release",
        ]
    return lines

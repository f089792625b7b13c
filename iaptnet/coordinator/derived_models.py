"""What the meta and its kinds share: running the GLMs a study derives in one conversation,
and the common header of a non-GLM study's results.

A study of another kind first talks to the nodes on its own (one session, its own hash), then
fits the exact federated GLMs it derives (`fit_models`, in shared rounds) in a second session
whose hash is the batch hash of the models it carries, as every node recomputes it.
"""

from __future__ import annotations

from ..protocol.families import get_family
from ..protocol.study import StudySpec
from .glm import ModelFit, fit_models
from .results import build_results, provenance
from .runner import node_status
from .session import Session
from .studies import batch_hash

#: Model-level keys of build_results kept for a model nested in a non-GLM study's results.
MODEL_KEYS = (
    "study",
    "family",
    "link",
    "ratio_name",
    "formula",
    "where",
    "offset",
    "cov_type",
    "exposure",
    "exposure_term",
    "n",
    "n_missing",
    "n_cohort",
    "events",
    "converged",
    "iterations",
    "deviance",
    "null_deviance",
    "pearson_chi2",
    "scale",
    "df_model",
    "df_resid",
    "llf",
    "aic",
    "dropped_terms",
    "nodes",
    "terms",
)


def fit_derived(
    grid,
    specs: dict[str, StudySpec],
    *,
    min_nodes: int | None,
    earlier: Session | None = None,
    progress=None,
    timeout: float | None = 300.0,
    poll_interval: float = 0.0,
    optional: frozenset[str] = frozenset(),
) -> tuple[Session, dict[str, ModelFit]]:
    """Fit the derived GLMs together. Nodes that dropped out of the study's earlier session
    stay out, with their reason. `optional`: models a node may decline for too few rows
    (coordinator/glm.py: fit_models)."""
    session = derived_session(
        grid,
        specs,
        min_nodes=min_nodes,
        earlier=earlier,
        progress=progress,
        timeout=timeout,
        poll_interval=poll_interval,
    )
    fits = fit_models(session, specs, {key: [] for key in specs}, optional)
    return session, fits


def derived_session(
    grid,
    specs: dict[str, StudySpec],
    *,
    min_nodes: int | None,
    earlier: Session | None = None,
    progress=None,
    timeout: float | None = 300.0,
    poll_interval: float = 0.0,
) -> Session:
    """The session of the derived GLMs (fit_derived), its nodes as `earlier` left them."""
    ordered = [specs[k] for k in sorted(specs, key=lambda k: (len(k), k))]  # the nodes' order
    session = Session(
        grid, batch_hash(ordered), min_nodes=min_nodes, timeout=timeout, poll_interval=poll_interval, progress=progress
    )
    if earlier is not None:
        session.round = earlier.round
        for node_id, before in earlier.nodes.items():
            node = session.nodes.get(node_id)
            if node is not None:
                node.name = before.name
                node.data_version = before.data_version
                node.audit_hash, node.audit_seq = before.audit_hash, before.audit_seq  # until it answers again
                if not before.contributed:
                    node.contributed, node.dropped_reason = False, before.dropped_reason
                    node.dropped_at, node.refusals = before.dropped_at, before.refusals
    return session


def carry_lost(later: Session, earlier: Session) -> bool:
    """Nodes that left `later` (min_nodes let the study go on) leave `earlier` too, with their
    reason; True if a node did. A kind whose later steps rest on an earlier step's pooled
    numbers then runs that step again without them."""
    grew = False
    for node_id, node in later.nodes.items():
        before = earlier.nodes.get(node_id)
        if before is not None and before.contributed and not node.contributed:
            before.name = before.name or node.name
            before.contributed, before.dropped_reason, before.dropped_at = False, node.dropped_reason, node.dropped_at
            before.refusals = node.refusals
            before.audit_hash, before.audit_seq = node.audit_hash, node.audit_seq
            grew = True
    return grew


def model_result(fit: ModelFit, session: Session, engine: str) -> dict:
    """One fitted model as a nested entry of results.json (terms named as statsmodels)."""
    full = build_results(
        fit,
        study_hash=fit.spec.hash,
        engine=engine,
        node_status=node_status(session, fit.node_counts),
        rounds=session.round,
    )
    out = {key: full[key] for key in MODEL_KEYS}
    out["study_hash"] = fit.spec.hash
    return out


def header(spec: StudySpec) -> dict:
    """The fields every results.json starts with."""
    family = get_family(spec.family) if spec.family else None
    return {
        "study": spec.name,
        "title": spec.title,
        "study_hash": spec.hash,
        "kind": spec.kind,
        "family": spec.family or None,
        "link": family.link_name if family else None,
        "ratio_name": family.ratio_name if family else None,
        "where": spec.where,
    }


def footer(spec: StudySpec, engine: str, rounds: int) -> dict:
    return {"rounds": rounds, **provenance(spec, engine)}


def with_ratio(
    entry: dict, ratio: bool, keys=(("estimate", "ratio"), ("conf_low", "ratio_low"), ("conf_high", "ratio_high"))
) -> dict:
    """Add exp() of the estimate and CI (odds or rate ratios) where the family has them."""
    import math

    if ratio:
        for src, dst in keys:
            value = entry.get(src)
            entry[dst] = math.exp(value) if value is not None else None
    return entry

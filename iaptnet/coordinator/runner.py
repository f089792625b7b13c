"""Run a batch of studies on a Grid and turn them into results.

GLM studies share their rounds; studies of every other kind run through their kind's module
(coordinator/kinds.py). The same function runs inside the in-process engine and inside the
Flower ServerApp, so both engines give the same numbers for the same study.
"""

from __future__ import annotations

from flwr.serverapp.grid import Grid

from ..protocol.errors import SpecError
from ..protocol.sensitivity import fold
from .checkpoint import BatchCheckpoint, Checkpoints
from .glm import fit_models
from .kinds import module_for
from .results import build_results
from .session import ProgressFn, Session
from .studies import LoadedStudy, batch_hash, check_min_nodes

#: The group of a run's studies that are GLMs with a random intercept (each runs alone).
RANDOM_INTERCEPT = "glm with a random intercept"


def run_batch(
    grid: Grid,
    studies: list[LoadedStudy],
    *,
    engine: str,
    progress: ProgressFn | None = None,
    timeout: float | None = 300.0,
    poll_interval: float = 0.0,
    announce=None,
    checkpoints: Checkpoints | None = None,
) -> list[dict]:
    """Results of every study, in the order given. `announce(text)`, when given, hears which
    studies start (for a progress display), and whether a checkpoint was taken up.
    `checkpoints`: where the GLM batch keeps its Newton state after every round, and finds it
    when the run is submitted again (coordinator/checkpoint.py)."""
    asked = len(studies)
    # Each study's sensitivity analyses run beside it as studies of their own, and fold back
    # into its results (protocol/sensitivity.py).
    studies = list(studies) + [c for s in studies for _, c in s.companions]
    names = [s.spec.name for s in studies]
    if len(set(names)) != len(names):
        raise SpecError("two studies in one run share a name; give each study its own 'name'.")
    n_nodes = len(list(grid.get_node_ids()))
    check_min_nodes(
        studies,
        n_nodes,
        f"{n_nodes} node(s) are connected to the hub" if engine == "flower" else f"the network has {n_nodes} node(s)",
    )
    options = {"engine": engine, "progress": progress, "timeout": timeout, "poll_interval": poll_interval}
    by_kind: dict[str, list[int]] = {}
    for i, study in enumerate(studies):
        # A GLM with a random intercept runs alone, through coordinator/glmm.py.
        mixed = study.spec.kind == "glm" and "random_intercept" in study.spec.params
        by_kind.setdefault(RANDOM_INTERCEPT if mixed else study.spec.kind, []).append(i)
    results: list[dict | None] = [None] * len(studies)
    for kind, indices in by_kind.items():
        chosen = [studies[i] for i in indices]
        if kind == "glm":
            if announce:
                announce(f"{len(chosen)} regression(s) in shared rounds")
            out = run_glm_batch(grid, chosen, **options, checkpoints=checkpoints, note=announce)
        else:
            out = []
            for study in chosen:
                if announce:
                    announce(f"{study.spec.name} ({kind})")
                if kind == RANDOM_INTERCEPT:
                    from . import glmm

                    out.append(glmm.run_study(grid, study, **options))
                else:
                    out.append(module_for(kind).run_study(grid, study, **options))
        for i, result in zip(indices, out):
            results[i] = result
    extra = iter(results[asked:])
    return [
        fold(result, [(analysis, next(extra)) for analysis, _ in study.companions]) if study.companions else result
        for study, result in zip(studies[:asked], results[:asked])
    ]


def run_glm_batch(
    grid: Grid,
    studies: list[LoadedStudy],
    *,
    engine: str,
    progress: ProgressFn | None = None,
    timeout: float | None = 300.0,
    poll_interval: float = 0.0,
    checkpoints: Checkpoints | None = None,
    note=None,
) -> list[dict]:
    """GLM studies fitted together: every model travels in the same rounds. With
    `checkpoints`, their state is kept after every round and taken up again (fit_models)."""
    specs = {f"m{i}": s.spec for i, s in enumerate(studies)}
    stateful = {f"m{i}": list(s.parsed.stateful) for i, s in enumerate(studies)}
    min_nodes = [s.spec.min_nodes for s in studies if s.spec.min_nodes is not None]
    key = batch_hash([s.spec for s in studies])
    session = Session(
        grid,
        key,
        min_nodes=max(min_nodes) if min_nodes else None,
        timeout=timeout,
        poll_interval=poll_interval,
        progress=progress,
    )
    checkpoint = BatchCheckpoint(checkpoints, key, note) if checkpoints is not None else None
    fits = fit_models(session, specs, stateful, checkpoint=checkpoint)
    out = []
    for _key, fit in fits.items():
        status = node_status(session, fit.node_counts)
        out.append(
            build_results(fit, study_hash=fit.spec.hash, engine=engine, node_status=status, rounds=session.round)
        )
    if checkpoints is not None:
        checkpoints.done(key)  # the batch is done: nothing left to continue from
    return out


def node_status(session: Session, counts: dict[str, dict] | None = None) -> list[dict]:
    """The results' `nodes` entries: every node of the cohort, whether it contributed (with
    its data version and its counts, under the small-number rules) or why not, and the
    node's audit head after its last reply (`audit_head`: the anchor that `iaptnet node audit
    --verify --against` holds the node's log to)."""
    status = []
    for node in sorted(session.nodes.values(), key=lambda n: n.name or str(n.node_id)):
        entry = {
            "name": node.name or f"node {node.node_id}",
            "contributed": node.contributed,
            "data_version": node.data_version,
        }
        if node.contributed:
            entry.update((counts or {}).get(node.name, {}))
        else:
            entry["reason"] = node.dropped_reason
        if node.audit_hash and node.audit_seq > 0:
            entry["audit_head"] = {"seq": node.audit_seq, "hash": node.audit_hash}
        status.append(entry)
    return status

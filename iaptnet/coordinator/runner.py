"""Run a batch of GLM studies on a Grid and turn the fits into results.

The same function runs inside the in-process engine and inside the Flower ServerApp, so
both engines give the same numbers for the same study.
"""

from __future__ import annotations

from flwr.serverapp.grid import Grid

from ..protocol.errors import SpecError
from .glm import fit_models
from .results import build_results
from .session import ProgressFn, Session
from .studies import LoadedStudy, batch_hash


def run_batch(grid: Grid, studies: list[LoadedStudy], *, engine: str, progress: ProgressFn | None = None,
              timeout: float | None = 300.0, poll_interval: float = 0.0) -> list[dict]:
    names = [s.spec.name for s in studies]
    if len(set(names)) != len(names):
        raise SpecError("two studies in one run share a name; give each study its own 'name'.")
    specs = {f"m{i}": s.spec for i, s in enumerate(studies)}
    stateful = {f"m{i}": list(s.parsed.stateful) for i, s in enumerate(studies)}
    min_nodes = [s.spec.min_nodes for s in studies if s.spec.min_nodes is not None]
    session = Session(grid, batch_hash([s.spec for s in studies]),
                      min_nodes=max(min_nodes) if min_nodes else None,
                      timeout=timeout, poll_interval=poll_interval, progress=progress)
    fits = fit_models(session, specs, stateful)
    out = []
    for key, fit in fits.items():
        status = []
        for node in sorted(session.nodes.values(), key=lambda n: n.name or str(n.node_id)):
            entry = {"name": node.name or f"node {node.node_id}", "contributed": node.contributed,
                     "data_version": node.data_version}
            if node.contributed:
                entry.update(fit.node_counts.get(node.name, {}))
            else:
                entry["reason"] = node.dropped_reason
            status.append(entry)
        out.append(build_results(fit, study_hash=fit.spec.hash, engine=engine, node_status=status,
                                 rounds=session.round))
    return out

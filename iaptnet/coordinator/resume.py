"""A GLM batch's Newton state as a checkpoint, and a fit continued from one.

`snapshot` turns the state of `fit_models` after a round into JSON: the session (its round
count, every node of the cohort: contributing or why it left, data version, audit head), the
pooled centring and scaling, and for every model and its null model everything the next round
depends on. `restore` puts that state back into the models a new run has just prepared (the
nodes prepare again: their designs live only in their memory), after checking that it applies:
the same contributing nodes with the same data versions, no node the checkpoint did not know,
the same design columns. JSON keeps every float64 exactly, so the rounds that follow are the
uninterrupted run's own (coordinator/checkpoint.py says where the state is kept).
"""

from __future__ import annotations

import numpy as np

from .session import NodeStatus, Session

# ModelFit fields kept as they are (numbers, lists of strings or dicts) and as arrays.
_PLAIN = (
    "iterations",
    "halvings",
    "converged",
    "n",
    "n_missing",
    "n_cohort",
    "events",
    "dropped",
    "deviance",
    "pearson",
    "loglike_sum",
    "n_clusters",
    "node_counts",
    "node_stats",
    "holders",
    "prev_dev",
    "log_theta",
    "prev_log_theta",
    "prev_llf",
    "theta_second",
    "last_ratio",
    "meat_due",
)
_ARRAYS = ("active", "beta", "prev_beta", "cov", "meat")


def _fit_state(fit) -> dict:
    out = {"names": list(fit.names)}
    for name in _PLAIN:
        value = getattr(fit, name)
        out[name] = float(value) if isinstance(value, (np.floating, float)) else value
    for name in _ARRAYS:
        value = getattr(fit, name)
        out[name] = None if value is None else np.asarray(value).tolist()
        # The memory order too (scipy's solvers give Fortran order): a product with the same
        # numbers in the other order may round differently in the last bit.
        out[f"{name}_fortran"] = bool(value is not None and np.ndim(value) > 1 and np.isfortran(value))
    out["marginal_sums"] = {term: np.asarray(v).tolist() for term, v in fit.marginal_sums.items()}
    return out


def _put_fit_state(fit, state: dict) -> None:
    for name in _PLAIN:
        setattr(fit, name, state[name])
    for name in _ARRAYS:
        value = state[name]
        if value is None:
            setattr(fit, name, None)
        else:
            array = np.asarray(value, dtype=bool if name == "active" else float)
            setattr(fit, name, np.asfortranarray(array) if state.get(f"{name}_fortran") else array)
    fit.marginal_sums = {term: np.asarray(v, dtype=float) for term, v in state.get("marginal_sums", {}).items()}


def snapshot(session: Session, fits: dict, transform_state: dict) -> dict:
    """The state after a completed round, as JSON."""
    nodes = []
    for node in session.nodes.values():
        nodes.append(
            {
                "name": node.name or f"node {node.node_id}",
                "contributed": node.contributed,
                "reason": node.dropped_reason,
                "at": node.dropped_at,
                "data_version": node.data_version,
                "audit_hash": node.audit_hash,
                "audit_seq": node.audit_seq,
            }
        )
    return {
        "round": session.round,
        "nodes": nodes,
        "transform_state": transform_state,
        "models": {key: {"model": _fit_state(fit), "null": _fit_state(fit.null)} for key, fit in fits.items()},
    }


def restore(session: Session, fits: dict, state: dict) -> str | None:
    """Put a checkpoint's state into freshly prepared `fits`; None once done, else why the
    checkpoint does not apply (nothing is changed then)."""
    saved = {n["name"]: n for n in state.get("nodes", [])}
    answered = {n.name: n for n in session.active}
    contributing = {name for name, n in saved.items() if n["contributed"]}
    if missing := sorted(contributing - set(answered)):
        return f"{', '.join(missing)} did not answer this time"
    if new := sorted(set(answered) - set(saved)):
        return f"{', '.join(new)} joined since"
    for name in sorted(contributing):
        if answered[name].data_version != saved[name]["data_version"]:
            return f"{name}'s data changed (its data version is now {answered[name].data_version[:12]})"
    if set(state.get("models", {})) != set(fits):
        return "the studies differ"
    for key, fit in fits.items():
        if state["models"][key]["model"]["names"] != fit.names:
            return f"model '{fit.spec.name}' has different design columns"
    for key, fit in fits.items():
        _put_fit_state(fit, state["models"][key]["model"])
        _put_fit_state(fit.null, state["models"][key]["null"])
    for name, entry in saved.items():
        if entry["contributed"]:
            continue
        node = answered.get(name) or next((n for n in session.nodes.values() if n.name == name), None)
        if node is None:  # it left before the checkpoint and is not connected now
            node = NodeStatus(node_id=-1 - len(session.nodes), name=name)
            session.nodes[node.node_id] = node
        node.contributed = False
        node.dropped_reason, node.dropped_at = entry["reason"], entry["at"]
        node.data_version = entry["data_version"]
        node.audit_hash, node.audit_seq = entry["audit_hash"], entry["audit_seq"]
    session.round = int(state["round"])
    return None

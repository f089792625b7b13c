"""The coordinator half of CR2 (cov_type = "CR2"): one round at the converged estimate, then
clubSandwich's bias-reduced sandwich and Satterthwaite degrees of freedom from the nodes' sums.

With M the pooled inverse information (the unscaled covariance of the fit), the nodes return
sums over their clusters (node/cr2.py): the meat sum_j c_j c_j', per coefficient i the traces
E_i = sum_j (a_ji - b_ji) and Q_i = sum_j (a_ji^2 - 2 a_ji b_ji), and the matrices
S_i = sum_j u_ji u_ji'. Summed over the nodes (each cluster lies within one node: the prepare
refuses a cluster that spans two):

    V = M (sum_j c_j c_j') M,
    df_i = 2 E_i^2 / (2 (Q_i + tr(S_i M S_i M))),

the second being clubSandwich's Satterthwaite(): E = tr(P_i), Var = 2 sum_jk P_i[j, k]^2 with
P_i[j, k] = delta_jk a_ji - u_ji' M u_ki, whose off-diagonal part is tr(S_i M S_i M) summed
over every pair of clusters, the pairs across nodes included (docs/methods/glm.md#cr2).
"""

from __future__ import annotations

import numpy as np

from ..protocol import messages as m
from ..protocol.errors import ModelError
from ..protocol.kinds import glm as protocol
from .replies import check_replies, models_left, sum_replies


def cr2_round(session, fits: dict) -> list[str]:
    """The CR2 round for each converged CR2 model without its sums yet: the coefficients and
    M to the nodes that hold it, their sums back. (A model fitted again without a lost node
    has no meat; one restored from a checkpoint may have its meat without df: asked again.)
    Returns the models a node holding their rows left during the round (to be fitted again
    without it)."""
    asked = {
        key: fit
        for key, fit in fits.items()
        if fit.spec.cov_type == "CR2" and (fit.meat is None or getattr(fit, "df", None) is None)
    }
    if not asked:
        return []
    payload = {"models": list(asked), "cr2": {}}
    arrays = {}
    breads = {}
    for key, fit in asked.items():
        bread = (fit.cov + fit.cov.T) / 2.0  # (what the nodes receive, packed, is symmetric)
        breads[key] = bread
        payload["cr2"][key] = [int(a) for a in fit.active]
        arrays[protocol.beta_key(key)] = fit.beta
        arrays[protocol.bread_key(key)] = m.pack_upper(bread)
    replies = session.ask(protocol.ROUND, payload, arrays)
    check_replies(replies)
    lost = models_left(fits, session)
    if lost:
        return lost
    for key, fit in asked.items():
        mine = [r for r in replies if r.node in fit.holders]
        p = fit.rank
        meat = m.unpack_upper(sum_replies(mine, protocol.cr2_meat_key(key)), p)
        trace = sum_replies(mine, protocol.cr2_trace_key(key))
        cross = sum_replies(mine, protocol.cr2_cross_key(key)).reshape(p, -1)
        fit.meat = meat
        fit.df = satterthwaite(breads[key], trace, np.array([m.unpack_upper(c, p) for c in cross]), fit.spec.name)
    return []


def satterthwaite(bread: np.ndarray, trace: np.ndarray, cross: np.ndarray, name: str = "") -> np.ndarray:
    """Per coefficient i: 2 E_i^2 / Var_i, E_i = trace[i], Var_i = 2 (trace[p + i] +
    tr(S_i M S_i M)) with S_i = cross[i] and M = bread."""
    p = bread.shape[0]
    out = np.empty(p)
    for i in range(p):
        sm = cross[i] @ bread
        var = 2.0 * (trace[p + i] + float(np.sum(sm * sm.T)))
        out[i] = 2.0 * trace[i] ** 2 / var if var > 0 else np.nan
    if not np.all(np.isfinite(out)) or np.any(out <= 0):
        raise ModelError(
            f"model '{name}': the Satterthwaite degrees of freedom of the CR2 standard errors cannot be computed "
            '(a term varies within no cluster\'s adjustment); use cov_type = "cluster".'
        )
    return out

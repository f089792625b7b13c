"""What every coordinator kind does with a round's replies: check them, sum an array over them,
and find the models a node holding their rows has left (glm, cr2, glmm, access, table and
propensity studies)."""

from __future__ import annotations

import numpy as np

from ..protocol import messages as m
from ..protocol.errors import NetworkError


def check_replies(replies: list[m.Reply]) -> None:
    """Some node answered, and no two nodes share a name."""
    if not replies:
        raise NetworkError("no node contributed to the study.")
    names = [r.node for r in replies]
    if len(set(names)) != len(names):
        raise NetworkError("two nodes of the network use the same name; each node needs its own.")


def sum_replies(replies: list[m.Reply], name: str) -> np.ndarray:
    """Sum one array over the replies, in their (node-name) order."""
    total = None
    for reply in replies:
        try:
            value = reply.arrays[name]
        except KeyError:
            raise NetworkError(f"node {reply.node} sent a reply without '{name}'.") from None
        total = value.copy() if total is None else total + value
    return total


def models_left(fits: dict, session) -> list[str]:
    """Keys of the models (each with the `holders` of its rows) that a node holding rows of
    them has just left."""
    active = {n.name for n in session.active}
    return [key for key, fit in fits.items() if any(h not in active for h in fit.holders)]

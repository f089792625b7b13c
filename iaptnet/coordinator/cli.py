"""`iaptnet coordinator ...`: the commands the network's hub operator runs."""

from __future__ import annotations


def register(sub) -> None:
    """The hub's commands arrive with the Flower deployment (coordinator start, register-node)."""

"""`iaptnet node approve | audit`: the Trust's governance commands (policy and audit log)."""

from __future__ import annotations


def register(node_sub) -> None:
    """Governance commands register here."""

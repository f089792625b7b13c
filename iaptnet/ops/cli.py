"""`iaptnet pki ...`, `iaptnet network ...`: operators' tooling."""

from __future__ import annotations


def register(sub) -> None:
    """Key tooling and the local network launcher register their commands here."""

"""IAPT-specific node logic: the derived variables and the NICE treatment-match table."""

from .derive import consistency_notes, derive

__all__ = ["consistency_notes", "derive"]

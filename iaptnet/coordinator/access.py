"""Coordinator half of a study kind (see coordinator/kinds.py); not yet implemented."""

"""Imports every module that registers task handlers, so the dispatcher knows them all."""

from . import access, describe, its, meta, propensity, tasks  # noqa: F401

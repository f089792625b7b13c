"""Which coordinator module runs each kind of study.

Every kind's module exposes `run_study(grid, study, *, engine, progress, timeout,
poll_interval) -> dict` (the results of one LoadedStudy) and `render(result) -> str` (a short
human report). GLM studies of one run share their rounds (coordinator/runner.py); each study
of any other kind runs in its own conversation with the nodes.
"""

from __future__ import annotations

from importlib import import_module

from ..protocol.errors import SpecError
from ..protocol.kinds import MODULES  # kind -> module name, the same in protocol/, node/ and here


def module_for(kind: str):
    module = import_module(f"{__package__}.{MODULES[kind]}")
    if not hasattr(module, "run_study"):
        raise SpecError(f"studies of kind '{kind}' are not available in this release.")
    return module

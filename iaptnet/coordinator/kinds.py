"""Which coordinator module runs each kind of study.

Every kind's module exposes `run(grid, studies, *, engine, progress, timeout, poll_interval)
-> list[dict]` (one results dict per study, in order) and `render(result) -> str` (a short
human report). GLM studies of one run share their rounds (coordinator/runner.py); each other
kind runs its studies in its own conversation with the nodes.
"""

from __future__ import annotations

from importlib import import_module

from ..protocol.errors import SpecError

#: kind -> module under iaptnet.coordinator
MODULES = {
    "table": "describe",
    "psm": "propensity",
    "iptw": "propensity",
    "access": "access",
    "meta": "meta",
    "its": "its",
}


def module_for(kind: str):
    module = import_module(f"{__package__}.{MODULES[kind]}")
    if not hasattr(module, "run"):
        raise SpecError(f"studies of kind '{kind}' are not available in this release.")
    return module

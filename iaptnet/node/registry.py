"""Which function answers each task kind at the node.

A kind's node module (node/glm.py, node/describe.py, ...) registers its task handlers with
`@handler(kind, studies=...)`; the dispatcher (node/dispatch.py) looks them up here, after
`load_kinds()` has imported every kind's module once. The registry imports no kind module at
import time, so kind modules and the dispatcher never import each other.

`studies="payload"`: the task carries its studies as wire specs in `payload["models"]`
(approval is checked on their hashes); `"prepared"`: it continues a study this node prepared
(same approval); `"none"`: it computes on no rows, so it may release only public strings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module

STUDY_MODES = ("payload", "prepared", "none")

#: The node modules that register task handlers (one per kind, see protocol/kinds/__init__.py;
#: and glmm, the tasks of a GLM with a random intercept).
KIND_MODULES = ("glm", "describe", "propensity", "access", "meta", "its", "glmm")


@dataclass(frozen=True)
class Registration:
    fn: Callable
    studies: str


HANDLERS: dict[str, Registration] = {}
_loaded = False


def handler(kind: str, *, studies: str = "payload"):
    """Register the decorated function as the answer to tasks of `kind`."""
    if studies not in STUDY_MODES:
        raise ValueError(f"studies must be one of {STUDY_MODES}")

    def register(fn: Callable) -> Callable:
        HANDLERS[kind] = Registration(fn, studies)
        return fn

    return register


def load_kinds() -> dict[str, Registration]:
    """Every task kind's handler (importing the kind modules on first use)."""
    global _loaded
    if not _loaded:
        for name in KIND_MODULES:
            import_module(f"{__package__}.{name}")
        _loaded = True
    return HANDLERS

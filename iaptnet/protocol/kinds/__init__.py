"""The one table of study kinds: each kind's module here is its wire contract and its parser.

A kind module defines `parse(data, schema, source) -> (StudySpec, parsed)`, where the
StudySpec carries the common fields (name, where, merge, min_nodes, ...) and the kind's own
settings (canonical, JSON; part of the study hash), and `parsed` is whatever the kind's
coordinator half needs (for example ParsedFormulas); its task names and reply keys are
declared here once (the GLM's in glm.py). Pure: no I/O, no pandas.

The node half of a kind lives in node/<module>.py (its task handlers, registered with
node/registry.py), the coordinator half in coordinator/<module>.py (`run_study` and `render`,
found through coordinator/kinds.py; the GLM's studies share their rounds, coordinator/runner.py).
docs/developer/adding-a-kind.md walks through adding one.
"""

from __future__ import annotations

from importlib import import_module

from ..errors import SpecError

#: kind -> module under iaptnet.protocol.kinds
MODULES = {
    "glm": "glm",
    "table": "describe",
    "psm": "propensity",
    "iptw": "propensity",
    "access": "access",
    "meta": "meta",
    "its": "its",
}


def parse_kind(kind: str, data: dict, schema, source: str):
    module = import_module(f"{__name__}.{MODULES[kind]}")
    parse = getattr(module, "parse", None)
    if parse is None:
        raise SpecError(f"{source}: studies of kind '{kind}' are not available in this release.")
    return parse(data, schema, source)

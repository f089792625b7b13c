"""Study kinds beyond the GLM: each module here parses and validates its kind's study TOML.

A kind module defines `KEYS` (the fields its study TOML may have) and
`parse(data, schema, source) -> (StudySpec, parsed)`, where the StudySpec carries the common
fields (name, where, merge, min_nodes, ...) and the kind's own settings in `params`
(canonical, JSON; part of the study hash), and `parsed` is whatever the kind's coordinator
half needs (for example ParsedFormulas). Pure: no I/O, no pandas.

The node half of a kind lives in node/<kind module>.py (its task handlers), the coordinator
half in coordinator/<kind module>.py (`run`), both registered by name in
coordinator/kinds.py and node/task_kinds.py.
"""

from __future__ import annotations

from importlib import import_module

from ..errors import SpecError

#: kind -> module under iaptnet.protocol.kinds
MODULES = {
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

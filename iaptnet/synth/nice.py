"""The NICE match table (docs/reference/domain.md#nice-match) as the generator uses it to plant matched and
mismatched treatments.

The node derives `nice_match` from the extract with its own copy of this table; the tests check
that the node's derivation gives back exactly the mismatch the generator planted, so the two
copies are an independent check on each other.
"""

from __future__ import annotations

import numpy as np

#: problem_descriptor code -> derived `problem` group (iapt_derived.toml).
PROBLEM_GROUP = {
    "F32": "depression",
    "F33": "depression",
    "F41.1": "gad",
    "F41.0": "panic",
    "F40.0": "agoraphobia",
    "F40.1": "social_anxiety",
    "F40.2": "specific_phobia",
    "F41.2": "mixed_anxiety_depression",
    "F42": "ocd",
    "F43.1": "ptsd",
    "F45.2": "health_anxiety",
    "BDD": "bdd",
    "F40-F43": "other_anxiety",
    "OTHER_MH": "other",
    "UNSPECIFIED": "other",
}

_SELF_HELP = ("GSH_BOOK", "GSH_COMP")

#: Problem group -> therapies that count as matched (first or second line). Groups absent here
#: have no guideline: their `nice_match` is missing.
MATCHED = {
    "depression": (
        "GSH_BOOK",
        "GSH_COMP",
        "NGSH_COMP",
        "PHYS_ACT",
        "PSYED_PEER",
        "BA_LI",
        "CBT",
        "BA_HI",
        "IPT",
        "CFD",
        "COUPLES_DEP",
        "DIT",
        "COLLAB_CARE",
        "MINDFUL",
    ),
    "gad": ("NGSH_BOOK", *_SELF_HELP, "PSYED_PEER", "CBT", "APPLIED_RELAX"),
    "panic": (*_SELF_HELP, "NGSH_BOOK", "CBT"),
    "agoraphobia": (*_SELF_HELP, "NGSH_BOOK", "CBT"),
    "social_anxiety": ("CBT", *_SELF_HELP, "DIT"),
    "specific_phobia": ("CBT", *_SELF_HELP),
    "ocd": ("CBT", *_SELF_HELP, "PSYED_PEER"),
    "ptsd": ("CBT", "EMDR", "GSH_COMP"),
    "health_anxiety": ("CBT", *_SELF_HELP),
    "bdd": ("CBT", *_SELF_HELP),
}


def match_matrix(problems: tuple[str, ...], therapies: tuple[str, ...]) -> np.ndarray:
    """int8 [problem code, therapy] table: 1 matched, 0 mismatched, -1 no guideline."""
    out = np.full((len(problems), len(therapies)), -1, dtype=np.int8)
    for i, code in enumerate(problems):
        group = PROBLEM_GROUP[code]
        if group in MATCHED:
            out[i] = [1 if t in MATCHED[group] else 0 for t in therapies]
    return out

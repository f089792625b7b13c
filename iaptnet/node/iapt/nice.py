"""Which therapies NICE recommends for each presenting problem (docs/reference/domain.md#nice-match), as data.

A referral's treatment "matches" when its primary therapy is in the first- or second-line set
for its problem descriptor. Problems with no applicable guideline are absent from the table, so
`nice_match` is missing for them. The cells are recalled guidance [A: docs/reference/domain.md#nice-match]: a Trust
that disagrees edits this table, not the derivation code.

Simplifications: COLLAB_CARE (NICE: depression with a long-term condition) and MINDFUL (NICE:
relapse prevention) count as matched for any depression referral; SIGNPOST, OTHER_LI and
OTHER_HI are never matched.
"""

from __future__ import annotations

_DEPRESSION = {
    "first": ("GSH_BOOK", "GSH_COMP", "NGSH_COMP", "PHYS_ACT", "PSYED_PEER", "BA_LI", "CBT", "BA_HI", "IPT"),
    "second": ("CFD", "COUPLES_DEP", "DIT", "COLLAB_CARE", "MINDFUL"),
}
_PANIC = {"first": ("GSH_BOOK", "NGSH_BOOK", "GSH_COMP", "CBT"), "second": ()}
_BODY_ANXIETY = {"first": ("CBT",), "second": ("GSH_BOOK", "GSH_COMP")}

#: problem_descriptor level -> first- and second-line primary_therapy levels.
NICE_RECOMMENDED: dict[str, dict[str, tuple[str, ...]]] = {
    "F32": _DEPRESSION,
    "F33": _DEPRESSION,
    "F41.1": {"first": ("NGSH_BOOK", "GSH_BOOK", "GSH_COMP", "PSYED_PEER", "CBT", "APPLIED_RELAX"), "second": ()},
    "F41.0": _PANIC,
    "F40.0": _PANIC,
    "F40.1": {"first": ("CBT",), "second": ("GSH_BOOK", "GSH_COMP", "DIT")},
    "F40.2": {"first": ("CBT",), "second": ("GSH_BOOK", "GSH_COMP")},
    "F42": {"first": ("CBT", "GSH_BOOK", "GSH_COMP", "PSYED_PEER"), "second": ()},
    "F43.1": {"first": ("CBT", "EMDR"), "second": ("GSH_COMP",)},
    "F45.2": _BODY_ANXIETY,
    "BDD": _BODY_ANXIETY,
}

#: Descriptors with no applicable guideline: nice_match is missing (NCEL's "inappropriate
#: problem descriptors"). Listed so that a test can check every schema level is accounted for.
NO_GUIDELINE = ("F41.2", "F40-F43", "OTHER_MH", "UNSPECIFIED")


def matched_therapies(descriptor: str) -> frozenset[str] | None:
    """The therapies that match `descriptor`, or None where no guideline applies."""
    lines = NICE_RECOMMENDED.get(descriptor)
    return None if lines is None else frozenset(lines["first"] + lines["second"])

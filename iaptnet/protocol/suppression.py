"""Secondary suppression of additive count tables: no suppressed count can be recovered as a
total minus the counts shown beside it.

A table is a set of *relations*, each a total and the parts it is the sum of (a row of a
cross-tabulation and its row total, a column and its column total, ...). Primary suppression
hides small counts; then, as long as some relation hides exactly one of its members, the
rule hides one more member of that relation:

- the part shown with the smallest non-zero count (first in the relation's order on ties);
- else the relation's total, if shown;
- else the first part shown (a zero).

Relations are visited in their given order, again and again, until every relation hides none
or at least two of its members. This is the usual heuristic of statistical offices for linked
tables (it hides more than an optimal solver would, never less than the rule). Pure: the
caller passes the counts (exact at a node; the pooled values at the coordinator). Nested
counts (a funnel's steps) add pairs whose difference must not be shown when it is small.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

Relation = tuple[Hashable, Sequence[Hashable]]  # (total, parts)


def secondary(values: Mapping[Hashable, float], hidden: set, relations: Sequence[Relation],
              differences: Sequence[tuple[Hashable, Hashable]] = ()) -> set:
    """The cells to hide: `hidden` (the primary suppressions) plus the complementary ones.

    `differences` are pairs (a, b) of shown cells whose difference a - b is itself a small
    count (e.g. people leaving between two steps of a funnel): one of them must be hidden,
    so b is hidden when both are shown. Each pass visits the relations, then the pairs."""
    out = set(hidden)
    changed = True
    while changed:
        changed = False
        for total, parts in relations:
            members = [total, *parts]
            if sum(1 for key in members if key in out) != 1:
                continue
            out.add(_complement(values, out, total, parts))
            changed = True
        for a, b in differences:
            if a not in out and b not in out:
                out.add(b)
                changed = True
    return out


def _complement(values, out: set, total, parts):
    shown = [key for key in parts if key not in out]
    nonzero = [key for key in shown if values[key] != 0]
    if nonzero:
        return min(nonzero, key=lambda key: (values[key], shown.index(key)))
    if total not in out:
        return total
    return shown[0]


def unprotected(hidden: set, relations: Sequence[Relation]) -> list[Relation]:
    """Relations hiding exactly one member (empty when the table is protected)."""
    return [(total, parts) for total, parts in relations
            if sum(1 for key in (total, *parts) if key in hidden) == 1]

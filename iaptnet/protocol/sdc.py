"""Statistical disclosure control of counts: one rule for every kind and every display.

`round_count` is NHS Digital's small-number rule. 0 stays 0 (nobody to protect), 1 to
`suppress_max` are suppressed (a few people could be recognised), others are rounded to the
nearest `round_to`, halves up (two releases then cannot be differenced down to a person).

`suppress` completes the suppression of linked tables, given as relations (a total and the
parts it is the sum of), chains (steps each holding a subset of the previous step's people: a
funnel) and pairs of cells whose difference is small. From the small counts it hides more
until:

(a) no relation hides exactly one member: it would be its total minus the parts shown;
(b) a hidden total hides all its parts, zeros too: beside a suppressed total of a few people
    the zeros say which levels they do not have, and so which cells hold them;
(c) in a chain, every step after a small one is hidden: the later steps hold some of its few
    people, and a 0 among them says what became of all of them;
(d) a total the analyst knows from elsewhere (`implicit`: an exact model count) cannot be
    hidden, so a relation hiding one part hides another, a zero if need be;
(e) those rules look at one relation at a time, an attacker at all of them together and knows
    counts are not negative. With exact counts (a node's own, the coordinator's exact margins)
    the result is audited: each hidden count and small difference must take two values among
    the non-negative completions of what is shown, else a neighbour is hidden too. Counts that
    the shown zeros alone make 0 are public and exempt. A table pooled from protected tables
    needs no audit: a count free at one node stays free in the sum.

Complements are chosen deterministically: a non-zero count before a zero, a cell whose hiding
hides fewest others by (b) (so a part before a total), one that completes other relations
rather than opens new ones, the smallest, the first listed. Pure.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

#: The network rule (NHS Digital): what the coordinator applies to counts it forms itself.
SUPPRESS_MAX = 7
ROUND_TO = 5
TOLERANCE = 1e-7


def round_count(n: float, suppress_max: int = SUPPRESS_MAX, round_to: int = ROUND_TO) -> int | None:
    """A count as released: 0 stays 0, 1..suppress_max is None, others rounded (halves up)."""
    n = int(round(float(n)))
    if n < 0:
        raise ValueError("a count cannot be negative")
    if n == 0:
        return 0
    if n <= suppress_max:
        return None
    return int(math.floor(n / round_to + 0.5) * round_to)


@dataclass(frozen=True)
class Relation:
    """`total` is the sum of `parts`. `implicit`: the analyst knows the total from elsewhere,
    so it is never hidden (its value, in `values`, is used by the audit)."""

    total: Hashable
    parts: tuple
    implicit: bool = False


@dataclass(frozen=True)
class Chain:
    """Counts of nested groups: each step's people are among the previous step's."""

    steps: tuple


@dataclass(frozen=True)
class _Leavers:
    """The (unshown) difference between two steps of a chain."""

    earlier: Hashable
    later: Hashable


def suppress(
    values: Mapping[Hashable, float | None],
    small: Iterable,
    relations: Sequence,
    differences: Sequence[tuple[Hashable, Hashable]] = (),
    hidden: Iterable = (),
) -> set:
    """The cells to hide: `small` (suppressed for being small), `hidden` (hidden for another
    reason, e.g. by a node) and the complementary cells rules (a)-(e) add.

    `relations` holds `Relation`s, (total, parts) tuples and `Chain`s; `differences` pairs
    (earlier, later) of chain steps whose difference is small (not both may be shown; the
    later is hidden). `values` gives the counts; where any is unknown (None) or the relations
    do not add up (rounded counts), the audit (e) is skipped."""
    links = _Links(relations, differences)
    small = set(small)
    out = links.close(values, small | set(hidden), small)
    if links.exact(values):
        out = links.audit(values, out, small)
    return out


def unprotected(hidden: set, relations: Sequence) -> list[Relation]:
    """Relations hiding exactly one member (an implicit total counts as shown): empty when
    rule (a) holds."""
    links = _Links(relations, ())
    return [r for r in links.relations if links.hidden_members(r, hidden) == 1]


class _Links:
    """A table's relations, chains and small differences, indexed for the rules."""

    def __init__(self, relations: Sequence, differences: Sequence):
        self.relations: list[Relation] = []
        self.chains: list[tuple] = []
        for item in relations:
            if isinstance(item, Chain):
                self.chains.append(tuple(item.steps))
            elif isinstance(item, Relation):
                self.relations.append(Relation(item.total, tuple(item.parts), item.implicit))
            else:
                total, parts = item
                self.relations.append(Relation(total, tuple(parts)))
        self.differences = [(a, b) for a, b in differences]
        self.order: dict = {}
        for r in self.relations:
            for key in (r.total, *r.parts):
                self.order.setdefault(key, len(self.order))
        for key in [s for steps in self.chains for s in steps] + [k for pair in self.differences for k in pair]:
            self.order.setdefault(key, len(self.order))
        self.fixed = {r.total for r in self.relations if r.implicit}
        self.breakdown: dict = {}  # hideable total -> its parts (rule b)
        for r in self.relations:
            if not r.implicit:
                self.breakdown.setdefault(r.total, []).extend(r.parts)
        self.touching: dict = {}  # cell -> the relations, chains and pairs it is in
        for group in [*self.relations, *self.chains, *self.differences]:
            members = (group.total, *group.parts) if isinstance(group, Relation) else group
            for key in members:
                self.touching.setdefault(key, []).append(group)

    def hidden_members(self, r: Relation, out: set) -> int:
        return sum(p in out for p in r.parts) + (not r.implicit and r.total in out)

    # ------------------------------------------------------------------ rules (a)-(d)

    def close(self, values, out: set, small: set) -> set:
        out = set(out)
        changed = True
        while changed:
            changed = False
            for steps in self.chains:  # (c)
                first = next((k for k, s in enumerate(steps) if s in small), None)
                if first is not None:
                    for s in steps[first + 1 :]:
                        if s not in out:
                            out.add(s)
                            changed = True
            for r in self.relations:
                if not r.implicit and r.total in out:  # (b)
                    new = [p for p in r.parts if p not in out]
                    if new:
                        out.update(new)
                        changed = True
                    continue
                if self.hidden_members(r, out) != 1:  # (a), (d)
                    continue
                shown = [p for p in r.parts if p not in out and p not in self.fixed]
                if shown:
                    out.add(min(shown, key=lambda p: self.cost(values, out, p)))
                elif not r.implicit:
                    out.add(r.total)
                else:
                    continue
                changed = True
            for a, b in self.differences:
                if a not in out and b not in out:
                    out.add(b if b not in self.fixed else a)
                    changed = True
        return out

    def cost(self, values, out: set, key) -> tuple:
        value = values.get(key)
        value = math.inf if value is None else value
        return value == 0, self.cascade(key, out), self.debt(key, out), value, self.order.get(key, math.inf)

    def debt(self, key, out: set) -> int:
        """Relations that hiding `key` leaves hiding exactly one member (each needs another
        cell hidden), less those it completes: hiding cells that close a cycle is cheaper."""
        n = 0
        for group in self.touching.get(key, ()):
            if isinstance(group, Relation):
                hidden = self.hidden_members(group, out)
                n += (hidden == 0) - (hidden == 1)
        return n

    def cascade(self, key, out: set) -> int:
        """How many shown cells hiding `key` hides with it by rule (b)."""
        seen, stack = {key}, [key]
        while stack:
            for part in self.breakdown.get(stack.pop(), ()):
                if part not in seen and part not in out:
                    seen.add(part)
                    stack.append(part)
        return len(seen) - 1

    # ------------------------------------------------------------------ the audit (e)

    def exact(self, values) -> bool:
        """Every count known and every relation and chain holding exactly."""

        def known(key):
            v = values.get(key)
            return v is not None and math.isfinite(v)

        if not all(known(key) and values[key] >= 0 for key in self.order):
            return False
        for r in self.relations:
            if abs(values[r.total] - sum(values[p] for p in r.parts)) > TOLERANCE:
                return False
        steps = [pair for chain in self.chains for pair in zip(chain, chain[1:])] + self.differences
        return all(values[a] >= values[b] - TOLERANCE for a, b in steps)

    def audit(self, values, out: set, small: set) -> set:
        given_up: set = set()
        while True:
            found = [item for item in self.pinned(values, out) if item not in given_up]
            if not found:
                return out
            target = found[0]
            candidates = self.neighbours(values, out, target)
            for key in candidates:
                trial = self.close(values, out | {key}, small)
                if not self.pinned(values, trial, target):
                    out = trial
                    break
            else:
                if candidates:  # no single cell frees it: hide the best and look again
                    out = self.close(values, out | {candidates[0]}, small)
                else:
                    given_up.add(target)

    def known_zero(self, values, out: set) -> set:
        """Hidden counts the shown zeros alone set to 0 (parts of a total shown as 0, steps
        after a step shown as 0): public, so exempt from the audit."""
        zero: set = set()

        def is_zero(key):
            return key in zero or (key not in out and values[key] == 0)

        changed = True
        while changed:
            changed = False
            for r in self.relations:
                if is_zero(r.total):
                    new = [p for p in r.parts if p in out and p not in zero]
                elif r.total in out and all(is_zero(p) for p in r.parts):
                    new = [r.total]
                else:
                    new = []
                if new:
                    zero.update(new)
                    changed = True
            for steps in self.chains:
                first = next((k for k, s in enumerate(steps) if is_zero(s)), None)
                if first is not None:
                    new = [s for s in steps[first + 1 :] if s in out and s not in zero]
                    if new:
                        zero.update(new)
                        changed = True
        return zero

    def pinned(self, values, out: set, only=None) -> list:
        """Hidden counts (and leavers of small differences) that take one value in every
        non-negative completion of the shown counts; with `only`, whether that one does."""
        system = _System(self, values, out)
        exempt = self.known_zero(values, out)
        protected = [k for k in system.variables if not isinstance(k, _Leavers) and k not in exempt]
        protected += [
            _Leavers(a, b) for a, b in self.differences if _Leavers(a, b) in system.variables and a not in exempt
        ]
        if only is not None:
            protected = [only] if only in protected else []
        by_component: dict = {}
        for key in protected:
            by_component.setdefault(system.root(key), []).append(key)
        found = []
        for keys in by_component.values():
            members, a, b, _ = system.block(keys[0])
            free, _ = _free(
                a,
                b,
                np.array(
                    [values.get(system.names[i], 1) == 0 or isinstance(system.names[i], _Leavers) for i in members]
                ),
            )
            local = {i: j for j, i in enumerate(members)}
            found += [key for key in keys if not free[local[system.variables[key]]]]
        return sorted(found, key=self._rank)

    def _rank(self, item):
        key = item.later if isinstance(item, _Leavers) else item
        return self.order.get(key, math.inf), isinstance(item, _Leavers)

    def neighbours(self, values, out: set, item) -> list:
        """Shown cells sharing a relation, chain or pair with the hidden counts linked to
        `item`: the cells that could free it, best first. Hiding a cell adds a column to the
        attacker's equations; `item` stays fixed unless that column lies in the equations'
        column space and meets the combination of equations that fixes it. Cells passing that
        test come first, then members of the equations combined, then by cost."""
        system = _System(self, values, out)
        if item not in system.variables:
            return []
        members, a, b, sources = system.block(item)
        maybe_zero = np.array(
            [values.get(system.names[i], 1) == 0 or isinstance(system.names[i], _Leavers) for i in members]
        )
        _, hull = _free(a, b, maybe_zero)
        target = np.zeros(len(members))
        target[members.index(system.variables[item])] = 1.0
        weights = np.linalg.lstsq(hull.T, target, rcond=None)[0]
        left = _null_space(hull.T)  # combinations of the equations that vanish
        cells = set()
        for i in members:
            key = system.names[i]
            cells.update((key.earlier, key.later) if isinstance(key, _Leavers) else (key,))
        candidates = {
            k
            for key in cells
            for group in self.touching.get(key, ())
            for k in _members(group)
            if k not in out and k not in self.fixed
        }

        def frees(key) -> tuple[bool, bool]:
            column = np.zeros(len(hull))
            for k, group in enumerate(sources):
                if isinstance(group, Relation):
                    column[k] = (key in group.parts) - (key == group.total and not group.implicit)
                else:
                    column[k] = (key == group[0]) - (key == group[1])
            used = bool(np.any((column != 0) & (np.abs(weights) > TOLERANCE)))
            alone = (
                used
                and abs(weights @ column) > TOLERANCE
                and (left.size == 0 or np.abs(left.T @ column).max() < TOLERANCE)
            )
            return not alone, not used

        return sorted(candidates, key=lambda k: (*frees(k), self.cost(values, out, k)))


def _members(group) -> tuple:
    return (group.total, *group.parts) if isinstance(group, Relation) else tuple(group)


class _System:
    """The attacker's equations over the hidden counts and the chains' leavers: one row
    {variable: coefficient} = right-hand side per relation, chain step or pair with a hidden
    member (`sources`), split into connected components."""

    def __init__(self, links: _Links, values, out: set):
        self.variables: dict = {}
        self.rows: list[dict] = []
        self.rhs: list[float] = []
        self.sources: list = []

        def var(key):
            return self.variables.setdefault(key, len(self.variables))

        for r in links.relations:
            if not links.hidden_members(r, out):
                continue
            row, b = {}, 0.0
            for p in r.parts:
                if p in out:
                    row[var(p)] = 1.0
                else:
                    b -= values[p]
            if not r.implicit and r.total in out:
                row[var(r.total)] = -1.0
            else:
                b += values[r.total]
            self._add(row, b, r)
        pairs = dict.fromkeys([pair for chain in links.chains for pair in zip(chain, chain[1:])])
        pairs.update(dict.fromkeys(links.differences))
        for a, b in pairs:  # a = b + leavers, leavers >= 0
            if a not in out and b not in out:
                continue
            row, c = {var(_Leavers(a, b)): -1.0}, 0.0
            for key, sign in ((a, 1.0), (b, -1.0)):
                if key in out:
                    row[var(key)] = row.get(var(key), 0.0) + sign
                else:
                    c -= sign * values[key]
            self._add(row, c, (a, b))
        self.names = {i: k for k, i in self.variables.items()}
        self.parent = list(range(len(self.variables)))
        for row in self.rows:
            first, *rest = row
            for j in rest:
                self.parent[self._find(j)] = self._find(first)

    def _add(self, row: dict, b: float, source) -> None:
        self.rows.append(row)
        self.rhs.append(b)
        self.sources.append(source)

    def _find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def root(self, key) -> int:
        return self._find(self.variables[key])

    def block(self, key):
        """The component holding `key`: (its variables, the matrix and right-hand side of
        its rows, the rows' sources)."""
        root = self.root(key)
        members = [i for i in range(len(self.variables)) if self._find(i) == root]
        local = {i: j for j, i in enumerate(members)}
        rows = [k for k, row in enumerate(self.rows) if self._find(next(iter(row))) == root]
        a = np.zeros((len(rows), len(members)))
        for n, k in enumerate(rows):
            for i, coef in self.rows[k].items():
                a[n, local[i]] = coef
        return members, a, np.array([self.rhs[k] for k in rows]), [self.sources[k] for k in rows]


def _free(a: np.ndarray, b: np.ndarray, maybe_zero: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For {x >= 0 : a x = b} (holding the true counts), which coordinates take more than
    one value, and the equations of its affine hull: a x = b plus x_i = 0 for the coordinates
    that are 0 in every point. Only coordinates 0 in the true counts (`maybe_zero`) can be;
    one linear program finds them (Freund, Roundy and Todd 1985: maximise sum t, t_i <= x_i,
    t_i <= 1, a x = lambda b, lambda >= 1). A coordinate is fixed when it lies in the row
    space of the hull's equations."""
    m, n = a.shape
    always_zero = np.zeros(n, dtype=bool)
    if maybe_zero.any():
        from scipy import sparse
        from scipy.optimize import linprog

        eye = sparse.identity(n, format="csr")
        a_eq = sparse.hstack([sparse.csr_matrix(a), sparse.csr_matrix((m, n)), sparse.csr_matrix(-b[:, None])])
        a_ub = sparse.hstack([-eye, eye, sparse.csr_matrix((n, 1))])
        cost = np.concatenate([np.zeros(n), -np.ones(n), [0.0]])
        bounds = [(0, None)] * n + [(0, 1)] * n + [(1, None)]
        res = linprog(cost, A_ub=a_ub, b_ub=np.zeros(n), A_eq=a_eq, b_eq=np.zeros(m), bounds=bounds, method="highs")
        if res.status == 0:
            always_zero = maybe_zero & (res.x[n : 2 * n] < 0.5)
    hull = np.vstack([a, np.eye(n)[always_zero]])
    return np.linalg.norm(_null_space(hull), axis=1) > TOLERANCE, hull


def _null_space(a: np.ndarray) -> np.ndarray:
    """An orthonormal basis (columns) of {x : a x = 0}, by pivoted QR of a's transpose."""
    from scipy.linalg import qr

    if a.shape[0] == 0:
        return np.eye(a.shape[1])
    q, r, _ = qr(a.T, pivoting=True)  # the columns of q after the rank span the null space
    diagonal = np.abs(np.diag(r))
    rank = int(np.sum(diagonal > 1e-12 * max(1.0, diagonal.max(initial=0.0)) * max(a.shape)))
    return q[:, rank:]

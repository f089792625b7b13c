"""Exact quantiles of pooled rows by federated bisection: never an average of local quantiles.

The quantile definition is numpy's and pandas' default ("linear", Hyndman and Fan type 7):
with n values, h = (n - 1) p, the quantile is x(j) + (h - j) (x(j+1) - x(j)) for j = floor(h)
(0-based order statistics). Each order statistic x(k) is found on the variable's grid
origin + i * step (the study's `resolution`; the schema's minimum is the origin): the smallest
grid value g with at least k+1 pooled values at or below it. Nodes answer "how many of your
rows are at or below t" with exact counts, summed over nodes; each round sends the midpoint
of every open bracket. So the result is exact for values on the grid (integer scores, days)
and otherwise the quantile of the values rounded up to the grid.

Bounds come from the schema (min/max) where it has them; an open side is found by galloping
out from the pooled mean in steps of the pooled SD, doubling, and back halfway once a node
withholds a point out there. A node withholds a count its policy would not release (a bin of
a few rows, or a threshold among the few smallest or largest values: the minimum and maximum
are never found); a bracket whose midpoint is withheld stops, and the quantile is reported as
the interval its brackets leave (`exact` false).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MAX_GALLOP = 50


@dataclass
class Search:
    """The quantiles of one variable in one column of a table."""

    n: int
    ps: tuple[float, ...]
    origin: float
    step: float
    low: int | None  # values are at or above value(low)
    high: int | None  # values are at or below value(high)
    start: int  # grid index near the mean
    spread: int  # grid steps of about one SD
    known: dict[int, int] = field(default_factory=dict)  # grid index -> pooled count at or below
    withheld: set[int] = field(default_factory=set)
    stuck: set[int] = field(default_factory=set)  # order statistics left as intervals
    gallops: dict[int, int] = field(default_factory=dict)  # order statistic -> gallop steps

    def __post_init__(self):
        if self.low is not None:
            self.known[self.low - 1] = 0
        if self.high is not None:
            self.known[self.high] = self.n

    @classmethod
    def for_variable(cls, n: int, mean: float, sd: float, ps, grid) -> Search:
        origin, step, low, high = grid
        start = int(round((mean - origin) / step)) if math.isfinite(mean) else 0
        spread = max(1, int(round(sd / step))) if math.isfinite(sd) and sd > 0 else 1
        if low is not None:
            start = max(start, low)
        if high is not None:
            start = min(start, high)
        return cls(n, tuple(ps), origin, step, low, high, start, spread)

    def value(self, i: int) -> float:
        return self.origin + i * self.step

    def orders(self) -> list[int]:
        """The 0-based order statistics the quantiles need."""
        out = set()
        for p in self.ps:
            j, _ = _index(self.n, p)
            out.update({j, min(j + 1, self.n - 1)})
        return sorted(out)

    def bracket(self, k: int) -> tuple[int | None, int | None]:
        """(largest index known to hold at most k values, smallest known to hold more)."""
        lo = max((i for i, c in self.known.items() if c <= k), default=None)
        hi = min((i for i, c in self.known.items() if c > k), default=None)
        return lo, hi

    def resolved(self, k: int) -> bool:
        lo, hi = self.bracket(k)
        return lo is not None and hi is not None and hi - lo <= 1

    def asks(self) -> list[int]:
        """Grid indices to ask about next (empty when done)."""
        out: set[int] = set()
        for k in self.orders():
            if k in self.stuck or self.resolved(k):
                continue
            lo, hi = self.bracket(k)
            if lo is not None and hi is not None:
                below = (k - self.known[lo]) / max(1, self.known[hi] - self.known[lo])
                mid = _split(lo, hi, self.withheld, below < 0.5)
                if mid is None:
                    self.stuck.add(k)
                else:
                    out.add(mid)
                continue
            ask = self._gallop(k, lo, hi)
            if ask is None:
                self.stuck.add(k)
            else:
                out.add(ask)
        return sorted(out)

    def _gallop(self, k: int, lo: int | None, hi: int | None) -> int | None:
        """The next point out on an open side: doubling steps from the known end, and once a
        node has withheld a point out there (nodes withhold the tails: no count among the
        few smallest or largest values), halfway back towards the known end instead."""
        if self.start not in self.known and self.start not in self.withheld:
            # The pooled mean first, even when the schema bounds one side: a schema's minimum
            # (0 days) can lie far below every value, where each point is in the withheld tail.
            return self.start
        while True:
            g = self.gallops.get(k, 0)
            if g > MAX_GALLOP:
                return None
            self.gallops[k] = g + 1
            if lo is None and hi is None:
                ask = self.start
            elif lo is None:
                blocked = [i for i in self.withheld if i < hi]
                ask = (max(blocked) + hi + 1) // 2 if blocked else hi - self.spread * 2**g
                if blocked and ask >= hi:
                    return None
            else:
                blocked = [i for i in self.withheld if i > lo]
                ask = (lo + min(blocked)) // 2 if blocked else lo + self.spread * 2**g
                if blocked and ask <= lo:
                    return None
            if ask not in self.withheld and ask not in self.known:
                return ask

    def record(self, i: int, count: int | None) -> None:
        if count is None:
            self.withheld.add(i)
        else:
            self.known[i] = int(count)

    def order_interval(self, k: int) -> tuple[float, float]:
        lo, hi = self.bracket(k)
        if lo is not None and hi is not None and hi - lo <= 1:
            return self.value(hi), self.value(hi)
        low = self.value(lo + 1) if lo is not None else -math.inf
        high = self.value(hi) if hi is not None else math.inf
        return low, high

    def results(self) -> list[dict]:
        out = []
        for p in self.ps:
            j, gamma = _index(self.n, p)
            a = self.order_interval(j)
            b = self.order_interval(min(j + 1, self.n - 1))
            low, high = _lerp(a[0], b[0], gamma), _lerp(a[1], b[1], gamma)
            exact = a[0] == a[1] and b[0] == b[1]
            out.append(
                {"p": p, "value": low if exact else None, "low": _finite(low), "high": _finite(high), "exact": exact}
            )
        return out


def _split(lo: int, hi: int, withheld: set[int], toward_low: bool) -> int | None:
    """The midpoint of (lo, hi); if a node withheld it, points halfway from it towards the
    end where the order statistic's rows are (then the other end): a withheld count means
    a bin of few rows, usually in a tail, so the search backs away from the tail."""
    mid = (lo + hi) // 2
    if mid not in withheld:
        return mid
    for low_side in (toward_low, not toward_low):
        point = mid
        while True:
            point = (lo + point) // 2 if low_side else (point + hi + 1) // 2
            if point <= lo or point >= hi:
                break
            if point not in withheld:
                return point
    return None


def _index(n: int, p: float) -> tuple[int, float]:
    """numpy's 'linear' method: (previous 0-based index, interpolation weight)."""
    virtual = (n - 1) * p
    if virtual >= n - 1:
        return n - 1, 0.0
    j = math.floor(virtual)
    return j, virtual - j


def _lerp(a: float, b: float, t: float) -> float:
    """numpy's interpolation (from the nearer end), so results agree to the last bit."""
    if t == 0.0:
        return a
    diff = b - a
    return b - diff * (1 - t) if t >= 0.5 else a + diff * t


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None

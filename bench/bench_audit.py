"""What the differencing audit costs a node: 500 remembered row sets on a 100,000-row node.

Builds a synthetic node of 100,000 referrals (age, sex, ethnic group, deprivation, year,
missing covariates), remembers 500 released row sets of the kind studies make (cohorts from
one to three conditions, complete cases of covariate sets), then in one run times:

- auditing one more cohort against all of them (the combination audit and the pairwise one);
- auditing a GLM's release (its rows, 40 level indicators and 8 numeric columns) against the
  memory, beside the cost of computing that GLM's information matrix X'WX on the same rows
  (what a node computes for one Newton round anyway): the ratio says what the audit adds;
- the pairwise fast path a table's quantile thresholds take.

Prints seconds and ratios from this one run (compare ratios, not seconds across runs: the
machines are shared).

    .venv/bin/python bench/bench_audit.py [--rows 100000] [--sets 500]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from iaptnet.node.release_memory import Footprint, VersionMemory

T = 8  # the default min_subset_difference


def synthetic_node(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "age": rng.integers(18, 91, size=n),
        "sex": rng.integers(0, 2, size=n),
        "ethnic": rng.choice(17, size=n, p=np.r_[0.6, np.full(16, 0.4 / 16)]),
        "imd": rng.integers(1, 6, size=n),
        "year": rng.integers(2012, 2020, size=n),
        "phq9": rng.integers(0, 28, size=n).astype(float),
        "missing_a": rng.random(n) < 0.08,
        "missing_b": rng.random(n) < 0.05,
    }


def cohort(data: dict, rng: np.random.Generator) -> np.ndarray:
    """A cohort as studies write them: one to three conditions, then complete cases."""
    n = data["age"].size
    rows = np.ones(n, dtype=bool)
    for _ in range(rng.integers(1, 4)):
        kind = rng.integers(0, 5)
        if kind == 0:
            lo = rng.integers(18, 70)
            rows &= (data["age"] >= lo) & (data["age"] < lo + rng.integers(10, 40))
        elif kind == 1:
            rows &= data["sex"] == rng.integers(0, 2)
        elif kind == 2:
            rows &= data["year"] >= rng.integers(2012, 2018)
        elif kind == 3:
            rows &= data["imd"] <= rng.integers(2, 6)
        else:
            rows &= ~data["missing_a"]
    if rng.random() < 0.5:
        rows &= ~data["missing_b"]
    return rows


def glm_footprint(data: dict, rows: np.ndarray) -> tuple[Footprint, np.ndarray]:
    """A GLM's release: its rows, level indicators of ethnic group, deprivation, year and
    sex, and numeric columns; with its design matrix for the X'WX comparison."""
    positions = np.flatnonzero(rows)
    indicators, X = [], [np.ones(positions.size)]
    for name, levels in (("ethnic", range(1, 17)), ("imd", range(2, 6)), ("year", range(2013, 2020)), ("sex", (1,))):
        for level in levels:
            hit = data[name][positions] == level
            indicators.append((f"{name}[T.{level}]", positions[hit]))
            X.append(hit.astype(float))
    columns = []
    for _j, name in enumerate(("age", "phq9")):
        values = data[name][positions].astype(float)
        for power in (1, 2, 3, 4):
            columns.append((f"{name}^{power}", (values / 50.0) ** power))
            X.append((values / 50.0) ** power)
    return Footprint("glm", rows, indicators=indicators, columns=columns), np.column_stack(X)


def seconds(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--sets", type=int, default=500)
    args = parser.parse_args()
    rng = np.random.default_rng(7)
    data = synthetic_node(args.rows, rng)
    memory = VersionMemory(None, args.rows)

    start = time.perf_counter()
    refused = 0
    while memory.size < args.sets:
        footprint = Footprint("cohort", cohort(data, rng))
        if memory.audit([footprint], T):
            refused += 1  # a cohort that would single out a few people is not remembered
            continue
        memory.remember([footprint], T)
    build = time.perf_counter() - start
    print(
        f"node of {args.rows:,} rows; {memory.size} row sets remembered in {build:.1f} s "
        f"({build / memory.size * 1000:.1f} ms per audited release; {refused} cohorts refused on the way)"
    )

    one = Footprint("cohort", cohort(data, rng))
    audit_one = seconds(lambda: memory.audit([one], T))
    print(f"audit of one more cohort against them: {audit_one * 1000:.1f} ms")

    rows = np.ones(args.rows, dtype=bool) & ~data["missing_a"]
    glm, X = glm_footprint(data, rows)
    w = rng.random(X.shape[0])
    gram = seconds(lambda: (X * np.sqrt(w)[:, None]).T @ (X * np.sqrt(w)[:, None]))
    audit_glm = seconds(
        lambda: memory.audit([Footprint(glm.label, glm.rows, indicators=glm.indicators, columns=glm.columns)], T)
    )
    print(
        f"audit of a GLM release ({len(glm.indicators)} indicators, {len(glm.columns)} numeric columns): "
        f"{audit_glm * 1000:.1f} ms; one round's X'WX on the same {X.shape[0]:,} rows: {gram * 1000:.1f} ms; "
        f"ratio {audit_glm / gram:.1f}"
    )

    thresholds = [(data["phq9"] <= k) & rows for k in range(5, 25)]
    fast = seconds(lambda: [memory.set_differs_by_few(s, [], T) for s in thresholds])
    print(
        f"pairwise check of 20 quantile thresholds: {fast * 1000:.1f} ms ({fast / len(thresholds) * 1000:.2f} ms each)"
    )


if __name__ == "__main__":
    main()

"""The span of a table's count cells: the cells left out of it are sums of the cells kept.

A table's shown cells join the span of released columns (node/cell_audit.py); to halve the
work, a cell that is the sum of others shown (the overall column, one level per variable and
column) is left out. That is safe only if the span is the same: checked here on a real
table task with a suppressed cell (whose relations cannot lose a member), by the rank of the
cells' indicators with and without the ones left out.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from nodecase import Node

from iaptnet.node.cell_audit import CellAudit
from iaptnet.protocol import messages as m
from iaptnet.protocol.kinds.describe import TABLE_TASK
from iaptnet.protocol.study import parse_study

COLUMNS = {
    "y": {"type": "binary"},
    "age": {"type": "integer"},
    "g": {"type": "categorical", "levels": ["a", "b", "c"]},
    "band": {"type": "categorical", "levels": ["young", "old"]},
    "score": {"type": "numeric"},
}


def frame(n: int = 600) -> pd.DataFrame:
    rng = np.random.default_rng(4)
    score = rng.normal(10, 3, size=n)
    score[:40] = np.nan  # a missing level with rows
    y = rng.integers(0, 2, size=n).astype(float)
    y[40:60] = np.nan
    g = rng.choice(["a", "b", "c"], size=n)
    band = rng.choice(["young", "old"], size=n)
    band[np.flatnonzero(g == "c")[3:]] = "young"  # 3 old people in g == "c": suppressed
    return pd.DataFrame({"y": y, "age": rng.integers(18, 90, size=n), "g": g, "band": band, "score": score})


def _rank(columns: list[np.ndarray], n: int) -> int:
    matrix = np.zeros((n, len(columns)))
    for j, positions in enumerate(columns):
        matrix[positions, j] = 1.0
    return int(np.linalg.matrix_rank(matrix))


def test_the_cells_left_out_of_the_span_are_sums_of_the_cells_kept(tmp_path, monkeypatch):
    seen = []
    original = CellAudit.for_span

    def recording(self, cells):
        kept = original(self, cells)
        seen.append((self.cohort.copy(), list(cells), kept))
        return kept

    monkeypatch.setattr(CellAudit, "for_span", recording)
    node = Node(tmp_path / "node", frame(), COLUMNS)
    spec, _ = parse_study(
        {"kind": "table", "name": "t", "by": "band", "variables": ["y", "g", "score"]}, node.schema, "t.toml"
    )
    reply = node.send(m.Task(kind=TABLE_TASK, study_hash=spec.hash, payload={"models": {"m0": spec.to_wire()}}))
    assert reply.status == m.OK, reply.message
    assert seen
    for cohort, cells, kept in seen:
        n = cohort.size
        everything = [np.flatnonzero(cohort), *(positions for _, positions in cells)]
        reduced = [np.flatnonzero(cohort), *(positions for _, positions in kept)]
        assert len(kept) < 0.7 * len(cells), (len(kept), len(cells))
        assert _rank(reduced, n) == _rank(everything, n)

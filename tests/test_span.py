"""The span of released columns (node/span.py) remembers a release with the directions its
audit found, matched by the columns' content: the same columns in another list reuse them,
other columns never do, and the span it keeps is the one a fresh computation gives."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from iaptnet.node import span as span_module
from iaptnet.node.release_memory import Footprint, MemoryDamaged
from iaptnet.node.span import ReleasedSpan

N = 400


def footprint(label: str, seed: int, k: int = 3) -> Footprint:
    rng = np.random.default_rng(seed)
    rows = rng.random(N) < 0.7
    columns = [(f"x{j}", rng.normal(size=int(rows.sum()))) for j in range(k)]
    return Footprint(label, rows, columns=columns)


def counting(monkeypatch) -> list[int]:
    calls = []
    original = ReleasedSpan._new_directions

    def counted(self, rows, V):
        calls.append(V.shape[1])
        return original(self, rows, V)

    monkeypatch.setattr(span_module.ReleasedSpan, "_new_directions", counted)
    return calls


def assert_span_is_the_projection_onto(span: ReleasedSpan, released: list[Footprint]) -> None:
    """The span's leverages are those of a QR of every released column over all N rows (each
    zero off its rows), and its basis is orthonormal."""
    columns = []
    for fp in released:
        columns.append(fp.rows.astype(float))
        for _, values in fp.columns:
            column = np.zeros(N)
            column[fp.rows] = values
            columns.append(column)
    q, _ = np.linalg.qr(np.column_stack(columns))
    np.testing.assert_allclose(span.leverage, np.einsum("ij,ij->i", q, q), rtol=1e-9, atol=1e-12)
    basis = span.basis()
    np.testing.assert_allclose(basis.T @ basis, np.eye(basis.shape[1]), atol=1e-12)


def test_a_release_is_remembered_with_its_audits_directions(monkeypatch):
    calls = counting(monkeypatch)
    span = ReleasedSpan(None, N)
    fp = footprint("m", 1)
    top = span.audit([fp])
    span.remember([footprint("m", 1)])  # the same columns, in another list of other objects
    assert len(calls) == 1
    np.testing.assert_allclose(span.leverage.max(), top, rtol=1e-12)


def test_other_columns_are_never_remembered_with_an_audits_directions(monkeypatch):
    calls = counting(monkeypatch)
    span, fresh = ReleasedSpan(None, N), ReleasedSpan(None, N)
    span.audit([footprint("a", 1)])  # audited (then, say, refused)
    span.remember([footprint("b", 2)])  # another release remembered
    fresh.remember([footprint("b", 2)])
    assert len(calls) == 3  # b's own directions, computed for it
    np.testing.assert_allclose(span.leverage, fresh.leverage, rtol=1e-12, atol=1e-15)


def test_the_span_kept_is_the_projection_onto_every_released_column():
    span = ReleasedSpan(None, N)
    released = [footprint("a", 1), footprint("b", 2, k=5), footprint("c", 3)]
    for fp in released:
        span.audit([fp])
        span.remember([fp])
    assert_span_is_the_projection_onto(span, released)


def cohort_footprint(label: str, rows: np.ndarray, seed: int, k: int = 2) -> Footprint:
    rng = np.random.default_rng(seed)
    return Footprint(label, rows, columns=[(f"x{j}", rng.normal(size=int(rows.sum()))) for j in range(k)])


@pytest.mark.parametrize("projection", ["stacked", "block after block"])
def test_releases_on_separate_and_overlapping_cohorts_span_what_all_their_columns_span(projection, monkeypatch):
    """Blocks are kept on their own rows: a release on another cohort, one that overlaps two,
    and one over every row give the leverage of the whole projection (with the touching
    blocks stacked into one basis, and one after another)."""
    if projection != "stacked":
        monkeypatch.setattr(span_module, "STACKED_BASIS_LIMIT", 0)
    span = ReleasedSpan(None, N)
    index = np.arange(N)
    cohorts = [index < 100, (index >= 100) & (index < 200), (index >= 50) & (index < 150), index < N]
    released = [cohort_footprint(str(i), rows, i) for i, rows in enumerate(cohorts)]
    for fp in released:
        span.audit([fp])
        span.remember([fp])
    assert [b.rows.size for b in span.blocks] == [100, 100, 200, N]  # each on the rows it touched
    assert_span_is_the_projection_onto(span, released)


def test_the_span_on_disk_is_read_back_as_it_was_kept_including_blocks_of_all_rows(tmp_path):
    """A node restarted reads its span back; a block written over all n rows (as iaptnet 0.2
    wrote it) still reads, as the same directions."""
    kept = ReleasedSpan(tmp_path, N)
    index = np.arange(N)
    for i, rows in enumerate([index < 120, index >= 300]):
        fp = cohort_footprint(str(i), rows, i)
        kept.audit([fp])
        kept.remember([fp])
    again = ReleasedSpan(tmp_path, N)
    np.testing.assert_array_equal(again.leverage, kept.leverage)
    assert again.digests == kept.digests
    # The older form: one .npy over all n rows, named by the index.
    old = tmp_path / "old"
    old.mkdir()
    np.save(old / "block-0.npy", kept.basis())
    (old / "index.jsonl").write_text('{"block": "block-0.npy", "digests": ["d"]}\n')
    np.testing.assert_allclose(ReleasedSpan(old, N).leverage, kept.leverage, rtol=1e-12, atol=1e-15)
    # A block of another size is damage, not a span.
    np.save(old / "block-0.npy", kept.basis()[:-1])
    with pytest.raises(MemoryDamaged):
        ReleasedSpan(old, N)


def test_a_columns_digest_is_the_one_iaptnet_0_2_remembered():
    """Digests name columns already in the span across an upgrade: the sha256 of the column's
    n values scaled to unit norm, zero off its rows."""
    fp = footprint("m", 4, k=1)
    span = ReleasedSpan(None, N)
    span.remember([fp])
    expected = set()
    for values in (np.ones(int(fp.rows.sum())), fp.columns[0][1]):
        column = np.zeros(N)
        column[fp.rows] = values / np.abs(values).max()
        column /= np.linalg.norm(column)
        expected.add(hashlib.sha256(column.tobytes()).hexdigest()[:32])
    assert span.digests == expected


@pytest.mark.parametrize("damage", ["garbage", "truncated", "flat"])
def test_a_damaged_block_stops_the_node_with_memory_damaged(tmp_path, damage):
    """A block file the node cannot read back (torn, overwritten, of another shape) is damage
    to its governance state: the node says so and answers nothing, never a traceback."""
    span = ReleasedSpan(tmp_path, N)
    fp = cohort_footprint("a", np.arange(N) < 200, 1)
    span.audit([fp])
    span.remember([fp])
    (block,) = tmp_path.glob("block-*.npz")
    if damage == "garbage":
        block.write_bytes(b"not a zip file at all")
    elif damage == "truncated":
        block.write_bytes(block.read_bytes()[:100])
    else:
        np.savez(block, rows=np.arange(3), basis=np.zeros(3))
    with pytest.raises(MemoryDamaged):
        ReleasedSpan(tmp_path, N)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_release_bundle_stops_the_node_with_memory_damaged(tmp_path, damage):
    """The release memory's bundles are read back the same way: damage is MemoryDamaged."""
    from iaptnet.node.release_memory import VersionMemory

    memory = VersionMemory(tmp_path, N)
    memory.remember([cohort_footprint("a", np.arange(N) < 200, 1)], 10)
    (bundle,) = (tmp_path / "bundles").glob("*.npz")
    bundle.write_bytes(b"not a zip file at all" if damage == "garbage" else bundle.read_bytes()[:100])
    with pytest.raises(MemoryDamaged):
        VersionMemory(tmp_path, N)


@pytest.mark.parametrize("together", [True, False])
def test_columns_near_the_span_are_kept_to_in_span_as_a_pivoted_qr_keeps_them(together):
    """Columns a relative 1e-3, 1e-6 and 1e-8 outside the others' span are new directions; one
    1e-11 outside and one inside are not (IN_SPAN is 1e-9). The Gram matrix tells apart only
    the first (node/span.py's CLEAR); the others are resolved by a pivoted QR of their own,
    whether they come in the release of the columns they are near or in a later one."""
    rng = np.random.default_rng(5)
    rows = np.ones(N, dtype=bool)
    base = rng.normal(size=(N, 5))
    q, _ = np.linalg.qr(np.column_stack([base, rng.normal(size=(N, 4))]))
    near = []
    for j, eps in enumerate([1e-3, 1e-6, 1e-8, 1e-11, 0.0]):
        c = base @ rng.normal(size=5)
        c /= np.linalg.norm(c)
        near.append(c + eps * q[:, 5 + min(j, 3)])
    first = Footprint("base", rows, columns=[(f"b{j}", base[:, j]) for j in range(5)])
    second = Footprint("near", rows, columns=[(f"n{j}", c) for j, c in enumerate(near)])
    span = ReleasedSpan(None, N)
    for release in [[first, second]] if together else [[first], [second]]:
        span.audit(release)
        span.remember(release)
    assert span.basis().shape[1] == 5 + 3 + 1  # the cohort's indicator too
    expected, _ = np.linalg.qr(np.column_stack([np.ones(N), base, q[:, 5:8]]))
    np.testing.assert_allclose(span.leverage, np.einsum("ij,ij->i", expected, expected), rtol=0, atol=1e-7)
    basis = span.basis()
    np.testing.assert_allclose(basis.T @ basis, np.eye(basis.shape[1]), atol=1e-12)


def test_a_release_of_many_columns_on_many_rows_is_one_orthonormal_block():
    """The catalogue's first batch in miniature: 120 columns on 20,000 rows, a tenth of them
    combinations of others, beside an earlier release: the span gains exactly the new rank."""
    rng = np.random.default_rng(9)
    n = 20_000
    rows = np.ones(n, dtype=bool)
    X = rng.normal(size=(n, 108))
    X = np.column_stack([X, X[:, :12] @ rng.normal(size=(12, 12))])
    span = ReleasedSpan(None, n)
    earlier = Footprint("earlier", rows, columns=[("e", X[:, 0] + X[:, 1])])
    span.audit([earlier])
    span.remember([earlier])
    release = Footprint("batch", rows, columns=[(f"x{j}", X[:, j]) for j in range(X.shape[1])])
    span.audit([release])
    span.remember([release])
    basis = span.basis()
    assert basis.shape[1] == 1 + 108  # the rows' indicator, and "e" is in the span of x0 and x1
    np.testing.assert_allclose(basis.T @ basis, np.eye(basis.shape[1]), atol=1e-11)
    q, _ = np.linalg.qr(np.column_stack([np.ones(n), X[:, :108]]))
    np.testing.assert_allclose(span.leverage, np.einsum("ij,ij->i", q, q), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("projection", ["stacked", "block after block"])
def test_forty_releases_on_overlapping_cohorts_near_each_others_span(projection, monkeypatch):
    """Forty releases of 1-7 columns on random cohorts, each a mix of six shared columns plus a
    part 10^-8..1 of their size of its own: the span has the rank, leverages and orthonormal
    basis of one pivoted QR of every column released (the passes it skips are not missed).
    Both ways of projecting on the touching blocks: stacked into one basis, and one after
    another (beyond STACKED_BASIS_LIMIT)."""
    import scipy.linalg

    if projection != "stacked":
        monkeypatch.setattr(span_module, "STACKED_BASIS_LIMIT", 0)

    rng = np.random.default_rng(3)
    n = 3000
    span = ReleasedSpan(None, n)
    base = rng.normal(size=(n, 6))
    columns = []
    for r in range(40):
        rows = rng.random(n) < rng.uniform(0.2, 0.9)
        k = int(rng.integers(1, 8))
        own = (rng.random() < 0.5) * rng.normal(size=(int(rows.sum()), k)) * 10 ** rng.uniform(-8, 0)
        mix = base[rows] @ rng.normal(size=(6, k)) + own
        fp = Footprint(str(r), rows, columns=[(f"c{j}", mix[:, j]) for j in range(k)])
        span.audit([fp])
        span.remember([fp])
        columns.append(rows.astype(float))
        for j in range(k):
            column = np.zeros(n)
            column[rows] = mix[:, j]
            columns.append(column)
    A = np.column_stack(columns)
    q, r, _ = scipy.linalg.qr(A / np.linalg.norm(A, axis=0), mode="economic", pivoting=True)
    q = q[:, np.abs(np.diag(r)) > span_module.IN_SPAN]
    basis = span.basis()
    assert basis.shape[1] == q.shape[1]
    # (a direction 1e-8 of a column's size is known to about 1e-8 of itself, in either QR)
    np.testing.assert_allclose(span.leverage, np.einsum("ij,ij->i", q, q), rtol=0, atol=1e-9)
    np.testing.assert_allclose(basis.T @ basis, np.eye(basis.shape[1]), atol=1e-12)


def test_a_large_release_on_a_cohort_replaces_the_small_blocks_it_touches(tmp_path):
    """Forty columns on a fifth of the rows (three of them combinations of others), beside four
    directions on every row: the new
    columns get their own block on the cohort, and the four directions are replaced by what
    they hold beyond it (cheaper than projecting forty columns on every row); the span, its
    leverages, its orthonormal basis and what a restarted node reads back are those of every
    column released, and a later release on other rows still joins it exactly."""
    import scipy.linalg

    rng = np.random.default_rng(11)
    n = 2000
    everyone = np.ones(n, dtype=bool)
    cohort = np.arange(n) < n // 5
    other = np.arange(n) >= n // 2
    first = Footprint("first", everyone, columns=[(f"e{j}", rng.normal(size=n)) for j in range(3)])
    shared = rng.normal(size=(int(cohort.sum()), 37))
    inside = shared[:, :5] @ rng.normal(size=(5, 3))  # three of the batch's columns add nothing
    batch = Footprint(
        "batch", cohort, columns=[(f"x{j}", c) for j, c in enumerate(np.column_stack([shared, inside]).T)]
    )
    later = Footprint("later", other, columns=[("z", rng.normal(size=int(other.sum())))])
    kept = ReleasedSpan(tmp_path, n)
    for fp in (first, batch):
        kept.audit([fp])
        kept.remember([fp])
    assert sorted((b.rows.size, b.basis.shape[1]) for b in kept.blocks) == [(n // 5, 38), (n, 4)]
    kept.audit([later])
    kept.remember([later])
    columns = []
    for fp in (first, batch, later):
        columns.append(fp.rows.astype(float))
        for _, values in fp.columns:
            column = np.zeros(n)
            column[fp.rows] = values
            columns.append(column)
    A = np.column_stack(columns)
    q, r, _ = scipy.linalg.qr(A / np.linalg.norm(A, axis=0), mode="economic", pivoting=True)
    q = q[:, np.abs(np.diag(r)) > span_module.IN_SPAN]
    assert kept.basis().shape[1] == q.shape[1] == 4 + 38 + 2
    np.testing.assert_allclose(kept.leverage, np.einsum("ij,ij->i", q, q), rtol=1e-9, atol=1e-12)
    basis = kept.basis()
    np.testing.assert_allclose(basis.T @ basis, np.eye(basis.shape[1]), atol=1e-12)
    again = ReleasedSpan(tmp_path, n)
    np.testing.assert_array_equal(again.leverage, kept.leverage)
    assert again.digests == kept.digests
    assert [b.name for b in again.blocks] == [b.name for b in kept.blocks]
    # An index line that drops a block it never read is damage.
    index = tmp_path / "index.jsonl"
    index.write_text(index.read_text() + '{"columns": [], "blocks": [], "drops": ["block-x.npz"]}\n')
    with pytest.raises(MemoryDamaged):
        ReleasedSpan(tmp_path, n)


def test_an_audit_overtaken_by_another_release_is_done_again_when_remembered():
    """An audit's directions are kept for its release's `remember` only while the span is
    unchanged: a release remembered in between (in this process, or read from another's)
    makes the first one's directions stale, and they are computed again."""
    span = ReleasedSpan(None, N)
    first, second = footprint("first", 21, k=4), footprint("second", 22, k=4)
    span.audit([first])
    span.remember([second])  # remembered without an audit of its own in between
    span.remember([first])
    assert_span_is_the_projection_onto(span, [second, first])

"""A synthetic appointment table (one row per scheduled contact) that carries a flat extract's
pathway columns, for `iaptnet synth --appointments`.

Built from the extract alone, so that the node's rules (node/iapt/appointments.py) give back
exactly the extract's n_treat, n_dna, n_cancel_pt, n_cancel_prov, first_treatment_date,
intensity and primary_therapy. Per referral:

- an attended assessment (01) on the referral date;
- n_treat attended treatment contacts (02, seen on time or late) a week apart from
  first_treatment_date, all of the primary therapy except in stepped care, where the first
  max(1, (n_treat - 1) // 2) are of a therapy of the other intensity (so the primary keeps the
  most sessions, or ties and is attended later);
- n_dna missed (3, or 7 arrived late and not seen), n_cancel_pt (2) and n_cancel_prov (4)
  treatment contacts after the referral;
- contacts the rules must not count: a follow-up (06) after discharge for finishers, and for
  about a tenth of referrals a review without treatment (04) that was missed.

Rows are shuffled (the rules must not depend on row order); each contact's `intensity` is
written for some services and left for the node to take from the therapy type at others.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ..protocol.iapt_schema import (
    LOW_INTENSITY_THERAPIES,
    PATHWAY_COLUMNS,
    iapt_appointments_schema,
)

#: The therapy a stepped pathway's other-intensity sessions use.
OTHER = {"LI": "OTHER_HI", "HI": "OTHER_LI"}


def appointments_for(extract: pa.Table, rng: np.random.Generator, with_intensity: bool = True) -> pa.Table:
    """The contacts of every referral of `extract` (one service's rows, or all)."""
    ids = np.asarray(extract.column("pathway_id").to_pylist(), dtype=object)
    day = _days(extract, "referral_date")
    first = _days(extract, "first_treatment_date")
    discharge = _days(extract, "discharge_date")
    count = {
        c: np.asarray(extract.column(c).to_numpy(zero_copy_only=False), dtype=np.int64)
        for c in ("n_treat", "n_dna", "n_cancel_pt", "n_cancel_prov")
    }
    intensity = np.asarray(extract.column("intensity").to_pylist(), dtype=object)
    primary = np.asarray(extract.column("primary_therapy").to_pylist(), dtype=object)
    n = len(ids)
    blocks = [_block(np.arange(n), day, "01", "5", None)]  # assessment on the day of referral

    rows, k = _expand(count["n_treat"])
    therapy = primary[rows].copy()
    stepped = intensity[rows] == "stepped"
    own_class = np.where(np.isin(primary[rows].astype(str), LOW_INTENSITY_THERAPIES), "LI", "HI")
    others = np.maximum(1, (count["n_treat"][rows] - 1) // 2)
    early = stepped & (count["n_treat"][rows] >= 2) & (k < others)
    therapy[early] = np.vectorize(OTHER.get, otypes=[object])(own_class[early])
    late = rng.random(len(rows)) < 0.05
    blocks.append(_block(rows, first[rows] + 7 * k, "02", np.where(late, "6", "5"), therapy))

    for column, code in (("n_dna", None), ("n_cancel_pt", "2"), ("n_cancel_prov", "4")):
        rows, k = _expand(count[column])
        attend = code if code else np.where(rng.random(len(rows)) < 0.2, "7", "3")
        blocks.append(_block(rows, day[rows] + 10 + 7 * k, "02", attend, None))

    finished = np.flatnonzero((count["n_treat"] >= 2) & (discharge >= 0))
    blocks.append(_block(finished, discharge[finished] + 28, "06", "5", None))
    reviewed = np.flatnonzero(rng.random(n) < 0.1)
    blocks.append(_block(reviewed, day[reviewed] + 3, "04", "3", None))

    rows = np.concatenate([b[0] for b in blocks])
    order = rng.permutation(len(rows))
    rows = rows[order]
    days = np.concatenate([b[1] for b in blocks])[order]
    therapies = np.concatenate([b[4] for b in blocks])[order]
    columns = {
        "pathway_id": pa.array(ids[rows], pa.string()),
        "contact_date": pa.array(days.astype("datetime64[D]"), pa.date32()),
        "app_type": pa.array(np.concatenate([b[2] for b in blocks])[order], pa.string()),
        "attend_code": pa.array(np.concatenate([b[3] for b in blocks])[order], pa.string()),
        "therapy_type": pa.array(therapies, pa.string()),
    }
    if with_intensity:
        klass = np.where(np.isin(therapies.astype(str), LOW_INTENSITY_THERAPIES), "LI", "HI")
        columns["intensity"] = pa.array(np.where(np.equal(therapies, None), None, klass), pa.string())
    assert set(columns) <= set(iapt_appointments_schema().columns)
    return pa.table(columns)


def without_pathway_columns(extract: pa.Table) -> pa.Table:
    """The extract as a Trust would write it beside its appointment table."""
    return extract.drop_columns(list(PATHWAY_COLUMNS))


def _days(table: pa.Table, column: str) -> np.ndarray:
    """Days since 1970 (int64), -1 where missing."""
    values = table.column(column).cast(pa.int32()).to_numpy(zero_copy_only=False)
    return np.where(np.isnan(values.astype(float)), -1, values).astype(np.int64)


def _expand(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row of each of sum(counts) items, its position 0..count-1 within its row)."""
    rows = np.repeat(np.arange(len(counts)), counts)
    starts = np.cumsum(counts) - counts
    return rows, np.arange(len(rows)) - np.repeat(starts, counts)


def _block(rows, days, app, attend, therapy):
    m = len(rows)
    return (
        np.asarray(rows, dtype=np.int64),
        np.asarray(days, dtype=np.int64),
        np.broadcast_to(np.asarray(app, dtype=object), (m,)),
        np.broadcast_to(np.asarray(attend, dtype=object), (m,)),
        np.asarray(therapy, dtype=object) if therapy is not None else np.full(m, None, dtype=object),
    )

"""The extract's pathway columns from a Trust's appointment table (docs/reference/domain.md#pathway).

A Trust may serve its referral extract without the pathway summaries and give the node its
appointment table (IDS201 care contacts, one row per scheduled contact; schema
iapt_appointments.toml) instead. The node computes, per referral, exactly the columns the flat
extract would carry, then validates and derives as usual, so a study cannot tell the two apart:

- `n_treat`: attended (attend_code 5 seen, 6 seen late) treatment contacts (app_type 02, 03, 05);
- `n_dna`: scheduled assessment or treatment contacts (app_type 01, 02, 03, 05) not attended
  (3 did not attend, 7 arrived late and not seen); `n_cancel_pt` (2) and `n_cancel_prov` (4)
  the same contacts cancelled by the patient or the provider [A: reviews without treatment
  (04) and follow-ups (06) are not counted as missed or cancelled sessions];
- `first_treatment_date`: the earliest attended treatment contact;
- `intensity`: of the attended treatment contacts (the contact's `intensity`, else its therapy
  type's class): `LI` or `HI` when all are one, `stepped` when both, empty when none;
- `primary_therapy`: the therapy type with the most attended treatment contacts; ties go to the
  one attended latest (then to the later in the schema's list, so the rule is total).

A referral without contacts gets 0 counts and empty dates and categories. Contacts whose
referral is not in the extract, or without a pathway_id, app_type or attend_code, are left
out and counted in the notes (counts only: nothing here names a referral).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ...protocol.iapt_schema import (
    LOW_INTENSITY_THERAPIES,
    PATHWAY_COLUMNS,
    iapt_appointments_schema,
)

__all__ = ["PATHWAY_COLUMNS", "summarise"]
TREATMENT = ("02", "03", "05")
SCHEDULED = ("01", "02", "03", "05")
ATTENDED = ("5", "6")
MISSED = ("3", "7")
CANCELLED_BY_PATIENT, CANCELLED_BY_PROVIDER = "2", "4"


def summarise(contacts: pd.DataFrame, pathway_ids: pd.Series) -> tuple[pd.DataFrame, list[str]]:
    """(the seven pathway columns, one row per `pathway_ids` entry in its order, as a raw
    extract would hold them; notes with counts of contacts left out).

    `contacts` is the typed appointment table (node.validate with iapt_appointments_schema)."""
    keys = pd.Index(pathway_ids.astype("string"))
    therapies = list(iapt_appointments_schema()["therapy_type"].levels)
    row = keys.get_indexer(contacts["pathway_id"].astype("string"))
    app, attend = contacts["app_type"].astype("string"), contacts["attend_code"].astype("string")
    known = (row >= 0) & app.notna().to_numpy() & attend.notna().to_numpy()
    notes = [] if len(contacts) else ["appointments: the table has no contacts, so every referral has 0 sessions"]
    unmatched = int(((row < 0) & contacts["pathway_id"].notna().to_numpy()).sum())
    if unmatched:
        notes.append(f"appointments: {unmatched:,} contacts name a referral that is not in the extract; left out")
    unusable = int((~known).sum()) - unmatched
    if unusable:
        notes.append(f"appointments: {unusable:,} contacts without a pathway_id, app_type or attend_code; left out")
    row, app, attend = row[known], app[known].to_numpy(), attend[known].to_numpy()
    date = contacts["contact_date"].to_numpy()[known]
    therapy = contacts["therapy_type"].astype("string").to_numpy()[known]
    level = contacts["intensity"].astype("string").to_numpy()[known]

    n = len(keys)
    treated = np.isin(app, TREATMENT) & np.isin(attend, ATTENDED)
    scheduled = np.isin(app, SCHEDULED)
    out = pd.DataFrame(
        {
            "n_treat": np.bincount(row[treated], minlength=n),
            "n_dna": np.bincount(row[scheduled & np.isin(attend, MISSED)], minlength=n),
            "n_cancel_pt": np.bincount(row[scheduled & (attend == CANCELLED_BY_PATIENT)], minlength=n),
            "n_cancel_prov": np.bincount(row[scheduled & (attend == CANCELLED_BY_PROVIDER)], minlength=n),
        }
    )
    sessions = pd.DataFrame({"row": row[treated], "date": date[treated], "therapy": therapy[treated]})
    first = sessions.dropna(subset=["date"]).groupby("row")["date"].min()
    out["first_treatment_date"] = pd.Series(first, index=range(n)).dt.strftime("%Y-%m-%d")
    out["intensity"] = _intensity(sessions, level[treated], n)
    out["primary_therapy"] = _primary(sessions, therapies, n)
    return out, notes


def _intensity(sessions: pd.DataFrame, level: np.ndarray, n: int) -> pd.Series:
    klass = np.where(
        np.isin(sessions["therapy"].to_numpy(dtype=object), LOW_INTENSITY_THERAPIES),
        "LI",
        np.where(pd.isna(sessions["therapy"]).to_numpy(), None, "HI"),
    )
    klass = np.where(pd.isna(level), klass, level)  # the contact's own intensity where recorded
    frame = pd.DataFrame({"row": sessions["row"].to_numpy(), "li": klass == "LI", "hi": klass == "HI"})
    seen = frame.groupby("row")[["li", "hi"]].any()
    kind = np.where(seen["li"] & seen["hi"], "stepped", np.where(seen["li"], "LI", np.where(seen["hi"], "HI", None)))
    return pd.Series(pd.Series(kind, index=seen.index, dtype=object), index=range(n), dtype=object)


def _primary(sessions: pd.DataFrame, therapies: list[str], n: int) -> pd.Series:
    known = sessions.dropna(subset=["therapy"])
    if known.empty:
        return pd.Series([None] * n, dtype=object)
    per = known.groupby(["row", "therapy"]).agg(count=("date", "size"), last=("date", "max")).reset_index()
    per["order"] = per["therapy"].map({t: i for i, t in enumerate(therapies)})
    per["last"] = per["last"].fillna(pd.Timestamp.min)
    best = per.sort_values(["row", "count", "last", "order"]).groupby("row").tail(1)
    return pd.Series(
        pd.Series(best["therapy"].to_numpy(), index=best["row"].to_numpy(), dtype=object), index=range(n), dtype=object
    )

"""Turning the generated referrals into the extract a Trust would write.

Builds one Arrow table whose columns are exactly those of `iapt_extract.toml`, in its order:
categorical values as strings equal to a schema level, integers as int64, dates as date32,
unrecorded values as nulls (or as the code the schema has for "not stated" where the data
dictionary has one: gender X/9, ethnicity Z/99, employment ZZ, disability ZZ). A truth table
beside it carries the planted flags for tests; it is never written to a node's files.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ..protocol.iapt_schema import iapt_extract_schema
from . import params as P
from .pathway import END_CODES, THERAPY_CODES
from .population import ETHNIC_CODES, PROBLEM_CODES, REFERRAL_SOURCE_CODES, SEXUAL_ORIENTATION_CODES, Cohort

_EPOCH_OFFSET = int((np.datetime64(P.REFERRAL_START, "D") - np.datetime64(0, "D")).astype(int))


def build_tables(rng: np.random.Generator, c: Cohort, masks: dict[str, np.ndarray], codes: tuple[str, ...]):
    """(extract, truth) Arrow tables, rows ordered by service then referral date; service k
    (1-based) is written as its code, codes[k - 1]."""
    order = np.lexsort((c["referral_day"], c["service"]))
    c = {k: v[order] for k, v in c.items()}
    m = {k: v[order] for k, v in masks.items()}
    n = len(order)
    service = c["service"]
    starts = np.r_[0, np.flatnonzero(np.diff(service)) + 1]
    lengths = np.diff(np.r_[starts, n])
    seq = np.arange(n) - np.repeat(starts, lengths) + 1
    service_id = _codes(codes, service - 1, None)
    pathway_id = _join(service_id, "-", _pad(seq, 7))

    cols: dict[str, pa.Array] = {}
    cols["pathway_id"] = pathway_id
    cols["service_id"] = service_id
    cols["referral_date"] = _dates(c["referral_day"])
    cols["referral_source"] = _codes(REFERRAL_SOURCE_CODES, c["referral_source"], m["referral_source"])
    cols["age_at_referral"] = pa.array(c["age"], pa.int64())

    cols["gender"] = _with_missing(rng, ("1", "2"), c["female"].astype(np.int64), m["gender"], P.GENDER_MISSING_CODES)
    cols["ethnic_category"] = _with_missing(rng, ETHNIC_CODES, c["ethnic"], m["ethnicity"], P.ETHNIC_MISSING_CODES)
    cols["employment_status"] = _with_missing(rng, P.EMPLOYMENT_CODES, c["employment"], m["employment"], (("ZZ", 1.0),))

    lsoa = _join(pa.array(np.full(n, "E01"), pa.string()), "", _pad(c["lsoa_number"], 6))
    cols["lsoa_code"] = _null_where(lsoa, m["imd"])
    cols["imd_decile"] = pa.array(c["imd_decile"], pa.int64(), mask=m["imd"])
    cols["ltc"] = pa.array(c["ltc"].astype(np.int64), pa.int64(), mask=m["ltc"])
    # Index 0 is NN (none); 1.. the disability codes.
    cols["disability"] = _with_missing(
        rng, ("NN",) + P.DISABILITY_CODES, c["disability"] + 1, m["disability"], (("ZZ", 1.0),)
    )
    cols["sexual_orientation"] = _with_missing(
        rng,
        SEXUAL_ORIENTATION_CODES,
        c["sexual_orientation"],
        m["sexual_orientation"],
        P.SEXUAL_ORIENTATION_MISSING_CODES,
    )
    cols["psychotropic_med"] = pa.array(c["psychotropic"].astype(np.int64), pa.int64(), mask=m["psychotropic"])
    cols["problem_descriptor"] = _codes(PROBLEM_CODES, c["problem"], None)
    cols["end_code"] = _codes(END_CODES, c["end_code"], None)
    cols["discharge_date"] = _dates(c["discharge_day"])
    for name in ("n_treat", "n_dna", "n_cancel_pt", "n_cancel_prov"):
        cols[name] = pa.array(c[name], pa.int64())
    entered = c["entered"]
    cols["first_treatment_date"] = _dates(c["first_treatment_day"], ~entered)
    cols["intensity"] = _codes(P.INTENSITY_LEVELS, c["intensity"], ~entered)
    cols["primary_therapy"] = _codes(THERAPY_CODES, c["therapy"], ~entered)

    no_last = ~entered | m["last_scores"]
    cols["phq9_first"] = pa.array(c["phq9_first"], pa.int64())
    cols["phq9_last"] = pa.array(c["phq9_last"], pa.int64(), mask=no_last)
    cols["gad7_first"] = pa.array(c["gad7_first"], pa.int64())
    cols["gad7_last"] = pa.array(c["gad7_last"], pa.int64(), mask=no_last)
    cols["adsm_type"] = pa.nulls(n, pa.string())
    cols["adsm_first"] = pa.nulls(n, pa.float64())
    cols["adsm_last"] = pa.nulls(n, pa.float64())
    cols["wsas_first"] = pa.array(c["wsas_first"], pa.int64(), mask=m["wsas"])
    cols["wsas_last"] = pa.array(c["wsas_last"], pa.int64(), mask=no_last | m["wsas"])

    names = iapt_extract_schema().names()
    if sorted(names) != sorted(cols):  # the schema file and this module must agree
        raise RuntimeError(f"synth: extract columns differ from the schema: {sorted(set(names) ^ set(cols))}")
    extract = pa.table({name: cols[name] for name in names})

    fin = c["finished"]
    flag = c["outcome_flag"]
    truth = pa.table(
        {
            "pathway_id": pathway_id,
            "service_id": cols["service_id"],
            "finished_treatment": pa.array(fin.astype(np.int64)),
            "case_first": pa.array(c["case_first"].astype(np.int64)),
            "reliable_recovery": pa.array(c["reliable_recovery"], pa.int64(), mask=c["reliable_recovery"] < 0),
            "reliable_improvement": pa.array(np.isin(flag, (0, 1)).astype(np.int64), mask=~fin),
            "reliable_deterioration": pa.array((flag == 2).astype(np.int64), mask=~fin),
            "attrition": pa.array(c["attrition"].astype(np.int64), mask=~entered),
            "nice_mismatch": pa.array(c["nice_mismatch"], pa.int64(), mask=c["nice_mismatch"] < 0),
            "outcome_intercept": pa.array(c["outcome_intercept"]),
            "service_effect": pa.array(c["service_effect"]),
        }
    )
    return extract, truth


def to_frame(table: pa.Table) -> pd.DataFrame:
    """The DataFrame pandas gives when it reads the written Parquet file."""
    return table.to_pandas()


def _with_missing(rng, codes: tuple[str, ...], index: np.ndarray, mask: np.ndarray, written: tuple) -> pa.Array:
    """Codes by index; masked rows get a "not stated" code or a blank, drawn by the shares in
    `written` ((code or None, share), ...)."""
    vocab = list(codes)
    slots = []
    for code, _ in written:
        if code is None:
            slots.append(-1)
        else:
            if code not in vocab:
                vocab.append(code)
            slots.append(vocab.index(code))
    weights = np.asarray([share for _, share in written], dtype=float)
    index = np.asarray(index, dtype=np.int64).copy()
    pick = rng.choice(len(weights), size=int(mask.sum()), p=weights / weights.sum())
    index[mask] = np.asarray(slots, dtype=np.int64)[pick]
    return _codes(tuple(vocab), index, None)


def _codes(codes, index: np.ndarray, null: np.ndarray | None) -> pa.Array:
    dictionary = pa.array(list(codes), pa.string())
    idx = np.where(index >= 0, index, 0).astype(np.int32)
    mask = (index < 0) if null is None else (null | (index < 0))
    arr = pa.DictionaryArray.from_arrays(pa.array(idx, pa.int32(), mask=mask), dictionary)
    return arr.cast(pa.string())


def _dates(day: np.ndarray, null: np.ndarray | None = None) -> pa.Array:
    days = (np.asarray(day, dtype=np.int64) + _EPOCH_OFFSET).astype(np.int32)
    return pa.array(days, pa.int32(), mask=null).cast(pa.date32())


def _pad(values: np.ndarray, width: int) -> pa.Array:
    return pc.utf8_lpad(pa.array(values).cast(pa.string()), width=width, padding="0")


def _join(left: pa.Array, sep: str, right: pa.Array) -> pa.Array:
    return pc.binary_join_element_wise(left, right, sep)


def _null_where(arr: pa.Array, mask: np.ndarray) -> pa.Array:
    return pc.if_else(pa.array(mask), pa.nulls(len(arr), arr.type), arr)

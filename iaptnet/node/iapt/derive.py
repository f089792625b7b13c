"""The derived IAPT variables (iapt_derived.toml; docs/reference/domain.md#derived-variables) from the typed extract.

Every node derives the same variables the same way, so a pooled model means the same thing at
every Trust. All work is whole-column numpy on category codes: no per-row Python. Output types
follow the typed-frame conventions of `node.validate` (binary float 0/1/NaN, categorical with
exactly the schema's levels).

Choices not fixed by docs/reference/domain.md, recorded here:
- The anxiety measure of a referral is its ADSM (adsm_type with its own cut-off and reliable
  change) when adsm_type is recorded and both adsm_first and adsm_last are present; otherwise
  GAD-7 for both first and last. One measure per referral, so scales are never mixed. adsm_type
  is not required to agree with the problem descriptor.
- Caseness at first contact needs both PHQ-9 and the anxiety score; outcome flags need a
  finished course and all four scores.
- wait_days and referral_month are kept as computed even outside the schema's range (a
  treatment date before the referral shows as a negative wait); referral_year is missing
  outside 2012-2019 because it has no level for other years. `consistency_notes` counts both.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ...protocol.iapt_schema import iapt_derived_schema, iapt_extract_schema
from .nice import matched_therapies

#: (cut-off, caseness is strictly above the cut-off, reliable change) per measure (docs/reference/domain.md#anxiety-measures).
GAD7 = (8.0, False, 4.0)
PHQ9_CUT, PHQ9_RCI = 10.0, 6.0
ADSM = {
    "SPIN": (19.0, False, 10.0),  # social anxiety
    "PDSS": (8.0, False, 5.0),  # panic
    "MI": (2.3, True, 0.73),  # agoraphobia: Mobility Inventory (alone), caseness > 2.3
    "IESR": (33.0, False, 9.0),  # PTSD
    "OCI": (40.0, False, 32.0),  # OCD
    "HAI": (18.0, False, 4.0),  # health anxiety
}
#: Tolerance for score differences compared with a fractional reliable change (MI 0.73).
_RCI_TOL = 1e-9

AGE_BREAKS = (25, 35, 45, 55, 65)  # lower bounds of the 2nd..last age_group levels
ATTRITION_END_CODES = ("43", "47")  # v1.5 dropped out; v2.0 ended earlier than planned
NEET_CODES = ("02", "04", "05", "06", "07")
IN_WORK_OR_STUDY = ("01", "03")
UNEMPLOYED = "02"
PERIOD = (pd.Timestamp("2012-04-01"), pd.Timestamp("2020-03-31"))

SEX = {"1": "male", "2": "female"}
ETHNIC_GROUP = {
    "A": "White British",
    "B": "White Irish",
    "C": "White other",
    **dict.fromkeys("DEFG", "Mixed"),
    **dict.fromkeys("HJKL", "Asian"),
    **dict.fromkeys("MNP", "Black"),
    "R": "Other",
    "S": "Other",
}
ETHNICITY_ONS = {
    **dict.fromkeys("ABC", "White"),
    **dict.fromkeys("DEFG", "Mixed"),
    **dict.fromkeys("HJKLR", "Asian"),
    **dict.fromkeys("MNP", "Black"),
    "S": "Other",
}
BME = {**dict.fromkeys("ABC", 0.0), **dict.fromkeys("DEFGHJKLMNPRS", 1.0)}
DISABILITY_ANY = {"NN": 0.0, **{f"{i:02d}": 1.0 for i in range(1, 11)}, "XX": 1.0}
REFERRAL_SOURCE_GROUP = {"A1": "GP", "B1": "self"}  # every other known code: "other"
PROBLEM = {
    "F32": "depression",
    "F33": "depression",
    "F41.1": "gad",
    "F41.0": "panic",
    "F40.0": "agoraphobia",
    "F40.1": "social_anxiety",
    "F40.2": "specific_phobia",
    "F41.2": "mixed_anxiety_depression",
    "F42": "ocd",
    "F43.1": "ptsd",
    "F45.2": "health_anxiety",
    "BDD": "bdd",
    "F40-F43": "other_anxiety",
    "OTHER_MH": "other",
    "UNSPECIFIED": "other",
}


def derive(typed: pd.DataFrame) -> pd.DataFrame:
    """The extract's columns except identifiers (model columns and the dates cohort filters
    may compare), followed by every derived column, in schema order.

    `typed` is the frame `validate` returns for the IAPT extract schema.
    """
    extract, derived = iapt_extract_schema(), iapt_derived_schema()
    levels = {name: list(col.levels) for name, col in derived.columns.items()}
    x = _Columns(typed)
    age = x.num("age_at_referral")
    n_treat, n_dna = x.num("n_treat"), x.num("n_dna")
    out: dict[str, object] = {}

    out["age_group"] = pd.Categorical.from_codes(
        np.where(np.isnan(age), -1, np.searchsorted(AGE_BREAKS, age, side="right")), categories=levels["age_group"]
    )
    out["older_adult"] = _flag(age >= 65, ~np.isnan(age))
    young = (age >= 18) & (age <= 24)
    out["young_adult"] = _flag(young, ~np.isnan(age))
    out["sex"] = x.recode("gender", SEX, levels["sex"])
    out["ethnic_group"] = x.recode("ethnic_category", ETHNIC_GROUP, levels["ethnic_group"])
    out["ethnicity_ons"] = x.recode("ethnic_category", ETHNICITY_ONS, levels["ethnicity_ons"])
    out["bme"] = x.lookup("ethnic_category", BME)
    employment = {code: code for code in levels["employment"]}  # every code but ZZ
    out["employment"] = x.recode("employment_status", employment, levels["employment"])
    known = x.isin("employment_status", employment)
    out["unemployed"] = _flag(x.isin("employment_status", [UNEMPLOYED]), known)
    neet = x.isin("employment_status", NEET_CODES)
    out["neet"] = _flag(neet, young & (neet | x.isin("employment_status", IN_WORK_OR_STUDY)))
    decile = x.num("imd_decile")
    out["imd_quintile"] = pd.Categorical.from_codes(
        np.where(np.isnan(decile), -1, np.ceil(decile / 2) - 1).astype(np.int64), categories=levels["imd_quintile"]
    )
    out["disability_any"] = x.lookup("disability", DISABILITY_ANY)
    sources = {code: REFERRAL_SOURCE_GROUP.get(code, "other") for code in x.levels("referral_source")}
    out["referral_source_group"] = x.recode("referral_source", sources, levels["referral_source_group"])
    out["problem"] = x.recode("problem_descriptor", PROBLEM, levels["problem"])

    referral = x.dates("referral_date")
    year = referral.dt.year.to_numpy(dtype="float64", na_value=np.nan)
    month = referral.dt.month.to_numpy(dtype="float64", na_value=np.nan)
    fy = year - (month < 4)
    first_fy = int(levels["referral_year"][0])
    fy_code = fy - first_fy
    fy_ok = ~np.isnan(fy) & (fy_code >= 0) & (fy_code < len(levels["referral_year"]))
    out["referral_year"] = pd.Categorical.from_codes(
        np.where(fy_ok, fy_code, -1).astype(np.int64), categories=levels["referral_year"]
    )
    out["referral_month"] = (year - 2012) * 12 + (month - 4)
    wait = x.dates("first_treatment_date") - referral
    out["wait_days"] = wait.dt.days.to_numpy(dtype="float64", na_value=np.nan)

    out["dna_rate"] = _ratio(n_dna, n_dna + n_treat)
    has_n = ~np.isnan(n_treat)
    entered = n_treat >= 1
    finished = (n_treat >= 2) & x.dates("discharge_date").notna().to_numpy()
    out["entered_treatment"] = _flag(entered, has_n)
    out["finished_treatment"] = _flag(finished, has_n)
    out["attrition"] = _flag(x.isin("end_code", ATTRITION_END_CODES), entered & x.present("end_code"))

    out.update(_outcomes(x, finished))
    out.update(_nice(x))
    out["nice_mismatch"] = 1.0 - out["nice_match"]

    served = [n for n, c in extract.columns.items() if c.type != "identifier"]
    frame = pd.concat(
        [typed[served].reset_index(drop=True), pd.DataFrame({n: out[n] for n in derived.columns})], axis=1
    )
    return frame


def _outcomes(x: _Columns, finished: np.ndarray) -> dict[str, np.ndarray]:
    """Caseness, reliable change and recovery (docs/reference/domain.md#caseness, #reliable-change, #recovery)."""
    phq_f, phq_l = x.num("phq9_first"), x.num("phq9_last")
    adsm_f, adsm_l = x.num("adsm_first"), x.num("adsm_last")
    adsm_code = x.codes("adsm_type")
    use_adsm = (adsm_code >= 0) & ~np.isnan(adsm_f) & ~np.isnan(adsm_l)
    anx_f = np.where(use_adsm, adsm_f, x.num("gad7_first"))
    anx_l = np.where(use_adsm, adsm_l, x.num("gad7_last"))
    # Per-code measure constants; the extra last entry (code -1) is GAD-7.
    table = [ADSM[level] for level in x.levels("adsm_type")] + [GAD7]
    pick = np.where(use_adsm, adsm_code, -1)
    cut = np.array([t[0] for t in table])[pick]
    strict = np.array([t[1] for t in table])[pick]
    rci = np.array([t[2] for t in table])[pick] - _RCI_TOL

    def case(phq, anx):
        return (phq >= PHQ9_CUT) | np.where(strict, anx > cut, anx >= cut)

    first_pair = ~np.isnan(phq_f) & ~np.isnan(anx_f)
    scored = finished & first_pair & ~np.isnan(phq_l) & ~np.isnan(anx_l)
    case_first, case_last = case(phq_f, anx_f), case(phq_l, anx_l)
    improved = (phq_f - phq_l >= PHQ9_RCI - _RCI_TOL) | (anx_f - anx_l >= rci)
    worsened = (phq_l - phq_f >= PHQ9_RCI - _RCI_TOL) | (anx_l - anx_f >= rci)
    reliable_improvement = improved & ~worsened
    in_recovery = scored & case_first
    return {
        "anx_first": anx_f,
        "anx_last": anx_l,
        "case_first": _flag(case_first, first_pair),
        "case_last": _flag(case_last, scored),
        "recovery": _flag(~case_last, in_recovery),
        "reliable_improvement": _flag(reliable_improvement, scored),
        "reliable_deterioration": _flag(worsened & ~improved, scored),
        "reliable_recovery": _flag(~case_last & reliable_improvement, in_recovery),
    }


def _nice(x: _Columns) -> dict[str, np.ndarray]:
    """nice_match from a descriptor-by-therapy table; the last row and column are 'missing'."""
    descriptors, therapies = x.levels("problem_descriptor"), x.levels("primary_therapy")
    grid = np.full((len(descriptors) + 1, len(therapies) + 1), np.nan)
    for i, descriptor in enumerate(descriptors):
        matched = matched_therapies(descriptor)
        if matched is not None:
            grid[i, :-1] = [float(t in matched) for t in therapies]
    return {"nice_match": grid[x.codes("problem_descriptor"), x.codes("primary_therapy")]}


def consistency_notes(typed: pd.DataFrame) -> list[str]:
    """Counts of records whose fields disagree with each other or the schema's period.

    They do not make the data invalid (each row keeps its values) but a Trust should know.
    """
    x = _Columns(typed)
    referral = x.dates("referral_date")
    treated = x.dates("first_treatment_date")
    discharged = x.dates("discharge_date")
    n_treat = x.num("n_treat")
    checks = [
        (
            ((referral < PERIOD[0]) | (referral > PERIOD[1])).sum(),
            "referral_date outside 2012-04-01..2020-03-31 (referral_year missing for them)",
        ),
        ((treated < referral).sum(), "first_treatment_date before referral_date (negative wait_days)"),
        ((discharged < referral).sum(), "discharge_date before referral_date"),
        (
            ((n_treat >= 1) & treated.isna().to_numpy()).sum(),
            "n_treat of 1 or more without a first_treatment_date (wait_days missing)",
        ),
        (((n_treat == 0) & treated.notna().to_numpy()).sum(), "a first_treatment_date with n_treat of 0"),
    ]
    return [f"{int(count):,} rows with {what}" for count, what in checks if count]


class _Columns:
    """Typed-frame columns as numpy arrays and category codes."""

    def __init__(self, typed: pd.DataFrame):
        self.typed = typed

    def num(self, name: str) -> np.ndarray:
        return self.typed[name].to_numpy(dtype="float64", na_value=np.nan)

    def dates(self, name: str) -> pd.Series:
        return self.typed[name].reset_index(drop=True)

    def codes(self, name: str) -> np.ndarray:
        return self.typed[name].cat.codes.to_numpy(dtype=np.int64)

    def levels(self, name: str) -> list[str]:
        return list(self.typed[name].cat.categories)

    def present(self, name: str) -> np.ndarray:
        return self.codes(name) >= 0

    def isin(self, name: str, wanted) -> np.ndarray:
        hit = np.array([level in wanted for level in self.levels(name)] + [False])
        return hit[self.codes(name)]

    def lookup(self, name: str, mapping: dict[str, float]) -> np.ndarray:
        """Level -> number; levels not in `mapping` and missing values give NaN."""
        table = np.array([mapping.get(level, np.nan) for level in self.levels(name)] + [np.nan])
        return table[self.codes(name)]

    def recode(self, name: str, mapping: dict[str, str], levels: list[str]) -> pd.Categorical:
        """Level -> new level; levels not in `mapping` and missing values become missing."""
        index = {level: i for i, level in enumerate(levels)}
        table = np.array([index[mapping[level]] if level in mapping else -1 for level in self.levels(name)] + [-1])
        return pd.Categorical.from_codes(table[self.codes(name)], categories=levels)


def _flag(condition: np.ndarray, defined: np.ndarray) -> np.ndarray:
    """Binary convention: 1.0/0.0 where defined, NaN elsewhere."""
    return np.where(defined, np.asarray(condition, dtype="float64"), np.nan)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out

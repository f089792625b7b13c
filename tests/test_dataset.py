"""Reading, validating and deriving a node's table (node.sources, node.validate, node.iapt,
node.dataset, node.check). Expected values are computed by hand from docs/reference/domain.md."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from iaptnet.node.check import run_check
from iaptnet.node.dataset import load_dataset
from iaptnet.node.iapt import derive
from iaptnet.node.iapt.derive import ADSM, ETHNIC_GROUP, ETHNICITY_ONS, PROBLEM
from iaptnet.node.iapt.nice import NICE_RECOMMENDED, NO_GUIDELINE
from iaptnet.node.sources import read_table
from iaptnet.node.validate import validate
from iaptnet.protocol.errors import DataError
from iaptnet.protocol.iapt_schema import (
    iapt_analysis_schema,
    iapt_derived_schema,
    iapt_extract_schema,
)
from iaptnet.protocol.schema import Schema

NaN = float("nan")

#: One complete, valid referral as a CSV would hold it: a finisher with depression treated by
#: CBT who recovered reliably (PHQ-9 18 -> 6, GAD-7 14 -> 5).
BASE = {
    "pathway_id": "P001",
    "service_id": "1",
    "referral_date": "2015-06-01",
    "referral_source": "A1",
    "age_at_referral": "30",
    "gender": "2",
    "ethnic_category": "A",
    "employment_status": "01",
    "lsoa_code": "E01000001",
    "imd_decile": "3",
    "ltc": "0",
    "disability": "NN",
    "sexual_orientation": "20430005",
    "psychotropic_med": "1",
    "problem_descriptor": "F32",
    "end_code": "46",
    "discharge_date": "2015-12-01",
    "n_treat": "8",
    "n_dna": "1",
    "n_cancel_pt": "0",
    "n_cancel_prov": "0",
    "first_treatment_date": "2015-07-01",
    "intensity": "HI",
    "primary_therapy": "CBT",
    "phq9_first": "18",
    "phq9_last": "6",
    "gad7_first": "14",
    "gad7_last": "5",
    "adsm_type": "",
    "adsm_first": "",
    "adsm_last": "",
    "wsas_first": "20",
    "wsas_last": "10",
}


def extract(*changes: dict) -> pd.DataFrame:
    """One raw text row per dict of changes to BASE (missing as NaN, like the CSV reader)."""
    rows = [{**BASE, "pathway_id": f"P{i:03d}", **c} for i, c in enumerate(changes or ({},))]
    return pd.DataFrame(rows, dtype=str).replace("", np.nan)


def derived(*changes: dict) -> pd.DataFrame:
    typed, report = validate(extract(*changes), iapt_extract_schema(), "test")
    assert report.ok, report.render()
    return derive(typed)


def col(frame: pd.DataFrame, name: str) -> list:
    """Column values as plain Python, NaN/missing as None, for readable assertions."""
    return [None if pd.isna(v) else v for v in frame[name].tolist()]


def write_csv(path, frame: pd.DataFrame, **kwargs) -> None:
    frame.to_csv(path, index=False, **kwargs)


# --- sources ----------------------------------------------------------------------------------


def test_csv_keeps_codes_as_written(tmp_path):
    path = tmp_path / "x.csv"
    write_csv(path, extract({"pathway_id": "007", "employment_status": "01", "disability": "05"}))
    raw = read_table(path).frame
    assert raw.loc[0, "pathway_id"] == "007"
    assert raw.loc[0, "employment_status"] == "01"
    ds = load_dataset(path)
    assert ds.usable
    assert col(ds.frame, "employment_status") == ["01"]
    assert col(ds.frame, "disability_any") == [1.0]


def test_csv_na_tokens_are_missing(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("a,b,c,d,e\nNA,null,NULL,NaN,\n1,2,3,4,5\n")
    raw = read_table(path).frame
    assert raw.iloc[0].isna().all()
    assert raw.iloc[1].tolist() == ["1", "2", "3", "4", "5"]


def test_headers_trimmed_and_leading_index_dropped(tmp_path):
    path = tmp_path / "x.csv"
    frame = extract().rename(columns={"phq9_first": " phq9_first ", "gad7_last": "gad7_last  "})
    frame.to_csv(path, index=True)  # pandas writes an unnamed leading index column
    raw = read_table(path).frame
    assert raw.columns[0] == "pathway_id"
    assert "phq9_first" in raw.columns and "gad7_last" in raw.columns
    ds = load_dataset(path)
    assert ds.usable and ds.report.ignored == ()


def test_custom_schema_with_datashield_style_headers(tmp_path):
    data, schema = tmp_path / "lab.csv", tmp_path / "lab.toml"
    data.write_text("LAB_TSC ,LAB_HDL , GENDER,extra\n5.5,1.2,0,x\n4.1,NA,1,y\n")
    schema.write_text(
        '[columns.LAB_TSC]\ntype = "numeric"\n[columns.LAB_HDL]\ntype = "numeric"\n'
        '[columns.GENDER]\ntype = "categorical"\nlevels = ["0", "1"]\n'
    )
    ds = load_dataset(data, schema)
    assert ds.usable
    assert list(ds.frame.columns) == ["LAB_TSC", "LAB_HDL", "GENDER"]
    assert col(ds.frame, "LAB_HDL") == [1.2, None]
    assert list(ds.frame["GENDER"].cat.categories) == ["0", "1"]
    assert ds.report.ignored == ("extra",)
    assert ds.data_version == hashlib.sha256(data.read_bytes()).hexdigest()
    assert ds.schema.name == "lab"


def test_duplicate_header_is_refused(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("a,b,a \n1,2,3\n")
    with pytest.raises(DataError, match=r"x\.csv: column 'a' appears twice"):
        read_table(path)


def test_parquet_round_trip_matches_csv(tmp_path):
    frame = extract({}, {"phq9_last": "", "employment_status": "ZZ"})
    write_csv(tmp_path / "x.csv", frame)
    frame.to_parquet(tmp_path / "x.parquet")
    from_csv, from_parquet = load_dataset(tmp_path / "x.csv"), load_dataset(tmp_path / "x.parquet")
    assert from_parquet.usable
    pd.testing.assert_frame_equal(from_csv.frame, from_parquet.frame)


def test_parquet_native_types(tmp_path):
    """Typed sources: ints and floats for codes, real dates, nullable integers."""
    frame = extract({}, {})
    frame["service_id"] = [1, 2.0]  # 1 -> level "1", 2.0 -> level "2"
    frame["employment_status"] = [1, 2]  # a code that lost its leading zero: "01", "02"
    frame["phq9_first"] = pd.array([18, None], dtype="Int64")
    frame["referral_date"] = pd.to_datetime(["2015-06-01", "2013-03-31"])
    frame["first_treatment_date"] = [pd.Timestamp("2015-07-01").date(), None]
    frame["ltc"] = [True, False]
    frame.to_parquet(tmp_path / "x.pq")
    ds = load_dataset(tmp_path / "x.pq")
    assert ds.usable, ds.report.render()
    assert col(ds.frame, "service_id") == ["1", "2"]
    assert col(ds.frame, "employment_status") == ["01", "02"]
    assert col(ds.frame, "phq9_first") == [18.0, None]
    assert col(ds.frame, "referral_year") == ["2015", "2012"]
    assert col(ds.frame, "wait_days") == [30.0, None]
    assert col(ds.frame, "ltc") == [1.0, 0.0]


def test_gzipped_csv(tmp_path):
    path = tmp_path / "x.csv.gz"
    write_csv(path, extract(), compression="gzip")
    assert load_dataset(path).usable


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("x.parquet", b"pathway_id,phq9_first\nP1,12\n", "not a Parquet file"),
        ("x.csv", b"PAR1\x00\x01binary", "is a Parquet file"),
        ("x.csv", bytes(range(256)) * 4, "binary data"),
        ("x.csv", "a,b\nJos\u00e9,1\n".encode("latin-1"), "not UTF-8"),
        ("x.csv.gz", b"a,b\n1,2\n", "not gzip-compressed"),
        ("x.csv", b"", "empty"),
        ("x.xlsx", b"a,b\n", "unknown data format"),
    ],
)
def test_file_not_in_its_claimed_format(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=expected) as info:
        read_table(path)
    message = str(info.value)
    assert message.startswith(str(path)) and message.count(".") >= 1
    assert "Jos" not in message and "P1" not in message


def test_ragged_csv_names_line_not_content(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("a,b\n1,2\nsecretword,3,4\n")
    with pytest.raises(DataError, match="line 3 has 3 fields but the header has 2") as info:
        read_table(path)
    assert "secretword" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset(tmp_path / "nope.csv")


def test_sqlite_table_and_query(tmp_path):
    sa = pytest.importorskip("sqlalchemy")
    url = f"sqlite:///{tmp_path / 'iapt.db'}"
    engine = sa.create_engine(url)
    extract({}, {"phq9_first": "9"}).to_sql("referrals", engine, index=False)
    engine.dispose()
    by_table = load_dataset(url, table="referrals")
    by_query = load_dataset(url, query="SELECT * FROM referrals")
    assert by_table.usable and by_table.n_rows == 2
    pd.testing.assert_frame_equal(by_table.frame, by_query.frame)
    assert by_table.data_version == by_query.data_version
    assert load_dataset(url, table="referrals").data_version == by_table.data_version
    with pytest.raises(DataError, match="table 'nope' was not found"):
        load_dataset(url, table="nope")
    with pytest.raises(DataError, match="exactly one of 'table'"):
        load_dataset(url)


def test_database_url_with_unknown_driver_hides_password():
    with pytest.raises(DataError, match="cannot use this database URL") as info:
        read_table("postgresql+nosuchdriver://user:s3cretpw@db.example/iapt", table="x")
    assert "s3cretpw" not in str(info.value) and "***" in str(info.value)


def test_database_errors_hide_password_and_driver_text():
    url = "postgresql+psycopg://user:s3cretpw@127.0.0.1:1/db?connect_timeout=2"
    with pytest.raises(DataError, match="could not read table 'x'") as info:
        read_table(url, table="x")
    assert "s3cretpw" not in str(info.value)


# --- validation -------------------------------------------------------------------------------


def check(frame: pd.DataFrame, schema: Schema | None = None):
    typed, report = validate(frame, schema or iapt_extract_schema(), "data.csv")
    text = report.render()
    blob = json.dumps(report.as_dict())
    return typed, report, text + blob


def invalid_of(report, name):
    return next(c for c in report.columns if c.name == name).invalid


def test_text_in_numeric_column():
    typed, report, shown = check(extract({}, {"phq9_first": "secretword"}))
    assert not report.ok
    assert invalid_of(report, "phq9_first") == {"not a number": 1}
    assert report.invalid_columns == ("phq9_first",)
    assert "secretword" not in shown
    assert col(typed, "phq9_first") == [18.0, None]


def test_score_above_max():
    typed, report, shown = check(extract({"phq9_first": "77"}, {"gad7_last": "-3"}))
    assert invalid_of(report, "phq9_first") == {"above max": 1}
    assert invalid_of(report, "gad7_last") == {"below min": 1}
    assert "above max 27" in shown and "below min 0" in shown
    assert "77" not in shown and "-3" not in shown


def test_integer_binary_and_date_rules():
    typed, report, shown = check(
        extract(
            {"n_treat": "2.5", "ltc": "2", "discharge_date": "2015-02-30"},
            {"n_treat": "3.0", "ltc": " 1 ", "discharge_date": "01/12/2015"},
        )
    )
    assert invalid_of(report, "n_treat") == {"not an integer": 1}
    assert invalid_of(report, "ltc") == {"not 0/1": 1}
    assert invalid_of(report, "discharge_date") == {"not a date": 1}
    assert col(typed, "n_treat") == [None, 3.0]
    assert col(typed, "ltc") == [None, 1.0]
    assert typed["discharge_date"].dtype == "datetime64[ns]"
    assert col(typed, "discharge_date") == [None, pd.Timestamp("2015-12-01")]
    assert "2015-02-30" not in shown and "2.5" not in shown


def test_unknown_code():
    typed, report, shown = check(extract({"employment_status": "Q7"}, {"gender": " 1 "}))
    assert invalid_of(report, "employment_status") == {"unknown level": 1}
    assert "Q7" not in shown
    assert col(typed, "gender") == ["2", "1"]


def test_missing_required_column():
    typed, report, shown = check(extract().drop(columns=["gad7_last"]))
    assert not report.ok
    assert report.missing_required == ("gad7_last",)
    assert "gad7_last" in shown and "MISSING" in shown
    assert col(typed, "gad7_last") == [None]  # present in the typed frame, all missing


def test_absent_optional_column_is_fine():
    typed, report, shown = check(extract().drop(columns=["adsm_type", "adsm_first", "adsm_last"]))
    assert report.ok
    assert "absent (optional)" in shown
    levels = iapt_extract_schema()["adsm_type"].levels
    assert list(typed["adsm_type"].cat.categories) == list(levels)


def test_typed_frame_conventions():
    typed, report, _ = check(extract({"gender": ""}))
    schema = iapt_extract_schema()
    assert list(typed.columns) == schema.names()
    for name, column in schema.columns.items():
        dtype = typed[name].dtype
        if column.type in ("numeric", "integer", "binary"):
            assert dtype == np.float64, name
        elif column.network:  # service_id: the codes its rows hold (the node declares none)
            assert list(dtype.categories) == ["1"], name
        elif column.type == "categorical":
            assert list(dtype.categories) == list(column.levels), name  # all levels, in order
        elif column.type == "date":
            assert dtype == "datetime64[ns]", name
        else:
            assert pd.api.types.is_string_dtype(dtype), name
    assert col(typed, "gender") == [None]


def test_duplicate_identifiers_counted_not_shown():
    typed, report, shown = check(extract({"pathway_id": "X9"}, {"pathway_id": "X9"}, {}))
    pathway = next(c for c in report.columns if c.name == "pathway_id")
    assert pathway.n_duplicates == 1
    assert "X9" not in shown
    assert not report.ok  # pathway_id is the extract's row key (unique = true)
    assert "pathway_id" in report.invalid_columns


def test_ignored_columns_named():
    frame = extract()
    frame["nhs_number"] = "9434765919"
    _, report, shown = check(frame)
    assert report.ignored == ("nhs_number",)
    assert "9434765919" not in shown


def test_render_has_one_line_per_column():
    _, report, _ = check(extract())
    lines = report.render().splitlines()
    for name in iapt_extract_schema().names():
        assert sum(line.split()[0] == name for line in lines[2:]) == 1


# --- derivations ------------------------------------------------------------------------------


def test_output_columns_and_types():
    frame = derived({}, {"employment_status": "ZZ", "phq9_last": ""})
    extract_schema, derived_schema = iapt_extract_schema(), iapt_derived_schema()
    served = [n for n, c in extract_schema.columns.items() if c.type != "identifier"]
    assert list(frame.columns) == served + derived_schema.names()
    assert frame["referral_date"].dtype == "datetime64[ns]"  # dates stay for cohort filters
    for name, column in iapt_analysis_schema().columns.items():
        if name not in frame:
            continue
        if column.network:  # service_id: the codes the node serves (here, those its rows hold)
            assert list(frame[name].cat.categories) == sorted(frame[name].dropna().unique()), name
        elif column.is_categorical:
            assert list(frame[name].cat.categories) == list(column.levels), name
        elif column.type != "date":
            assert frame[name].dtype == np.float64, name
        if column.type == "binary":
            assert set(frame[name].dropna().unique()) <= {0.0, 1.0}, name


@pytest.mark.parametrize(
    "phq_last, improved, deteriorated",
    [
        ("12", 1.0, 0.0),  # drop of exactly 6: reliable
        ("13", 0.0, 0.0),  # drop of 5: not reliable
        ("24", 0.0, 1.0),  # rise of exactly 6: reliable deterioration
        ("23", 0.0, 0.0),  # rise of 5
    ],
)
def test_phq9_reliable_change(phq_last, improved, deteriorated):
    frame = derived({"phq9_first": "18", "phq9_last": phq_last, "gad7_first": "5", "gad7_last": "5"})
    assert col(frame, "reliable_improvement") == [improved]
    assert col(frame, "reliable_deterioration") == [deteriorated]


def test_gad7_reliable_change_and_conflict():
    frame = derived(
        {"phq9_first": "5", "phq9_last": "5", "gad7_first": "12", "gad7_last": "8"},  # drop 4
        {"phq9_first": "5", "phq9_last": "5", "gad7_first": "12", "gad7_last": "9"},  # drop 3
        {"phq9_first": "18", "phq9_last": "12", "gad7_first": "5", "gad7_last": "9"},  # both
    )
    assert col(frame, "reliable_improvement") == [1.0, 0.0, 0.0]
    assert col(frame, "reliable_deterioration") == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "phq, gad, case",
    [
        ("9", "7", 0.0),
        ("10", "0", 1.0),
        ("0", "8", 1.0),
        ("9", "", None),
        ("", "12", None),
    ],
)
def test_caseness_cut_offs(phq, gad, case):
    frame = derived({"phq9_first": phq, "gad7_first": gad, "n_treat": "0", "first_treatment_date": ""})
    assert col(frame, "case_first") == [case]


def test_recovery_and_reliable_recovery():
    frame = derived(
        {},  # 18/14 -> 6/5: recovered reliably
        {"phq9_first": "10", "phq9_last": "9", "gad7_first": "8", "gad7_last": "7"},  # not reliable
        {"phq9_last": "10"},  # still at caseness on PHQ-9
        {"phq9_first": "9", "gad7_first": "7", "phq9_last": "3", "gad7_last": "1"},  # not a case
        {"n_treat": "1"},  # not finished
        {"discharge_date": ""},  # no discharge date: not finished
        {"gad7_last": ""},  # unpaired
    )
    assert col(frame, "finished_treatment") == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    assert col(frame, "case_first") == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    assert col(frame, "case_last") == [0.0, 0.0, 1.0, 0.0, None, None, None]
    assert col(frame, "recovery") == [1.0, 1.0, 0.0, None, None, None, None]
    assert col(frame, "reliable_recovery") == [1.0, 0.0, 0.0, None, None, None, None]
    # PHQ-9 18 -> 10 is a reliable drop even though still at caseness.
    assert col(frame, "reliable_improvement") == [1.0, 0.0, 1.0, 1.0, None, None, None]


def test_adsm_used_when_recorded_with_both_scores():
    frame = derived(
        # social anxiety, SPIN 30 -> 15: case (>=19), reliable drop (>=10), recovered.
        {
            "problem_descriptor": "F40.1",
            "adsm_type": "SPIN",
            "adsm_first": "30",
            "adsm_last": "15",
            "phq9_first": "5",
            "phq9_last": "5",
            "gad7_first": "3",
            "gad7_last": "3",
        },
        # same but no last ADSM: GAD-7 for both, so not at caseness
        {
            "problem_descriptor": "F40.1",
            "adsm_type": "SPIN",
            "adsm_first": "30",
            "phq9_first": "5",
            "phq9_last": "5",
            "gad7_first": "3",
            "gad7_last": "3",
        },
        # scores without adsm_type: GAD-7
        {"adsm_first": "30", "adsm_last": "15", "gad7_first": "14", "gad7_last": "5"},
    )
    assert col(frame, "anx_first") == [30.0, 3.0, 14.0]
    assert col(frame, "anx_last") == [15.0, 3.0, 5.0]
    assert col(frame, "case_first") == [1.0, 0.0, 1.0]
    # Reliable change is defined for every finisher with paired scores, at caseness or not.
    assert col(frame, "reliable_improvement") == [1.0, 0.0, 1.0]
    assert col(frame, "recovery") == [1.0, None, 1.0]
    assert col(frame, "reliable_recovery") == [1.0, None, 1.0]


def test_mobility_inventory_strict_cut_and_fractional_rci():
    calm = {
        "phq9_first": "5",
        "phq9_last": "5",
        "gad7_first": "3",
        "gad7_last": "3",
        "adsm_type": "MI",
        "problem_descriptor": "F40.0",
    }
    frame = derived(
        {**calm, "adsm_first": "2.3", "adsm_last": "2.3"},  # not > 2.3
        {**calm, "adsm_first": "2.4", "adsm_last": "2.0"},  # case; drop 0.4 not reliable
        {**calm, "adsm_first": "3.0", "adsm_last": "2.27"},  # drop of exactly 0.73: reliable
    )
    assert col(frame, "case_first") == [0.0, 1.0, 1.0]
    assert col(frame, "reliable_improvement") == [0.0, 0.0, 1.0]
    assert col(frame, "reliable_recovery") == [None, 0.0, 1.0]


def test_treatment_pathway():
    frame = derived(
        {"n_treat": "3", "n_dna": "1", "end_code": "47"},
        {"n_treat": "2", "n_dna": "0", "end_code": "43"},
        {"n_treat": "1", "n_dna": "2", "end_code": "46", "discharge_date": ""},
        {"n_treat": "0", "n_dna": "0", "end_code": "10", "first_treatment_date": ""},
        {"n_treat": "4", "end_code": ""},
    )
    assert col(frame, "entered_treatment") == [1.0, 1.0, 1.0, 0.0, 1.0]
    assert col(frame, "finished_treatment") == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert col(frame, "attrition") == [1.0, 1.0, 0.0, None, None]
    assert col(frame, "dna_rate") == [0.25, 0.0, 2 / 3, None, 0.2]
    assert col(frame, "wait_days") == [30.0, 30.0, 30.0, None, 30.0]


def test_financial_year_boundary():
    frame = derived(
        {"referral_date": "2013-03-31", "first_treatment_date": "2013-04-02"},
        {"referral_date": "2013-04-01", "first_treatment_date": "2013-04-02"},
        {"referral_date": "2012-04-01", "first_treatment_date": "2012-05-01"},
        {"referral_date": "2020-03-31", "first_treatment_date": "2020-04-01", "discharge_date": "2020-06-01"},
    )
    assert col(frame, "referral_year") == ["2012", "2013", "2012", "2019"]
    assert col(frame, "referral_month") == [11.0, 12.0, 0.0, 95.0]
    assert col(frame, "wait_days") == [2.0, 1.0, 30.0, 1.0]


def test_referral_outside_period_is_noted(tmp_path):
    path = tmp_path / "x.csv"
    write_csv(
        path,
        extract(
            {"referral_date": "2020-04-01", "first_treatment_date": "2020-05-01", "discharge_date": "2020-09-01"},
            {"first_treatment_date": "2015-05-01"},
        ),
    )
    ds = load_dataset(path)
    assert ds.usable
    assert col(ds.frame, "referral_year") == [None, "2015"]
    assert col(ds.frame, "wait_days") == [30.0, -31.0]
    notes = " ".join(ds.report.notes)
    assert "1 rows with referral_date outside" in notes
    assert "1 rows with first_treatment_date before referral_date" in notes


@pytest.mark.parametrize(
    "age, code, neet",
    [
        ("20", "02", 1.0),
        ("20", "04", 1.0),
        ("20", "05", 1.0),
        ("20", "06", 1.0),
        ("20", "07", 1.0),
        ("20", "01", 0.0),
        ("20", "03", 0.0),
        ("20", "08", None),
        ("20", "ZZ", None),
        ("20", "", None),
        ("18", "02", 1.0),
        ("24", "01", 0.0),
        ("25", "02", None),
        ("30", "01", None),
    ],
)
def test_neet(age, code, neet):
    frame = derived({"age_at_referral": age, "employment_status": code})
    assert col(frame, "neet") == [neet]


def test_employment_and_unemployed():
    frame = derived(*({"employment_status": c} for c in ("02", "01", "08", "ZZ", "")))
    assert col(frame, "unemployed") == [1.0, 0.0, 0.0, None, None]
    assert col(frame, "employment") == ["02", "01", "08", None, None]


def test_age_bands():
    ages = ["18", "24", "25", "64", "65", "100"]
    frame = derived(*({"age_at_referral": a} for a in ages))
    assert col(frame, "age_group") == ["18-24", "18-24", "25-34", "55-64", "65+", "65+"]
    assert col(frame, "older_adult") == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    assert col(frame, "young_adult") == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_demographic_groupings():
    frame = derived(
        {"gender": "1", "ethnic_category": "R", "imd_decile": "1", "disability": "05", "referral_source": "B1"},
        {"gender": "2", "ethnic_category": "C", "imd_decile": "2", "disability": "XX", "referral_source": "H2"},
        {"gender": "9", "ethnic_category": "Z", "imd_decile": "10", "disability": "ZZ", "referral_source": "A1"},
        {"gender": "X", "ethnic_category": "99", "imd_decile": "", "disability": "NN", "referral_source": ""},
    )
    assert col(frame, "sex") == ["male", "female", None, None]
    assert col(frame, "ethnic_group") == ["Other", "White other", None, None]
    assert col(frame, "ethnicity_ons") == ["Asian", "White", None, None]
    assert col(frame, "bme") == [1.0, 0.0, None, None]
    assert col(frame, "imd_quintile") == ["1", "1", "5", None]
    assert col(frame, "disability_any") == [1.0, 1.0, None, 0.0]
    assert col(frame, "referral_source_group") == ["self", "other", "GP", None]


@pytest.mark.parametrize(
    "descriptor, therapy, match",
    [
        ("F32", "CBT", 1.0),
        ("F33", "CFD", 1.0),
        ("F32", "EMDR", 0.0),
        ("F32", "SIGNPOST", 0.0),
        ("F41.1", "APPLIED_RELAX", 1.0),
        ("F41.1", "CFD", 0.0),
        ("F41.0", "NGSH_BOOK", 1.0),
        ("F40.1", "DIT", 1.0),
        ("F40.1", "PSYED_PEER", 0.0),
        ("F43.1", "EMDR", 1.0),
        ("F43.1", "GSH_BOOK", 0.0),
        ("F42", "PSYED_PEER", 1.0),
        ("BDD", "GSH_COMP", 1.0),
        ("F45.2", "OTHER_HI", 0.0),
        ("F41.2", "CBT", None),
        ("F40-F43", "CBT", None),
        ("OTHER_MH", "CBT", None),
        ("UNSPECIFIED", "CBT", None),
        ("", "CBT", None),
        ("F32", "", None),
    ],
)
def test_nice_match(descriptor, therapy, match):
    frame = derived({"problem_descriptor": descriptor, "primary_therapy": therapy})
    assert col(frame, "nice_match") == [match]
    assert col(frame, "nice_mismatch") == [None if match is None else 1.0 - match]


def test_problem_groups():
    frame = derived(*({"problem_descriptor": d} for d in ("F33", "F41.2", "F40-F43", "OTHER_MH")))
    assert col(frame, "problem") == ["depression", "mixed_anxiety_depression", "other_anxiety", "other"]


def test_tables_cover_the_schemas():
    extract_schema, derived_schema = iapt_extract_schema(), iapt_derived_schema()
    descriptors = set(extract_schema["problem_descriptor"].levels)
    therapies = set(extract_schema["primary_therapy"].levels)
    assert set(NICE_RECOMMENDED) | set(NO_GUIDELINE) == descriptors
    assert not set(NICE_RECOMMENDED) & set(NO_GUIDELINE)
    for lines in NICE_RECOMMENDED.values():
        assert set(lines["first"]) | set(lines["second"]) <= therapies
    assert set(ADSM) == set(extract_schema["adsm_type"].levels)
    assert set(PROBLEM) == descriptors
    assert set(PROBLEM.values()) == set(derived_schema["problem"].levels)
    assert set(ETHNIC_GROUP.values()) == set(derived_schema["ethnic_group"].levels)
    assert set(ETHNICITY_ONS.values()) == set(derived_schema["ethnicity_ons"].levels)
    years = derived_schema["referral_year"].levels
    assert [int(y) for y in years] == list(range(int(years[0]), int(years[0]) + len(years)))


# --- dataset and check ------------------------------------------------------------------------


def test_analysis_schema_is_pure_and_merged():
    schema = iapt_analysis_schema()
    assert schema.names() == iapt_extract_schema().names() + iapt_derived_schema().names()
    code = "import sys, iaptnet.protocol.iapt_schema as m; m.iapt_analysis_schema(); assert 'pandas' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_load_dataset_iapt(tmp_path):
    path = tmp_path / "x.csv"
    write_csv(path, extract({}, {"phq9_first": "9", "gad7_first": "7"}))
    ds = load_dataset(path)
    assert ds.usable and ds.n_rows == 2
    # The schema served: service_id's levels the node's own codes (it declares none: those it holds).
    assert ds.schema.fingerprint == iapt_analysis_schema().with_services(["1"]).fingerprint
    assert ds.data_version == hashlib.sha256(path.read_bytes()).hexdigest()
    assert "pathway_id" not in ds.frame and "lsoa_code" not in ds.frame
    assert col(ds.frame, "reliable_recovery") == [1.0, None]


def test_invalid_data_loads_but_is_not_usable(tmp_path):
    path = tmp_path / "x.csv"
    write_csv(path, extract({"phq9_first": "secretword"}))
    ds = load_dataset(path)
    assert not ds.usable
    assert "secretword" not in ds.report.render()


def test_run_check(tmp_path):
    good, bad = tmp_path / "good.csv", tmp_path / "bad.csv"
    write_csv(good, extract({}, {}, {}))
    text, ok = run_check(good)
    assert ok
    assert text.splitlines()[-1] == "OK: 3 rows, 33 columns valid"
    write_csv(bad, extract({"phq9_first": "77", "gender": "Q"}).drop(columns=["wsas_last"]))
    text, ok = run_check(bad)
    assert not ok
    assert text.splitlines()[-1] == (
        "2 columns have invalid values and 1 required column is missing: see above (not usable for studies)"
    )
    assert "77" not in text.replace(str(tmp_path), "")  # (pytest's folder may be pytest-77...)


def test_derive_is_vectorised_on_many_rows():
    """Behaviour on a larger frame equals the row-by-row expectations (no timing asserted)."""
    rows = [{}, {"phq9_last": "13", "phq9_first": "18", "gad7_first": "5", "gad7_last": "5"}]
    small = derived(*rows)
    big = derived(*(rows * 500))
    for name in ("reliable_improvement", "recovery", "nice_match", "referral_year", "neet"):
        assert col(big, name)[:2] == col(small, name)
        assert col(big, name)[-2:] == col(small, name)
    assert math.isclose(big["reliable_improvement"].mean(), 0.5)


# --- schema extras: source headers and unique row keys --------------------------------------


def test_schema_source_maps_a_messy_header(tmp_path):
    schema_path = tmp_path / "s.toml"
    schema_path.write_text('[columns.age_60]\ntype = "numeric"\nsource = "age.60"\n')
    data = tmp_path / "d.csv"
    data.write_text("age.60,other\n1.5,x\n2.5,y\n")
    ds = load_dataset(data, schema_path)
    assert list(ds.frame.columns) == ["age_60"]
    assert ds.frame["age_60"].tolist() == [1.5, 2.5]

"""A node given its appointment table (one row per contact) computes the extract's pathway
columns by the rules of docs/reference/domain.md#pathway and serves exactly what the flat extract would give."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from glmcase import write_study

from iaptnet.cli import main
from iaptnet.coordinator.inprocess import run_inprocess
from iaptnet.coordinator.network import load_network
from iaptnet.node.dataset import AppointmentSource, load_dataset
from iaptnet.node.iapt.appointments import PATHWAY_COLUMNS, summarise
from iaptnet.node.validate import identifier_text, validate
from iaptnet.protocol.errors import SpecError
from iaptnet.protocol.iapt_schema import iapt_appointments_schema
from iaptnet.synth import generate_network


def _nodes(network):
    return {node["name"]: node for node in load_network(network).nodes}


@pytest.fixture(scope="module")
def networks(tmp_path_factory):
    """The same synthetic referrals written flat and with appointment tables, as Parquet and CSV."""
    base = tmp_path_factory.mktemp("appointments")
    out = {}
    for fmt in ("parquet", "csv"):
        out[fmt] = (
            generate_network(base / f"flat_{fmt}", services=3, patients=9_000, seed=8, fmt=fmt),
            generate_network(base / f"appt_{fmt}", services=3, patients=9_000, seed=8, fmt=fmt, appointments=True),
        )
    return out


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_appointment_tables_give_back_the_flat_extract(networks, fmt):
    flat, appt = networks[fmt]
    for name, node in _nodes(appt).items():
        assert "appointments" in node
        extract_columns = (
            pd.read_csv(node["data"], nrows=0).columns if fmt == "csv" else pd.read_parquet(node["data"]).columns
        )
        assert not set(PATHWAY_COLUMNS) & set(extract_columns)  # the Trust's extract lacks them
        served = load_dataset(node["data"], appointments=AppointmentSource(node["appointments"]))
        reference = load_dataset(_nodes(flat)[name]["data"])
        assert served.usable and served.appointments_report.ok
        pd.testing.assert_frame_equal(served.frame, reference.frame)
        assert served.data_version != reference.data_version
        assert not [n for n in served.report.notes if n.startswith("appointments:")]


def test_a_study_gives_the_same_numbers_on_both_networks(networks, tmp_path):
    flat, appt = networks["parquet"]
    study = _study(tmp_path)
    a, b = run_inprocess([study], flat)[0], run_inprocess([study], appt)[0]
    assert a["n"] == b["n"] > 500
    assert [t["estimate"] for t in a["terms"]] == [t["estimate"] for t in b["terms"]]
    assert [n["data_version"] for n in a["nodes"]] != [n["data_version"] for n in b["nodes"]]


def _study(folder):
    return write_study(
        folder / "sessions.toml",
        name="sessions",
        family="binomial",
        formula="reliable_recovery ~ n_treat + n_dna + intensity",
        where="finished_treatment == 1 and case_first == 1",
        exposure="n_treat",
    )


def _contacts(rows):
    frame = pd.DataFrame(
        rows, columns=["pathway_id", "contact_date", "app_type", "attend_code", "therapy_type", "intensity"]
    )
    typed, report = validate(frame.astype(object), iapt_appointments_schema(), "contacts")
    assert report.ok
    return typed


def test_the_rules_on_a_hand_made_table():
    contacts = _contacts(
        [
            # r1: stepped care; CBT and GSH_BOOK tie on two sessions each, CBT attended last
            ("r1", "2019-01-05", "01", "5", None, None),  # assessment: not a session
            ("r1", "2019-01-10", "02", "5", "GSH_BOOK", None),
            ("r1", "2019-01-17", "02", "6", "GSH_BOOK", None),  # seen late: attended
            ("r1", "2019-01-24", "03", "5", "CBT", None),  # assessment and treatment: a session
            ("r1", "2019-02-07", "05", "5", "CBT", None),  # review and treatment: a session
            ("r1", "2019-01-31", "02", "3", "CBT", None),  # did not attend
            ("r1", "2019-02-14", "01", "7", None, None),  # arrived late, not seen: missed
            ("r1", "2019-02-21", "04", "3", None, None),  # a review without treatment: not counted
            ("r1", "2019-03-30", "06", "5", None, None),  # follow-up: not a session
            ("r1", "2019-02-28", "02", "2", None, None),  # cancelled by the patient
            ("r1", "2019-03-07", "02", "4", None, None),  # cancelled by the provider
            # r2: one session of a low-intensity therapy recorded as high intensity by the service
            ("r2", "2019-05-01", "02", "5", "GSH_COMP", "HI"),
            # r3: three sessions, the most-attended therapy wins though another is later
            ("r3", "2019-06-01", "02", "5", "IPT", None),
            ("r3", "2019-06-08", "02", "5", "IPT", None),
            ("r3", "2019-06-15", "02", "5", "CFD", None),
            # a contact of a referral the extract does not have, and one without an attend code
            ("elsewhere", "2019-06-15", "02", "5", "CFD", None),
            ("r3", "2019-06-22", "02", None, "CFD", None),
        ]
    )
    ids = identifier_text(pd.Series(["r1", "r2", "r3", "r4"]))
    out, notes = summarise(contacts, ids)
    want = pd.DataFrame(
        {
            "n_treat": [4, 1, 3, 0],
            "n_dna": [2, 0, 0, 0],
            "n_cancel_pt": [1, 0, 0, 0],
            "n_cancel_prov": [1, 0, 0, 0],
            "first_treatment_date": ["2019-01-10", "2019-05-01", "2019-06-01", np.nan],
            "intensity": ["stepped", "HI", "HI", None],
            "primary_therapy": ["CBT", "GSH_COMP", "IPT", None],
        }
    )
    pd.testing.assert_frame_equal(out.astype(object), want.astype(object), check_dtype=False)
    assert notes == [
        "appointments: 1 contacts name a referral that is not in the extract; left out",
        "appointments: 1 contacts without a pathway_id, app_type or attend_code; left out",
    ]
    # An empty table (a header only) is served, and says so.
    out, notes = summarise(contacts.iloc[:0], ids)
    assert out["n_treat"].tolist() == [0, 0, 0, 0] and out["primary_therapy"].isna().all()
    assert notes == ["appointments: the table has no contacts, so every referral has 0 sessions"]


def test_bad_input_gets_one_sentence(networks, tmp_path, capsys):
    flat, appt = networks["csv"]
    node = _nodes(appt)["service_1"]
    flat_data = _nodes(flat)["service_1"]["data"]
    # An extract that still has the pathway columns, beside an appointment table.
    code = main(["node", "check", "--data", flat_data, "--appointments", node["appointments"]])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "column 'n_treat' is computed from the appointment table" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    # An appointment table with a code that is not AttendOrDNA's: a per-column report, not usable.
    bad = pd.read_csv(node["appointments"], dtype=str)
    bad.loc[bad.index[:3], "attend_code"] = "9"
    bad.to_csv(tmp_path / "bad.csv", index=False)
    code = main(["node", "check", "--data", node["data"], "--appointments", str(tmp_path / "bad.csv")])
    out = capsys.readouterr().out
    assert code != 0 and "attend_code" in out and "not usable for studies" in out and "bad.csv" in out
    # network.toml: a missing appointment file, and an appointment table with a custom schema.
    net = tmp_path / "network.toml"
    net.write_text(f'[[node]]\nname = "a"\ndata = "{node["data"]}"\nappointments = "nowhere.csv"\n')
    with pytest.raises(SpecError, match="field 'appointments' names nowhere.csv, which does not exist"):
        load_network(net)
    (tmp_path / "schema.toml").write_text('[columns.x]\ntype = "numeric"\n')
    net.write_text(
        f'[[node]]\nname = "a"\ndata = "{node["data"]}"\nschema = "schema.toml"\n'
        f'appointments = "{node["appointments"]}"\n'
    )
    with pytest.raises(SpecError, match="goes with the IAPT extract only"):
        load_network(net)

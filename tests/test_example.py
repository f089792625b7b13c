"""The README's worked example (examples/custom-table) runs and equals statsmodels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from glmcase import assert_matches, reference_fit

from iaptnet.cli import main

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom-table"


def test_worked_example_matches_pooled_statsmodels(tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        main(["run", str(EXAMPLE / "study.toml"), "--network", str(EXAMPLE / "network.toml"), "--out", str(out)]) == 0
    )
    import json

    result = json.loads((out / "results.json").read_text())
    frame = pd.concat([pd.read_csv(EXAMPLE / f"{s}.csv") for s in ("north", "south", "east")])
    frame["delivery"] = pd.Categorical(frame["delivery"], categories=["face_to_face", "video", "phone"])
    frame = frame[frame["age"] >= 25].dropna(subset=["baseline_phq9"])
    ref = reference_fit(
        frame,
        "improved ~ sessions + delivery + center(baseline_phq9) + age",
        "binomial",
        ["improved", "sessions", "delivery", "baseline_phq9", "age"],
    )
    assert_matches(result, ref)
    assert result["exposure_term"]["term"] == "delivery[T.phone]"
    assert np.isfinite(result["exposure_term"]["ratio"])


def test_worked_example_node_check(capsys):
    assert main(["node", "check", "--data", str(EXAMPLE / "north.csv"), "--schema", str(EXAMPLE / "schema.toml")]) == 0
    text = capsys.readouterr().out
    assert "baseline_phq9" in text and "OK:" in text
    assert "north-0001" not in text  # identifiers are validated, never shown

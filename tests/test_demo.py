"""What `iaptnet demo` reports: summary.json holds exactly the abstract's six findings;
the source papers' secondary findings go to secondary.json."""

from __future__ import annotations

import tomllib

from iaptnet.coordinator.catalogue import catalogue_paths
from iaptnet.coordinator.demo import render_summary, summarise

SIX = ["sessions", "dna", "nice_mismatch", "older_adults", "neet", "deprivation"]


def _fake_result(path) -> dict:
    """A results.json as the runner writes it, with made-up numbers (only the layout matters)."""
    study = tomllib.loads(path.read_text())
    exposure = study.get("exposure")
    term = {"term": exposure, "ratio": 1.5, "ratio_low": 1.2, "ratio_high": 1.9} if exposure else None
    return {
        "study": study["name"],
        "kind": study.get("kind", "glm"),
        "reference": study.get("reference"),
        "exposure_term": term,
        "n": 1000,
    }


def test_summary_has_the_six_findings_and_secondary_the_rest():
    results = [_fake_result(p) for p in catalogue_paths()]
    primary, secondary = summarise(results), summarise(results, secondary=True)
    assert [r["finding"] for r in primary] == SIX
    assert [r["finding"] for r in secondary] == [
        "older_adults_improvement",
        "older_adults_attrition",
        "neet_deterioration",
        "neet_attrition",
        "neet_sessions",
    ]
    for row in primary + secondary:
        assert set(row) == {
            "finding",
            "term",
            "ratio",
            "ratio_low",
            "ratio_high",
            "paper_ratio",
            "paper_low",
            "paper_high",
        }
        assert row["paper_low"] < row["paper_ratio"] < row["paper_high"]
    table = render_summary(secondary, results, heading="secondary (S4, S5)").splitlines()
    assert table[0].startswith("secondary (S4, S5)") and len(table) == 1 + len(secondary)
    assert all(line.endswith("NO") for line in table[1:] if "neet_sessions" in line)  # 1.5 outside 1.08-1.12


def test_every_catalogue_study_validates_against_the_iapt_schema():
    """The shipped studies (and the tables they name: population, need) load and validate as
    `iaptnet run` would load them, before any node is asked anything."""
    from iaptnet.coordinator.studies import load_study
    from iaptnet.synth import service_codes

    studies = [load_study(p, services=service_codes(8)) for p in catalogue_paths()]
    assert len({s.spec.hash for s in studies}) == len(studies)
    need = [s for s in studies if s.spec.kind == "access" and s.spec.params.get("need")]
    assert [s.spec.name for s in need] == ["a4_access_need"]

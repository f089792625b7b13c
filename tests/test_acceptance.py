"""iaptnet against other projects' acceptance data (tests/data/acceptance: DataSHIELD and
vantage6 test studies, one CSV per site as upstream splits them): each site served as a node
(with a schema written here), the pooled GLM run in-process, compared with statsmodels' GLM on
the sites' rows concatenated: coefficients, SEs and deviance to 1e-8 relative, the same N."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
import statsmodels.formula
import statsmodels.formula.api as smf
import tomli_w

from iaptnet.coordinator.inprocess import run_inprocess

statsmodels.formula.options.formula_engine = "formulaic"
DATA = Path(__file__).parent / "data" / "acceptance"
FAMILY = {"binomial": sm.families.Binomial, "gaussian": sm.families.Gaussian, "poisson": sm.families.Poisson}

CNSIM = {
    "LAB_TSC": {"type": "numeric"},
    "LAB_TRIG": {"type": "numeric"},
    "LAB_HDL": {"type": "numeric"},
    "LAB_GLUC_ADJUSTED": {"type": "numeric"},
    "PM_BMI_CONTINUOUS": {"type": "numeric"},
    "DIS_CVA": {"type": "binary"},
    "MEDI_LPD": {"type": "binary"},
    "DIS_DIAB": {"type": "binary"},
    "DIS_AMI": {"type": "binary"},
    "GENDER": {"type": "binary"},
    "PM_BMI_CATEGORICAL": {"type": "categorical", "levels": ["1", "2", "3"]},
}
EXPAND = {
    "survtime": {"type": "numeric"},
    "cens": {"type": "integer", "min": 0},
    "age_60": {"type": "numeric", "source": "age.60"},
    "female": {"type": "binary"},
    "noise_56": {"type": "numeric", "source": "noise.56"},
    "pm10_16": {"type": "numeric", "source": "pm10.16"},
    "bmi_26": {"type": "numeric", "source": "bmi.26"},
}
V6 = {
    "binomial": (
        {
            "admit": {"type": "binary"},
            "gre": {"type": "numeric"},
            "gpa": {"type": "numeric"},
            "rank": {"type": "categorical", "levels": ["1", "2", "3", "4"]},
        },
        "admit ~ gre + gpa + rank",
    ),
    "gaussian": (
        {"Girth": {"type": "numeric"}, "Height": {"type": "numeric"}, "Volume": {"type": "numeric"}},
        "Volume ~ Girth + Height",
    ),
    "poisson": (
        {
            "num_awards": {"type": "integer", "min": 0},
            "prog": {"type": "categorical", "levels": ["General", "Academic", "Vocational"]},
            "math": {"type": "numeric"},
        },
        "num_awards ~ prog + math",
    ),
}

CASES = [
    (
        "datashield CNSIM binomial",
        "datashield",
        "CNSIM{}.csv",
        CNSIM,
        "binomial",
        "DIS_DIAB ~ GENDER * PM_BMI_CONTINUOUS + LAB_HDL",
    ),
    (
        "datashield CNSIM gaussian",
        "datashield",
        "CNSIM{}.csv",
        CNSIM,
        "gaussian",
        "LAB_TSC ~ LAB_TRIG + LAB_HDL + PM_BMI_CATEGORICAL + GENDER",
    ),
    (
        "datashield EXPAND_MISSING poisson",
        "datashield",
        "expand_missing_study{}.csv",
        EXPAND,
        "poisson",
        "cens ~ female + age_60 + bmi_26 + pm10_16",
    ),
] + [
    (f"vantage6 {fam}", "vantage6-glm", f"{fam}_{{}}.csv", V6[fam][0], fam, V6[fam][1])
    for fam in ("binomial", "gaussian", "poisson")
]


def run_case(root: Path, work: Path, name, folder, pattern, schema, family, formula):
    sites = [root / folder / pattern.format(s) for s in ("1", "2", "3")]
    if not sites[0].exists():
        sites = [root / folder / pattern.format(s) for s in ("a", "b", "c")]
    (work / "schema.toml").write_text(tomli_w.dumps({"columns": schema}))
    # vantage6's sites are tiny (20-70 rows): their Trusts would set a lower minimum.
    small = max(len(pd.read_csv(p)) for p in sites) < 100
    rules = "min_rows = 15\nmin_events = 5\nmin_level_count = 2\nmin_subset_difference = 3\n"
    policy = f'mode = "exploratory"\n[rules]\n{rules}[exploratory]\n{rules}'
    if small:
        (work / "policy.toml").write_text(policy)
    (work / "network.toml").write_text(
        "\n".join(
            f'[[node]]\nname = "site{i}"\ndata = "{p}"\nschema = "schema.toml"\n'
            + ('policy = "policy.toml"\n' if small else "")
            for i, p in enumerate(sites)
        )
    )
    (work / "study.toml").write_text(tomli_w.dumps({"name": "acceptance", "family": family, "formula": formula}))
    result = run_inprocess([work / "study.toml"], work / "network.toml")[0]

    frames = []
    for p in sites:
        frame = pd.read_csv(p, dtype=str, keep_default_na=False, na_values=[""])
        frame.columns = [c.strip() for c in frame.columns]
        frames.append(frame)
    pooled = pd.concat(frames, ignore_index=True)
    renames = {spec["source"]: col for col, spec in schema.items() if "source" in spec}
    pooled = pooled.rename(columns=renames)
    for col, spec in schema.items():
        if spec["type"] == "categorical":
            pooled[col] = pd.Categorical(pooled[col].str.strip(), categories=spec["levels"])
        else:
            pooled[col] = pd.to_numeric(pooled[col])
    ref = smf.glm(formula, pooled, family=FAMILY[family]()).fit(tol=1e-13, tol_criterion="params", maxiter=200)
    assert [t["term"] for t in result["terms"]] == list(ref.params.index), name
    est = np.array([t["estimate"] for t in result["terms"]])
    se = np.array([t["std_error"] for t in result["terms"]])
    return {
        "case": name,
        "n": result["n"],
        "n_ref": int(ref.nobs),
        "coef": float(np.max(np.abs(est / ref.params.to_numpy() - 1))),
        "se": float(np.max(np.abs(se / ref.bse.to_numpy() - 1))),
        "deviance": abs(result["deviance"] / ref.deviance - 1),
    }


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_other_projects_studies_equal_the_pooled_rows(tmp_path, case):
    row = run_case(DATA, tmp_path, *case)
    assert row["n"] == row["n_ref"]
    assert row["coef"] < 1e-8 and row["se"] < 1e-8 and row["deviance"] < 1e-8, row

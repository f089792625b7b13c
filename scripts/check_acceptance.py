"""Check iaptnet against other projects' test data (../shared/acceptance by default).

For each DataSHIELD and vantage6 test study: serve each site's CSV as a node (with a schema
written here), run the pooled GLM in-process, and compare with statsmodels' GLM on the
sites' rows concatenated. Prints the largest relative differences; exits 1 above 1e-8.

    .venv/bin/python scripts/check_acceptance.py [--data ../shared/acceptance]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import statsmodels.api as sm
import statsmodels.formula
import statsmodels.formula.api as smf
import tomli_w

from iaptnet.coordinator.inprocess import run_inprocess

statsmodels.formula.options.formula_engine = "formulaic"
FAMILY = {"binomial": sm.families.Binomial, "gaussian": sm.families.Gaussian, "poisson": sm.families.Poisson}

CNSIM = {
    "LAB_TSC": {"type": "numeric"}, "LAB_TRIG": {"type": "numeric"}, "LAB_HDL": {"type": "numeric"},
    "LAB_GLUC_ADJUSTED": {"type": "numeric"}, "PM_BMI_CONTINUOUS": {"type": "numeric"},
    "DIS_CVA": {"type": "binary"}, "MEDI_LPD": {"type": "binary"}, "DIS_DIAB": {"type": "binary"},
    "DIS_AMI": {"type": "binary"}, "GENDER": {"type": "binary"},
    "PM_BMI_CATEGORICAL": {"type": "categorical", "levels": ["1", "2", "3"]},
}
EXPAND = {
    "survtime": {"type": "numeric"}, "cens": {"type": "integer", "min": 0},
    "age_60": {"type": "numeric", "source": "age.60"}, "female": {"type": "binary"},
    "noise_56": {"type": "numeric", "source": "noise.56"}, "pm10_16": {"type": "numeric", "source": "pm10.16"},
    "bmi_26": {"type": "numeric", "source": "bmi.26"},
}
V6 = {
    "binomial": ({"admit": {"type": "binary"}, "gre": {"type": "numeric"}, "gpa": {"type": "numeric"},
                  "rank": {"type": "categorical", "levels": ["1", "2", "3", "4"]}},
                 "admit ~ gre + gpa + rank"),
    "gaussian": ({"Girth": {"type": "numeric"}, "Height": {"type": "numeric"}, "Volume": {"type": "numeric"}},
                 "Volume ~ Girth + Height"),
    "poisson": ({"num_awards": {"type": "integer", "min": 0},
                 "prog": {"type": "categorical", "levels": ["General", "Academic", "Vocational"]},
                 "math": {"type": "numeric"}},
                "num_awards ~ prog + math"),
}

CASES = [
    ("datashield CNSIM binomial", "datashield", "CNSIM{}.csv", CNSIM, "binomial",
     "DIS_DIAB ~ GENDER * PM_BMI_CONTINUOUS + LAB_HDL"),
    ("datashield CNSIM gaussian", "datashield", "CNSIM{}.csv", CNSIM, "gaussian",
     "LAB_TSC ~ LAB_TRIG + LAB_HDL + PM_BMI_CATEGORICAL + GENDER"),
    ("datashield EXPAND_MISSING poisson", "datashield", "expand_missing_study{}.csv", EXPAND, "poisson",
     "cens ~ female + age_60 + bmi_26 + pm10_16"),
] + [(f"vantage6 {fam}", "vantage6-glm", f"{fam}_{{}}.csv", V6[fam][0], fam, V6[fam][1])
     for fam in ("binomial", "gaussian", "poisson")]


def run_case(root: Path, work: Path, name, folder, pattern, schema, family, formula):
    sites = [root / folder / pattern.format(s) for s in ("1", "2", "3")]
    if not sites[0].exists():
        sites = [root / folder / pattern.format(s) for s in ("a", "b", "c")]
    (work / "schema.toml").write_text(tomli_w.dumps({"columns": schema}))
    (work / "network.toml").write_text("\n".join(
        f'[[node]]\nname = "site{i}"\ndata = "{p}"\nschema = "schema.toml"\n' for i, p in enumerate(sites)))
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
    ref = smf.glm(formula, pooled, family=FAMILY[family]()).fit(tol=1e-13, maxiter=200)
    assert [t["term"] for t in result["terms"]] == list(ref.params.index), name
    est = np.array([t["estimate"] for t in result["terms"]])
    se = np.array([t["std_error"] for t in result["terms"]])
    return {
        "case": name, "n": result["n"], "n_ref": int(ref.nobs),
        "coef": float(np.max(np.abs(est / ref.params.to_numpy() - 1))),
        "se": float(np.max(np.abs(se / ref.bse.to_numpy() - 1))),
        "deviance": abs(result["deviance"] / ref.deviance - 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "acceptance"))
    args = parser.parse_args()
    root = Path(args.data)
    if not root.exists():
        print(f"error: {root} not found; pass --data", file=sys.stderr)
        return 2
    worst = 0.0
    print(f"{'case':<36} {'n':>6} {'coef rel':>10} {'SE rel':>10} {'dev rel':>10}")
    for case in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            row = run_case(root, Path(tmp), *case)
        worst = max(worst, row["coef"], row["se"], row["deviance"])
        flag = "" if row["n"] == row["n_ref"] else f"  n differs: statsmodels {row['n_ref']}"
        print(f"{row['case']:<36} {row['n']:>6} {row['coef']:>10.1e} {row['se']:>10.1e} {row['deviance']:>10.1e}{flag}")
    print(f"largest relative difference: {worst:.1e}")
    return 0 if worst < 1e-8 else 1


if __name__ == "__main__":
    sys.exit(main())

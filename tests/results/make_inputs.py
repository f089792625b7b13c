"""Write the small input tables that the R scripts beside this file read (make references).

Each `<name>_input.csv` holds the pooled rows of a few sites, with a `site` column; a site's
rows keep their order (node row i is the site's i-th row). Fixed seeds, and numbers rounded to
6 decimals so that R and Python read exactly the same doubles. Run once; the CSVs are
committed and the tests read them, so R and numpy versions never move the inputs.

- meta: 5 services with different slopes of x (so tau^2 > 0); s3 has no rows of level c.
- psm: 4 services; continuous x2, so no two logits tie and the greedy pairs are unambiguous
  (make_psm.R checks that by perturbing the logits and the caliper). Matching within a caliper
  of 0.2 SD of the logit leaves 1 exposed row unmatched in s0 and 2 in s3 (so iaptnet's rule
  that a service leaves 0 or at least 8 unmatched unmatches 7 and 6 more pairs there), none in
  s2, and 14 in s1, three of them exposed rows whose logits lie beyond every control's.
- iptw: 3 services, exposure depending on a categorical and two continuous covariates.
- glm: 4 services of 12 clinics each (clusters within services), prior weights.
- nb: public data, the RAND Health Insurance Experiment's outpatient visits (Deb and Trivedi's
  extract, as statsmodels ships it: statsmodels.datasets.randhie, read from the installed
  package, nothing downloaded): 3,000 of its 20,190 person-years drawn without replacement
  (in their order), split over 5 services of unequal size; the sparse hlthp left out.
- cr2: the same public data, 4,000 other person-years (another seed) over 5 services of unequal
  size (600 to 1,150), with `service` (1..5, the node's own: clusters = nodes) and `arm`, the
  insurance arm within the service (10 x service + 0 for free care, 1 for any coinsurance: 10
  clusters within nodes, each of at least 200 person-years); outcomes any visit (anyvis),
  visits (mdvis) and the chronic disease index (disea); `wt` = 1 / (1 + physlm), prior weights
  for one gaussian model. (clubSandwich forms each cluster's n x n matrices with R's reference
  BLAS: a node of 2,300 rows takes minutes per model.)
- marginal: the same public data, 3,000 other person-years (another seed) over 4 services of
  unequal size, with any visit (anyvis) beside the visits; the exposure is the individual
  deductible plan (idp, binary).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent


def expit(eta):
    return 1.0 / (1.0 + np.exp(-eta))


def meta_input() -> pd.DataFrame:
    rng = np.random.default_rng(20240611)
    slopes = {"s1": 0.40, "s2": 0.75, "s3": 0.20, "s4": 0.90, "s5": 0.55}
    sizes = {"s1": 500, "s2": 650, "s3": 450, "s4": 600, "s5": 550}
    frames = []
    for k, (site, n) in enumerate(sizes.items()):
        levels = ["a", "b"] if site == "s3" else ["a", "b", "c"]
        g = rng.choice(levels, size=n)
        x = np.round(rng.normal(0.3, 1.0, size=n), 6)
        z = np.round(rng.normal(size=n), 6)
        eff = pd.Series(g).map({"a": 0.0, "b": 0.5, "c": -0.4}).to_numpy()
        eta = -0.3 + slopes[site] * x + 0.4 * z + eff + 0.1 * k
        y = (rng.random(n) < expit(eta)).astype(int)
        frames.append(pd.DataFrame({"site": site, "y": y, "x": x, "z": z, "g": g}))
    return pd.concat(frames, ignore_index=True)


def _propensity_site(rng, n: int, k: int) -> pd.DataFrame:
    g = rng.choice(["a", "b", "c"], size=n, p=[0.5, 0.3, 0.2])
    h = (rng.random(n) < 0.4).astype(int)
    x1 = np.round(rng.normal(0.2 * k, 1.0, size=n), 6)
    x2 = np.round(rng.normal(0.0, 1.0, size=n), 6)
    gcode = pd.Series(g).map({"a": 0.0, "b": 0.3, "c": 0.6}).to_numpy()
    t = (rng.random(n) < expit(-1.3 + gcode + 0.3 * h + 0.2 * x1 + 0.35 * x2)).astype(int)
    eta = -0.4 + 0.6 * t + 0.2 * x1 + 0.5 * x2 - 0.3 * h + 0.3 * (g == "b")
    y = (rng.random(n) < expit(eta)).astype(int)
    return pd.DataFrame({"y": y, "t": t, "x1": x1, "x2": x2, "g": g, "h": h})


def psm_input() -> pd.DataFrame:
    rng = np.random.default_rng(20240612)
    frames = []
    for k, n in enumerate((620, 560, 600, 540)):
        frame = _propensity_site(rng, n, k)
        if k == 1:  # three exposed far beyond every control (x2 about 6 SD up)
            extra = _propensity_site(rng, 3, k).assign(t=1, x2=np.round(rng.normal(6.0, 0.3, size=3), 6))
            frame = pd.concat([frame.iloc[:200], extra, frame.iloc[200:]], ignore_index=True)
        frames.append(frame.assign(site=f"s{k}"))
    return pd.concat(frames, ignore_index=True)[["site", "y", "t", "x1", "x2", "g", "h"]]


def iptw_input() -> pd.DataFrame:
    rng = np.random.default_rng(20240613)
    frames = [_propensity_site(rng, n, k).assign(site=f"s{k}") for k, n in enumerate((700, 650, 750))]
    return pd.concat(frames, ignore_index=True)[["site", "y", "t", "x1", "x2", "g", "h"]]


def glm_input() -> pd.DataFrame:
    rng = np.random.default_rng(20240614)
    frames = []
    for k, n in enumerate((600, 520, 680, 560)):
        clinic = 100 * (k + 1) + rng.integers(0, 12, size=n)
        # Outcomes correlate within a clinic.
        clinic_effect = rng.normal(0.0, 0.5, size=12)[clinic % 100]
        g = rng.choice(["a", "b", "c"], size=n, p=[0.4, 0.35, 0.25])
        h = (rng.random(n) < 0.45).astype(int)
        x = np.round(rng.normal(0.5 + 0.1 * k, 1.0, size=n), 6)
        eff = pd.Series(g).map({"a": 0.0, "b": 0.4, "c": -0.5}).to_numpy()
        y = (rng.random(n) < expit(-0.2 + 0.7 * x + eff + 0.3 * h + clinic_effect)).astype(int)
        w = np.round(3.0 + 1.5 * x + eff - 0.4 * h + 2.0 * clinic_effect + rng.normal(scale=1.3, size=n), 6)
        wt = np.round(rng.gamma(2.0, 0.5, size=n), 6)
        frames.append(
            pd.DataFrame(
                {
                    "site": f"s{k}",
                    "clinic": clinic,
                    "y": y,
                    "w": w,
                    "x": x,
                    "g": g,
                    "h": h,
                    "wt": wt,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def nb_input() -> pd.DataFrame:
    from statsmodels.datasets import randhie

    data = randhie.load_pandas().data
    rng = np.random.default_rng(20240615)
    rows = data.iloc[np.sort(rng.choice(len(data), size=3000, replace=False))].reset_index(drop=True)
    rows = rows[["mdvis", "lncoins", "idp", "lpi", "fmde", "physlm", "disea", "hlthg", "hlthf"]]
    rows = rows.astype({"mdvis": int, "idp": int, "physlm": float, "hlthg": int, "hlthf": int}).round(6)
    sizes = (420, 610, 880, 390, 700)
    site = np.repeat([f"s{k}" for k in range(len(sizes))], sizes)
    return pd.concat([pd.DataFrame({"site": site}), rows], axis=1)


def cr2_input() -> pd.DataFrame:
    from statsmodels.datasets import randhie

    data = randhie.load_pandas().data
    rng = np.random.default_rng(20240616)
    rows = data.iloc[np.sort(rng.choice(len(data), size=4000, replace=False))].reset_index(drop=True)
    rows = rows[["mdvis", "lncoins", "idp", "lpi", "fmde", "physlm", "disea", "hlthg", "hlthf"]]
    rows = rows.astype({"mdvis": int, "idp": int, "physlm": float, "hlthg": int, "hlthf": int}).round(6)
    sizes = (600, 900, 700, 1150, 650)
    service = np.repeat(np.arange(1, len(sizes) + 1), sizes)
    arm = (rows["lncoins"] > 0).astype(int).to_numpy()
    front = pd.DataFrame({"site": [f"s{k - 1}" for k in service], "service": service, "arm": 10 * service + arm})
    rows = rows.assign(anyvis=(rows["mdvis"] > 0).astype(int), wt=np.round(1.0 / (1.0 + rows["physlm"]), 6))
    return pd.concat([front, rows], axis=1)


def marginal_input() -> pd.DataFrame:
    from statsmodels.datasets import randhie

    data = randhie.load_pandas().data
    rng = np.random.default_rng(20240617)
    rows = data.iloc[np.sort(rng.choice(len(data), size=3000, replace=False))].reset_index(drop=True)
    rows = rows[["mdvis", "lncoins", "idp", "lpi", "fmde", "physlm", "disea", "hlthg", "hlthf"]]
    rows = rows.astype({"mdvis": int, "idp": int, "physlm": float, "hlthg": int, "hlthf": int}).round(6)
    rows = rows.assign(anyvis=(rows["mdvis"] > 0).astype(int))
    sizes = (650, 900, 580, 870)
    site = np.repeat([f"s{k}" for k in range(len(sizes))], sizes)
    return pd.concat([pd.DataFrame({"site": site}), rows], axis=1)


INPUTS = {
    "meta": meta_input,
    "psm": psm_input,
    "iptw": iptw_input,
    "glm": glm_input,
    "nb": nb_input,
    "cr2": cr2_input,
    "marginal": marginal_input,
}


def main(names: list[str] | None = None) -> None:
    for name, make in INPUTS.items():
        if names and name not in names:
            continue
        frame = make()
        frame.to_csv(HERE / f"{name}_input.csv", index=False, float_format="%.6f")
        print(f"{name}_input.csv: {len(frame)} rows, {frame['site'].nunique()} sites")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])

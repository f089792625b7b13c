"""Helpers for GLM tests: write a small network of CSV sites with a custom schema, run a
study in-process, and fit the independent reference (statsmodels on the pooled rows)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import statsmodels.api as sm
import statsmodels.formula
import statsmodels.formula.api as smf
import tomli_w
from numpy import exp, log, sqrt  # noqa: F401 - the formulas of the reference fits use them

from iaptnet.coordinator.inprocess import run_inprocess

# The reference builds its design with formulaic, the formula library iaptnet uses, so that
# centring/scaling conventions agree (patsy's scale() divides by n, formulaic's by n - 1).
statsmodels.formula.options.formula_engine = "formulaic"

FAMILIES = {
    "binomial": sm.families.Binomial,
    "gaussian": sm.families.Gaussian,
    "poisson": sm.families.Poisson,
}


def write_schema(path: Path, columns: dict[str, dict]) -> Path:
    lines = []
    for name, spec in columns.items():
        lines.append(f"[columns.{name}]")
        for key, value in spec.items():
            if isinstance(value, str):
                lines.append(f'{key} = "{value}"')
            elif isinstance(value, list):
                lines.append(f"{key} = [" + ", ".join(f'"{v}"' for v in value) + "]")
            else:
                lines.append(f"{key} = {value}")
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def write_network(
    folder: Path, sites: dict[str, pd.DataFrame], columns: dict[str, dict], policies: dict[str, str] | None = None
) -> Path:
    """One CSV per site, the schema, and network.toml; `policies` gives some nodes a policy
    file (its TOML text)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_schema(folder / "schema.toml", columns)
    entries = []
    for name, frame in sites.items():
        frame.to_csv(folder / f"{name}.csv", index=False)
        entry = f'[[node]]\nname = "{name}"\ndata = "{name}.csv"\nschema = "schema.toml"\n'
        if policies and name in policies:
            (folder / f"{name}_policy.toml").write_text(policies[name])
            entry += f'policy = "{name}_policy.toml"\n'
        entries.append(entry)
    (folder / "network.toml").write_text("\n".join(entries))
    return folder / "network.toml"


def write_study(path: Path, **fields) -> Path:
    path.write_text(tomli_w.dumps(fields))
    return path


def run_study(folder: Path, **fields) -> dict:
    study = write_study(folder / f"{fields['name']}.toml", **fields)
    return run_inprocess([study], folder / "network.toml")[0]


def pooled(sites: dict[str, pd.DataFrame], columns: dict[str, dict]) -> pd.DataFrame:
    """Concatenate the sites' rows with the schema's categorical levels, as a reader would."""
    frame = pd.concat(list(sites.values()), ignore_index=True)
    for name, spec in columns.items():
        if spec["type"] == "categorical":
            frame[name] = pd.Categorical(frame[name].astype("string"), categories=spec["levels"])
    return frame


def reference_fit(frame: pd.DataFrame, formula: str, family: str, needed: list[str], offset: str | None = None):
    """statsmodels GLM on the pooled complete cases of `needed`, converged tightly."""
    kwargs = {}
    frame = frame.dropna(subset=needed + ([offset] if offset else []))
    if offset:
        kwargs["offset"] = frame[offset]
    model = smf.glm(formula, frame, family=FAMILIES[family](), **kwargs)
    return model.fit(tol=1e-13, tol_criterion="params", maxiter=200)


def assert_matches(result: dict, ref, rtol: float = 1e-8) -> None:
    names = [t["term"] for t in result["terms"]]
    assert names == list(ref.params.index)
    est = np.array([t["estimate"] for t in result["terms"]])
    se = np.array([t["std_error"] for t in result["terms"]])
    np.testing.assert_allclose(est, ref.params.to_numpy(), rtol=rtol, atol=0)
    np.testing.assert_allclose(se, ref.bse.to_numpy(), rtol=rtol, atol=0)
    assert result["n"] == int(ref.nobs)
    np.testing.assert_allclose(result["deviance"], ref.deviance, rtol=rtol)
    np.testing.assert_allclose(result["null_deviance"], ref.null_deviance, rtol=rtol)
    np.testing.assert_allclose(result["llf"], ref.llf, rtol=rtol)
    np.testing.assert_allclose(result["aic"], ref.aic, rtol=rtol)
    ci = ref.conf_int()
    np.testing.assert_allclose([t["conf_low"] for t in result["terms"]], ci[0].to_numpy(), rtol=1e-7)
    np.testing.assert_allclose([t["p_value"] for t in result["terms"]], ref.pvalues.to_numpy(), rtol=1e-6, atol=1e-300)

"""Results of a study: the `results.json` contract and the human-readable report.

Term names follow the statsmodels/formulaic conventions (`C(x)[T.level]`, `a:b`), so a
result can be compared term by term with a statsmodels fit on pooled rows.
"""

from __future__ import annotations

import math
import time

import numpy as np
from scipy import special

from .. import __version__
from ..protocol.study import marginal_label, value_text
from ..report.words import p_value, service_name, services_of, term_label
from .glm import ModelFit
from .outputs import check_out_folder, results_paths, safe_filename, write_json_atomic  # noqa: F401 (re-exported)

# The normal quantile and tail from scipy.special (what scipy.stats.norm computes them with):
# scipy.stats would add most of a second to the start of every ServerApp process.
Z975 = float(special.ndtri(0.975))


def term_rows(fit: ModelFit) -> list[dict]:
    """The term rows of docs/reference/design.md#results-contract. With robust or cluster-robust standard errors, each row also
    gives the model-based one (`std_error_model`), which docs/reference/domain.md#model-defaults reports beside a
    sandwich from few clusters. `df` is null where the p-value and limits use the normal
    distribution, and with CR2 standard errors the Satterthwaite degrees of freedom of the
    t distribution they use (as clubSandwich's coef_test and conf_int)."""
    se = np.sqrt(np.diag(fit.covariance))
    robust = fit.spec.cov_type != "nonrobust"
    se_model = np.sqrt(np.diag(fit.cov * fit.scale)) if robust else se
    est = fit.beta[fit.active]
    dfs = getattr(fit, "df", None)
    rows = []
    for i, (name, b, s, s_model) in enumerate(zip(fit.active_names, est, se, se_model)):
        z = b / s
        df = None if dfs is None else float(dfs[i])
        if df is None:
            p, crit = float(2.0 * special.ndtr(-abs(z))), Z975
        else:
            p, crit = float(2.0 * special.stdtr(df, -abs(z))), float(special.stdtrit(df, 0.975))
        row = {
            "term": name,
            "estimate": float(b),
            "std_error": float(s),
            "statistic": float(z),
            "df": df,
            "p_value": p,
            "conf_low": float(b - crit * s),
            "conf_high": float(b + crit * s),
        }
        if robust:
            row["std_error_model"] = float(s_model)
        if fit.family.ratio_name:
            row["ratio"] = math.exp(row["estimate"])
            row["ratio_low"] = math.exp(row["conf_low"])
            row["ratio_high"] = math.exp(row["conf_high"])
        rows.append(row)
    return rows


def build_results(fit: ModelFit, *, study_hash: str, engine: str, node_status: list[dict], rounds: int) -> dict:
    spec = fit.spec
    terms = term_rows(fit)
    exposure = next((t for t in terms if t["term"] == spec.exposure), None)
    llf = fit.llf
    # Estimated parameters: the coefficients, and a negative binomial model's theta (glm.nb's
    # AIC counts it).
    k = fit.rank + (fit.log_theta is not None)
    return {
        "study": spec.name,
        "title": spec.title,
        "study_hash": study_hash,
        "kind": spec.kind,
        "family": fit.family.name,
        "link": fit.family.link_name,
        "ratio_name": fit.family.ratio_name,
        "formula": spec.formula,
        "where": spec.where,
        "offset": spec.offset,
        "exposure": spec.exposure,
        "exposure_term": exposure,
        "n": fit.n,
        "n_missing": fit.n_missing,
        "n_cohort": fit.n_cohort,
        "events": fit.events,
        "converged": fit.converged,
        "iterations": fit.iterations,
        "rounds": rounds,
        "deviance": fit.deviance,
        "null_deviance": fit.null.deviance,
        "pearson_chi2": fit.pearson,
        "scale": fit.scale,
        "cov_type": fit.spec.cov_type,
        "n_clusters": fit.n_clusters if fit.spec.cov_type in ("cluster", "CR2") else None,
        "cluster": fit.spec.cluster,
        "weights": fit.spec.weights,
        "df_model": fit.rank - 1,
        "df_resid": fit.n - fit.rank,
        "llf": llf,
        "aic": -2.0 * llf + 2.0 * k,
        **dispersion_fields(fit),
        **({"marginal": marginal_rows(fit)} if fit.marginal_sums else {}),
        "dropped_terms": fit.dropped,
        "nodes": node_status,
        "terms": terms,
        **provenance(spec, engine),
    }


def marginal_rows(fit: ModelFit) -> list[dict]:
    """Standardised (g-computation) risks of each `marginal` entry: the mean fitted value
    over the model's rows (prior-weighted) with the exposure set to 1 and to 0 for everyone
    (a contrast: to its first and second value; its interactions too), their difference and
    ratio; delta-method SEs with the covariance the terms report (robust when cov_type is),
    normal 95% intervals, the ratio's on the log scale. The cohort's covariates are held fixed
    (no sampling variance of their mix). A contrast's row also names its `exposure` column and
    the two values it `compare`s ("risk_exposed" is the risk at the first)."""
    a = fit.active
    p = len(fit.names)
    cov = fit.covariance
    contrasts = {marginal_label(e): e for e in fit.spec.marginal if not isinstance(e, str)}
    rows = []
    for term, sums in fit.marginal_sums.items():
        n = float(sums[2])
        r1, r0 = float(sums[0]) / n, float(sums[1]) / n
        g1, g0 = sums[3 : 3 + p][a] / n, sums[3 + p : 3 + 2 * p][a] / n
        rd = r1 - r0
        grad = g1 - g0
        se = math.sqrt(float(grad @ cov @ grad))
        row = {
            "term": term,
            "risk_exposed": r1,
            "risk_unexposed": r0,
            "risk_difference": rd,
            "rd_std_error": se,
            "rd_low": rd - Z975 * se,
            "rd_high": rd + Z975 * se,
            "risk_ratio": None,
            "rr_low": None,
            "rr_high": None,
        }
        if term in contrasts:
            row["exposure"], row["compare"] = contrasts[term]["exposure"], list(contrasts[term]["compare"])
        if r1 > 0 and r0 > 0:
            log_grad = g1 / r1 - g0 / r0
            se_log = math.sqrt(float(log_grad @ cov @ log_grad))
            rr = r1 / r0
            row.update(risk_ratio=rr, rr_low=rr * math.exp(-Z975 * se_log), rr_high=rr * math.exp(Z975 * se_log))
        rows.append(row)
    return rows


def dispersion_fields(fit: ModelFit) -> dict:
    """A negative binomial model's theta and alpha = 1 / theta with their standard errors
    (theta's as MASS::theta.ml gives it; alpha's by the delta method, SE(theta) / theta^2);
    nothing for the other families."""
    if fit.log_theta is None:
        return {}
    theta, se = fit.theta, fit.theta_std_error
    return {"theta": theta, "theta_std_error": se, "alpha": 1.0 / theta, "alpha_std_error": se / theta**2}


def provenance(spec, engine: str) -> dict:
    """The fields every results.json ends with: software versions, engine, the study's
    reference values and the time."""
    from importlib.metadata import version

    return {
        "software": {"iaptnet": __version__, "flwr": version("flwr")},
        "engine": engine,
        "reference": spec.reference or None,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def node_lines(result: dict) -> list[str]:
    """The report's lines on which nodes contributed, and why any did not (services by the
    names the report gives them: `camden_islington` -> `Camden Islington`)."""
    contributed = [service_name(n["name"]) for n in result["nodes"] if n["contributed"]]
    lines = [f"  nodes: {len(contributed)} contributed ({', '.join(contributed)})"]
    lines += [
        f"  node {service_name(n['name'])} did not contribute: {n['reason']}"
        for n in result["nodes"]
        if not n["contributed"]
    ]
    return lines


def term_text(term: str, result: dict) -> str:
    """A term in the words the report uses (report/words.py `term_label`): a level by its
    schema label (`employment[T.02]` -> `employment: unemployed, seeking work (02)`), a
    service's term by its node (`service_id[T.ZN2]` -> `service id: Barnet (ZN2)`)."""
    with services_of(result):
        return term_label(term)


def term_lines(result: dict) -> list[str]:
    """The terms as a table (estimate, standard error, statistic, p, ratio with its CI), then
    the terms the fit left out."""
    ratio = result.get("ratio_name")
    names = [term_text(t["term"], result) for t in result["terms"]]
    width = max([34, *map(len, names)])
    head = f"  {'term':<{width}} {'estimate':>10} {'std err':>9} {'z':>8} {'p':>9}"
    if ratio:
        head += f"   {ratio + ' (95% CI)':>26}"
    lines = [head]
    for t, name in zip(result["terms"], names):
        row = f"  {name:<{width}} {t['estimate']:>10.4f} {t['std_error']:>9.4f} {t['statistic']:>8.2f} {p_value(t['p_value']):>9}"
        if ratio:
            row += f"   {t['ratio']:>8.3f} ({t['ratio_low']:.3f}-{t['ratio_high']:.3f})"
        if t["term"] == result.get("exposure"):
            row += "  <- exposure"
        lines.append(row)
    for d in result.get("dropped_terms", []):
        lines.append(f"  dropped {term_text(d['term'], result)}: {d['reason']}")
    return lines


def sensitivity_lines(result: dict) -> list[str]:
    """The study's sensitivity analyses (protocol/sensitivity.py), one line each."""
    ratio = result.get("ratio_name") or "ratio"
    lines = []
    for e in result.get("sensitivity") or []:
        t = e.get("term") or {}
        if e["analysis"] == "marginal" or "ratio" not in t:
            continue
        if e["analysis"] == "cr2":
            how = f"CR2 by {e['cluster']} ({e['n_clusters']} clusters, df {t['df']:.1f})"
        else:
            group = e["variance_components"][0]
            how = f"random intercept for {group['group']} (std dev {group['std_dev']:.3g})"
        lines.append(
            f"  sensitivity, {how}: {ratio} {t['ratio']:.3f} ({t['ratio_low']:.3f}-{t['ratio_high']:.3f}), "
            f"p {p_value(t['p_value'])}; {e['formula']}"
        )
    return lines


def render_report(result: dict) -> str:
    """A statsmodels-like summary table for the terminal (other kinds: their module's render)."""
    if result.get("kind", "glm") != "glm":
        from .kinds import module_for

        return module_for(result["kind"]).render(result)
    if result.get("random_intercept"):
        from .glmm import render

        return render(result)
    lines = []
    title = result.get("title") or result["study"]
    lines.append(f"{title}  [{result['family']}/{result['link']}]  study {result['study_hash'][:12]}")
    lines.append(
        f"  n = {result['n']:,} used ({result['n_missing']:,} dropped for missing values, cohort {result['n_cohort']:,}); "
        f"deviance {result['deviance']:.4f}, null {result['null_deviance']:.4f}, AIC {result['aic']:.2f}; "
        f"{result['iterations']} Newton rounds"
    )
    if result.get("theta") is not None:
        lines.append(
            f"  theta {result['theta']:.4f} (std err {result['theta_std_error']:.4f}); "
            f"alpha = 1/theta {result['alpha']:.4f} (std err {result['alpha_std_error']:.4f})"
        )
    lines.extend(node_lines(result))
    if result.get("cov_type") == "CR2":
        dfs = ", ".join(f"{term_text(t['term'], result)} {t['df']:.1f}" for t in result["terms"])
        lines.append(
            f"  CR2 standard errors clustered on {result.get('cluster')} ({result.get('n_clusters')} clusters); "
            f"z below is t, its p and CI on Satterthwaite df: {dfs}"
        )
    lines.extend(term_lines(result))
    for e in result.get("marginal") or []:
        first, second = (value_text(v) for v in e.get("compare") or (1, 0))
        line = (
            f"  standardised {term_text(e.get('exposure') or e['term'], result)}: {e['risk_exposed']:.4f} set to {first} "
            f"vs {e['risk_unexposed']:.4f} set to {second}; "
            f"difference {e['risk_difference']:.4f} ({e['rd_low']:.4f} to {e['rd_high']:.4f})"
        )
        if e["risk_ratio"] is not None:
            line += f", ratio {e['risk_ratio']:.3f} ({e['rr_low']:.3f}-{e['rr_high']:.3f})"
        lines.append(line)
    lines.extend(sensitivity_lines(result))
    return "\n".join(lines)

"""The coordinator half of a meta study (`kind = "meta"`): heterogeneity between nodes.

1. `meta.local_fit`: each node fits the model on its own rows and releases the exposure's
   estimate and standard error, if its policy allows (node/meta.py). This step continues
   whatever the nodes answer: a node that refuses, fails, has no rows or cannot estimate the
   exposure alone is reported with its reason and left out of the meta-analysis.
2. The exposure's node estimates are pooled by fixed-effect and random-effects
   (DerSimonian-Laird, REML) meta-analysis (coordinator/meta_analysis.py), the REML interval
   Wald or HKSJ as the study's `ci` says, with the Q-profile CI for tau^2. Both use only the
   estimates and standard errors of step 1: nothing more is asked of the nodes.
3. The one-stage models, exact federated GLMs fitted in shared rounds: the formula without
   the service term, and with service fixed effects. These follow the study's `min_nodes`
   like any GLM study. A node that leaves the study there (lost, or refusing) leaves the
   meta-analysis too, with its reason: the study is then the one a network without that node
   gives, as for every kind.
"""

from __future__ import annotations

from ..protocol.errors import ModelError
from ..protocol.families import get_family
from ..protocol.kinds import meta as protocol
from ..report.words import p_phrase, service_name
from .derived_models import carry_lost, fit_derived, footer, header, model_result, with_ratio
from .meta_analysis import Z975, meta_analyse, tau2_qprofile
from .results import term_text
from .session import Session

METHODS = (
    ("fixed", "fixed effect"),
    ("random_dl", "random effects, DerSimonian-Laird"),
    ("random_reml", "random effects, REML"),
)


def run_study(
    grid, study, *, engine: str, progress=None, timeout: float | None = 300.0, poll_interval: float = 0.0
) -> dict:
    spec = study.spec
    ratio = get_family(spec.family).ratio_name is not None
    local = Session(grid, spec.hash, min_nodes=0, timeout=timeout, poll_interval=poll_interval, progress=progress)
    replies = local.ask(protocol.TASK, {"models": {"meta": spec.to_wire()}})
    one, fe = protocol.model_specs(spec)
    session, fits = fit_derived(
        grid,
        {"m0": one, "m1": fe},
        min_nodes=spec.min_nodes,
        earlier=None,
        progress=progress,
        timeout=timeout,
        poll_interval=poll_interval,
    )
    carry_lost(session, local)
    per_node = _per_node(local, replies, ratio)
    usable = [e for e in per_node if e["estimate"] is not None]
    ci = spec.params.get("ci", protocol.DEFAULT_CI)
    effects, variances = [e["estimate"] for e in usable], [e["std_error"] ** 2 for e in usable]
    pooled = meta_analyse(effects, variances, ci=ci) if len(usable) >= 2 else {key: None for key, _ in METHODS}
    tau2_ci = tau2_qprofile(effects, variances, pooled["random_reml"]["tau2"]) if len(usable) >= 2 else None
    for key, _ in METHODS:
        if pooled[key] is None:
            continue
        with_ratio(pooled[key], ratio)
        if pooled[key].get("prediction_low") is not None:
            with_ratio(
                pooled[key],
                ratio,
                (("prediction_low", "prediction_ratio_low"), ("prediction_high", "prediction_ratio_high")),
            )
        weights = pooled[key].pop("weights", None)
        if weights is None:
            inv = [1.0 / e["std_error"] ** 2 for e in usable]
            weights = [w / sum(inv) for w in inv]
        for entry, w in zip(usable, weights):
            entry.setdefault("weights", {})[key] = w
    one_stage = model_result(fits["m0"], session, engine)
    service_fe = model_result(fits["m1"], session, engine)
    for model in (one_stage, service_fe):
        if model["exposure_term"] is None:
            raise ModelError(
                f"model '{model['study']}': the exposure '{spec.exposure}' is not among its estimated terms."
            )
    result = header(spec)
    result.update(
        {
            "formula": spec.formula,
            "offset": spec.offset,
            "weights": spec.weights,
            "cov_type": spec.cov_type,
            "exposure": spec.exposure,
            "service": spec.params["service"],
            "ci": ci,
            "exposure_term": service_fe["exposure_term"],
            "k": len(usable),
            "per_node": per_node,
            "fixed": pooled["fixed"],
            "random_dl": pooled["random_dl"],
            "random_reml": pooled["random_reml"],
            "tau2_ci": tau2_ci,
            "one_stage": one_stage,
            "one_stage_service_fe": service_fe,
            "n": service_fe["n"],
            "nodes": service_fe["nodes"],
        }
    )
    if len(usable) < 2:
        result["note"] = "fewer than two nodes released their own estimate, so there is no meta-analysis"
    result.update(footer(spec, engine, local.round + session.round))
    return result


def _per_node(session: Session, replies, ratio: bool) -> list[dict]:
    """One entry per node of the network, in name order: its estimate or why there is none."""
    answered = {r.node: r for r in replies}
    out = []
    for node in sorted(session.nodes.values(), key=lambda n: n.name or str(n.node_id)):
        name = node.name or f"node {node.node_id}"
        entry = {"node": name, "estimate": None, "std_error": None}
        reply = answered.get(node.name) if node.contributed else None
        if reply is None:
            entry["reason"] = node.dropped_reason or "did not answer"
            entry["refusals"] = node.refusals or None
        else:
            node.data_version = str(reply.payload.get("data_version", ""))
            fit = reply.payload.get("models", {}).get("meta", {})
            if fit.get("estimable"):
                se = float(fit["std_error"])
                est = float(fit["estimate"])
                entry.update(
                    estimate=est,
                    std_error=se,
                    conf_low=est - Z975 * se,
                    conf_high=est + Z975 * se,
                    dropped_terms=fit.get("dropped", []),
                )
                with_ratio(entry, ratio)
            elif not fit.get("has_rows"):
                entry["reason"] = "has no rows in the study's cohort"
            else:
                entry["reason"] = (
                    "cannot estimate the exposure from its own rows alone (it is constant there, "
                    "determined by other terms, or predicts the outcome perfectly)"
                )
        out.append(entry)
    return out


def render(result: dict) -> str:
    """A short report: each node's estimate, the pooled ones, and the one-stage models; the
    exposure in the report's words (`n treat`, `sex: male`) and I², tau² as the report writes them."""
    ratio = result.get("ratio_name")
    lines = [
        f"{result.get('title') or result['study']}  [meta-analysis of {term_text(result['exposure'], result)}, "
        f"{result['family']}/{result['link']}]  study {result['study_hash'][:12]}"
    ]

    def show(entry: dict) -> str:
        if ratio:
            return f"{entry['ratio']:.3f} ({entry['ratio_low']:.3f}-{entry['ratio_high']:.3f})"
        return f"{entry['estimate']:.4f} ({entry['conf_low']:.4f} to {entry['conf_high']:.4f})"

    label = f"{ratio} (95% CI)" if ratio else "estimate (95% CI)"
    lines.append(f"  {'node':<26} {label:<26} {'weight FE / DL / REML':>24}")
    for e in result["per_node"]:
        if e["estimate"] is None:
            lines.append(f"  {service_name(e['node']):<26} not pooled: {e['reason']}")
            continue
        w = e.get("weights", {})
        shares = " / ".join(f"{100 * w[k]:5.1f}%" if k in w else "   -  " for k, _ in METHODS)
        lines.append(f"  {service_name(e['node']):<26} {show(e):<26} {shares:>24}")
    for key, name in METHODS:
        entry = result.get(key)
        if entry is None:
            continue
        if entry.get("ci") == "hksj":
            name = f"{name}, HKSJ"
        extra = f"Q = {entry['Q']:.2f} on {entry['Q_df']} df"
        if entry.get("Q_p_value") is not None:
            extra += f" ({p_phrase(entry['Q_p_value'])})"
        if entry.get("I2") is not None:
            extra += f", I² = {100 * entry['I2']:.1f}%"
        if "tau2" in entry:
            extra = f"tau² = {entry['tau2']:.3g}, " + extra
        lines.append(f"  {name:<38} {show(entry):<26} {extra}")
        if entry.get("prediction_low") is not None:
            if ratio:
                pi = f"{entry['prediction_ratio_low']:.3f}-{entry['prediction_ratio_high']:.3f}"
            else:
                pi = f"{entry['prediction_low']:.4f} to {entry['prediction_high']:.4f}"
            lines.append(f"  {'':<38} 95% prediction interval for a new node: {pi}")
        if entry.get("ci") == "hksj":
            lines.append(
                f"  {'':<38} Hartung-Knapp-Sidik-Jonkman interval: t = {entry['statistic']:.3f} on "
                f"{entry['df']} df, {p_phrase(entry['p_value'])}, SE {entry['std_error']:.4g}"
            )
    if result.get("tau2_ci"):
        lines.append(f"  {'heterogeneity, 95% CI (Q-profile)':<38} {_tau2_ci_text(result['tau2_ci'])}")
        if result["tau2_ci"].get("note"):
            lines.append(f"  {'':<38} {result['tau2_ci']['note']}")
    for key, name in (
        ("one_stage", "one-stage (pooled rows)"),
        ("one_stage_service_fe", "one-stage + service fixed effects"),
    ):
        model = result[key]
        lines.append(
            f"  {name:<38} {show(model['exposure_term']):<26} n = {model['n']:,}, {model['iterations']} Newton rounds"
        )
    if result.get("note"):
        lines.append(f"  note: {result['note']}")
    return "\n".join(lines)


def _tau2_ci_text(ci: dict) -> str:
    """tau2, tau, I2 and H2 bounds, with metafor's signs where a bound is at the search's end."""
    lo, hi = ci.get("lower_sign") or "", ci.get("upper_sign") or ""
    return (
        f"tau² {lo}{ci['tau2_low']:.3g} to {hi}{ci['tau2_high']:.3g}, "
        f"tau {lo}{ci['tau_low']:.3g} to {hi}{ci['tau_high']:.3g}, "
        f"I² {lo}{100 * ci['I2_low']:.1f}% to {hi}{100 * ci['I2_high']:.1f}%, "
        f"H² {lo}{ci['H2_low']:.3g} to {hi}{ci['H2_high']:.3g}"
    )

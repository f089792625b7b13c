"""Coordinator half of propensity-score studies: `kind = "psm"` (matching) and `"iptw"`
(inverse probability of treatment weighting), each exact against the same analysis on the
pooled rows.

PSM:
1. the propensity model `exposure ~ covariates`, fitted federated (coordinator/glm.py);
2. `propensity.score` with its β: the nodes score their cohort rows and send the logit's
   (n, mean, M2) per exposure group and the balance before matching; the coordinator pools
   the SD of the logit over the whole cohort (Chan's formula) and sets the caliper to
   `caliper` × SD;
3. `propensity.match` with the caliper: each node matches within its own rows (node/matching.py)
   and sends its matching counts (small-number rules), its number of pairs and per design
   column the sum of the pairs' exposed-minus-control differences (the balance after);
4. the outcome model `outcome ~ exposure` on the matched rows with standard errors clustered
   on the matched pair: pairs lie within a node, so the cluster sandwich is exact.

IPTW: steps 1-2, the nodes also computing the weights and the weighted balance, then the
outcome model weighted (statsmodels' var_weights) with robust HC0 standard errors, which
treat the weights as fixed (as statsmodels does).

Steps 1-3 share one study hash (the propensity model's), the outcome model has its own; both
models carry the study, so a Trust approves the study's hash once. A node that leaves with
`min_nodes` (refusing a step, or not answering) leaves the later steps too, and a node that
leaves after the propensity model was fitted takes its rows out of every step: the steps start
again from the propensity model on the remaining nodes, so that the result is theirs alone.
"""

from __future__ import annotations

import math

import numpy as np

from ..protocol.errors import NetworkError
from ..protocol.kinds import propensity as kind
from ..report import words
from ..report.words import service_name
from .balance import balance_rows, balance_summary, pool_moments, pool_weighted_means, variances
from .derived_models import carry_lost
from .glm import ModelFit, fit_models
from .replies import check_replies
from .results import build_results, term_rows, term_text
from .runner import node_status
from .session import ProgressFn, Session
from .studies import LoadedStudy

GROUPS = ("exposed", "control")
SMD_DEFINITION = (
    "(mean exposed - mean control) / sqrt((s2 exposed + s2 control) / 2), with the "
    "group variances of the cohort before matching or weighting in both SMDs"
)
MATCHING_METHOD = (
    "1:1 nearest neighbour on the logit of the propensity score, without replacement, "
    "within each node; exposed rows in descending order of the score, ties in row order"
)


def run_study(
    grid,
    study: LoadedStudy,
    *,
    engine: str,
    progress: ProgressFn | None = None,
    timeout: float | None = 300.0,
    poll_interval: float = 0.0,
) -> dict:
    parent = study.spec
    specs = kind.derived_specs(parent)
    options = dict(min_nodes=parent.min_nodes, timeout=timeout, poll_interval=poll_interval, progress=progress)
    session = Session(grid, specs["ps"].hash, **options)
    spent = 0  # rounds of outcome models started again
    # A node lost after the propensity model (min_nodes) takes its rows out of every step:
    # the steps start again from the propensity model, on the remaining nodes' rows alone.
    while True:
        ps_fit = fit_models(session, {"ps": specs["ps"]}, {"ps": list(study.parsed.ps.stateful)})["ps"]
        lost = len(session.lost)
        wire = {"models": {"ps": specs["ps"].to_wire()}}
        payload = dict(wire)
        if parent.params.get("stabilized"):
            payload["marginal"] = ps_fit.events / ps_fit.n
        scored = session.ask(kind.TASK_SCORE, payload, {"beta": ps_fit.beta})
        check_replies(scored)
        if len(session.lost) > lost:
            continue
        names = ["ps_logit", *ps_fit.names]
        keep = [0] + [j + 1 for j, name in enumerate(ps_fit.names) if ps_fit.active[j] and name != "Intercept"]
        score = _score_summary(scored)
        before = _before(scored)
        if parent.kind == "psm":
            caliper = parent.params["caliper"] * score["logit_sd"]
            matched = session.ask(kind.TASK_MATCH, {**wire, "caliper": caliper})
            check_replies(matched)
            if len(session.lost) > lost:
                continue
            pairs = sum(float(_array(r, "after/pairs")[0]) for r in matched)
            total = np.sum([_array(r, "after/difference") for r in matched], axis=0)
            difference = total / pairs if pairs else np.full(len(names), np.nan)
            rows = balance_rows(names, keep, before, difference)
            extra = {"matching": _matching(parent, caliper, score["logit_sd"], before, pairs, matched)}
        else:
            sums = {g: np.sum([_array(r, kind.weights_key(g)) for r in scored], axis=0) for g in GROUPS}
            means = {
                g: pool_weighted_means(
                    [(_array(r, kind.weights_key(g))[0], _array(r, kind.weighted_mean_key(g))) for r in scored]
                )[1]
                for g in GROUPS
            }
            rows = balance_rows(names, keep, before, means["exposed"] - means["control"], means)
            extra = {"weighting": _weighting(parent, before, sums, ps_fit)}
        outcome_session = Session(grid, specs["outcome"].hash, **options)
        _carry_dropped(session, outcome_session)
        out_fit = fit_models(
            outcome_session, {"outcome": specs["outcome"]}, {"outcome": list(study.parsed.outcome_model.stateful)}
        )["outcome"]
        if not carry_lost(outcome_session, session):
            break
        spent += outcome_session.round
    counts = out_fit.node_counts
    if parent.kind == "psm":  # the cohort's counts, not the matched set's
        counts = {
            node: {**c, **{k: ps_fit.node_counts.get(node, {}).get(k) for k in ("n_cohort", "n_missing")}}
            for node, c in counts.items()
        }
    result = build_results(
        out_fit,
        study_hash=parent.hash,
        engine=engine,
        node_status=node_status(outcome_session, counts),
        rounds=session.round + spent + outcome_session.round,
    )
    result.update(
        {
            "study": parent.name,
            "title": parent.title,
            "kind": parent.kind,
            "where": parent.where,
            "cohort_where": specs["ps"].where,
            "outcome": parent.params["outcome"],
            "covariates": parent.params["covariates"],
            "reference": parent.reference or None,
            "n_cohort": ps_fit.n_cohort,
            "n_missing": ps_fit.n_missing,
            "propensity_model": _model_summary(ps_fit),
            "propensity_score": score,
            "balance": rows,
            "balance_summary": balance_summary(rows, SMD_DEFINITION),
            **extra,
        }
    )
    return result


def _score_summary(replies) -> dict:
    """The logit's mean and SD per group, and its SD over the whole cohort (for the caliper)."""
    logit = {g: pool_moments([_triple(r, kind.logit_key(g)) for r in replies]) for g in GROUPS}
    n, _, m2 = pool_moments([logit["exposed"], logit["control"]])
    return {
        "logit_sd": math.sqrt(m2[0] / (n - 1.0)),
        **{f"logit_mean_{g}": float(logit[g][1][0]) for g in GROUPS},
        **{f"logit_sd_{g}": float(math.sqrt(variances(logit[g])[0])) for g in GROUPS},
    }


def _before(replies) -> dict:
    """The cohort's (n, mean, M2) of every balance column, per group."""
    return {g: pool_moments([_block(r, g) for r in replies]) for g in GROUPS}


def _triple(reply, name: str) -> tuple[float, np.ndarray, np.ndarray]:
    try:
        n, mean, m2 = reply.arrays[name]
    except (KeyError, ValueError):
        raise NetworkError(f"node {reply.node} sent a reply without '{name}'.") from None
    return float(n), np.array([mean]), np.array([m2])


def _array(reply, name: str) -> np.ndarray:
    try:
        return reply.arrays[name]
    except KeyError:
        raise NetworkError(f"node {reply.node} sent a reply without '{name}'.") from None


def _block(reply, group: str) -> tuple[float, np.ndarray, np.ndarray]:
    try:
        return (
            float(reply.arrays[kind.before_key(group, "n")][0]),
            reply.arrays[kind.before_key(group, "mean")],
            reply.arrays[kind.before_key(group, "m2")],
        )
    except (KeyError, IndexError):
        raise NetworkError(f"node {reply.node} sent a reply without the balance of the {group} group.") from None


def _carry_dropped(first: Session, second: Session) -> None:
    """Nodes that left the study before the outcome model stay out of it."""
    for node_id, node in second.nodes.items():
        earlier = first.nodes.get(node_id)
        if earlier is not None and not earlier.contributed:
            node.name, node.contributed, node.dropped_reason = earlier.name, False, earlier.dropped_reason
            node.audit_hash, node.audit_seq = earlier.audit_hash, earlier.audit_seq  # its last answer's head


def _model_summary(fit: ModelFit) -> dict:
    return {
        "formula": fit.spec.formula,
        "family": fit.family.name,
        "n": fit.n,
        "exposed": fit.events,
        "converged": fit.converged,
        "iterations": fit.iterations,
        "deviance": fit.deviance,
        "null_deviance": fit.null.deviance,
        "llf": fit.llf,
        "aic": -2.0 * fit.llf + 2.0 * fit.rank,
        "dropped_terms": fit.dropped,
        "terms": term_rows(fit),
    }


def _matching(parent, caliper: float, sd: float, before: dict, pairs: float, replies) -> dict:
    exposed, controls = before["exposed"][0], before["control"][0]
    nodes = []
    for reply in replies:
        table = reply.payload.get("propensity", {}).get("matching", {})
        nodes.append(
            {
                "name": reply.node,
                **{
                    k: table.get(k) for k in ("exposed", "controls", "pairs", "exposed_unmatched", "controls_unmatched")
                },
            }
        )
    return {
        "method": MATCHING_METHOD,
        "caliper_sd": parent.params["caliper"],
        "logit_sd": sd,
        "caliper": caliper,
        "exposed": int(exposed),
        "controls": int(controls),
        "pairs": int(pairs),
        "exposed_unmatched": int(exposed - pairs),
        "controls_unmatched": int(controls - pairs),
        "nodes": nodes,
    }


def _weighting(parent, before: dict, weights: dict, ps_fit: ModelFit) -> dict:
    out = {
        "estimand": parent.params["estimand"],
        "stabilized": parent.params["stabilized"],
        "se": "robust (HC0) sandwich treating the weights as fixed, as statsmodels' var_weights",
    }
    if parent.params["stabilized"]:
        out["exposed_share"] = ps_fit.events / ps_fit.n
    for g in GROUPS:
        total, squares = (float(v) for v in weights[g])
        out[g] = {
            "n": int(before[g][0]),
            "sum_weights": total,
            "effective_n": total * total / squares if squares > 0 else 0.0,
        }
    return out


def render(result: dict) -> str:
    """A short human report: the exposure's effect, the propensity model, matching or
    weighting, and the covariates that stay imbalanced; terms and columns in the report's
    words (report/sections.py propensity_section: `sex: male`, `propensity score (logit)`)."""

    def label(term: str) -> str:
        return "propensity score (logit)" if term == "ps_logit" else term_text(term, result)

    lines = []
    title = result.get("title") or result["study"]
    method = "propensity-score matching" if result["kind"] == "psm" else "inverse probability weighting"
    lines.append(f"{title}  [{method}]  study {result['study_hash'][:12]}")
    ps = result["propensity_model"]
    lines.append(
        f"  propensity model: {ps['n']:,} rows ({int(ps['exposed']):,} exposed), "
        f"{len(ps['terms'])} terms, {ps['iterations']} Newton rounds; "
        f"SD of the logit {result['propensity_score']['logit_sd']:.3f}"
    )
    if result["kind"] == "psm":
        mt = result["matching"]
        lines.append(
            f"  matching: caliper {mt['caliper_sd']:g} SD = {mt['caliper']:.4f} on the logit; "
            f"{mt['pairs']:,} pairs; {mt['exposed_unmatched']:,} of {mt['exposed']:,} exposed unmatched"
        )
        per_node = ", ".join(f"{service_name(n['name'])} {_shown(n['pairs'])}" for n in mt["nodes"])
        lines.append(f"  pairs per node (rounded): {per_node}")
    else:
        wt = result["weighting"]
        lines.append(
            f"  weights: {wt['estimand']}{', stabilised' if wt['stabilized'] else ''}; effective n "
            f"{wt['exposed']['effective_n']:,.0f} exposed (of {wt['exposed']['n']:,}), "
            f"{wt['control']['effective_n']:,.0f} controls (of {wt['control']['n']:,})"
        )
    summary = result["balance_summary"]
    lines.append(
        f"  balance: max |SMD| {_smd(summary['max_abs_smd_before'])} before, "
        f"{_smd(summary['max_abs_smd_after'])} after"
        + (
            "; every covariate below 0.1"
            if summary["balanced"]
            else f"; at or above 0.1 after: {', '.join(map(label, summary['imbalanced_terms'][:8]))}"
        )
    )
    shown = [
        r
        for r in result["balance"]
        if r["term"] == "ps_logit"
        or r["term"] in summary["imbalanced_terms"]
        or (r["smd_before"] is not None and abs(r["smd_before"]) >= summary["threshold"])
    ]
    if shown:
        shown = shown[:30]
        width = max([34, *(len(label(r["term"])) for r in shown)])
        lines.append(f"  {'term':<{width}} {'SMD before':>10} {'SMD after':>10}")
        for r in shown:
            lines.append(f"  {label(r['term']):<{width}} {_smd(r['smd_before']):>10} {_smd(r['smd_after']):>10}")
    ratio = result.get("ratio_name") or "estimate"
    # The outcome model in words, as the report's summary says it (its terms follow, one a line).
    outcome = words.column_label(result["outcome"]) if result.get("outcome") else "the outcome"
    adjusted = result["formula"].split("~", 1)[-1].strip() != result.get("exposure")
    lines.append(
        f"  outcome model of {outcome} on {label(result['exposure'])}"
        f"{' and the covariates' if adjusted else ''} ({result['n']:,} rows), "
        f"{'SEs clustered on the matched pair' if result['kind'] == 'psm' else 'robust (HC0) SEs'}:"
    )
    names = [label(t["term"]) for t in result["terms"]]
    width = max([32, *map(len, names)])
    for t, name in zip(result["terms"], names):
        row = f"    {name:<{width}} {t['estimate']:>9.4f} ({t['std_error']:.4f})"
        if "ratio" in t:
            row += f"   {ratio} {t['ratio']:.3f} ({t['ratio_low']:.3f}-{t['ratio_high']:.3f})"
        if t["term"] == result.get("exposure"):
            row += "  <- exposure"
        lines.append(row)
    return "\n".join(lines)


def _shown(count) -> str:
    return "*" if count is None else f"{count:,}"


def _smd(value) -> str:
    return "-" if value is None else f"{value:+.3f}"

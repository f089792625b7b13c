"""The coordinator half of an interrupted time series (`kind = "its"`).

1. `its.columns`: every node computes the study's segmented-regression columns for its own
   rows and keeps them (node/its.py); it replies with a count table per group and period
   (referrals, events, denominator; small numbers suppressed, others rounded, a group's other
   period hidden beside a suppressed one: protocol/sdc.py). Summed over nodes, the same rules
   run over the network's table.
2. The exact federated Poisson GLMs with offset log(denominator), in shared rounds: the pooled
   model (each group its own level and trend, a common level change and slope change) and one
   model per group with a change date whose cohort has referrals before and after it
   (protocol/kinds/its.py). A group whose table shows no referrals, or a suppressed count, on
   one side of its change is reported and not fitted alone (a node would refuse it, or its
   model would give the suppressed count away).

The level change is the rate ratio at the change (exp of `after_change`); the slope change the
ratio per time unit of the trend after the change to the trend before (exp of
`time_after_change`), also shown per 12 units (a year of months).
"""

from __future__ import annotations

import math

from ..protocol.errors import ModelError
from ..protocol.kinds import its as protocol
from ..protocol.sdc import Relation, suppress
from ..report import words
from .derived_models import carry_lost, derived_session, footer, header, model_result, with_ratio
from .glm import fit_models
from .meta_analysis import meta_analyse
from .session import Session

PERIODS = ("before", "after")
WHAT = ("referrals", "events", "denominator")


def run_study(
    grid, study, *, engine: str, progress=None, timeout: float | None = 300.0, poll_interval: float = 0.0
) -> dict:
    spec = study.spec
    p = spec.params
    first = Session(
        grid, spec.hash, min_nodes=spec.min_nodes, timeout=timeout, poll_interval=poll_interval, progress=progress
    )
    replies = first.ask(protocol.TASK, {"models": {"its": spec.to_wire()}})
    for reply in replies:
        first.node_named(reply.node).data_version = str(reply.payload.get("data_version", ""))
    while True:  # once more without a node that left during the models (min_nodes)
        remaining = {n.name for n in first.active}
        segments = _segments(spec, [r for r in replies if r.node in remaining])
        by_level = {s["group"]: s for s in segments}
        all_specs = protocol.model_specs(spec)
        chosen = {"pooled": all_specs["pooled"]}
        skipped = {}
        for i, level in enumerate(p["changes"]):
            reason = _why_not(by_level[level])
            if reason:
                skipped[level] = reason
            else:
                chosen[f"g{i}"] = all_specs[f"g{i}"]
        _check_estimable(spec, [by_level[level] for level in p["changes"]])
        # A group's own model rests on the nodes holding its referrals; the others decline it
        # (too few rows: a node answers 0 rows as it answers a few, so it cannot say "none").
        # A node lost meanwhile takes its counts and groups with it: the table and the choice
        # of models are made again from the remaining nodes' counts, and the models fitted anew.
        session = derived_session(
            grid,
            chosen,
            min_nodes=spec.min_nodes,
            earlier=first,
            progress=progress,
            timeout=timeout,
            poll_interval=poll_interval,
        )
        try:
            fits = fit_models(session, chosen, {k: [] for k in chosen}, frozenset(k for k in chosen if k != "pooled"))
        except ModelError:
            first.round = session.round
            if carry_lost(session, first):
                continue  # e.g. the only node holding a group's referrals left during its model
            raise
        first.round = session.round
        if not carry_lost(session, first):
            break
    for i, level in enumerate(p["changes"]):
        key = f"g{i}"
        if key in fits:
            holders = {n for n in by_level[level]["nodes"] if n in {s.name for s in session.active}}
            if set(fits[key].holders) != holders:
                skipped[level] = (
                    "a node holding referrals of this group declined its model (fewer rows than its "
                    "policy's minimum), so it would not be the group's own model"
                )
    pooled = _with_changes(model_result(fits["pooled"], session, engine), p)
    per_service = []
    for i, level in enumerate(p["changes"]):
        entry = {
            "group": level,
            "change_time": p["changes"][level],
            "change_date": protocol.month_label(p["changes"][level], p["time_origin"]),
        }
        if level in skipped:
            entry.update(fitted=False, reason=skipped[level])
        else:
            entry.update(fitted=True, **_with_changes(model_result(fits[f"g{i}"], session, engine), p))
        per_service.append(entry)
    result = header(spec)
    result.update(
        {
            "level_change_meta": _level_change_meta(per_service),
            "outcome": p["outcome"],
            "denominator": p["denominator"],
            "time": p["time"],
            "group": p["group"],
            "time_origin": p["time_origin"],
            "cov_type": p["cov_type"],
            "changes": [
                {"group": g, "change_time": t, "change_date": protocol.month_label(t, p["time_origin"])}
                for g, t in p["changes"].items()
            ],
            "level_change": pooled["level_change"],
            "slope_change": pooled["slope_change"],
            "exposure_term": pooled["level_change"],
            "n": pooled["n"],
            "pooled": pooled,
            "per_service": per_service,
            "segments": segments,
            "nodes": pooled["nodes"],
        }
    )
    result.update(footer(spec, engine, session.round))
    return result


def _segments(spec, replies) -> list[dict]:
    """Per group level and period, the nodes' counts summed; None where a node suppressed one
    or did not release it (a sum with an unknown part is unknown), then the nodes' rules over
    the network's table: a group's two periods add up to a count its models give, so one
    hidden hides the other; sums follow their referrals. Crude rate = events / denominator of
    the rounded counts, as NHS publications compute percentages from rounded values."""
    p = spec.params
    levels = list(dict.fromkeys([*p["changes"], *_levels_in(replies)]))
    tables = [reply.payload.get("segments", {}).get("its", {}) for reply in replies]
    months = _months_in(tables)
    pooled, small, withheld = {}, set(), set()
    for level in levels:
        for period in (*PERIODS, *months.get(level, [])):
            for what in WHAT:
                key, name, total, known = (level, period, what), f"{level}/{period}/{what}", 0.0, True
                for table in tables:
                    value = table.get(name)
                    if value is None and period not in PERIODS and _holds_none(table, level):
                        value = 0  # a node without referrals of this group has no months of it
                    if value is None:
                        known = False
                        (small if name in table else withheld).add(key)
                    else:
                        total += float(value)
                pooled[key] = int(total) if known else None
    relations = [
        Relation((level, "total", what), ((level, "before", what), (level, "after", what)), implicit=True)
        for level in levels
        for what in WHAT
    ]
    change = p["changes"]
    for level, keys in months.items():
        for period in PERIODS:
            inside = (
                [k for k in keys if (int(k[1:]) >= change[level]) == (period == "after")] if level in change else []
            )
            if level not in change and period == "before":
                inside = list(keys)
            for what in WHAT:
                if inside:
                    relations.append(Relation((level, period, what), tuple((level, k, what) for k in inside)))
    hidden = suppress(pooled, small, relations, hidden=withheld)
    hidden |= {(level, period, what) for level, period, kind in hidden if kind == "referrals" for what in WHAT[1:]}
    out = []
    for level in levels:
        entry = {
            "group": level,
            "change_time": p["changes"].get(level),
            "change_date": protocol.month_label(p["changes"][level], p["time_origin"])
            if level in p["changes"]
            else None,
            "nodes": [],
        }
        for period in PERIODS:
            entry[period] = _cell(pooled, hidden, level, period)
        entry["months"] = [
            {
                "time": int(k[1:]),
                "date": protocol.month_label(int(k[1:]), p["time_origin"]),
                **_cell(pooled, hidden, level, k),
            }
            for k in months.get(level, [])
        ]
        for table in tables:
            if any(table.get(f"{level}/{period}/referrals") != 0 for period in PERIODS):
                entry["nodes"].append(replies[tables.index(table)].node)
        if level in p["changes"] or entry["nodes"]:
            out.append(entry)
    return out


def _cell(pooled: dict, hidden: set, level: str, period: str) -> dict:
    """One period's (or month's) network counts, None where hidden, and the crude rate."""
    cell = {what: None if (level, period, what) in hidden else pooled[(level, period, what)] for what in WHAT}
    events, denominator = cell["events"], cell["denominator"]
    cell["rate"] = events / denominator if events is not None and denominator else None
    return cell


def _months_in(tables: list[dict]) -> dict[str, list[str]]:
    """{level: month keys in time order} over every node's count table."""
    found: dict[str, set] = {}
    for table in tables:
        for name in table:
            level, period, _ = name.rsplit("/", 2)
            if period not in PERIODS:
                found.setdefault(level, set()).add(period)
    return {level: sorted(keys, key=lambda k: int(k[1:])) for level, keys in found.items()}


def _holds_none(table: dict, level: str) -> bool:
    """The node released 0 referrals of this group in both periods (it holds none)."""
    return all(table.get(f"{level}/{period}/referrals") == 0 for period in PERIODS)


def _levels_in(replies) -> list[str]:
    names = []
    for reply in replies:
        for name in reply.payload.get("segments", {}).get("its", {}):
            names.append(name.rsplit("/", 2)[0])
    return names


def _why_not(segment: dict) -> str | None:
    for period in PERIODS:
        n = segment[period]["referrals"]
        if n is None:
            return (
                f"the count of referrals {period} the change is suppressed (a node has 1-7 of them, or hides it "
                "beside such a count), so a model of this group alone would be refused or would give it away"
            )
        if n == 0:
            return f"no referral in the cohort falls {period} the change"
    if _one_month_before(segment):
        return (
            "every referral before the change falls in one month, so the group's trend before the change "
            "cannot be told apart from its slope change"
        )
    return None


def _one_month_before(segment: dict) -> bool:
    """The count table shows every referral of the group before its change in one month
    (shown, not suppressed, and equal to the period's count)."""
    months = [m for m in segment.get("months") or [] if m["time"] < segment["change_time"] and m["referrals"] != 0]
    before = segment["before"]["referrals"]
    return len(months) == 1 and before is not None and months[0]["referrals"] == before


def _level_change_meta(per_service: list[dict]) -> dict | None:
    """The groups' own level changes pooled by fixed-effect and random-effects meta-analysis
    (their models use disjoint rows, so the estimates are independent): how much the change's
    effect varies between groups, beside the pooled model's common level change."""
    fitted = [s for s in per_service if s["fitted"]]
    if len(fitted) < 2:
        return None
    pooled = meta_analyse(
        [s["level_change"]["estimate"] for s in fitted], [s["level_change"]["std_error"] ** 2 for s in fitted]
    )
    for _key, entry in pooled.items():
        with_ratio(entry, True)
        if entry.get("prediction_low") is not None:
            with_ratio(
                entry, True, (("prediction_low", "prediction_ratio_low"), ("prediction_high", "prediction_ratio_high"))
            )
        weights = entry.pop("weights", None)
        if weights is not None:
            entry["weights"] = {s["group"]: w for s, w in zip(fitted, weights)}
    pooled["groups"] = [s["group"] for s in fitted]
    return pooled


def _check_estimable(spec, segments: list[dict]) -> None:
    """ModelError unless some group with a change shows referrals after it and has some (or a
    suppressed count) before it: otherwise the level change is not estimable, or only from a
    few referrals. Each sentence says what the count table shows for each group."""
    after = [s["after"]["referrals"] for s in segments]
    both = [s for n, s in zip(after, segments) if n and s["before"]["referrals"] != 0]
    if both and all(_one_month_before(s) for s in both):
        raise ModelError(
            f"study '{spec.name}': in every group with referrals on both sides of its change, those before it fall "
            "in one month, so the trend before a change cannot be told apart from the slope change; move the "
            "change dates later (a change needs at least two months of data before it)."
        )
    if both:
        return
    counts = _listing(segments)
    if any(after):  # referrals after a change only in groups with none before theirs
        raise ModelError(
            f"study '{spec.name}': no group with a change has referrals both before and after it ({counts}), "
            "so the level change cannot be told apart from the groups' own levels; move the change dates or "
            "widen the cohort."
        )
    if all(n == 0 for n in after):
        raise ModelError(
            f"study '{spec.name}': no referral in the cohort falls on or after a change date ({counts}), "
            "so there is no change to estimate."
        )
    raise ModelError(
        f"study '{spec.name}': after each change date the count of referrals is suppressed or none ({counts}; "
        "a count is suppressed when a node has 1-7 of them, or hides it beside such a small one), so the change "
        "cannot be estimated without singling out a few referrals; widen the cohort or the time after the changes."
    )


def _listing(segments: list[dict]) -> str:
    """ "group 1: 120 before, suppressed after; group 2: ..." from the count table."""

    def count(n):
        return "suppressed" if n is None else "none" if n == 0 else f"{n:,}"

    return "; ".join(
        f"group {s['group']}: {count(s['before']['referrals'])} before, {count(s['after']['referrals'])} after"
        for s in segments
    )


#: Why the slope change is left out of a model whose change falls in its last period.
SLOPE_DROPPED = (
    "every referral on or after the change falls in the change's own period (the change is at the last "
    "period of the data), so there is no trend after it to compare: the slope change is not estimable "
    "and the model is fitted without it"
)


def _with_changes(model: dict, p: dict) -> dict:
    terms = {t["term"]: t for t in model["terms"]}
    model["level_change"] = dict(terms[protocol.AFTER])
    if protocol.SINCE not in terms:
        # time_after_change is 0 on every row: the model left it out as a column without rows.
        for dropped in model["dropped_terms"]:
            if dropped["term"] == protocol.SINCE:
                dropped["reason"] = SLOPE_DROPPED
        model["slope_change"] = None
        return model
    slope = dict(terms[protocol.SINCE])
    slope["ratio_per_12"] = _exp(12 * slope["estimate"])
    slope["ratio_per_12_low"] = _exp(12 * slope["conf_low"])
    slope["ratio_per_12_high"] = _exp(12 * slope["conf_high"])
    model["slope_change"] = slope
    return model


def _exp(x: float) -> float:
    """exp(x), infinite past a float's range (a wide interval on the scale of 12 months)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def render(result: dict) -> str:
    """A short report: crude rates per group and period, then the level and slope changes;
    columns in the report's words (report/sections.py its_section: `n dna per n treat`)."""
    # The series as the report's axis names it: the outcome per its denominator, in words.
    series = f"{words.column_label(result['outcome'])} per {' + '.join(map(words.column_label, result['denominator']))}"
    lines = [
        f"{result.get('title') or result['study']}  [interrupted time series, poisson/log of "
        f"{series}]  study {result['study_hash'][:12]}"
    ]
    # A group held by one node is named by that service (not by its code, e.g. service_id 3).
    names = {
        g["group"]: words.service_name(g["nodes"][0]) for g in result["segments"] if len(g.get("nodes") or []) == 1
    }

    def group_name(level: str) -> str:
        return names.get(level) or f"{words.column_label(result['group'])} {level}"

    width = max([16, *(len(group_name(g["group"])) for g in result["segments"])])
    rates = f"{series} before/after"
    lines.append(f"  {'group':<{width}} {'change':<9} {'referrals before/after':>24} {rates:>32}")

    def num(v):
        return "*" if v is None else f"{v:,}"

    def pct(v):
        return "*" if v is None else f"{v:.4f}"

    for s in result["segments"]:
        change = s["change_date"] or "none"
        lines.append(
            f"  {group_name(s['group']):<{width}} {change:<9} "
            f"{num(s['before']['referrals']) + ' / ' + num(s['after']['referrals']):>24} "
            f"{pct(s['before']['rate']) + ' / ' + pct(s['after']['rate']):>32}"
        )

    def change(model):
        lv, sl = model["level_change"], model["slope_change"]
        slope = (
            "slope change not estimable (the change is at the last period)"
            if sl is None
            else f"slope RR per 12 {sl['ratio_per_12']:.3f} ({sl['ratio_per_12_low']:.3f}-{sl['ratio_per_12_high']:.3f})"
        )
        return f"level RR {lv['ratio']:.3f} ({lv['ratio_low']:.3f}-{lv['ratio_high']:.3f}); {slope}"

    for s in result["per_service"]:
        label = f"{group_name(s['group'])} from {s['change_date']}"
        if s["fitted"]:
            lines.append(f"  {label:<32} {change(s)}  n = {s['n']:,}")
        else:
            lines.append(f"  {label:<32} not fitted: {s['reason']}")
    pooled = result["pooled"]
    lines.append(
        f"  {'pooled (common change)':<32} {change(pooled)}  n = {pooled['n']:,}, "
        f"{pooled['iterations']} Newton rounds, {result['cov_type']} SEs"
    )
    meta = result.get("level_change_meta")
    if meta:
        for key, name in (("random_dl", "groups' level changes, DL"), ("random_reml", "groups' level changes, REML")):
            e = meta[key]
            pi = ""
            if e.get("prediction_ratio_low") is not None:
                pi = f"; 95% PI {e['prediction_ratio_low']:.3f}-{e['prediction_ratio_high']:.3f}"
            lines.append(
                f"  {name:<32} level RR {e['ratio']:.3f} ({e['ratio_low']:.3f}-{e['ratio_high']:.3f}); "
                f"tau² = {e['tau2']:.3g}, I² = {100 * e['I2']:.1f}%{pi}"
            )
    return "\n".join(lines)

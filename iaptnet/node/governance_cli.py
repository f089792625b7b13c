"""`iaptnet node approve | audit`: the Trust's governance commands (policy and audit log).

iaptnet node approve STUDY.toml --policy policy.toml [--schema SCHEMA.toml]
                     [--services CODES | --network NETWORK.toml | --hub HUB.toml] [--yes]
    prints what the study will compute and what the node will release for it, then adds
    its hash to the policy's `approved` list (after a yes, or with --yes). On the IAPT
    extract the hash covers the network's service codes (the levels of service_id), so the
    network's services are given, as a list or from the network or hub file that lists them.
iaptnet node audit --policy policy.toml [--node NAME] [--since DATE] [--verify] [--json]
                   [--against RESULTS.json ...]
    lists the audit log's entries (one line each, or full JSON; a damaged line is named by
    file and line), and with --verify checks the hash chain and the head: any edited,
    deleted or reordered entry is reported, while a crash the node repaired (a recovery
    entry) or has yet to repair is said to be one. With --against, each audit head that the
    results files recorded for this node must be in the chain at its sequence number, so a
    log rewritten and re-chained after those studies fails too.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from ..protocol.errors import SpecError


def register(node_sub) -> None:
    """Governance commands register here."""
    approve = node_sub.add_parser("approve", help="review a study and add its hash to the policy's approved list")
    approve.add_argument("study", help="study TOML file")
    approve.add_argument("--policy", default="policy.toml", help="the node's policy file")
    approve.add_argument(
        "--schema", help="the schema TOML this node serves (default: the study's own, else the built-in IAPT dataset)"
    )
    approve.add_argument(
        "--services", help="the network's service codes, comma-separated (the levels of service_id in the study)"
    )
    approve.add_argument("--network", help="a network file whose nodes declare the network's services")
    approve.add_argument("--hub", help="a hub file whose [services] lists the network's services")
    approve.add_argument("--yes", action="store_true", help="approve without asking")
    approve.set_defaults(fn=cmd_approve)

    audit = node_sub.add_parser("audit", help="list and verify the node's audit log")
    audit.add_argument("--policy", default="policy.toml", help="the node's policy file")
    audit.add_argument("--node", help="the node's name (needed when the state folder holds several)")
    audit.add_argument("--since", help="only entries from this date (YYYY-MM-DD) or time on, UTC")
    audit.add_argument("--verify", action="store_true", help="check the hash chain; exit 1 if it is broken")
    audit.add_argument("--json", action="store_true", help="print the entries as JSON lines, in full")
    audit.add_argument(
        "--against",
        nargs="+",
        metavar="RESULTS.json",
        help="also check the audit heads these results recorded for this node (implies --verify)",
    )
    audit.set_defaults(fn=cmd_audit)


# --------------------------------------------------------------------------- approve


def cmd_approve(args) -> int:
    from ..protocol.iapt_schema import iapt_analysis_schema
    from ..protocol.schema import Schema
    from ..protocol.sensitivity import parse_with_companions
    from ..protocol.study import read_study_file
    from .policy import add_approved_hash, load_policy

    policy_path = Path(args.policy)
    policy = load_policy(policy_path, production=True)
    study_path = Path(args.study)
    data = read_study_file(study_path)
    if args.schema:
        schema = Schema.load(args.schema)
    elif data.get("schema"):
        schema = Schema.load(study_path.parent / str(data["schema"]))
    else:
        schema = iapt_analysis_schema()
    if schema.network_column is not None:
        schema = schema.with_services(network_services(args, schema.network_column))
    # A study's sensitivity analyses are studies of their own (protocol/sensitivity.py): the
    # Trust reviews and approves each, by its own hash.
    main, companions = parse_with_companions(data, schema, str(study_path))
    specs = [main] + [parsed for _, parsed in companions]
    print("\n\n".join(describe_study(spec, parsed, schema, policy) for spec, parsed in specs))
    pending = [spec.hash for spec, _ in specs if spec.hash not in policy.approved]
    if not pending:
        print(f"\nalready approved in {policy_path}")
        return 0
    if not args.yes:
        if not sys.stdin.isatty():
            raise SpecError("approve: not approved; give --yes to approve without a terminal to ask on.")
        what = "this study" if len(specs) == 1 else f"this study and its {len(specs) - 1} sensitivity analyses"
        answer = input(f"\nApprove {what} in {policy_path}? [y/N] ").strip().lower()
        if answer not in ("y", "yes"):
            print("not approved")
            return 1
    for digest in pending:
        add_approved_hash(policy_path, digest)
        print(f"approved: {digest} added to {policy_path}")
    return 0


def network_services(args, column: str) -> list[str]:
    """The network's service codes for `approve`: --services, or from --network or --hub."""
    given = [flag for flag in ("services", "network", "hub") if getattr(args, flag, None)]
    if len(given) != 1:
        raise SpecError(
            f"approve: the study's '{column}' takes its levels from the network's services, which its hash covers; "
            "give exactly one of --services CODES, --network NETWORK.toml or --hub HUB.toml."
        )
    if args.services:
        return [c.strip() for c in args.services.split(",") if c.strip()]
    if args.network:
        from ..coordinator.network import load_network

        codes = list(load_network(args.network).services)
    else:
        from ..coordinator.engines.flower import load_hub_file

        codes = list(load_hub_file(args.hub).services)
    if not codes:
        raise SpecError(f"approve: {args.network or args.hub} lists no services.")
    return codes


def describe_study(spec, parsed, schema, policy) -> str:
    """What a study will compute at this node and what the node will release for it."""
    from ..protocol.families import get_family

    if spec.kind != "glm":
        return describe_kind_study(spec, policy)
    family = get_family(spec.family)
    terms = design_terms(spec, parsed, schema)
    rules = policy.rules
    lines = [
        f"study '{spec.name}'" + (f": {spec.title}" if spec.title else ""),
        f"  hash       {spec.hash}",
        f"  dataset    {spec.dataset} (schema sha256 {spec.schema_fingerprint[:16]})",
        f"  model      {spec.family} GLM ({family.link_name} link) of '{parsed.outcome}'",
        f"  formula    {' '.join(spec.formula.split())}",
        f"  cohort     {spec.where or 'every row'}",
    ]
    if spec.offset:
        lines.append(f"  offset     {spec.offset}")
    if spec.exposure:
        lines.append(f"  exposure   {spec.exposure}")
    if spec.cov_type != "nonrobust":
        lines.append(f"  std errors {spec.cov_type}" + (f", clustered by {spec.cluster}" if spec.cluster else ""))
    if spec.marginal:
        from ..protocol.study import marginal_label

        lines.append(f"  marginal   standardised risks of {', '.join(marginal_label(m) for m in spec.marginal)}")
    from ..protocol.kinds.glmm import describe as random_intercept_lines

    lines += random_intercept_lines(spec, rules)
    for column, groups in spec.merge.items():
        for new, olds in groups.items():
            lines.append(f"  merge      {column}: '{new}' = {' + '.join(repr(o) for o in olds)}")
    lines.append(
        f"  nodes      {'every node must contribute' if spec.min_nodes is None else f'continues with at least {spec.min_nodes} nodes'}"
    )
    lines.append(
        f"  reads      {', '.join(sorted({parsed.outcome, *parsed.columns, *([spec.offset] if spec.offset else [])}))}"
    )
    if terms:
        lines.append(f"  estimates  {len(terms)} coefficients: {', '.join(terms)}")
    lines += [
        "",
        "what this node releases for it (every reply is checked against the policy first):",
        "  prepare   rows used and events (exact), rows with a non-zero value per design column",
        "            (and events among them), this node's own fit (information matrix and I*b);",
        f"            rows in the cohort and dropped as missing as counts (1-{rules.suppress_max} suppressed, others rounded to {rules.round_to})",
        "  rounds    score, information matrix, deviance and log-likelihood at coefficients sent",
        "            by the coordinator (refused if they single out a few rows)",
    ]
    if spec.cov_type == "CR2":
        lines += [
            "  CR2       one more round: sums over this node's clusters of the bias-reduced scores' outer",
            "            products and the p x p pieces of their degrees of freedom (p x p sums, never a row)",
        ]
    if spec.marginal:
        lines.append("  marginal  sums of the fitted risks with the exposure set to 1 and to 0 (a contrast: to its two")
        lines.append("            values), and their gradients")
    lines += [
        f"  refused   under {rules.min_rows} rows, under {rules.min_events} events or non-events, over "
        f"{rules.max_params_per_row:g} parameters per row, a level with 1-{rules.min_level_count - 1} rows,",
        f"            rows differing by 1-{rules.min_subset_difference - 1} people from the whole dataset or an earlier release,",
        f"            more than {rules.max_rounds_per_study} tasks a day",
    ]
    return "\n".join(lines)


def describe_kind_study(spec, policy) -> str:
    """A study of another kind: its identity, cohort and merges, then what its kind's module
    (protocol/kinds/, `describe(spec, rules)`) says it computes and releases."""
    from importlib import import_module

    from ..protocol.kinds import MODULES

    lines = [
        f"study '{spec.name}'" + (f": {spec.title}" if spec.title else ""),
        f"  hash       {spec.hash}",
        f"  kind       {spec.kind}",
        f"  dataset    {spec.dataset} (schema sha256 {spec.schema_fingerprint[:16]})",
        f"  cohort     {spec.where or 'every row'}",
    ]
    for column, groups in spec.merge.items():
        for new, olds in groups.items():
            lines.append(f"  merge      {column}: '{new}' = {' + '.join(repr(o) for o in olds)}")
    describe = getattr(import_module(f"..protocol.kinds.{MODULES[spec.kind]}", __package__), "describe", None)
    if describe is not None:
        lines += describe(spec, policy.rules)
    return "\n".join(lines)


def design_terms(spec, parsed, schema) -> list[str]:
    """The design's column names, built on one placeholder row (no data involved)."""
    import pandas as pd
    from formulaic import ModelSpec

    from ..protocol.study import merged_levels
    from .design import EVAL_CONTEXT, legacy_ordered

    row = {}
    for name in {parsed.outcome, *parsed.columns}:
        col = schema[name]
        if col.is_categorical:
            levels = list(col.levels)
            if name in spec.merge:
                levels = merged_levels(levels, spec.merge[name])[0]
            row[name] = pd.Categorical([levels[0]], categories=levels)
        else:
            row[name] = [1.0]
    try:
        rhs = legacy_ordered(spec.formula.split("~", 1)[1], schema)
        mm = ModelSpec(formula=rhs, na_action="ignore", output="pandas").get_model_matrix(
            pd.DataFrame(row), context=EVAL_CONTEXT
        )
        return list(mm.columns)
    except Exception:  # noqa: BLE001 - the listing is a help, not a check
        return []


# --------------------------------------------------------------------------- audit


def cmd_audit(args) -> int:
    from .audit import AuditLog, entry_time, parse_since, read_anchors
    from .policy import load_policy

    policy = load_policy(Path(args.policy), production=True)
    folder = state_folder(policy, args.node)
    log = AuditLog(folder)
    since = parse_since(args.since) if args.since else None
    if args.verify or args.against:
        anchors = []
        if args.against:
            anchors = read_anchors(args.against, folder.name)
            if not anchors:
                raise SpecError(
                    f"{', '.join(args.against)}: no audit head recorded for node '{folder.name}' (results "
                    "written before iaptnet recorded audit heads have none); give results of studies this node answered."
                )
        result = log.verify(anchors)
        if not result.ok:
            print(f"audit log FAILED after {result.entries} good entries: {result.problem}")
            return 1
        line = f"audit log OK: {result.entries} entries, chain intact, head {result.head}"
        if anchors:
            sources = len({a.source for a in anchors})
            line += f"; {result.anchored} audit heads recorded in {sources} results file{'s' * (sources != 1)} match"
        print(line)
        for repair in result.repairs:
            print(f"  crash repair recorded in {repair}")
        if result.pending:
            print(f"  note: {result.pending}")
        return 0
    damaged = False
    for number, entry, problem in log.scan():
        if entry is None:
            damaged = True
            print(f"error: {log.path}, line {number}: {problem}.", file=sys.stderr)
            continue
        if since is not None and entry_time(entry) < since:
            continue
        print(json.dumps(entry, sort_keys=True) if args.json else summarise(entry))
    return 1 if damaged else 0


def state_folder(policy, node: str | None) -> Path:
    base = Path(policy.state_dir)
    if node:
        folder = base / node
        if not (folder / "audit.jsonl").exists():
            raise SpecError(f"{policy.path}: no audit log for node '{node}' in {base}.")
        return folder
    found = sorted(p.parent for p in base.glob("*/audit.jsonl")) if base.exists() else []
    if not found:
        raise SpecError(f"{policy.path}: no audit log yet in {base} (the node has answered no task).")
    if len(found) > 1:
        raise SpecError(
            f"{policy.path}: the state folder {base} holds several nodes' logs "
            f"({', '.join(p.name for p in found)}); name one with --node."
        )
    return found[0]


def summarise(entry: dict) -> str:
    """One entry on one line: an entry `AuditLog.scan` read (a line whose fields have the
    types `entry_problem` checks; the listing reports any other line as damaged)."""
    if entry.get("kind") in ("audit.recovery", "audit.damage"):
        head = f"#{entry.get('seq')} {str(entry.get('time', ''))[:19]}Z {entry.get('kind')}"
        what = "; ".join(str(r.get("sentence", r.get("repair", ""))) for r in entry.get("repairs", []) or [])
        if entry.get("status") == "damaged":
            return f"{head}: DAMAGE FOUND {entry.get('damage', '')}" + (f"; {what}" if what else "")
        return f"{head}: RECOVERED after a crash: {what}"
    head = (
        f"#{entry.get('seq')} {entry.get('time', '')[:19]}Z {entry.get('kind', '')} "
        f"study {str(entry.get('study_hash', ''))[:12] or '-'} round {entry.get('round', 0)}"
    )
    status = entry.get("status")
    if status == "ok":
        released = entry.get("released", {})
        arrays = released.get("arrays", {})
        values = sum(math.prod(a.get("shape", [])) for a in arrays.values())
        return f"{head}: released {len(arrays)} arrays ({values} numbers) and {_count_leaves(released.get('payload', {}))} values"
    if status == "refused":
        from ..protocol.messages import render_refusal

        return f"{head}: REFUSED " + "; ".join(render_refusal(r) for r in entry.get("refusal", []))
    return f"{head}: ERROR {entry.get('code', '')}: {entry.get('error', '')}"


def _count_leaves(obj) -> int:
    """The values in a released payload (a list of numbers counts each); without recursion,
    since a payload nested as deep as the JSON reader allows must not stop the listing."""
    count, stack = 0, [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list) and item and isinstance(item[0], (dict, list)):
            stack.extend(item)
        else:
            count += len(item) if isinstance(item, list) else 1
    return count

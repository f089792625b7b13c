"""`iaptnet node ...`: the commands a Trust's operator runs on the node's own server."""

from __future__ import annotations

import argparse


def cmd_check(args) -> int:
    from .check import run_check

    text, ok = run_check(
        args.data,
        args.schema,
        table=args.table,
        query=args.query,
        appointments=args.appointments,
        appointments_table=args.appointments_table,
        appointments_query=args.appointments_query,
        services=_codes(args.services),
    )
    print(text)
    return 0 if ok else 1


def _codes(text: str | None) -> tuple[str, ...] | None:
    """--services RRP,TAF as declared codes (checked), or None."""
    if not text:
        return None
    from ..protocol.schema import check_service_codes

    return tuple(check_service_codes([c.strip() for c in text.split(",") if c.strip()], "--services"))


def cmd_start(args) -> int:
    from .config import load_node_file
    from .daemon import start

    return start(load_node_file(args.config), local_network=args.local_network)


def cmd_status(args) -> int:
    from .health import cmd_status as status

    return status(args)


def cmd_approve_app(args) -> int:
    from .config import approve, load_node_file, read_approved

    cfg = load_node_file(args.config)
    added = approve(cfg.approved_apps, args.hash, args.note or "")
    state = "approved" if added else "was already approved"
    print(
        f"app bundle {args.hash.strip().lower()} {state}; {len(read_approved(cfg.approved_apps))} approved in {cfg.approved_apps}."
    )
    return 0


def register(sub) -> None:
    node = sub.add_parser("node", help="commands for a Trust's node")
    node_sub = node.add_subparsers(dest="node_command", required=True)
    check = node_sub.add_parser("check", help="validate a data extract and report per column (counts only)")
    check.add_argument("--data", required=True, help="CSV or Parquet file, or an SQLAlchemy URL")
    check.add_argument("--schema", help="schema TOML (default: the built-in IAPT extract)")
    check.add_argument("--table", help="table name, for an SQL source")
    check.add_argument("--query", help="SQL query, for an SQL source")
    check.add_argument(
        "--appointments", help="the IAPT extract's appointment table (CSV, Parquet or an SQLAlchemy URL)"
    )
    check.add_argument("--appointments-table", help="table name, for an SQL appointment table")
    check.add_argument("--appointments-query", help="SQL query, for an SQL appointment table")
    check.add_argument(
        "--services",
        help="the ODS codes of the services whose referrals the extract holds, comma-separated, as node.toml "
        "declares them (default: whatever codes its service_id holds)",
    )
    check.set_defaults(fn=cmd_check)

    start = node_sub.add_parser("start", help="run the node daemon (a Flower SuperNode serving this Trust's data)")
    start.add_argument("--config", default="node.toml", help="node.toml")
    # Used by `iaptnet network up` only: a node of a local demo network may run without a
    # policy file (exploratory), and only when its hub is on this machine.
    start.add_argument("--local-network", action="store_true", help=argparse.SUPPRESS)
    start.set_defaults(fn=cmd_start)

    status = node_sub.add_parser(
        "status", help="one line on the node's health (daemon, hub contact, audit log); exit 0 when healthy"
    )
    status.add_argument("--config", default="node.toml", help="node.toml")
    status.add_argument(
        "--max-silence",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="unhealthy when the hub has not answered for this long (default 120)",
    )
    status.set_defaults(fn=cmd_status)

    approve_app = node_sub.add_parser(
        "approve-app", help="approve an app bundle hash (a release, from 'iaptnet app-hash')"
    )
    approve_app.add_argument("hash", help="the sha256 printed by 'iaptnet app-hash' for the release")
    approve_app.add_argument("--config", default="node.toml", help="node.toml")
    approve_app.add_argument("--note", help="a note kept beside the hash (who approved, which release)")
    approve_app.set_defaults(fn=cmd_approve_app)

    # Governance commands (approve studies, read and verify the audit log) live beside the
    # policy code that they drive.
    from . import governance_cli

    governance_cli.register(node_sub)

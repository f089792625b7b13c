"""`iaptnet node ...`: the commands a Trust's operator runs on the node's own server."""

from __future__ import annotations


def cmd_check(args) -> int:
    from .check import run_check

    text, ok = run_check(args.data, args.schema, table=args.table, query=args.query)
    print(text)
    return 0 if ok else 1


def register(sub) -> None:
    node = sub.add_parser("node", help="commands for a Trust's node")
    node_sub = node.add_subparsers(dest="node_command", required=True)
    check = node_sub.add_parser("check", help="validate a data extract and report per column (counts only)")
    check.add_argument("--data", required=True, help="CSV or Parquet file, or an SQLAlchemy URL")
    check.add_argument("--schema", help="schema TOML (default: the built-in IAPT extract)")
    check.add_argument("--table", help="table name, for an SQL source")
    check.add_argument("--query", help="SQL query, for an SQL source")
    check.set_defaults(fn=cmd_check)

    # Governance commands (approve studies, read and verify the audit log) live beside the
    # policy code that they drive.
    from . import governance_cli

    governance_cli.register(node_sub)

"""`iaptnet coordinator ...`: the commands the network's hub operator runs."""

from __future__ import annotations

import json
from pathlib import Path


def cmd_start(args) -> int:
    from .hub import load_hub_config, start_hub

    return start_hub(load_hub_config(args.config))


def cmd_register_node(args) -> int:
    from .hub import load_hub_config, register_node

    node_id = register_node(load_hub_config(args.config), args.name, Path(args.public_key))
    print(f"registered node '{args.name}' (Flower node id {node_id}); it can now connect with its private key.")
    return 0


def cmd_unregister_node(args) -> int:
    from .hub import load_hub_config, unregister_node

    unregister_node(load_hub_config(args.config), args.name)
    print(f"unregistered node '{args.name}'; its key can no longer connect.")
    return 0


def cmd_nodes(args) -> int:
    from .hub import load_hub_config, node_statuses, read_registry

    cfg = load_hub_config(args.config)
    registry = read_registry(cfg)
    statuses = node_statuses(cfg.flwr_home)
    rows = [
        {
            "name": name,
            "node_id": entry["node_id"],
            "status": statuses.get(entry["node_id"], "unknown"),
            "registered_at": entry["registered_at"],
        }
        for name, entry in sorted(registry.items())
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(f"{row['name']:<24} {row['status']:<10} node id {row['node_id']}  registered {row['registered_at']}")
        if not rows:
            print("no nodes registered")
    return 0


def register(sub) -> None:
    coord = sub.add_parser("coordinator", help="commands for the network's hub")
    csub = coord.add_subparsers(dest="coordinator_command", required=True)

    start = csub.add_parser("start", help="run the hub (Flower SuperLink, TLS and node authentication)")
    start.add_argument("--config", required=True, help="coordinator.toml")
    start.set_defaults(fn=cmd_start)

    reg = csub.add_parser("register-node", help="register a Trust's node public key")
    reg.add_argument("name", help="the node's name (as in its node.toml)")
    reg.add_argument("public_key", help="the node's public key file (NAME.pub from 'iaptnet pki node-key')")
    reg.add_argument("--config", required=True, help="coordinator.toml")
    reg.set_defaults(fn=cmd_register_node)

    unreg = csub.add_parser("unregister-node", help="remove a node's key (key rotation, a Trust leaving)")
    unreg.add_argument("name", help="the node's registered name")
    unreg.add_argument("--config", required=True, help="coordinator.toml")
    unreg.set_defaults(fn=cmd_unregister_node)

    nodes = csub.add_parser("nodes", help="list registered nodes and whether they are connected")
    nodes.add_argument("--config", required=True, help="coordinator.toml")
    nodes.add_argument("--json", action="store_true", help="print the list as JSON")
    nodes.set_defaults(fn=cmd_nodes)

"""`iaptnet pki ...`, `iaptnet network ...`, `iaptnet app-hash`: operators' tooling."""

from __future__ import annotations

from pathlib import Path


def cmd_pki_init(args) -> int:
    from ..keys import init_ca

    cert, key = init_ca(Path(args.dir), name=args.name, days=args.days, overwrite=args.force)
    print(f"network CA: {cert} (give it to every Trust and analyst) and {key} (keep it secret, offline if you can)")
    return 0


def cmd_pki_issue(args) -> int:
    from ..keys import issue_certificate

    cert, key = issue_certificate(
        Path(args.ca_dir),
        Path(args.out or args.ca_dir),
        args.host,
        name=args.name,
        days=args.days,
        overwrite=args.force,
    )
    print(f"hub certificate for {', '.join(args.host)}: {cert} and {key}")
    return 0


def cmd_pki_node_key(args) -> int:
    from ..keys import node_key

    key, pub = node_key(Path(args.out), args.name, overwrite=args.force)
    print(f"node key pair: {key} (stays at the Trust) and {pub} (send it to the coordinator to register)")
    return 0


def cmd_app_hash(args) -> int:
    from ..flower.bundle import release_hash

    print(release_hash())
    return 0


def cmd_network_up(args) -> int:
    from .launcher import up

    up(args.network, port=args.port, timeout=args.timeout, poll_active=args.poll_active, poll_idle=args.poll_idle)
    return 0


def cmd_network_down(args) -> int:
    from .launcher import down

    down(args.network)
    return 0


def register(sub) -> None:
    pki = sub.add_parser("pki", help="the network's CA, the hub certificate and node keys")
    psub = pki.add_subparsers(dest="pki_command", required=True)
    init = psub.add_parser("init", help="create the network CA (ca.crt, ca.key)")
    init.add_argument("--dir", default="pki", help="folder for ca.crt and ca.key")
    init.add_argument("--name", default="iaptnet network CA", help="the CA's common name")
    init.add_argument("--days", type=int, default=3650, help="days the CA certificate is valid")
    init.add_argument("--force", action="store_true", help="replace existing files")
    init.set_defaults(fn=cmd_pki_init)
    issue = psub.add_parser("issue", help="issue the hub's TLS certificate, signed by the CA")
    issue.add_argument(
        "--host",
        action="append",
        required=True,
        help="a DNS name or IP address the nodes use to reach the hub (repeat for several)",
    )
    issue.add_argument("--ca-dir", default="pki", help="the CA's folder")
    issue.add_argument("--out", help="folder for NAME.crt and NAME.key (default: the CA's folder)")
    issue.add_argument("--name", default="hub", help="file name (NAME.crt, NAME.key) and common name")
    issue.add_argument("--days", type=int, default=825, help="days the certificate is valid")
    issue.add_argument("--force", action="store_true", help="replace existing files")
    issue.set_defaults(fn=cmd_pki_issue)
    nkey = psub.add_parser("node-key", help="create a node's authentication key pair (NAME.key, NAME.pub)")
    nkey.add_argument("name", help="the node's name")
    nkey.add_argument("--out", default=".", help="folder for the key pair")
    nkey.add_argument("--force", action="store_true", help="replace existing files")
    nkey.set_defaults(fn=cmd_pki_node_key)

    network = sub.add_parser("network", help="a hub and node daemons on this machine (TLS, node auth)")
    nsub = network.add_subparsers(dest="network_command", required=True)
    nup = nsub.add_parser("up", help="start a hub and one node daemon per [[node]]; write hub.toml")
    nup.add_argument("network", help="network.toml")
    nup.add_argument("--port", type=int, help="the hub's port (default: a free one)")
    nup.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the nodes")
    nup.add_argument(
        "--poll-active",
        type=float,
        default=None,
        help="the nodes' polling interval during a study (default: 0.1 s up to 3 nodes, N/8 s up to 1 s beyond)",
    )
    nup.add_argument(
        "--poll-idle",
        type=float,
        default=None,
        help="the nodes' polling interval between studies (default: 0.25 s up to 3 nodes, 1 s beyond)",
    )
    nup.set_defaults(fn=cmd_network_up)
    ndown = nsub.add_parser("down", help="stop the processes 'network up' started for this file")
    ndown.add_argument("network", help="network.toml")
    ndown.set_defaults(fn=cmd_network_down)

    app_hash = sub.add_parser("app-hash", help="print the sha256 of the installed release's app bundle")
    app_hash.set_defaults(fn=cmd_app_hash)

"""The `iaptnet` command line.

Every user mistake ends as one sentence on stderr and a non-zero exit, never a traceback.
Long work shows progress on a terminal and stays quiet with --json. Every option says what it
is for and shows its default.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

# Flower must never phone home from anything we run.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

from .protocol.errors import IaptnetError  # noqa: E402


def _study_names(paths: list[str]) -> list[str | None]:
    """Each study file's `name` as written (None where it has none: loading it says so)."""
    from .protocol.tomlfile import read_toml

    names = [read_toml(p, "study file").get("name") for p in paths]
    return [n if isinstance(n, str) else None for n in names]


def cmd_run(args) -> int:
    from .coordinator.outputs import check_out_folder, results_paths, write_json_atomic

    if args.engine == "flower":
        if not args.hub:
            raise IaptnetError("iaptnet run: --hub HUB.toml is required for the flower engine.")
    elif not args.network:
        raise IaptnetError("iaptnet run: --network NETWORK.toml is required for the in-process engine.")
    if args.workers is not None and (args.workers < 1 or args.engine == "flower"):
        raise IaptnetError("iaptnet run: --workers expects a whole number of 1 or more, with the in-process engine.")
    if args.out:
        check_out_folder(Path(args.out))
    if args.out and len(args.study) > 1:
        # Two studies writing one folder is found now, not after an hour of rounds.
        named = [(n, p) for n, p in zip(_study_names(args.study), args.study) if n is not None]
        results_paths(Path(args.out), [n for n, _ in named], [p for _, p in named])
    from .progress import LiveProgress

    with LiveProgress.for_terminal(quiet=args.quiet or args.json) as live:
        live.stage(f"running {len(args.study)} stud{'y' if len(args.study) == 1 else 'ies'}")
        if args.engine == "flower":
            from .coordinator.engines.flower import run_flower

            results = run_flower(args.study, args.hub, progress=live.round, status=live.update, out=args.out)
        else:
            from .coordinator.inprocess import run_inprocess, usable_cores

            results = run_inprocess(
                args.study,
                args.network,
                progress=live.round,
                announce=live.stage,
                out=args.out,
                workers=args.workers or usable_cores(),
            )
    if args.out:
        out = Path(args.out)
        if len(results) == 1:
            writes = [(out / "results.json", results[0])]
        else:
            writes = zip(results_paths(out, [r["study"] for r in results], args.study), results)
        for path, result in writes:
            try:
                write_json_atomic(path, result)
            except OSError as exc:
                raise IaptnetError(f"{path}: the results cannot be written ({exc.strerror or exc}).") from None
        report = _write_report(out)
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results, indent=2))
    else:
        from .coordinator.results import render_report

        for result in results:
            print(render_report(result))
            print()
        if args.out:
            print(f"results written to {args.out}; report: {report}")
    return 0


def _write_report(folder: Path, out: Path | None = None) -> Path:
    from .report import write_report

    try:
        return write_report(folder, out).html
    except OSError as exc:
        raise IaptnetError(f"{exc.filename or folder}: the report cannot be written ({exc.strerror or exc}).") from None


def cmd_report(args) -> int:
    path = _write_report(Path(args.folder), Path(args.out) if args.out else None)
    print(f"report: {path} (tables in {path.parent / 'tables'} and {path.parent / 'tables.xlsx'})")
    return 0


def cmd_demo(args) -> int:
    from .coordinator.demo import run_demo

    return run_demo(
        Path(args.out),
        cache=Path(args.cache) if args.cache else None,
        json_mode=args.json,
        quiet=args.quiet,
        patients=args.patients,
        seed=args.seed,
    )


def cmd_synth(args) -> int:
    from .synth import generate_network

    path = generate_network(
        Path(args.out),
        services=args.services,
        patients=args.patients,
        seed=args.seed,
        fmt=args.format,
        appointments=args.appointments,
    )
    also = " with their appointment tables" if args.appointments else ""
    print(f"wrote {args.patients:,} referrals for {args.services} services{also}; network file {path}")
    return 0


DESCRIPTION = """iaptnet: a federated analysis network for NHS Talking Therapies (IAPT) services.
Each service runs a node next to its own records and releases only aggregates, under a
disclosure policy the Trust controls; a coordinator combines them into estimates identical to
a regression on the pooled rows. Documentation: docs/ (make docs), starting at docs/index.md."""


class _DefaultsFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows an option's default after its help, when it has a meaningful one."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (
            "%(default)" not in text
            and action.option_strings
            and default not in (None, False, argparse.SUPPRESS)
            and not isinstance(default, bool)
        ):
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """Every parser and sub-parser shows defaults (sub-parsers are made of the parent's class)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="iaptnet", description=DESCRIPTION)
    parser.add_argument(
        "--version",
        action="version",
        version=f"iaptnet {__import__('iaptnet').__version__}",
        help="print the installed release and exit",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log detail to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one or more studies and write results.json")
    run.add_argument("study", nargs="+", help="study TOML file(s); several share rounds")
    run.add_argument("--network", help="network.toml (in-process engine)")
    run.add_argument(
        "--engine",
        default="inprocess",
        choices=["inprocess", "flower"],
        help="inprocess: the nodes of a network file on this machine; flower: a real hub",
    )
    run.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="in-process engine: worker processes the nodes answer in (default: one per core; 1: in this process)",
    )
    run.add_argument("--hub", help="hub.toml: the hub's address and CA certificate (flower engine)")
    run.add_argument("--out", help="folder for results.json, report.html and the report's tables")
    run.add_argument("--json", action="store_true", help="print results as JSON, no progress")
    run.add_argument("--quiet", action="store_true", help="no progress display (it shows only on a terminal)")
    run.set_defaults(fn=cmd_run)

    report = sub.add_parser(
        "report", help="render the HTML report (and its CSV and XLSX tables) of a results folder again"
    )
    report.add_argument("folder", help="the --out folder of iaptnet run or iaptnet demo; no node is asked anything")
    report.add_argument("--out", help="the report's file (default: FOLDER/report.html; tables go beside it)")
    report.set_defaults(fn=cmd_report)

    demo = sub.add_parser("demo", help="synthesise the paper-scale network and run the catalogue")
    demo.add_argument(
        "--out",
        default="demo-out",
        help="folder for report.html, summary.json, secondary.json and each study's results",
    )
    demo.add_argument("--cache", help="folder for the cached synthetic network")
    demo.add_argument(
        "--patients",
        type=int,
        default=483_683,
        help="referrals in the synthetic network, at least the paper's 483,683 (on fewer, nodes refuse some studies)",
    )
    demo.add_argument(
        "--seed", type=int, default=None, help="the synthetic network's seed (default: the paper's, 20210901)"
    )
    demo.add_argument("--json", action="store_true", help="print the findings as JSON, no progress")
    demo.add_argument("--quiet", action="store_true", help="no progress display (it shows only on a terminal)")
    demo.set_defaults(fn=cmd_demo)

    synth = sub.add_parser("synth", help="write a synthetic network of service extracts")
    synth.add_argument("--out", required=True, help="folder for the extracts and network.toml")
    synth.add_argument("--services", type=int, default=8, help="services (nodes) in the network")
    synth.add_argument("--patients", type=int, default=483_683, help="referrals over all services")
    synth.add_argument("--seed", type=int, default=20210901, help="random seed (the same seed gives the same data)")
    synth.add_argument("--format", choices=["parquet", "csv"], default="parquet", help="file format of the extracts")
    synth.add_argument(
        "--appointments",
        action="store_true",
        help="write each service's pathway columns as an appointment table (one row per contact)",
    )
    synth.set_defaults(fn=cmd_synth)

    # Each side registers its own commands: the node's in node/cli.py, the hub's in
    # coordinator/cli.py, operators' tooling (keys, local networks) in ops/cli.py.
    from .coordinator import cli as coordinator_cli
    from .node import cli as node_cli
    from .ops import cli as ops_cli

    node_cli.register(sub)
    coordinator_cli.register(sub)
    ops_cli.register(sub)
    return parser


def one_line(text: str) -> str:
    """The sentence as one printable line: a control or bidirectional-override character that
    came from a file (a field's value quoted back) is shown escaped, so it can neither break
    the line nor take over the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _not_from_nodes(record: logging.LogRecord) -> bool:
    return not record.name.startswith("iaptnet.node")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    before = list(logging.root.handlers)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose and args.fn in (cmd_run, cmd_demo):
        # The in-process nodes report to the coordinator, whose one sentence says what they
        # said; their own log (a policy they cannot read, a task they could not compute)
        # would repeat it beside it. -v shows it, as a node daemon's log does.
        for handler in logging.root.handlers:
            if handler not in before:
                handler.addFilter(_not_from_nodes)
    try:
        return args.fn(args)
    except IaptnetError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""Latency of the real network on localhost: seconds a round and the whole D1 study.

For 3 and 8 nodes (synthetic services of ~60,000 referrals each; 8 nodes is the paper-scale
483,683), starts a real network with `iaptnet network up` (hub + node daemons, TLS, node
authentication), runs the D1 study (iaptnet/catalogue/d1_sessions.toml) `--repeat` times through
the flower engine, then stops the network; once with flwr 1.42's own timings ("before":
IAPTNET_STOCK_FLOWER_TIMING=1 keeps its 3 s idle poll, 0.5 s reply check, 1 s+ pull backoffs,
1 s dispatch poll) and once with iaptnet's adaptations ("after": flower/supernode.py).

Both keep what is not a timing: the warm worker (with flwr's stock one-process-per-message the
node loses the prepared study between rounds and the GLM cannot run at all; docs/reference/flower.md#latency has
that path at 7-10 s a round with 3 nodes), one record per message (flower/frame.py) and
the hub's in-memory state (coordinator.toml `database = "memory"`).

Per configuration it prints: the median seconds a round (from the ServerApp's own event
timestamps: a round starts when its tasks are pushed and ends when the last node's reply is
pulled), the median of the D1 study on the hub (first task pushed to results) and of the whole
run seen from the analyst's process (submit to results), and the rounds D1 took. Then, for the
issue's end-to-end goal, the median of `--repeat` runs of `iaptnet run D1 --engine flower` and
of `iaptnet run D1` in-process on a fresh copy of the same services (no release memory), each a
new process as a user runs it, interleaved, and their ratio.
These machines are shared and noisy: compare the before/after of one run, not seconds across
runs.

    .venv/bin/python bench/bench_latency.py [--nodes 3 8] [--repeat 3] [--patients-per-node 60000]
                                            [--only before|after] [--poll-active 0.1 0.25]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from iaptnet.coordinator.catalogue import catalogue_paths
from iaptnet.coordinator.engines import flower as engine
from iaptnet.flower import pins
from iaptnet.ops import launcher
from iaptnet.synth import generate_network

D1 = next(p for p in catalogue_paths() if p.stem == "d1_sessions")


def follow(hub_toml: Path, study: Path) -> dict:
    """Run `study` on the hub through the flower engine; its results, the whole run's wall
    seconds, and each round's span (first task pushed, last reply pulled: the ServerApp's own
    event timestamps) and the ServerApp's last act (results sent)."""
    hub = engine.load_hub_file(hub_toml)
    entries = engine.study_entries([study], hub)
    started = time.monotonic()
    run = engine.FlowerRun(hub)
    run.submit_and_follow(entries)
    status, details = run.outcome()
    wall = time.monotonic() - started
    if run.error or status != "finished:completed" or not run.results:
        raise SystemExit(f"{study.stem} failed: {run.error or details or status}")
    events = [json.loads(base64.b64decode(b)) for line in run.log_lines for b in engine._EVENT.findall(line)]
    # A round is one conversation's (glm, glmm, ...: the task kind's prefix) round number: D1's
    # random-intercept companion counts its rounds from 1 again after the GLMs' rounds.
    rounds: dict[tuple[str, int], list[float]] = {}
    for e in events:
        if e["event"] == "progress":
            rounds.setdefault((e["kind"].split(".")[0], e["round"]), []).append(e["t"])
    return {
        "result": run.results[0],
        "wall": wall,
        "spans": sorted((min(ts), max(ts)) for ts in rounds.values()),
        "done": max(e["t"] for e in events if e["event"] == "result"),
    }


def run_once(hub_toml: Path) -> dict:
    one = follow(hub_toml, D1)
    return {
        "rounds": [t1 - t0 for t0, t1 in one["spans"]],
        "study": one["done"] - one["spans"][0][0],
        "wall": one["wall"],
        "n_rounds": len(one["spans"]),
        "beta": one["result"]["exposure_term"]["estimate"],
    }


def cli_seconds(*args: str) -> float:
    """Wall seconds of one `iaptnet run ...` as a user runs it (a new process: imports included)."""
    iaptnet = Path(sys.executable).parent / "iaptnet"
    started = time.monotonic()
    proc = subprocess.run([str(iaptnet), "run", *args, "--quiet"], capture_output=True, text=True)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"iaptnet run {' '.join(args)} failed: {proc.stderr.strip()[-500:]}")
    return wall


def inprocess_seconds(network: Path) -> float:
    """D1 through the in-process CLI on a fresh copy of the network (no release memory)."""
    with tempfile.TemporaryDirectory(prefix="bench-latency-inprocess-") as tmp:
        copy = Path(tmp) / "net"
        shutil.copytree(network.parent, copy, ignore=shutil.ignore_patterns(launcher.STATE_DIR, ".iaptnet-state"))
        return cli_seconds(str(D1), "--network", str(copy / network.name))


def measure(network: Path, nodes: int, stock: bool, repeat: int, poll_active: float | None = None) -> dict:
    """`poll_active` None: what `iaptnet network up` picks for this many nodes."""
    env_key = pins.STOCK_TIMING_ENV
    saved = os.environ.get(env_key)
    if stock:
        os.environ[env_key] = "1"
    else:
        os.environ.pop(env_key, None)
    try:
        launcher.up(network, timeout=600, echo=lambda *_: None, poll_active=poll_active)
        try:
            run_once(network.parent / "hub.toml")  # warm-up: first load of the data, caches
            runs = [run_once(network.parent / "hub.toml") for _ in range(repeat)]
            # The same D1 through the command line, on the hub and in-process, interleaved
            # (the in-process runs share the machine with the idle network).
            cli_flower, cli_local = [], []
            for _ in range(repeat):
                cli_flower.append(cli_seconds(str(D1), "--engine", "flower", "--hub", str(network.parent / "hub.toml")))
                cli_local.append(inprocess_seconds(network))
        finally:
            launcher.down(network, echo=lambda *_: None)
    finally:
        if saved is None:
            os.environ.pop(env_key, None)
        else:
            os.environ[env_key] = saved
    rounds = [r for run in runs for r in run["rounds"]]
    config = "before (flwr 1.42 timings)" if stock else "after (iaptnet adaptations)"
    if not stock and poll_active is not None:
        config += f", poll_active {poll_active:g} s"
    return {
        "nodes": nodes,
        "config": config,
        "poll_active": poll_active,
        "round_median": statistics.median(rounds),
        "study_median": statistics.median(r["study"] for r in runs),
        "wall_median": statistics.median(r["wall"] for r in runs),
        "rounds": runs[0]["n_rounds"],
        "beta": runs[0]["beta"],
        "cli_flower": statistics.median(cli_flower),
        "cli_local": statistics.median(cli_local),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[3, 8])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--patients-per-node", type=int, default=60_000)
    parser.add_argument("--seed", type=int, default=20210901)
    parser.add_argument("--work", help="folder for the synthetic networks (default: a temporary one)")
    parser.add_argument("--only", choices=["before", "after"], help="measure one configuration only")
    parser.add_argument(
        "--poll-active",
        type=float,
        nargs="+",
        default=None,
        help="node.toml tuning.poll_active values to measure 'after' with (default: what "
        "`iaptnet network up` picks, 0.1 s for up to 3 nodes)",
    )
    args = parser.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-latency-"))
    rows = []
    for nodes in args.nodes:
        folder = work / f"net{nodes}"
        network = folder / "network.toml"
        if not network.exists():
            print(f"synthesising {nodes} services x {args.patients_per_node:,} referrals in {folder}", file=sys.stderr)
            generate_network(folder, services=nodes, patients=nodes * args.patients_per_node, seed=args.seed)
        configs = [(True, None)] + [(False, poll) for poll in (args.poll_active or [None])]
        for stock, poll in configs:
            if args.only and (args.only == "before") != stock:
                continue
            print(
                f"{nodes} nodes, {'before' if stock else 'after'}"
                f"{'' if poll is None else f' (poll_active {poll:g} s)'}: measuring",
                file=sys.stderr,
            )
            row = measure(network, nodes, stock, args.repeat, poll)
            rows.append(row)
            print(
                f"  {row['round_median']:.2f} s a round, D1 {row['study_median']:.1f} s on the hub, "
                f"{row['wall_median']:.1f} s end to end, {row['rounds']} rounds; through the CLI "
                f"{row['cli_flower']:.1f} s on the hub, {row['cli_local']:.1f} s in-process",
                file=sys.stderr,
            )
    print(
        "\n| nodes | configuration | median s/round | D1 on the hub (s) | D1 end to end (s) | D1 rounds "
        "| `iaptnet run` on the hub (s) | `iaptnet run` in-process (s) | × in-process |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['nodes']} | {r['config']} | {r['round_median']:.2f} | {r['study_median']:.1f} | "
            f"{r['wall_median']:.1f} | {r['rounds']} | {r['cli_flower']:.1f} | {r['cli_local']:.1f} | "
            f"{r['cli_flower'] / r['cli_local']:.2f} |"
        )
    by = {
        (r["nodes"], r["config"].split()[0]): r
        for r in rows
        if r["poll_active"] is None or r["config"].startswith("before")
    }
    for nodes in args.nodes:
        if (nodes, "before") in by and (nodes, "after") in by:
            b, a = by[(nodes, "before")], by[(nodes, "after")]
            assert b["beta"] == a["beta"], "both configurations must give the same D1 estimate"
            print(
                f"{nodes} nodes: a round {b['round_median'] / a['round_median']:.1f}x faster, "
                f"D1 end to end {b['wall_median'] / a['wall_median']:.1f}x faster"
            )


if __name__ == "__main__":
    main()

"""Freeze and thaw a node daemon again and again: how often does the network recover?

Starts a real network on localhost (`iaptnet network up`: a hub and `--nodes` node daemons,
TLS, node authentication), then `--tries` times:

1. submits a logistic study that may go on without one node (`min_nodes` = nodes - 1);
2. freezes one node's process group (SIGSTOP) at an instant that rotates between tries: the
   moment it has answered the prepare, the moment it has sent a round's reply, or 0-8 s into
   the study; holds it `--hold` seconds (past the node timeout, so the study drops it and
   finishes without it), then thaws it (SIGCONT);
3. runs the next study on every node. It must complete with the thawed node contributing:
   "recovered in place". If the node ended itself instead (its watchdog: exit code 75 and a
   line in its log), the script starts it again, as systemd's Restart= would, and the next
   study must complete: "restarted itself". Anything else is "NOT recovered".

It prints a line per try (what the node's log says it did: a suspension seen by the watchdog,
a reply given up, a reconnection) and the totals. The issue this answers (13) saw 3 of 7
freezes leave a node online but answering nothing, for good.

    .venv/bin/python bench/bench_freeze.py [--tries 20] [--nodes 3] [--hold 15] [--node-timeout 10]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

from iaptnet.coordinator.engines.flower import run_flower
from iaptnet.ops import launcher
from iaptnet.protocol.errors import IaptnetError

SCHEMA = """[columns.y]
type = "binary"

[columns.x]
type = "numeric"

[columns.g]
type = "categorical"
levels = ["a", "b", "c"]
"""


# Two studies a try: more than exploratory mode's 25 studies a day (node/policy.py).
POLICY = """mode = "exploratory"
state_dir = "state"

[rules]
max_studies_per_day = 1000

[exploratory]
max_studies_per_day = 1000
"""


def write_network(folder: Path, nodes: int, rows: int = 400) -> Path:
    rng = np.random.default_rng(7)
    (folder / "schema.toml").write_text(SCHEMA)
    (folder / "policy.toml").write_text(POLICY)
    entries = []
    for i in range(nodes):
        x = rng.normal(size=rows)
        g = rng.choice(["a", "b", "c"], size=rows)
        eta = -0.2 + 0.8 * x + pd.Series(g).map({"a": 0.0, "b": 0.4, "c": -0.5}).to_numpy()
        y = (rng.random(rows) < 1 / (1 + np.exp(-eta))).astype(int)
        pd.DataFrame({"y": y, "x": x, "g": g}).to_csv(folder / f"site{i}.csv", index=False)
        entries.append(
            f'[[node]]\nname = "site{i}"\ndata = "site{i}.csv"\nschema = "schema.toml"\npolicy = "policy.toml"\n'
        )
    (folder / "network.toml").write_text("\n".join(entries))
    return folder / "network.toml"


def write_study(folder: Path, name: str, **extra) -> Path:
    lines = [f'name = "{name}"', 'family = "binomial"', 'formula = "y ~ x + g"']
    lines += [f"{k} = {v}" for k, v in extra.items()]
    path = folder / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


class Bench:
    def __init__(self, folder: Path, args):
        self.folder = folder
        self.args = args
        self.network = write_network(folder, args.nodes)
        self.record = launcher.up(self.network, timeout=240, node_timeout=args.node_timeout, echo=lambda *_: None)
        self.hub = Path(self.record["hub_toml"])
        self.logs = folder / launcher.STATE_DIR / "logs"

    def pid(self, name: str) -> int:
        return next(p["pid"] for p in self.record["processes"] if p["name"] == name)

    def log_size(self, name: str) -> int:
        return (self.logs / f"{name}.log").stat().st_size

    def since(self, name: str, offset: int) -> str:
        with open(self.logs / f"{name}.log", errors="replace") as fh:
            fh.seek(offset)
            return fh.read()

    def restart_node(self, name: str, offset: int) -> None:
        node_toml = self.folder / launcher.STATE_DIR / "nodes" / name / "node.toml"
        with open(self.logs / f"{name}.log", "ab") as fh:
            fh.write(b"--- started again by bench_freeze (as systemd would) ---\n")
            fh.flush()
            proc = subprocess.Popen(
                [sys.executable, "-m", "iaptnet.cli", "node", "start", "--config", str(node_toml), "--local-network"],
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
            )
        for entry in self.record["processes"]:
            if entry["name"] == name:
                entry["pid"] = proc.pid
        (self.folder / launcher.STATE_DIR / launcher.PROCESSES).write_text(__import__("json").dumps(self.record))
        deadline = time.monotonic() + 120
        while "SuperNode ID" not in self.since(name, offset).rsplit("started again by bench_freeze", 1)[-1]:
            if time.monotonic() > deadline:
                raise SystemExit(f"{name} started again did not connect; see {self.logs / (name + '.log')}")
            time.sleep(0.2)

    def freeze_when(self, name: str, trigger: str, offset: int, started: threading.Event, done: threading.Event):
        pid = self.pid(name)
        delay = random.uniform(0.0, 8.0)
        t0 = None
        while not done.is_set():
            said = self.since(name, offset)
            if trigger == "prepare" and f"node {name} answered glm.prepare" in said:
                break
            if trigger == "reply" and said.count("Sent successfully") >= 2:
                break
            if trigger == "random" and started.is_set():
                t0 = t0 or time.monotonic()
                if time.monotonic() - t0 >= delay:
                    break
            time.sleep(0.005)
        else:
            return None
        os.killpg(pid, signal.SIGSTOP)
        time.sleep(self.args.hold)
        os.killpg(pid, signal.SIGCONT)
        return True

    def one_try(self, k: int) -> str:
        name = f"site{self.args.nodes - 1 - k % self.args.nodes}"
        trigger = ("prepare", "reply", "random")[k % 3]
        offset = self.log_size(name)
        pid = self.pid(name)
        started, done = threading.Event(), threading.Event()
        fired = []
        freezer = threading.Thread(
            target=lambda: fired.append(self.freeze_when(name, trigger, offset, started, done)), daemon=True
        )
        freezer.start()
        started.set()
        first = "completed"
        try:
            result = run_flower([write_study(self.folder, f"f{k}", min_nodes=self.args.nodes - 1)], self.hub)[0]
            if {n["name"]: n["contributed"] for n in result["nodes"]}.get(name):
                first = "completed (the node answered in time)"
        except IaptnetError as exc:
            first = f"failed: {exc}"
        done.set()
        freezer.join(self.args.hold + 30)
        time.sleep(1.0)
        how = "recovered in place"
        if not alive(pid):
            if "the watchdog ends the daemon (exit code 75)" not in self.since(name, offset):
                return f"{name} ({trigger}): NOT recovered: the node exited without its watchdog's line"
            how = "restarted itself (watchdog, exit 75)"
            self.restart_node(name, offset)
        t0 = time.monotonic()
        try:
            result = run_flower([write_study(self.folder, f"a{k}")], self.hub)[0]
        except IaptnetError as exc:
            return f"{name} ({trigger}): NOT recovered: the next study failed: {exc}"
        if not all(n["contributed"] for n in result["nodes"]):
            return f"{name} ({trigger}): NOT recovered: the next study went without a node"
        said = self.since(name, offset)
        notes = [
            note
            for note, mark in (
                ("suspension seen", "was suspended for about"),
                ("reply given up", "no reply to message"),
                ("reconnected", "the connection to the hub ended"),
            )
            if mark in said
        ]
        frozen = "frozen" if fired and fired[0] else "not frozen (the study ended first)"
        return (
            f"{name} ({trigger}, {frozen}): {how}; first study {first}; next study in "
            f"{time.monotonic() - t0:.1f} s" + (f" [{', '.join(notes)}]" if notes else "")
        )

    def down(self) -> None:
        launcher.down(self.network, echo=lambda *_: None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tries", type=int, default=20)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--node-timeout", type=float, default=10.0)
    parser.add_argument("--hold", type=float, default=None, help="seconds frozen (default: node timeout + 5)")
    parser.add_argument("--seed", type=int, default=13)
    args = parser.parse_args()
    args.hold = args.node_timeout + 5.0 if args.hold is None else args.hold
    random.seed(args.seed)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    with tempfile.TemporaryDirectory(prefix="bench-freeze-") as tmp:
        bench = Bench(Path(tmp), args)
        outcomes = []
        try:
            for k in range(args.tries):
                line = bench.one_try(k)
                outcomes.append(line)
                print(f"try {k + 1:2d}/{args.tries}: {line}", flush=True)
        finally:
            bench.down()
    in_place = sum("recovered in place" in o for o in outcomes)
    restarted = sum("restarted itself" in o for o in outcomes)
    print(
        f"\n{in_place + restarted} of {len(outcomes)} recovered ({in_place} in place, {restarted} restarted "
        f"themselves); {len(outcomes) - in_place - restarted} not recovered "
        f"({args.nodes} nodes, frozen {args.hold:g} s, node timeout {args.node_timeout:g} s)"
    )


if __name__ == "__main__":
    main()

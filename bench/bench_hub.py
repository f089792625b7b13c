"""The hub at national scale: what a round costs the real hub with 32, 64 and 128 nodes.

The hub is the one `iaptnet network up` starts (`iaptnet coordinator start`: Flower's
SuperLink with TLS and node authentication, every node's key registered, the ServerApp of
each run started by it from the installed release). The nodes are stand-ins that compute
nothing: each speaks Flower 1.42's node protocol over HTTPS with its own registered key, as
the SuperNode does (activate, poll for messages with the node's own polling timings and held
polls, fetch the run once and its bundle only if it is not the installed release, pull the
message's objects, confirm, push the reply and its objects),
and answers with the reply the real node gave to the same task. Those replies are recorded
first by running the same study on the same data through the in-process engine; a stand-in
only puts the task's id into its recorded reply. So the hub's ServerApp runs the real study
(here D1 on the synthetic national network, as bench/bench_national.py fits it), with real
message sizes (a GLM reply carries its p x p information matrix: 178 coefficients), and its
results are the in-process ones.

For each node count (the first N services of the 128-service network), the script starts the
hub, registers N keys, starts the stand-ins (in `--workers` processes of threads), runs the
study `--repeat` times through `iaptnet run`'s Flower engine, and stops everything. While a
run goes it samples the CPU time of the hub's processes (the SuperLink and the run's ServerApp)
every 0.1 s. Per node count it prints the median per round of: the hub's wall time (from the
ServerApp's own event timestamps: tasks pushed to the last reply pulled), the hub's CPU
seconds in that time, and the requests the stand-ins made; then the cost of each added node
(least squares over the node counts). Everything runs on this machine: the stand-ins share its
cores with the hub, so the wall time is an upper bound of what a hub on its own machine takes;
its CPU time is what a hub machine must have. `--nice 19` runs the stand-ins at the lowest
priority, so that when the hub and the stand-ins both want a core the hub gets it, nearer to
nodes on machines of their own (the stand-ins still take the cores whenever the hub waits).

    .venv/bin/python bench/bench_hub.py [--nodes 32 64 128] [--repeat 3] [--workers 2]
                                        [--poll-active 0.25] [--poll-idle 1.0] [--hold 10]
                                        [--nice 0]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

BENCH = Path(__file__).resolve().parent


# --------------------------------------------------------------------------------------------
# The recorded replies


def subset_network(full: Path, n: int, folder: Path) -> Path:
    """A network file of the first `n` nodes of `full`, with absolute data paths."""
    import tomllib

    import tomli_w

    raw = tomllib.loads(full.read_text())
    nodes = []
    for node in raw["node"][:n]:
        node = dict(node)
        node["data"] = str((full.parent / node["data"]).resolve())
        nodes.append(node)
    path = folder / f"network-{n}.toml"
    path.write_text(tomli_w.dumps({**{k: v for k, v in raw.items() if k != "node"}, "node": nodes}))
    return path


def record_replies(network: Path, study: Path, state: Path) -> tuple[dict, dict]:
    """Run `study` on `network` in-process; return each node's replies ({(node, kind): [bytes
    of the reply's RecordDict, in order]}) and the results."""
    os.environ["IAPTNET_STATE_DIR"] = str(state)  # a fresh memory of releases for the nodes
    from flwr.common.serde import recorddict_to_proto

    from iaptnet.coordinator.engines.inprocess import InProcessGrid
    from iaptnet.coordinator.network import load_network
    from iaptnet.coordinator.runner import run_batch
    from iaptnet.coordinator.studies import load_study
    from iaptnet.node.app import app as node_app
    from iaptnet.protocol import messages as m

    replies: dict[tuple[str, str], list[bytes]] = defaultdict(list)
    lock = threading.Lock()

    def recorder(message, context):
        reply = node_app(message, context)
        kind, _ = m.peek_task(message.content)
        with lock:
            replies[(context.node_config["name"], kind)].append(recorddict_to_proto(reply.content).SerializeToString())
        return reply

    loaded = load_network(network)
    studies = [load_study(study, loaded.schema_paths, list(loaded.services))]
    results = run_batch(InProcessGrid(loaded.nodes, client_app=recorder), studies, engine="inprocess")
    return dict(replies), results[0]


# --------------------------------------------------------------------------------------------
# The stand-in nodes (run as `bench_hub.py --stand-ins SPEC.json` in their own processes)


class StandIn(threading.Thread):
    """One node: Flower's own fleet connection (`http_request_response`, the SuperNode's), the
    SuperNode's message handling without its local state and runtime API, and iaptnet's
    polling timings (`supernode.SleepPolicy`)."""

    def __init__(self, name: str, key: Path, spec: dict, replies: dict, stop: threading.Event):
        super().__init__(name=f"stand-in-{name}", daemon=True)
        self.node, self.key, self.spec, self.replies, self.stop = name, key, spec, replies, stop
        self.requests = 0
        self.answered = 0
        self.error = ""

    def run(self) -> None:
        try:
            self._serve()
        except Exception as exc:  # noqa: BLE001 - reported by the parent
            self.error = f"{type(exc).__name__}: {exc}"

    def _serve(self) -> None:
        from cryptography.hazmat.primitives.serialization import load_ssh_private_key
        from flwr.app import Message
        from flwr.common.serde import recorddict_from_proto
        from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
        from flwr.supercore.inflatable.inflatable_object import (
            get_all_nested_objects,
            get_object_tree,
            iterate_object_tree,
        )
        from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents, pull_objects
        from flwr.supernode.fleet_http_connection import http_request_response

        from iaptnet.flower.bundle import release_hash
        from iaptnet.flower.frame import pack, unpack
        from iaptnet.flower.supernode import SleepPolicy, local_release_fab
        from iaptnet.protocol import messages as m

        private = load_ssh_private_key(self.key.read_bytes(), password=None)
        policy = SleepPolicy(
            idle_poll=self.spec["poll_idle"], active_poll=self.spec["poll_active"], hold=self.spec["hold"]
        )
        served = defaultdict(int)
        runs: set[int] = set()
        with http_request_response(
            self.spec["address"], False, self.spec["ca_cert"], authentication_keys=(private, private.public_key())
        ) as (_node_id, receive, send, get_run, get_fab, pull_object, push_object, confirm):
            fab = local_release_fab(get_fab)  # as the node daemon's SuperNode (flower/supernode.py)
            while not self.stop.is_set():
                self.requests += 1
                t0 = time.monotonic()
                received = receive()
                policy.polled(time.monotonic() - t0, received is None)  # as the SuperNode's loop tells it
                if received is None:
                    time.sleep(policy.cap(3.0))  # what flwr asks for after an empty poll
                    continue
                message, tree = received
                run_id = message.metadata.run_id
                policy.touch(run_id)
                if run_id not in runs:  # the SuperNode fetches a new run once
                    run = get_run(run_id)
                    fab(run.fab_hash, run_id)  # (its bundle only if not the installed release)
                    self.requests += 1 + (run.fab_hash != release_hash())
                    runs.add(run_id)
                ids = [t.object_id for t in iterate_object_tree(tree)]
                contents = pull_objects(ids, pull_object_fn=lambda oid, r=run_id: pull_object(r, oid))
                confirm(run_id, message.metadata.message_id)
                self.requests += len(ids) + 1
                task = unpack(inflate_object_from_contents(message.metadata.message_id, contents).content)
                kind, task_id = m.peek_task(task)
                recorded = self.replies[(self.node, kind)][served[run_id, kind]]
                served[run_id, kind] += 1
                proto = ProtoRecordDict()
                proto.ParseFromString(recorded)
                content = recorddict_from_proto(proto)
                content.config_records["reply"]["task_id"] = task_id
                reply = Message(pack(content), reply_to=message)
                reply.metadata.__dict__["_message_id"] = reply.object_id  # as flwr's ClientApp runtime does
                objects = get_all_nested_objects(reply)
                wanted, session = send(reply, get_object_tree(reply), 0.0)
                for oid in [oid for oid in objects if oid in wanted]:
                    push_object(run_id, session, oid, objects[oid].deflate())
                self.requests += 1 + len(wanted)
                self.answered += 1
                policy.replied()  # as the SuperNode's _push_messages tells it (flower/supernode.py)


def stand_ins_main(spec_path: Path) -> None:
    from iaptnet.flower.supernode import install_pull_hold

    spec = json.loads(spec_path.read_text())
    install_pull_hold(spec["hold"])  # as the node daemon does (flower/supernode.py)
    replies = pickle.loads(Path(spec["replies"]).read_bytes())
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    nodes = [StandIn(name, Path(key), spec, replies, stop) for name, key in spec["nodes"]]
    for node in nodes:
        node.start()
    counts = Path(spec["counts"])
    while not stop.wait(0.5):
        # The counts so far, for the parent to read between runs (one write: never torn).
        tmp = counts.with_suffix(".tmp")
        tmp.write_text(
            json.dumps({n.node: {"requests": n.requests, "answered": n.answered, "error": n.error} for n in nodes})
        )
        tmp.replace(counts)


# --------------------------------------------------------------------------------------------
# The hub's CPU


def _tree_cpu(root: int) -> float:
    """CPU seconds (user + system, with reaped children's) of `root` and its descendants."""
    from iaptnet.ops.launcher import _children, _descendants

    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in [root, *_descendants(root, _children())]:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15]) / tick  # utime stime cutime cstime
    return total


class CpuSampler(threading.Thread):
    def __init__(self, root: int, every: float = 0.1):
        super().__init__(daemon=True)
        self.root, self.every = root, every
        self.samples: list[tuple[float, float]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.samples.append((time.time(), _tree_cpu(self.root)))
            self.done.wait(self.every)

    def between(self, t0: float, t1: float) -> float:
        def at(t: float) -> float:
            before = [c for ts, c in self.samples if ts <= t]
            return before[-1] if before else self.samples[0][1]

        return at(t1) - at(t0)


# --------------------------------------------------------------------------------------------
# One node count


def run_once(hub_toml: Path, study: Path, sampler: CpuSampler) -> dict:
    from bench_latency import follow

    one = follow(hub_toml, study)
    return {
        "round_wall": [t1 - t0 for t0, t1 in one["spans"]],
        "round_cpu": [sampler.between(t0, t1) for t0, t1 in one["spans"]],
        "wall": one["wall"],
        "result": one["result"],
    }


def read_counts(paths: list[Path]) -> dict:
    out = {}
    for path in paths:
        if path.exists():
            out.update(json.loads(path.read_text()))
    return out


def measure(args, full_network: Path, study: Path, n: int, work: Path) -> dict:
    from iaptnet.ops import launcher

    folder = work / f"hub-{n}"
    folder.mkdir(parents=True, exist_ok=True)
    network = subset_network(full_network, n, folder)
    print(f"\n{n} nodes: recording the nodes' replies in-process", flush=True)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-hub-state-") as state:
        replies, reference = record_replies(network, study, Path(state))
    print(
        f"  {reference['rounds']} rounds, {sum(len(v) for v in replies.values())} replies in {time.perf_counter() - t:.0f} s"
    )
    (folder / "replies.pickle").write_bytes(pickle.dumps(replies))

    t = time.perf_counter()
    record = launcher.up(network, timeout=900, start_nodes=False, echo=lambda *_: None)
    print(f"  hub up, {n} keys registered in {time.perf_counter() - t:.0f} s", flush=True)
    workers, count_files = [], []
    try:
        hub_pid = next(p["pid"] for p in record["processes"] if p["role"] == "hub")
        paths = launcher.NetworkPaths(network)
        from iaptnet.coordinator.hub import load_hub_config

        ca_cert = str(load_hub_config(paths.coordinator_toml).ca_cert)
        names = list(record["node_ids"])
        for w in range(args.workers):
            mine = names[w :: args.workers]
            spec = folder / f"stand-ins-{w}.json"
            counts = folder / f"counts-{w}.json"
            spec.write_text(
                json.dumps(
                    {
                        "address": record["address"],
                        "ca_cert": ca_cert,
                        "replies": str(folder / "replies.pickle"),
                        "counts": str(counts),
                        "poll_active": args.poll_active,
                        "poll_idle": args.poll_idle,
                        "hold": args.hold,
                        "nodes": [[name, str(_key(paths.node_dir(name), name))] for name in mine],
                    }
                )
            )
            log = open(folder / f"stand-ins-{w}.log", "wb")  # noqa: SIM115 - closed with the process
            workers.append(
                subprocess.Popen(
                    [sys.executable, str(Path(__file__).resolve()), "--stand-ins", str(spec)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"},
                    preexec_fn=(lambda: os.nice(args.nice)) if args.nice else None,
                )
            )
            count_files.append(counts)
        wait_online(paths, record, names)
        print(f"  {n} stand-ins connected", flush=True)
        sampler = CpuSampler(hub_pid)
        sampler.start()
        runs = []
        for k in range(args.repeat + 1):  # the first run warms the hub (bundle, imports)
            before = read_counts(count_files)
            one = run_once(paths.hub_toml, study, sampler)
            time.sleep(1.0)  # the counts are written every 0.5 s
            after = read_counts(count_files)
            requests = sum(after[x]["requests"] for x in after) - sum(
                before.get(x, {}).get("requests", 0) for x in after
            )
            errors = {x: c["error"] for x, c in after.items() if c["error"]}
            if errors:
                raise SystemExit(f"stand-ins failed: {errors}")
            one["requests"] = requests
            check(one["result"], reference)
            label = "warm-up" if k == 0 else f"run {k}"
            print(
                f"  {label}: {len(one['round_wall'])} rounds, median {statistics.median(one['round_wall']):.2f} s "
                f"and {statistics.median(one['round_cpu']):.2f} CPU s of the hub a round; whole run {one['wall']:.1f} s; "
                f"{requests:,} requests from the nodes",
                flush=True,
            )
            if k:
                runs.append(one)
        sampler.done.set()
    finally:
        for proc in workers:
            proc.terminate()
        for proc in workers:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        launcher.down(network, echo=lambda *_: None)
    rounds = sum(len(r["round_wall"]) for r in runs)
    return {
        "nodes": n,
        "coefficients": len(reference["terms"]),
        "rounds": len(runs[0]["round_wall"]),
        "round_wall": statistics.median(x for r in runs for x in r["round_wall"]),
        "round_cpu": statistics.median(x for r in runs for x in r["round_cpu"]),
        "run_wall": statistics.median(r["wall"] for r in runs),
        "requests_per_node_round": sum(r["requests"] for r in runs) / rounds / n,
    }


def _key(node_dir: Path, name: str) -> Path:
    return node_dir / f"{name}.key"  # made and registered by `network up` (keys.node_key)


def wait_online(paths, record: dict, names: list[str], timeout: float = 600.0) -> None:
    from iaptnet.coordinator.hub import load_hub_config, node_statuses

    cfg = load_hub_config(paths.coordinator_toml)
    wanted = {str(record["node_ids"][name]) for name in names}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        statuses = node_statuses(cfg.flwr_home)
        if all(statuses.get(i) == "online" for i in wanted):
            return
        time.sleep(2.0)
    raise SystemExit(f"the stand-ins did not all connect within {timeout:g} s; see {paths.root.parent}")


def check(result: dict, reference: dict) -> None:
    """The hub's results are the in-process ones (the stand-ins' replies are the real nodes')."""
    ours = {t["term"]: t["estimate"] for t in result["terms"]}
    for term in reference["terms"]:
        gap = abs(ours[term["term"]] - term["estimate"])
        if gap > 1e-8 * max(1.0, abs(term["estimate"])):
            raise SystemExit(f"the hub's estimate of {term['term']} differs from the in-process one by {gap:.1e}")


def slope(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of ys on xs."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="processes the stand-in nodes run in")
    parser.add_argument("--poll-active", type=float, default=0.25, help="the nodes' poll during a study (node.toml)")
    parser.add_argument("--poll-idle", type=float, default=1.0, help="the nodes' poll when idle (node.toml)")
    parser.add_argument(
        "--hold", type=float, default=10.0, help="seconds the nodes ask the hub to hold an empty poll (0: none)"
    )
    parser.add_argument(
        "--nice", type=int, default=0, help="the stand-ins' niceness (19: the hub gets the cores first)"
    )
    parser.add_argument("--work", help="folder for the networks' state (default: a temporary one)")
    parser.add_argument("--stand-ins", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stand_ins:
        stand_ins_main(Path(args.stand_ins))
        return
    os.environ.update(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    sys.path.insert(0, str(BENCH))
    from bench_national import NATIONAL_MERGES, d1_main, network_path

    defaults = argparse.Namespace(services=128, patients=2_000_000, seed=20210901, cache=None)
    full = network_path(defaults)
    study = d1_main(full.parent, "d1_sessions_national.toml", NATIONAL_MERGES)
    with tempfile.TemporaryDirectory(prefix="bench-hub-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        rows = [measure(args, full, study, n, work) for n in args.nodes]
    print(
        f"\nD1 (national merges), {rows[-1]['coefficients']} coefficients; nodes poll every "
        f"{args.poll_active:g} s during a study, asking the hub to hold an empty poll {args.hold:g} s; "
        + (f"stand-ins at niceness {args.nice}; " if args.nice else "")
        + f"medians of {args.repeat} runs"
    )
    print("| nodes | rounds | hub wall s/round | hub CPU s/round | requests per node per round | run wall s |")
    print("|--:|--:|--:|--:|--:|--:|")
    for r in rows:
        print(
            f"| {r['nodes']} | {r['rounds']} | {r['round_wall']:.2f} | {r['round_cpu']:.2f} | "
            f"{r['requests_per_node_round']:.1f} | {r['run_wall']:.1f} |"
        )
    if len(rows) > 1:
        xs = [r["nodes"] for r in rows]
        a_wall, b_wall = slope(xs, [r["round_wall"] for r in rows])
        a_cpu, b_cpu = slope(xs, [r["round_cpu"] for r in rows])
        print(
            f"each added node: +{1000 * b_wall:.1f} ms of hub wall time and +{1000 * b_cpu:.1f} ms of hub CPU a round "
            f"(fixed part {a_wall:.2f} s wall, {a_cpu:.2f} s CPU)"
        )
    big = max(rows, key=lambda r: r["nodes"])
    print(f"goal: at most 2 s a round of hub wall time at {big['nodes']} nodes: {big['round_wall']:.2f} s")


if __name__ == "__main__":
    main()

"""Fuzz the public command line with 10,000 inputs and count how each ended.

Every input (tests/fuzzcase.py: study files of every kind, network files, policy files,
extracts, valid data at its edges) runs through `iaptnet.cli.main` in a worker process; the
parent gives each input `--timeout` seconds and counts one that takes longer as a hang (the
worker is ended and another started). Inputs are drawn from a seeded generator, so a run is
repeatable and any input can be replayed alone:

    .venv/bin/python bench/fuzz_cli.py [--inputs 10000] [--seed 1] [--workers 2] [--timeout 60]
    .venv/bin/python tests/fuzzcase.py TARGET SEED        # replay one input

It prints the counts of successes, clean errors, tracebacks, unclean endings (several lines,
a half-written --out), inputs that let a library warning through, and hangs, with the first
inputs of each failure; it exits non-zero if any input failed.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing as mp
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))


def _worker(conn, root: str) -> None:
    sys.path.insert(0, str(TESTS))
    import fuzzcase

    ws = fuzzcase.open_workspace(Path(root))
    folder = ws.root / "cases" / str(os.getpid())
    while True:
        job = conn.recv()
        if job is None:
            return
        index, target, seed = job
        started = time.monotonic()
        try:
            case = fuzzcase.make_case(random.Random(seed), ws, target)
        except Exception as exc:  # noqa: BLE001 - the generator's own mistake, not iaptnet's
            conn.send(
                {
                    "index": index,
                    "target": target,
                    "seed": seed,
                    "kind": "not drawn",
                    "warnings": [],
                    "what": repr(exc)[:300],
                    "seconds": 0.0,
                }
            )
            continue
        outcome = fuzzcase.run_case(case, ws, folder)
        first = (outcome.detail or outcome.stderr).strip().splitlines()
        conn.send(
            {
                "index": index,
                "target": target,
                "seed": seed,
                "kind": outcome.kind,
                "warnings": outcome.warnings[:3],
                "what": (first[-1] if outcome.kind == "traceback" and first else first[0] if first else "")[:300],
                "seconds": time.monotonic() - started,
            }
        )


class Worker:
    def __init__(self, ctx, root: str):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker, args=(child, root), daemon=True)
        self.process.start()
        self.job = None
        self.since = 0.0

    def give(self, job) -> None:
        self.job, self.since = job, time.monotonic()
        self.conn.send(job)

    def end(self) -> None:
        self.process.kill()
        self.process.join()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1, help="the generator's seed (input i draws seed*10^6 + i)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before an input counts as a hang")
    parser.add_argument("--targets", default=None, help="comma-separated targets (default: all)")
    parser.add_argument("--workspace", default=None, help="a folder to build the workspace in (default: temporary)")
    args = parser.parse_args(argv)

    import fuzzcase

    targets = args.targets.split(",") if args.targets else list(fuzzcase.TARGETS)
    root = Path(args.workspace or tempfile.mkdtemp(prefix="iaptnet-fuzz-"))
    fuzzcase.build_workspace(root)
    jobs = collections.deque((i, targets[i % len(targets)], args.seed * 1_000_000 + i) for i in range(args.inputs))
    ctx = mp.get_context("spawn")
    workers = [Worker(ctx, str(root)) for _ in range(args.workers)]
    counts, per_target, examples, slowest = collections.Counter(), collections.Counter(), {}, []
    started, done = time.monotonic(), 0
    try:
        while done < args.inputs:
            for i, worker in enumerate(workers):
                if worker.job is None and jobs:
                    worker.give(jobs.popleft())
                elif worker.job is not None and worker.conn.poll(0.01):
                    try:
                        result = worker.conn.recv()
                    except EOFError:  # the worker died (the process itself crashed)
                        index, target, seed = worker.job
                        result = {
                            "index": index,
                            "target": target,
                            "seed": seed,
                            "kind": "crash",
                            "warnings": [],
                            "what": "the worker process died",
                            "seconds": 0.0,
                        }
                        worker.end()
                        workers[i] = worker = Worker(ctx, str(root))
                    worker.job = None
                    done += 1
                    kind = result["kind"]
                    counts[kind] += 1
                    per_target[(result["target"], kind)] += 1
                    if result["warnings"]:
                        counts["warning"] += 1
                    slowest = sorted([*slowest, (result["seconds"], result["target"], result["seed"])])[-3:]
                    if kind not in ("success", "clean") or result["warnings"]:
                        key = (kind, result["what"][:80], tuple(w[:60] for w in result["warnings"]))
                        if key not in examples:
                            examples[key] = result
                            print(
                                f"  {kind}: {result['target']} {result['seed']}: {result['what']} {result['warnings']}"
                            )
                    if done % 500 == 0:
                        print(f"{done:,} inputs, {time.monotonic() - started:.0f} s: {dict(counts)}", flush=True)
                elif worker.job is not None and time.monotonic() - worker.since > args.timeout:
                    index, target, seed = worker.job
                    counts["hang"] += 1
                    per_target[(target, "hang")] += 1
                    examples.setdefault(("hang", target, seed), {"target": target, "seed": seed, "what": "timeout"})
                    done += 1
                    worker.end()
                    workers[i] = Worker(ctx, str(root))
    finally:
        for worker in workers:
            worker.end()
    elapsed = time.monotonic() - started
    print(f"\n{args.inputs:,} fuzzed inputs in {elapsed:.0f} s ({args.workers} workers, seed {args.seed})")
    for kind in ("success", "clean", "traceback", "unclean", "warning", "hang", "crash", "not drawn"):
        print(f"  {kind:<10} {counts[kind]:>6,}")
    print("  per target: " + ", ".join(f"{t} {k} {n}" for (t, k), n in sorted(per_target.items())))
    print("  slowest: " + ", ".join(f"{s:.1f} s ({t} {seed})" for s, t, seed in reversed(slowest)))
    for result in list(examples.values())[:20]:
        print(f"  {result['target']} {result['seed']}: {result['what']} {result.get('warnings') or ''}")
    failed = sum(counts[k] for k in ("traceback", "unclean", "warning", "hang", "crash", "not drawn"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""A network the size of England, in-process: D1 on 128 services and 2,000,000 referrals.

Synthesises (or reuses a cached) network of `--services` services with log-normal sizes and
`--patients` referrals (`iaptnet synth`), then, in one run and interleaved `--repeat` times:

- runs D1 through the command line as a user does (`iaptnet run d1_sessions.toml --network
  ... --json`, the in-process engine: every node reads, validates and derives its own file,
  builds its design and answers the rounds; the nodes answer in a worker process per core),
  under `/usr/bin/time` for its wall and CPU time, its peak memory sampled over all its
  processes (their proportional set sizes, so that pages a forked worker shares with its
  parent count once);
- the same with `--workers 1` (every node in threads of the one process, as before worker
  processes), to show what the workers bring;
- runs a statsmodels script that reads the same files the same way (each service's extract
  validated and its variables derived by iaptnet's own loader, as a node does), pools the rows,
  keeps D1's cohort and fits the same formula with statsmodels' GLM: again wall time and peak
  memory, in its own process.

Prints both, the rounds D1 took, the ratios (CLI over statsmodels; the target is 0.25 of the
time) and the largest relative difference of an estimate. The machines are shared and noisy:
compare the ratios of one run, not seconds across runs.

    .venv/bin/python bench/bench_national.py [--services 128] [--patients 2000000] [--repeat 1]
                                             [--seed 20210901] [--cache DIR] [--study FILE]
                                             [--network FILE] [--paper]

`--paper` measures the paper-scale network instead (the demo's: 8 services, 483,683
referrals, synthesised once and cached) with the catalogue's D1 without its sensitivity
analyses: issue 14's first goal.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from iaptnet.coordinator.catalogue import catalogue_paths
from iaptnet.coordinator.demo import DEFAULT_SEED, _generator_fingerprint, default_cache

TIME = "/usr/bin/time"

#: The statsmodels side, run as `python -c REFERENCE network.toml study.toml`: read, pool, fit.
REFERENCE = r"""
import json, sys, time, warnings
start = time.perf_counter()
import pandas as pd
import statsmodels.api as sm
import statsmodels.formula
import statsmodels.formula.api as smf
from iaptnet.coordinator.network import load_network, node_services
from iaptnet.coordinator.studies import load_study
from iaptnet.node.cohort import cohort_mask
from iaptnet.node.dataset import load_dataset
from iaptnet.protocol.study import merged_levels

statsmodels.formula.options.formula_engine = "formulaic"  # the formula library iaptnet uses
warnings.filterwarnings("ignore", message="The design matrix is rank-deficient")
network = load_network(sys.argv[1])
codes = sorted(network.services)
spec = load_study(sys.argv[2], network.schema_paths, codes).spec
frames = []
for node in network.nodes:
    frame = load_dataset(node["data"], services=node_services(node)).frame
    frames.append(frame[cohort_mask(frame, spec.where_tree())])
pooled = pd.concat(frames, ignore_index=True)
pooled["service_id"] = pd.Categorical(pooled["service_id"].astype(str), categories=codes)
for column, groups in spec.merge.items():  # the study's level merges, in the order they define
    levels, mapping = merged_levels(list(pooled[column].cat.categories), groups)
    values = pooled[column].astype(object).map(lambda v: mapping.get(v, v))
    pooled[column] = pd.Categorical(values, categories=levels)
read = time.perf_counter() - start
fit = smf.glm(spec.formula, pooled, family=sm.families.Binomial()).fit()
print(json.dumps({"params": fit.params.to_dict(), "nobs": int(fit.nobs), "read": read,
                  "iterations": int(fit.fit_history["iteration"])}))
"""


def _tree(pid: int) -> list[int]:
    """The process and all its descendants (Linux /proc)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo.extend(int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split())
        except OSError:
            pass
    return out


def _pss_kib(pid: int) -> int:
    """A process's proportional set size: its own pages plus its share of pages it shares
    (with a forked worker, the parent's libraries count once over both, not twice)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def timed(cmd: list[str], env: dict) -> tuple[float, float, float, str]:
    """(wall seconds, CPU seconds (user + system) of all its processes, peak memory MiB,
    stdout) of one command: times from /usr/bin/time, memory the largest sum of the
    proportional set sizes of the command's processes (its worker processes included),
    sampled every 0.25 s (reading the sizes costs CPU; the peak lasts longer)."""
    peak = [0]
    with tempfile.NamedTemporaryFile("r", suffix=".time") as out, tempfile.TemporaryFile("w+") as stdout:
        proc = subprocess.Popen(
            [TIME, "-f", "%e %U %S %M", "-o", out.name, *cmd],
            env=env,
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
        )
        done = threading.Event()

        def sample():
            while not done.wait(0.25):
                peak[0] = max(peak[0], sum(_pss_kib(p) for p in _tree(proc.pid)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        stderr = proc.communicate()[1]
        done.set()
        sampler.join()
        if proc.returncode != 0:
            sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{stderr[-3000:]}")
        wall, user, system, peak_kb = Path(out.name).read_text().split()[-4:]
        stdout.seek(0)
        text = stdout.read()
    return float(wall), float(user) + float(system), max(peak[0], int(peak_kb)) / 1024, text


def network_path(args) -> Path:
    from iaptnet.synth import generate_network

    cache = Path(args.cache) if args.cache else default_cache()
    folder = cache / f"national-{args.services}-{args.patients}-{args.seed}-{_generator_fingerprint()}"
    path = folder / "network.toml"
    if not path.exists():
        print(f"synthesising {args.patients:,} referrals for {args.services} services in {folder}", flush=True)
        t = time.perf_counter()
        generate_network(folder, services=args.services, patients=args.patients, seed=args.seed)
        print(f"  done in {time.perf_counter() - t:.0f} s", flush=True)
    else:
        print(f"using the cached network in {folder}", flush=True)
    return path


#: Rare levels merged for a national network: at 128 services the smallest services' D1 cohorts
#: hold 1-7 referrals of some levels (body dysmorphic disorder, agoraphobia, specific phobia;
#: unpaid voluntary work; White Irish), which each such node refuses to release (a level with
#: 1-7 rows), as it should. An analyst merges them, as the refusal says.
NATIONAL_MERGES = {
    "problem": {"other_anxiety": ["other_anxiety", "agoraphobia", "specific_phobia", "bdd"]},
    "employment": {"06": ["06", "07"]},
    "ethnic_group": {"White other": ["White other", "White Irish"]},
}


def d1_main(folder: Path, name: str, merges: dict | None = None) -> Path:
    """The catalogue's D1 without its sensitivity analyses (the reference fits its main model
    only), with `merges` if given, written into `folder` as `name`."""
    import tomllib

    import tomli_w

    d1 = next(p for p in catalogue_paths() if p.name.startswith("d1"))
    study = tomllib.loads(d1.read_text())
    study.pop("sensitivity", None)
    if merges:
        study["merge"] = merges
    path = folder / name
    path.write_text(tomli_w.dumps(study))
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--services", type=int, default=128)
    parser.add_argument("--patients", type=int, default=2_000_000)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--repeat", type=int, default=1, help="interleaved runs of each side (medians)")
    parser.add_argument("--cache", help="folder for the synthetic network (default: iaptnet's cache)")
    parser.add_argument("--study", help="study file (default: the catalogue's D1 with NATIONAL_MERGES)")
    parser.add_argument("--network", help="a network file to use instead of the synthetic one")
    parser.add_argument("--paper", action="store_true", help="the paper-scale network and D1 (issue 14's first goal)")
    args = parser.parse_args()
    if args.paper:
        from iaptnet.coordinator.demo import PAPER_PATIENTS, synthetic_network

        cache = Path(args.cache) if args.cache else default_cache()
        network = synthetic_network(cache, PAPER_PATIENTS, args.seed)
        study = Path(args.study) if args.study else d1_main(network.parent, "d1_sessions_main.toml")
    else:
        network = Path(args.network) if args.network else network_path(args)
        study = (
            Path(args.study) if args.study else d1_main(network.parent, "d1_sessions_national.toml", NATIONAL_MERGES)
        )
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    cli = [sys.executable, "-m", "iaptnet.cli", "run", str(study), "--network", str(network), "--json"]
    ref = [sys.executable, "-c", REFERENCE, str(network), str(study)]
    fed, single, pooled = [], [], []
    for k in range(args.repeat):
        for runs, command in ((fed, cli), (single, [*cli, "--workers", "1"])):
            with tempfile.TemporaryDirectory(prefix="iaptnet-bench-state-") as state:
                # A fresh state folder: each run's nodes start with an empty memory of releases.
                runs.append(timed(command, {**env, "IAPTNET_STATE_DIR": state}))
        pooled.append(timed(ref, env))
        print(
            f"run {k + 1}: iaptnet run {fed[-1][0]:.1f} s (CPU {fed[-1][1]:.1f} s), peak {fed[-1][2]:,.0f} MiB; "
            f"with --workers 1 {single[-1][0]:.1f} s, peak {single[-1][2]:,.0f} MiB; "
            f"statsmodels {pooled[-1][0]:.1f} s (CPU {pooled[-1][1]:.1f} s), peak {pooled[-1][2]:,.0f} MiB",
            flush=True,
        )
    result, reference = json.loads(fed[-1][3]), json.loads(pooled[-1][3])
    f_wall, f_cpu, f_mem = (statistics.median(run[i] for run in fed) for i in range(3))
    s_wall, s_cpu, s_mem = (statistics.median(run[i] for run in single) for i in range(3))
    r_wall, r_cpu, r_mem = (statistics.median(run[i] for run in pooled) for i in range(3))
    # Estimates against statsmodels': the largest difference in standard errors (relative
    # differences blow up for estimates near 0).
    se = {t["term"]: t["std_error"] for t in result["terms"]}
    gap = max(abs(t["estimate"] - reference["params"][t["term"]]) / se[t["term"]] for t in result["terms"])
    if args.network or args.paper:
        from iaptnet.coordinator.network import load_network

        print(f"network: {len(load_network(network).services)} services ({network})")
    else:
        print(f"network: {args.services} services, {args.patients:,} referrals ({network.parent})")
    print(
        f"{result['study']}: n = {result['n']:,}, {len(result['terms'])} coefficients, {result['rounds']} rounds "
        f"(1 prepare + {result['iterations']} Newton); statsmodels: {reference['iterations']} IRLS iterations"
    )
    print(
        f"iaptnet run (in-process, CLI, nodes in a worker process per core): wall {f_wall:.1f} s, "
        f"CPU {f_cpu:.1f} s, peak memory {f_mem:,.0f} MiB"
    )
    print(
        f"iaptnet run --workers 1 (nodes in threads of one process): wall {s_wall:.1f} s, CPU {s_cpu:.1f} s, "
        f"peak memory {s_mem:,.0f} MiB; worker processes over threads: {f_wall / s_wall:.2f} of the time"
    )
    print(
        f"statsmodels script (read {reference['read']:.1f} s, then fit): wall {r_wall:.1f} s, CPU {r_cpu:.1f} s, "
        f"peak memory {r_mem:,.0f} MiB"
    )
    print(f"ratio of wall time, iaptnet / statsmodels: {f_wall / r_wall:.3f} (CPU time: {f_cpu / r_cpu:.3f})")
    print(f"ratio of peak memory, iaptnet / statsmodels: {f_mem / r_mem:.2f}")
    print(f"largest difference of an estimate from statsmodels': {gap:.1e} standard errors")


if __name__ == "__main__":
    main()

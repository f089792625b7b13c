"""Paper-scale speed of the exact federated GLM against statsmodels on the pooled rows.

Synthesises (or reuses the demo's cached) 8-service network of 483,683 referrals, loads every
node's data once, then times in one run: the in-process federated fit of the D1 model
(prepare + Newton rounds, design matrices built at each node) and statsmodels' GLM on the
pooled rows of the same cohort (design matrix built by the same formula library). Prints the
ratio; these machines are shared and noisy, so compare ratios from one run, not seconds
across runs.

    .venv/bin/python bench/bench_glm.py [--patients N] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import pandas as pd
import statsmodels.api as sm
import statsmodels.formula
import statsmodels.formula.api as smf
from threadpoolctl import threadpool_limits

from iaptnet.coordinator.catalogue import catalogue_paths
from iaptnet.coordinator.demo import DEFAULT_SEED, default_cache, synthetic_network
from iaptnet.coordinator.engines.inprocess import InProcessGrid
from iaptnet.coordinator.network import load_network
from iaptnet.coordinator.runner import run_batch
from iaptnet.coordinator.studies import load_study
from iaptnet.node.cohort import cohort_mask
from iaptnet.node.runtime import NodeConfig, runtime_for

statsmodels.formula.options.formula_engine = "formulaic"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--patients", type=int, default=483_683)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    network_path = synthetic_network(default_cache(), args.patients, DEFAULT_SEED)
    network = load_network(network_path)
    d1 = next(p for p in catalogue_paths() if p.name.startswith("d1"))
    study = load_study(d1, network.schema_paths, list(network.services))
    t0 = time.perf_counter()
    runtimes = [runtime_for(NodeConfig.from_mapping(n)) for n in network.nodes]
    frames = [r.dataset.frame for r in runtimes]
    print(f"loaded {sum(len(f) for f in frames):,} rows at {len(frames)} nodes in {time.perf_counter() - t0:.1f} s")
    pooled = pd.concat(frames, ignore_index=True)
    cohort = pooled[cohort_mask(pooled, study.spec.where_tree())]

    def statsmodels_fit():
        return smf.glm(study.spec.formula, cohort, family=sm.families.Binomial()).fit()

    fed, ref_default, ref_single = [], [], []
    for _ in range(args.repeat):
        grid = InProcessGrid(network.nodes)
        t = time.perf_counter()
        result = run_batch(grid, [study], engine="inprocess")[0]
        fed.append(time.perf_counter() - t)
        t = time.perf_counter()
        fit = statsmodels_fit()
        ref_default.append(time.perf_counter() - t)
        with threadpool_limits(limits=1, user_api="blas"):
            t = time.perf_counter()
            statsmodels_fit()
            ref_single.append(time.perf_counter() - t)
    # statsmodels gets the better of its two BLAS settings (default threads, one thread).
    f = statistics.median(fed)
    r = min(statistics.median(ref_default), statistics.median(ref_single))
    print(
        f"statsmodels: median {statistics.median(ref_default):.2f} s with default BLAS threads, "
        f"{statistics.median(ref_single):.2f} s with one BLAS thread"
    )
    print(f"D1 model: n = {result['n']:,}, {len(result['terms'])} coefficients")
    print("federated runs (s): " + " ".join(f"{x:.2f}" for x in fed))
    print(
        f"federated in-process fit: median {f:.2f} s over {args.repeat} runs; "
        f"{result['rounds']} rounds (1 prepare + {result['iterations']} Newton)"
    )
    print(f"statsmodels GLM on pooled rows: {r:.2f} s, the better setting (n = {int(fit.nobs):,})")
    print(f"ratio federated / statsmodels: {f / r:.3f}")
    rel = max(abs(t["estimate"] / fit.params[t["term"]] - 1) for t in result["terms"])
    print(f"max relative difference of estimates: {rel:.2e}")


if __name__ == "__main__":
    main()

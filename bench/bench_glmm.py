"""What a random intercept costs beside the plain GLM, on the synthetic network.

Synthesises (or reuses the demo's cached) 8-service network, then times in one run the D1
model (sessions attended and reliable recovery; `service_id` left out of the formula) fitted
three ways, each alone through the in-process engine: the plain GLM, the same with a random
intercept per service by the Laplace approximation (`nagq = 1`), and with 10 adaptive
Gauss-Hermite points. Prints rounds, seconds and each fit's ratio to the plain GLM's; the
machines are shared and noisy, so compare ratios from one run, not seconds across runs. Each
fit starts from fresh node runtimes (nodes load their data at their first task, outside the
timing: a warm-up fit per repeat).

    .venv/bin/python bench/bench_glmm.py [--patients N] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import tomli_w

from iaptnet.coordinator.demo import DEFAULT_SEED, default_cache, synthetic_network
from iaptnet.coordinator.inprocess import run_inprocess

D1 = {
    "family": "binomial",
    "where": "finished_treatment == 1 and case_first == 1",
    "formula": (
        "reliable_recovery ~ n_treat + n_dna + age_group + employment + sex + ethnic_group + imd_quintile + ltc"
        " + disability_any + psychotropic_med + phq9_first + gad7_first + wsas_first + problem"
        " + referral_source_group + wait_days + intensity + referral_year"
    ),
    "exposure": "n_treat",
}
FITS = {
    "glm": {},
    "random intercept, Laplace": {"random_intercept": "service_id", "nagq": 1},
    "random intercept, 10 points": {"random_intercept": "service_id", "nagq": 10},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--patients", type=int, default=483_683)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    network = synthetic_network(default_cache(), args.patients, DEFAULT_SEED)
    folder = Path(tempfile.mkdtemp(prefix="bench_glmm_"))
    paths = {}
    for i, (label, extra) in enumerate(FITS.items()):
        paths[label] = folder / f"fit{i}.toml"
        paths[label].write_text(tomli_w.dumps({"name": f"d1_fit{i}", **D1, **extra}))
    run_inprocess([paths["glm"]], network)  # the nodes load their data once
    seconds: dict[str, list[float]] = {label: [] for label in FITS}
    rounds: dict[str, int] = {}
    for _ in range(args.repeat):
        for label, path in paths.items():
            t = time.perf_counter()
            result = run_inprocess([path], network)[0]
            seconds[label].append(time.perf_counter() - t)
            rounds[label] = result["rounds"]
            if "variance_components" in result:
                variance = result["variance_components"][0]["variance"]
                print(
                    f"  {label}: between-service variance {variance:.5f}, exposure OR {result['exposure_term']['ratio']:.4f}"
                )
    base = statistics.median(seconds["glm"])
    print(f"D1 on {args.patients:,} referrals, median of {args.repeat}:")
    for label in FITS:
        median = statistics.median(seconds[label])
        print(f"  {label:<28} {rounds[label]:>3} rounds  {median:7.2f} s  {median / base:5.2f} x the GLM")


if __name__ == "__main__":
    main()

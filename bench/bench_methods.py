"""What each inference method costs beside its plain GLM, on the synthetic network.

Synthesises (or reuses, from `--cache`) the 8-service network, copies it to a fresh folder
(without `.iaptnet-state`: the nodes' release memory of earlier runs elsewhere plays no part),
then times in one run, through the in-process engine, the catalogue's D3 study (NICE-mismatched
treatment and reliable recovery; its exposure `nice_mismatch` is binary) fitted as:

- the plain GLM (D3 as the catalogue has it, `+ service_id` in the formula);
- the same without `service_id` (the base of the next two, which put the services elsewhere);
- with `marginal = ["nice_mismatch"]` (standardised risks: one more round);
- with `cov_type = "CR2"` and `cluster = "service_id"`, the formula without `service_id` (the
  node refuses CR2 with the clusters' own fixed effects: each cluster alone determines its
  dummy);
- with `random_intercept = "service_id"`, the formula without `service_id`, `nagq = 1` (Laplace);
- a negative binomial model of `n_treat` (sessions attended, the extract's count column) on
  D3's rows (its cohort, with D3's outcome present) and its other covariates;

and the meta kind's H1 study (each node's own fit of D1's model, pooled) with `ci = "hksj"`
beside the same study without it, on a second fresh copy of the network (H1's cohort is D1's,
not D3's: its releases are kept apart from D3's).

Every fit runs alone (one study per run), all of them interleaved `--repeat` times in this
process, after one untimed pass that loads the nodes' data and checks that each fit runs (one
that a node refuses is reported and left out). Prints per method the rounds (`rounds` of the
results, else `iterations`), the median seconds and the ratio to the plain GLM's median; the
machines are shared and noisy, so compare ratios from one run, not seconds across runs.

    .venv/bin/python bench/bench_methods.py [--patients 483683] [--repeat 3] [--seed 20210901]
                                            [--cache DIR]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
import tomllib
from pathlib import Path

import tomli_w

from iaptnet.coordinator.inprocess import run_inprocess
from iaptnet.protocol.errors import IaptnetError
from iaptnet.synth import generate_network

CATALOGUE = Path(__file__).resolve().parents[1] / "iaptnet" / "catalogue"
#: The fields of a catalogue study that make the study (not its reference or sensitivity notes).
STUDY_FIELDS = ("name", "title", "kind", "family", "where", "formula", "exposure", "service", "offset", "weights")
SERVICE_TERM = " + service_id"
STATE = ".iaptnet-state"


def study(name: str) -> dict:
    data = tomllib.loads((CATALOGUE / f"{name}.toml").read_text())
    return {k: data[k] for k in STUDY_FIELDS if k in data}


def d3_variants() -> dict[str, dict]:
    d3 = study("d3_nice_mismatch")
    assert d3["formula"].endswith(SERVICE_TERM), "D3's formula no longer ends with the service's fixed effects"
    without = {**d3, "formula": d3["formula"].removesuffix(SERVICE_TERM)}
    outcome, terms = d3["formula"].split(" ~ ")
    covariates = [t for t in terms.split(" + ") if t != "n_treat"]
    return {
        "plain GLM": d3,
        "GLM without service_id": without,
        "marginal (standardised risks)": {**d3, "marginal": ["nice_mismatch"]},
        "CR2, clusters = services": {**without, "cov_type": "CR2", "cluster": "service_id"},
        "random intercept, Laplace": {**without, "random_intercept": "service_id", "nagq": 1},
        "negative binomial (n_treat)": {
            **d3,
            # D3's rows: those with its outcome too (a few finishers have none; a row set that
            # differs from D3's by so few people is refused by the nodes' differencing audit)
            "where": f"{d3['where']} and {outcome} is not missing",
            "family": "negative_binomial",
            "formula": f"n_treat ~ {' + '.join(covariates)}",
        },
    }


def meta_variants() -> dict[str, dict]:
    h1 = study("h1_heterogeneity_sessions")
    return {"meta (H1), Wald": h1, "meta (H1), HKSJ": {**h1, "ci": "hksj"}}


def network_copy(source: Path, into: Path) -> Path:
    """A copy of the network folder with no node state: a fresh release memory."""
    shutil.copytree(source.parent, into, ignore=shutil.ignore_patterns(STATE))
    return into / source.name


def cached_network(cache: Path, patients: int, seed: int) -> Path:
    folder = cache / f"network-{patients}-{seed}"
    network = folder / "network.toml"
    if not network.exists():
        print(f"synthesising {patients:,} referrals for 8 services (seed {seed}) into {folder} ...")
        start = time.perf_counter()
        shutil.rmtree(folder, ignore_errors=True)
        generate_network(folder, services=8, patients=patients, seed=seed)
        print(f"  done in {time.perf_counter() - start:.1f} s")
    return network


def rounds_of(result: dict) -> str:
    for key in ("rounds", "iterations"):
        if isinstance(result.get(key), int):
            return str(result[key])
    return "-"


def summary(label: str, result: dict) -> str:
    term = result.get("exposure_term") or {}
    parts = [f"n {result['n']:,}" if "n" in result else ""]
    if term.get("ratio") is not None:
        parts.append(f"{result.get('ratio_name') or 'ratio'} {term['ratio']:.4f}")
    if result.get("marginal"):
        parts.append(f"risk difference {result['marginal'][0]['risk_difference']:.4f}")
    dfs = [t["df"] for t in result.get("terms", []) if t.get("df") is not None]
    if dfs:
        parts.append(f"df {min(dfs):.2f} to {max(dfs):.2f}")
    if result.get("variance_components"):
        parts.append(f"between-service variance {result['variance_components'][0]['variance']:.5f}")
    if result.get("theta") is not None:
        parts.append(f"theta {result['theta']:.3f}")
    return f"  {label}: " + ", ".join(p for p in parts if p)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=483_683)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=20210901)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "iaptnet-bench-methods")
    args = parser.parse_args()
    source = cached_network(args.cache, args.patients, args.seed)
    work = Path(tempfile.mkdtemp(prefix="bench_methods_"))
    try:
        networks = {"d3": network_copy(source, work / "d3"), "meta": network_copy(source, work / "meta")}
        fits: dict[str, tuple[Path, Path]] = {}  # label -> (study file, network)
        for group, variants in (("d3", d3_variants()), ("meta", meta_variants())):
            for i, (label, fields) in enumerate(variants.items()):
                path = work / f"{group}_{i}.toml"
                path.write_text(tomli_w.dumps({**fields, "name": f"{group}_method{i}"}))
                fits[label] = (path, networks[group])
        rounds: dict[str, str] = {}
        print("untimed pass (the nodes load their data; each fit is checked to run):")
        for label, (path, network) in list(fits.items()):
            try:
                result = run_inprocess([path], network)[0]
            except IaptnetError as exc:
                print(f"  {label}: left out, {exc}")
                del fits[label]
                continue
            rounds[label] = rounds_of(result)
            print(summary(label, result))
        if "plain GLM" not in fits:
            raise SystemExit("the plain GLM did not run: no ratios to print")
        seconds: dict[str, list[float]] = {label: [] for label in fits}
        for _ in range(args.repeat):
            for label, (path, network) in fits.items():
                start = time.perf_counter()
                run_inprocess([path], network)
                seconds[label].append(time.perf_counter() - start)
        base = statistics.median(seconds["plain GLM"])
        print(f"\nD3 (and H1) on {args.patients:,} referrals, median of {args.repeat}:")
        print(f"  {'method':<32} {'rounds':>6} {'median s':>9} {'x plain GLM':>12}")
        for label in fits:
            median = statistics.median(seconds[label])
            print(f"  {label:<32} {rounds[label]:>6} {median:9.2f} {median / base:12.2f}")
        wald, hksj = "meta (H1), Wald", "meta (H1), HKSJ"
        if wald in seconds and hksj in seconds:
            ratio = statistics.median(seconds[hksj]) / statistics.median(seconds[wald])
            print(f"  HKSJ over the same meta study without it: {ratio:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

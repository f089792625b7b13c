"""The whole demo catalogue, federated in-process, against the same analyses on pooled rows.

Loads (or synthesises) the paper-scale network, then in one run:
- times `iaptnet demo`'s work: every catalogue study through the in-process engine (the six
  findings share one conversation; each other kind runs its own), with the nodes' data already
  loaded (as the demo's nodes have it after their first task);
- times the same analyses on the pooled rows with statsmodels/numpy, using the independent
  references the tests check against (tests/reference_*.py) and statsmodels' GLM for the
  GLM studies, with the better of statsmodels' two BLAS settings.
Prints seconds per study and the totals' ratio; compare ratios from one run, not seconds
across runs (the machines are shared).

With `--audit`, it instead measures what the nodes' memory of their releases costs the
catalogue (issue 9's goal: at most 10% more time): the federated catalogue `--repeat` times
each, interleaved, with the release-memory checks (differencing audit, span of released
columns, cohort conditions; each pass in a fresh state folder, as a first run) and with them
switched off in this process only (a benchmark's patch: no node can be told to skip them),
and prints the medians and their ratio.

    .venv/bin/python bench/bench_catalogue.py [--patients N] [--audit [--repeat 2]]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
import tomllib
import warnings
from pathlib import Path

import pandas as pd
import statsmodels.api as sm
import statsmodels.formula
import statsmodels.formula.api as smf
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from reference_access import reference_access  # noqa: E402
from reference_describe import describe_reference, settings_for_study  # noqa: E402
from reference_its import reference_its  # noqa: E402
from reference_meta import reference_meta  # noqa: E402
from reference_propensity import reference_iptw, reference_psm  # noqa: E402

from iaptnet.coordinator.catalogue import catalogue_paths  # noqa: E402
from iaptnet.coordinator.demo import DEFAULT_SEED, default_cache, synthetic_network  # noqa: E402
from iaptnet.coordinator.engines.inprocess import InProcessGrid  # noqa: E402
from iaptnet.coordinator.network import load_network  # noqa: E402
from iaptnet.coordinator.runner import run_batch  # noqa: E402
from iaptnet.coordinator.studies import load_study  # noqa: E402
from iaptnet.node.cohort import cohort_mask  # noqa: E402
from iaptnet.node.policy import load_policy  # noqa: E402
from iaptnet.node.runtime import NodeConfig, runtime_for  # noqa: E402
from iaptnet.protocol.iapt_schema import iapt_analysis_schema  # noqa: E402
from iaptnet.protocol.kinds.access import ILLUSTRATIVE_NEED  # noqa: E402
from iaptnet.synth.denominators import read_population  # noqa: E402

statsmodels.formula.options.formula_engine = "formulaic"
# D3's cohort has no rows of three problem levels: statsmodels warns that the pooled design is
# rank-deficient (iaptnet drops those columns and says so in results.json).
warnings.filterwarnings("ignore", message="The design matrix is rank-deficient")


def pooled_glm(frame, study, toml):
    cohort = frame[cohort_mask(frame, study.spec.where_tree())]
    for column, groups in (toml.get("merge") or {}).items():
        mapping = {old: new for new, olds in groups.items() for old in olds}
        cohort = cohort.assign(**{column: cohort[column].astype(object).map(lambda v: mapping.get(v, v))})
    return smf.glm(study.spec.formula, cohort, family=sm.families.Binomial()).fit()


def pooled_access(frame, study, toml):
    population = read_population()
    if toml.get("need"):  # people with need: each population row times its group's prevalence
        need = pd.read_csv(ILLUSTRATIVE_NEED if toml["need"] == "illustrative" else toml["need"])
        population = population.merge(need, on=list(need.columns.drop("prevalence")), how="left")
        population = population.assign(population=population["population"] * population["prevalence"])
    settings = {
        "by": toml["by"],
        "period": tuple(toml["period"]),
        "years": 8.0,
        "merge": toml.get("merge") or {},
        "nodes": sorted(frame["area"].unique()),
    }
    return reference_access(frame, population, settings)


def pooled(kind, frame, study, toml):
    schema = iapt_analysis_schema()
    if kind == "glm":
        return pooled_glm(frame, study, toml)
    if kind == "table":
        rules = load_policy(None, production=False).rules_for(False)  # the demo's exploratory nodes
        return describe_reference(
            frame,
            settings_for_study(
                toml,
                schema,
                {
                    "suppress_max": rules.suppress_max,
                    "round_to": rules.round_to,
                    "min_rows": rules.min_rows,
                    "min_level_count": rules.min_level_count,
                },
            ),
        )
    if kind == "psm":
        return reference_psm(frame, toml, "service")
    if kind == "iptw":
        return reference_iptw(frame, toml)
    if kind == "meta":
        return reference_meta(frame, toml)
    if kind == "its":
        return reference_its(frame, toml)
    if kind == "access":
        return pooled_access(frame, study, toml)
    raise ValueError(kind)


@contextlib.contextmanager
def release_memory_off():
    """The node's checks against what it released before, switched off (benchmark only)."""
    from iaptnet.node.audit import NodeMemory

    class NoThresholds:  # the memory of one variable's quantile thresholds, forgetting
        def audit(self, *a, **k):
            return []

        def remember(self, *a, **k):
            return None

    off = {
        "audit_release": lambda self, *a, **k: [],
        "audit_span": lambda self, *a, **k: [],
        "span_lifted": lambda self, *a, **k: None,
        "audit_conditions": lambda self, *a, **k: [],
        "remember_release": lambda *a, **k: None,
        "remember_conditions": lambda *a, **k: None,
        "thresholds": lambda self, *a, **k: NoThresholds(),
        "threshold_studies": lambda self, *a, **k: set(),
        "add_threshold_study": lambda *a, **k: None,
    }
    saved = {name: getattr(NodeMemory, name) for name in off}
    for name, method in off.items():
        setattr(NodeMemory, name, method)
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(NodeMemory, name, method)


def fresh_state(nodes) -> None:
    """Every node's audit log and release memory in a new, empty folder (a first run)."""
    os.environ["IAPTNET_STATE_DIR"] = tempfile.mkdtemp(prefix="iaptnet-bench-state-")
    for node in nodes:
        runtime_for(NodeConfig.from_mapping(node))._state = None


def audit_cost(network, studies, repeat: int) -> None:
    """Wall and CPU seconds of the catalogue with and without the checks. The CPU time (this
    process's, every thread) moves less than the wall time when other work shares the machine,
    so both ratios are printed."""
    timings: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    run_batch(InProcessGrid(network.nodes), studies[:1], engine="inprocess")  # warm: imports, caches
    for _ in range(repeat):
        for audited in (False, True):
            fresh_state(network.nodes)
            with contextlib.nullcontext() if audited else release_memory_off():
                t, cpu = time.perf_counter(), time.process_time()
                run_batch(InProcessGrid(network.nodes), studies, engine="inprocess")
                timings[audited].append((time.perf_counter() - t, time.process_time() - cpu))
    medians = {
        audited: [statistics.median(t[i] for t in timings[audited]) for i in (0, 1)] for audited in (True, False)
    }
    for audited, label in ((True, "with the release-memory checks:   "), (False, "without (this benchmark's patch):")):
        wall, cpu = medians[audited]
        runs = [(round(w, 1), round(c, 1)) for w, c in timings[audited]]
        print(f"catalogue {label} wall {wall:.1f} s, CPU {cpu:.1f} s  (each pass: {runs})")
    (on, on_cpu), (off, off_cpu) = medians[True], medians[False]
    print(f"ratio with / without: wall {on / off:.3f}, CPU {on_cpu / off_cpu:.3f} (goal: at most 1.10)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--patients", type=int, default=483_683)
    parser.add_argument("--audit", action="store_true", help="the release-memory checks' cost instead")
    parser.add_argument("--repeat", type=int, default=2, help="passes of each, with --audit")
    args = parser.parse_args()
    network_path = synthetic_network(default_cache(), args.patients, DEFAULT_SEED)
    network = load_network(network_path)
    paths = catalogue_paths()
    studies = [load_study(p, network.schema_paths, list(network.services)) for p in paths]
    tomls = [tomllib.loads(p.read_text()) for p in paths]

    t = time.perf_counter()
    frames = []
    for node in network.nodes:
        frame = runtime_for(NodeConfig.from_mapping(node)).dataset.frame.copy()
        frame["service"] = node["name"]
        frame["area"] = node["name"]
        frames.append(frame)
    load = time.perf_counter() - t
    if args.audit:
        audit_cost(network, studies, args.repeat)
        return
    frame = pd.concat(frames, ignore_index=True)
    print(f"loaded {len(frame):,} rows at {len(frames)} nodes in {load:.1f} s (both sides need this once)")

    t = time.perf_counter()
    results = run_batch(InProcessGrid(network.nodes), studies, engine="inprocess")
    federated = time.perf_counter() - t

    rows = []
    for study, toml in zip(studies, tomls):
        kind = study.spec.kind
        timings = []
        for limit in (None, 1):
            t = time.perf_counter()
            if limit:
                with threadpool_limits(limits=1, user_api="blas"):
                    pooled(kind, frame, study, toml)
            else:
                pooled(kind, frame, study, toml)
            timings.append(time.perf_counter() - t)
        rows.append((study.spec.name, kind, min(timings)))
    reference = sum(r[2] for r in rows)
    print(f"{'study':<28} {'kind':<7} {'pooled s':>9}")
    for name, kind, seconds in rows:
        print(f"{name:<28} {kind:<7} {seconds:>9.2f}")
    print(f"federated in-process, whole catalogue ({len(results)} studies): {federated:.1f} s")
    print(f"pooled statsmodels/numpy, same analyses: {reference:.1f} s")
    print(f"ratio federated / pooled: {federated / reference:.2f}")


if __name__ == "__main__":
    main()

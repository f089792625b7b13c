"""The synthetic IAPT network: deterministic extracts with the source study's effects planted.

    generate_network(out_dir, services=8, patients=483683, seed=20210901) -> network.toml path
    generate_extract(patients, services, seed) -> pooled extract DataFrame (as read from files)
    generate(patients, services, seed) -> Synthetic(extract, truth) Arrow tables
    population_table(patients, services) -> the population denominators (population.csv)
    REMINDER_DATES / REMINDER_DATES_BY_SERVICE_ID -> when each service started SMS reminders
    service_names(services) / service_codes(services) -> each service's node name and code

Modules, one job each: `params` (the targets of docs/reference/synthetic.md), `population` (who is referred),
`pathway` (funnel, treatment, dates, end codes), `reminders` (the planted service change: SMS
appointment reminders lower the odds of a missed appointment), `nice` (the §C table used to
plant mismatches), `outcomes` (the planted outcome model and last scores), `missing` (MCAR
masks), `extract` (the schema-exact table), `denominators` (the catchments' adult population
by age band, sex, ethnic group and IMD quintile, for access rates), `network` (atomic writing
and network.toml).

A written network folder holds service_<k>.parquet (or .csv), network.toml (each node with the
code of its service: `services = ["ZN1"]`) and population.csv. The package ships
`population.csv` for the default paper-scale network (483,683 referrals, 8 services); it does
not depend on the seed. The paper network's 8 services have the source study's sizes; any
other number of services (`--services 128`) gets log-normal sizes and made-up ODS-style codes
(population.py: `service_shares`, `service_codes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from ..protocol.errors import SpecError
from ._draw import exact_counts
from .denominators import population_csv, population_table, read_population
from .extract import build_tables, to_frame
from .missing import draw_masks
from .network import FORMATS, service_names, write_network
from .outcomes import draw_outcomes
from .params import DEFAULT_SEED, MAX_SERVICES, PAPER_PATIENTS, PAPER_SERVICES
from .pathway import draw_pathway
from .population import draw_population, service_codes, service_shares
from .reminders import (
    REMINDER_DATES,
    REMINDER_DATES_BY_SERVICE_ID,
    REMINDER_MONTH_BY_SERVICE_ID,
    reminder_dates,
    reminder_dates_by_code,
)

__all__ = [
    "DEFAULT_SEED",
    "PAPER_PATIENTS",
    "PAPER_SERVICES",
    "FORMATS",
    "REMINDER_DATES",
    "REMINDER_DATES_BY_SERVICE_ID",
    "REMINDER_MONTH_BY_SERVICE_ID",
    "Synthetic",
    "generate",
    "generate_extract",
    "generate_network",
    "max_services",
    "population_csv",
    "population_table",
    "read_population",
    "reminder_dates",
    "reminder_dates_by_code",
    "service_codes",
    "service_names",
    "service_shares",
]


@dataclass(frozen=True)
class Synthetic:
    """A generated network before it is split into files.

    `extract`: the pooled extract (schema columns only). `truth`: per referral, in the same row
    order, what the generator planted (reliable_recovery, reliable_improvement,
    reliable_deterioration, attrition, nice_mismatch, finished_treatment, case_first, the
    outcome intercept and service effect) for tests; it never goes into a node's files.
    """

    extract: pa.Table
    truth: pa.Table
    seed: int
    services: int


def max_services() -> int:
    return MAX_SERVICES


def generate(patients: int = PAPER_PATIENTS, services: int = PAPER_SERVICES, seed: int = DEFAULT_SEED) -> Synthetic:
    _check(patients, services, seed)
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(5)]
    cohort = draw_population(streams[0], patients, services)
    draw_pathway(streams[1], cohort)
    # The MCAR masks depend on nothing in the data; drawn before the outcomes only so that the
    # balanced outcome draw can stratify on the complete-case pattern. They are applied after.
    masks = draw_masks(streams[3], patients, cohort["finished"])
    draw_outcomes(streams[2], cohort, services, masks)
    extract, truth = build_tables(streams[4], cohort, masks, service_codes(services))
    return Synthetic(extract, truth, seed, services)


def generate_extract(
    patients: int = PAPER_PATIENTS, services: int = PAPER_SERVICES, seed: int = DEFAULT_SEED
) -> pd.DataFrame:
    """The pooled extract of all services as one DataFrame, as pandas reads the files."""
    return to_frame(generate(patients, services, seed).extract)


def generate_network(
    out_dir: str | Path,
    services: int = PAPER_SERVICES,
    patients: int = PAPER_PATIENTS,
    seed: int = DEFAULT_SEED,
    fmt: str = "parquet",
    appointments: bool = False,
    step=None,
) -> Path:
    """Generate and write a network (one extract per service, network.toml and the population
    denominators population.csv) into out_dir, atomically. Returns the path of network.toml.
    With `appointments`, each service's pathway columns come as an appointment table.
    `step(text)`, when given, hears each stage (for a progress display)."""
    if fmt not in FORMATS:
        raise SpecError(f"synth: format must be one of {', '.join(FORMATS)}, got {fmt!r}.")
    if step:
        step(f"generating {patients:,} referrals for {services} services")
    synthetic = generate(patients, services, seed)
    return write_network(
        out_dir,
        synthetic.extract,
        services,
        seed,
        fmt,
        population=population_csv(patients, services),
        appointments=appointments,
        step=step,
    )


def _check(patients: int, services: int, seed: int) -> None:
    for name, value in (("patients", patients), ("services", services), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise SpecError(f"synth: --{name} must be a whole number, got {value!r}.")
    top = max_services()
    if not 1 <= services <= top:
        raise SpecError(f"synth: --services must be between 1 and {top}, got {services}.")
    smallest = float(service_shares(services).min())
    need = max(100 * services, int(np.ceil(100 / smallest)))
    while exact_counts(need, service_shares(services)).min() < 100:
        need += 1
    if patients < need:
        raise SpecError(
            f"synth: --patients must be at least 100 per service, the smallest included "
            f"({need:,} for {services} services of these sizes), got {patients}."
        )
    if seed < 0:
        raise SpecError(f"synth: --seed must be zero or positive, got {seed}.")

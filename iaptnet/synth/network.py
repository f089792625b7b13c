"""Writing a synthetic network: one extract per service (optionally with its appointment table,
appointments.py), the network.toml that lists them, and population.csv, the coordinator's
population denominators for the services' catchments (denominators.py; scaled to the
network's size).

The files are written into a temporary folder beside the destination and moved into place with
a rename, so an interrupted or failed run leaves either the previous network or the new one,
never a half-written folder. A destination that holds something other than a previous synthetic
network is refused rather than replaced.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ..protocol.errors import SpecError
from . import params as P
from .appointments import appointments_for, without_pathway_columns
from .population import service_codes

HEADER = "# written by iaptnet synth"
FORMATS = ("parquet", "csv")


def service_names(services: int) -> list[str]:
    """NCEL service names for the 8-service network, service_<k> otherwise."""
    if services == P.PAPER_SERVICES:
        return list(P.SERVICE_NAMES_8)
    return [f"service_{k}" for k in range(1, services + 1)]


def write_network(
    out_dir: str | Path,
    extract: pa.Table,
    services: int,
    seed: int,
    fmt: str = "parquet",
    population: str | None = None,
    appointments: bool = False,
    step=None,
) -> Path:
    """Write `extract` split by service into out_dir, and `population` (CSV text) as
    population.csv when given; returns the network.toml path. With `appointments`, each
    service's extract leaves out the pathway columns and an appointment table that carries
    them is written beside it (appointments.py)."""
    if fmt not in FORMATS:
        raise SpecError(f"synth: format must be one of {', '.join(FORMATS)}, got {fmt!r}.")
    out = Path(out_dir)
    _check_destination(out)
    parent = out.parent if str(out.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.synth-", dir=parent))
    try:
        service = extract.column("service_id")
        lines = [
            f"{HEADER} (seed {seed})",
            f"# {extract.num_rows:,} referrals in {services} service{'' if services == 1 else 's'}",
            "",
        ]
        lines[2:2] = ["# services: made-up codes in the form of ODS codes, naming no real organisation"]
        for k, (name, code) in enumerate(zip(service_names(services), service_codes(services)), start=1):
            part = extract.filter(pc.equal(service, code))
            if step:
                step(f"writing service {k} of {services} ({name})")
            filename = f"service_{k}.{fmt}"
            node = ["[[node]]", f'name = "{name}"', f'data = "{filename}"', f'services = ["{code}"]']
            if appointments:
                contacts = appointments_for(part, np.random.default_rng([seed, k]), with_intensity=k % 2 == 1)
                _write(contacts, tmp / f"service_{k}_appointments.{fmt}", fmt)
                node.append(f'appointments = "service_{k}_appointments.{fmt}"')
                part = without_pathway_columns(part)
            _write(part, tmp / filename, fmt)
            lines += node + [""]
        if population is not None:
            (tmp / "population.csv").write_text(population, encoding="utf-8", newline="")
            lines[2:2] = ["# population.csv: adult population denominators of the catchments (for the coordinator)"]
        (tmp / "network.toml").write_text("\n".join(lines))
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "network.toml"


def _write(table: pa.Table, path: Path, fmt: str) -> None:
    if fmt == "parquet":
        pq.write_table(table, path, compression="zstd")
    else:
        pacsv.write_csv(table, path, pacsv.WriteOptions(quoting_style="needed"))


def _check_destination(out: Path) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise SpecError(f"{out}: exists and is not a folder; give a new or empty folder for the network.")
    if any(out.iterdir()) and not _is_synthetic(out):
        raise SpecError(
            f"{out}: the folder is not empty and was not written by 'iaptnet synth'; give a new or empty folder."
        )


def _is_synthetic(out: Path) -> bool:
    toml = out / "network.toml"
    try:
        return toml.is_file() and toml.read_text().startswith(HEADER)
    except OSError:
        return False


def _replace(tmp: Path, out: Path) -> None:
    """Move tmp to out; a previous network at out is swapped aside and then removed."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=tmp.parent))
    os.rmdir(old)
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)

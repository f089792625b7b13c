"""A node reads its extract from a real PostgreSQL server through SQLAlchemy (URL and `table` or
`query` in node.toml) and the pooled fit is the same as from the same rows in files.

The server is the one `.ci/run` installs from Debian's packages and starts; its URL comes in
IAPTNET_TEST_POSTGRES_URL. Without it the tests skip, except on CI (IAPTNET_REQUIRE_POSTGRES=1),
where a missing server is a failure, not a skip.
"""

from __future__ import annotations

import os
import uuid

import numpy as np
import pandas as pd
import pytest
from glmcase import pooled, reference_fit, write_network, write_study

pytestmark = pytest.mark.postgres

URL = os.environ.get("IAPTNET_TEST_POSTGRES_URL")
COLUMNS = {
    "y": {"type": "binary"},
    "x": {"type": "numeric"},
    "n_sessions": {"type": "integer", "min": 0},
    "g": {"type": "categorical", "levels": ["a", "b", "c"]},
}


def require_postgres() -> str:
    if not URL:
        if os.environ.get("IAPTNET_REQUIRE_POSTGRES") == "1":
            pytest.fail("IAPTNET_TEST_POSTGRES_URL is not set but CI requires the PostgreSQL tests.")
        pytest.skip("no PostgreSQL server (set IAPTNET_TEST_POSTGRES_URL; .ci/run starts one)")
    return URL


@pytest.fixture(scope="module")
def pg_table():
    import sqlalchemy as sa

    url = require_postgres()
    engine = sa.create_engine(url)
    rng = np.random.default_rng(5)
    n = 600
    frame = pd.DataFrame(
        {
            "y": (rng.random(n) < 0.4).astype(int),
            "x": rng.normal(size=n),
            "n_sessions": rng.poisson(5, size=n),
            "g": rng.choice(["a", "b", "c"], size=n),
            "site": rng.choice(["north", "south"], size=n),
        }
    )
    frame.loc[rng.choice(n, size=20, replace=False), "x"] = np.nan
    frame.loc[rng.choice(n, size=10, replace=False), "g"] = None
    table = f"iapt_extract_{uuid.uuid4().hex[:8]}"
    frame.to_sql(table, engine, index=False)
    try:
        yield url, table, frame
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP TABLE IF EXISTS "{table}"'))
        engine.dispose()


def test_node_toml_reads_a_table_and_a_query(pg_table, tmp_path):
    from iaptnet import keys as pki
    from iaptnet.node.config import load_node_file
    from iaptnet.node.runtime import NodeConfig, NodeRuntime

    url, table, frame = pg_table
    pki.init_ca(tmp_path)
    pki.node_key(tmp_path, "n")
    (tmp_path / "schema.toml").write_text(
        '[columns.y]\ntype = "binary"\n[columns.x]\ntype = "numeric"\n'
        '[columns.n_sessions]\ntype = "integer"\nmin = 0\n'
        '[columns.g]\ntype = "categorical"\nlevels = ["a", "b", "c"]\n'
    )
    base = (
        f'name = "n"\nhub = "127.0.0.1:9092"\nca_cert = "ca.crt"\nkey = "n.key"\n'
        f'data = "{url}"\nschema = "schema.toml"\npolicy = "schema.toml"\n'
    )
    for source, expected in (
        (f'table = "{table}"\n', len(frame)),
        (
            f"query = \"SELECT y, x, n_sessions, g FROM {table} WHERE site = 'north'\"\n",
            int((frame.site == "north").sum()),
        ),
    ):
        (tmp_path / "node.toml").write_text(base + source)
        cfg = load_node_file(tmp_path / "node.toml")
        assert cfg.data == url
        runtime = NodeRuntime(NodeConfig.from_mapping(cfg.node_config()))
        dataset = runtime.dataset
        assert dataset.n_rows == expected and dataset.usable
        assert list(dataset.frame.columns) == ["y", "x", "n_sessions", "g"]
        assert dataset.data_version and "iaptnet-ci" not in dataset.source  # the password is never shown


def test_pooled_fit_with_a_postgres_node_equals_the_reference(pg_table, tmp_path):
    from iaptnet.coordinator.inprocess import run_inprocess

    url, table, frame = pg_table
    rows = frame.drop(columns="site")
    north, south = rows[frame.site == "north"], rows[frame.site == "south"]
    write_network(tmp_path, {"files": south}, COLUMNS)
    # A second node reads its rows from PostgreSQL with a query.
    with open(tmp_path / "network.toml", "a") as fh:
        fh.write(
            f'\n[[node]]\nname = "database"\ndata = "{url}"\n'
            f"query = \"SELECT y, x, n_sessions, g FROM {table} WHERE site = 'north'\"\n"
            f'schema = "schema.toml"\n'
        )
    study = write_study(tmp_path / "pg.toml", name="pg", family="poisson", formula="n_sessions ~ x + g + y")
    result = run_inprocess([study], tmp_path / "network.toml")[0]
    ref = reference_fit(
        pooled({"a": south, "b": north}, COLUMNS), "n_sessions ~ x + g + y", "poisson", ["n_sessions", "x", "g", "y"]
    )
    np.testing.assert_allclose([t["estimate"] for t in result["terms"]], ref.params.to_numpy(), rtol=1e-8)
    np.testing.assert_allclose([t["std_error"] for t in result["terms"]], ref.bse.to_numpy(), rtol=1e-8)
    assert result["n"] == int(ref.nobs)
    assert {n["name"] for n in result["nodes"]} == {"files", "database"}


def test_appointments_from_postgres_give_back_the_flat_extract(tmp_path):
    """A node whose appointment table is in the database (network.toml `appointments` URL with
    `appointments_table` or `appointments_query`) serves what the flat extract gives."""
    import sqlalchemy as sa

    from iaptnet.coordinator.network import load_network
    from iaptnet.node.dataset import AppointmentSource, load_dataset
    from iaptnet.synth import generate_network

    url = require_postgres()
    flat = load_network(generate_network(tmp_path / "flat", services=1, patients=2_000, seed=6)).nodes[0]
    appt = load_network(
        generate_network(tmp_path / "appt", services=1, patients=2_000, seed=6, appointments=True)
    ).nodes[0]
    table = f"iapt_contacts_{uuid.uuid4().hex[:8]}"
    engine = sa.create_engine(url)
    pd.read_parquet(appt["appointments"]).to_sql(table, engine, index=False)
    try:
        (tmp_path / "network.toml").write_text(
            f'[[node]]\nname = "db"\ndata = "{appt["data"]}"\nservices = ["{appt["services"]}"]\n'
            f'appointments = "{url}"\n'
            f'appointments_query = "SELECT * FROM {table}"\n'
        )
        node = load_network(tmp_path / "network.toml").nodes[0]
        reference = load_dataset(flat["data"]).frame
        for source in (
            AppointmentSource(node["appointments"], query=node["appointments_query"]),
            AppointmentSource(url, table=table),
        ):
            served = load_dataset(node["data"], appointments=source)
            assert served.usable
            pd.testing.assert_frame_equal(served.frame, reference)
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP TABLE IF EXISTS "{table}"'))
        engine.dispose()

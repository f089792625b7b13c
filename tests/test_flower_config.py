"""The deployment's configuration files (node.toml, coordinator.toml, hub.toml) and the node's
approved app list: every mistake is one sentence naming the file and the field, a non-zero
exit, never a traceback; a production node will not start without its policy or without TLS."""

from __future__ import annotations

import re

import pytest

from iaptnet import keys as pki
from iaptnet.cli import main
from iaptnet.coordinator.engines.flower import load_hub_file
from iaptnet.coordinator.hub import load_hub_config, superlink_command, warm_serverapp_command
from iaptnet.node.config import approve, load_node_file, read_approved
from iaptnet.node.daemon import Gate, check_policy
from iaptnet.protocol.errors import SpecError

HASH_A = "a" * 64
HASH_B = "b" * 64


@pytest.fixture()
def kit(tmp_path):
    pki.init_ca(tmp_path / "pki")
    pki.issue_certificate(tmp_path / "pki", tmp_path / "pki", ["localhost"])
    pki.node_key(tmp_path / "pki", "site-a")
    (tmp_path / "data.csv").write_text("x,y\n1,0\n2,1\n")
    (tmp_path / "policy.toml").write_text("")
    return tmp_path


def node_toml(folder, **fields) -> str:
    base = {
        "name": "site-a",
        "hub": "127.0.0.1:9092",
        "ca_cert": "pki/ca.crt",
        "key": "pki/site-a.key",
        "data": "data.csv",
        "policy": "policy.toml",
    }
    base.update(fields)
    lines = [f'{k} = "{v}"' for k, v in base.items() if v is not None]
    path = folder / "node.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def test_node_file_resolves_paths(kit):
    cfg = load_node_file(node_toml(kit, state_dir="st"))
    assert cfg.ca_cert == kit / "pki" / "ca.crt" and cfg.key == kit / "pki" / "site-a.key"
    assert cfg.data == str(kit / "data.csv") and cfg.state_dir == kit / "st"
    assert cfg.approved_apps == kit / "st" / "approved-apps.txt"
    assert cfg.node_config() == {
        "name": "site-a",
        "data": str(kit / "data.csv"),
        "policy": str(kit / "policy.toml"),
        "state": str(kit / "st" / "governance"),
    }
    with_contacts = load_node_file(node_toml(kit, appointments="data.csv"))
    assert with_contacts.node_config()["appointments"] == str(kit / "data.csv")
    sql = load_node_file(node_toml(kit, appointments="postgresql+psycopg://db/x", appointments_table="contacts"))
    assert sql.node_config()["appointments_table"] == "contacts"


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"ca_cert": None}, "ca_cert"),  # no TLS: refused
        ({"ca_cert": "pki/missing.crt"}, "ca_cert"),
        ({"ca_cert": "data.csv"}, "ca_cert"),  # not a certificate
        ({"key": "pki/ca.crt"}, "key"),  # not an OpenSSH key
        ({"hub": "no-port"}, "hub"),
        ({"data": "nowhere.csv"}, "data"),
        ({"name": "bad name!"}, "name"),
        ({"data": "postgresql+psycopg://db/x"}, "table"),
        ({"colour": "blue"}, "colour"),
        ({"appointments": "nowhere.csv"}, "appointments"),
        ({"appointments_table": "contacts"}, "appointments_table"),
        ({"appointments": "postgresql+psycopg://db/x"}, "appointments_table"),
        ({"appointments": "data.csv", "schema": "data.csv"}, "appointments"),
    ],
)
def test_node_file_mistakes_name_file_and_field(kit, capsys, fields, field):
    path = node_toml(kit, **fields)
    with pytest.raises(SpecError) as err:
        load_node_file(path)
    assert str(kit / "node.toml") in str(err.value) or "node.toml" in str(err.value)
    assert field in str(err.value)
    code, text = run_cli(capsys, "node", "start", "--config", path)
    assert code != 0 and text.startswith("error: ") and "Traceback" not in text
    assert len(text.strip().splitlines()) == 1


def test_production_node_needs_its_policy(kit, capsys):
    cfg = load_node_file(node_toml(kit, policy=None))
    with pytest.raises(SpecError, match="field 'policy' is required"):
        check_policy(cfg, local_network=False)
    check_policy(cfg, local_network=True)  # a local demo network may run exploratory...
    remote = load_node_file(node_toml(kit, policy=None, hub="hub.example.nhs.uk:443"))
    with pytest.raises(SpecError, match="policy"):
        check_policy(remote, local_network=True)  # ...but only with its hub on this machine
    code, text = run_cli(capsys, "node", "start", "--config", str(kit / "node.toml"))
    assert code != 0 and "policy" in text and "Traceback" not in text


def test_approved_apps_and_gate(kit, capsys):
    path = node_toml(kit)
    assert main(["node", "approve-app", HASH_A.upper(), "--config", path, "--note", "release 0.1"]) == 0
    assert main(["node", "approve-app", HASH_A, "--config", path]) == 0  # already there: fine
    cfg = load_node_file(path)
    assert read_approved(cfg.approved_apps) == {HASH_A}
    assert cfg.approved_apps.read_text().count(HASH_A) == 1
    gate = Gate(cfg.approved_apps, release_hash=HASH_A)
    assert gate(HASH_A) is None
    assert "has not approved" in gate(HASH_B)
    approve(cfg.approved_apps, HASH_B)  # takes effect without a restart
    assert "not the iaptnet release installed" in gate(HASH_B)
    capsys.readouterr()
    code, text = run_cli(capsys, "node", "approve-app", "not-a-hash", "--config", path)
    assert code != 0 and "app hash" in text
    cfg.approved_apps.write_text("junk\n")
    with pytest.raises(SpecError, match="line 1"):
        read_approved(cfg.approved_apps)


def test_app_hash_is_the_release_bundle(capsys):
    assert main(["app-hash"]) == 0
    first = capsys.readouterr().out.strip()
    assert re.fullmatch(r"[0-9a-f]{64}", first)
    from iaptnet.flower.bundle import release_fab

    data, digest = release_fab()
    assert digest == first
    import io
    import zipfile

    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    assert "pyproject.toml" in names and "iaptnet/node/app.py" in names and "iaptnet/coordinator/serverapp.py" in names
    assert not [n for n in names if n.startswith("tests/") or n.endswith((".pyc", ".csv", ".parquet"))]
    # The bundle's project file is written from the installed package (a wheel install has no
    # pyproject.toml): this release's version, and the flwr pin the project installs.
    import tomllib
    from pathlib import Path

    import iaptnet

    project = tomllib.loads(zipfile.ZipFile(io.BytesIO(data)).read("pyproject.toml").decode())
    assert project["project"]["version"] == iaptnet.__version__
    assert project["tool"]["flwr"]["app"]["components"]["clientapp"] == "iaptnet.node.app:app"
    installed = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
    assert project["project"]["dependencies"] == [d for d in installed if d.startswith("flwr")]


def coordinator_toml(folder, **fields) -> str:
    base = {
        "host": "127.0.0.1",
        "ca_cert": "pki/ca.crt",
        "cert": "pki/hub.crt",
        "key": "pki/hub.key",
        "state_dir": "hub-state",
    }
    base.update(fields)
    lines = [f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v}" for k, v in base.items() if v is not None]
    path = folder / "coordinator.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_coordinator_file_and_superlink_flags(kit):
    cfg = load_hub_config(coordinator_toml(kit, port=9443))
    cmd = superlink_command(cfg)
    assert "--enable-supernode-auth" in cmd and "--disable-runtime-dependency-installation" in cmd
    assert "--insecure" not in cmd
    assert cmd[cmd.index("--ssl-certfile") + 1] == str(kit / "pki" / "hub.crt")
    assert cmd[cmd.index("--port") + 1] == "9443"
    assert "--database" not in cmd  # default: Flower's state in memory, node keys replayed
    sqlite = superlink_command(load_hub_config(coordinator_toml(kit, database="sqlite")))
    assert sqlite[sqlite.index("--database") + 1] == str(kit / "hub-state" / "state.db")
    # The warm ServerApp serves the runs: the SuperLink starts no SuperExec of its own, and the
    # worker reaches the Runtime API on this machine, trusting only the network CA.
    assert cmd[cmd.index("--isolation") + 1] == "process"
    assert "--isolation" not in superlink_command(cfg, warm=False)
    worker = warm_serverapp_command(cfg, parent_pid=4321)
    assert worker[1:3] == ["-m", "iaptnet.flower.warm_serverapp"]
    assert worker[worker.index("--runtime-api-address") + 1] == "127.0.0.1:9443"
    assert worker[worker.index("--root-certificates") + 1] == str(kit / "pki" / "ca.crt")
    assert worker[worker.index("--parent-pid") + 1] == "4321"
    anywhere = load_hub_config(coordinator_toml(kit, port=9443, host="0.0.0.0"))
    assert anywhere.runtime_address == "127.0.0.1:9443"


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"cert": None}, "cert"),
        ({"cert": "pki/nope.crt"}, "cert"),
        ({"ca_cert": "pki/hub.key"}, "ca_cert"),
        ({"port": 70000}, "port"),
        ({"state_dir": None}, "state_dir"),
        ({"database": "postgres"}, "database"),
    ],
)
def test_coordinator_file_mistakes(kit, capsys, fields, field):
    path = coordinator_toml(kit, **fields)
    with pytest.raises(SpecError) as err:
        load_hub_config(path)
    assert "coordinator.toml" in str(err.value) and field in str(err.value)
    code, text = run_cli(capsys, "coordinator", "start", "--config", path)
    assert code != 0 and "Traceback" not in text
    code, text = run_cli(capsys, "coordinator", "register-node", "x", "pki/site-a.pub", "--config", path)
    assert code != 0 and "Traceback" not in text


def test_register_node_checks_the_key_first(kit, capsys):
    path = coordinator_toml(kit)
    code, text = run_cli(
        capsys, "coordinator", "register-node", "site-a", str(kit / "pki" / "ca.crt"), "--config", path
    )
    assert code != 0 and "OpenSSH public key" in text


def test_hub_file_mistakes(kit, capsys):
    hub = kit / "hub.toml"
    hub.write_text('address = "127.0.0.1:9092"\nca_cert = "pki/ca.crt"\n')
    assert load_hub_file(hub).ca_cert == kit / "pki" / "ca.crt"
    (kit / "study.toml").write_text('name = "s"\nfamily = "binomial"\nformula = "y ~ x"\n')
    for text_, field in (
        ('address = "nowhere"\nca_cert = "pki/ca.crt"\n', "address"),
        ('address = "127.0.0.1:9092"\n', "ca_cert"),
        ('address = "127.0.0.1:9092"\nca_cert = "data.csv"\n', "ca_cert"),
        ('address = "127.0.0.1:9092"\nca_cert = "pki/ca.crt"\nnode_timeout = -1\n', "node_timeout"),
    ):
        hub.write_text(text_)
        with pytest.raises(SpecError, match=field):
            load_hub_file(hub)
        code, err = run_cli(capsys, "run", str(kit / "study.toml"), "--engine", "flower", "--hub", str(hub))
        assert code != 0 and "hub.toml" in err and "Traceback" not in err
    code, err = run_cli(capsys, "run", str(kit / "study.toml"), "--engine", "flower")
    assert code != 0 and "--hub" in err


def test_deploy_examples_use_only_known_fields():
    import tomllib
    from pathlib import Path

    from iaptnet.coordinator.engines.flower import HUB_KEYS
    from iaptnet.coordinator.hub import KEYS as COORDINATOR_KEYS
    from iaptnet.node.config import KEYS as NODE_KEYS
    from iaptnet.node.config import TUNING_KEYS

    examples = Path(__file__).resolve().parents[1] / "deploy" / "examples"
    node = tomllib.loads((examples / "node.toml").read_text())
    assert set(node) <= NODE_KEYS and set(node["tuning"]) <= TUNING_KEYS
    assert {"name", "hub", "ca_cert", "key", "data", "policy"} <= set(node)
    assert set(tomllib.loads((examples / "coordinator.toml").read_text())) <= COORDINATOR_KEYS
    assert set(tomllib.loads((examples / "hub.toml").read_text())) <= HUB_KEYS


def test_documented_examples_of_the_network_files_use_only_known_fields():
    import re
    import tomllib
    from pathlib import Path

    from iaptnet.coordinator.engines.flower import HUB_KEYS
    from iaptnet.coordinator.hub import KEYS as COORDINATOR_KEYS
    from iaptnet.node.config import KEYS as NODE_KEYS
    from iaptnet.node.config import TUNING_KEYS

    # The operator guide's page of the three files; it includes them with pymdownx.snippets
    # (--8<-- "deploy/examples/..."), so the page is read with its inclusions expanded.
    root = Path(__file__).resolve().parents[1]
    page = (root / "docs" / "operator" / "configuration.md").read_text()
    page = re.sub(
        r'^--8<-- "([^"]+)"$',
        lambda m: (root / m.group(1)).read_text().rstrip("\n"),
        page,
        flags=re.MULTILINE,
    )
    blocks = {
        m.group(1): tomllib.loads(m.group(0)[len("```toml") : -3])
        for m in re.finditer(r"```toml\n# (?:/etc/iaptnet/)?(hub|node|coordinator)\.toml:.*?```", page, re.DOTALL)
    }
    assert set(blocks) == {"hub", "node", "coordinator"}
    assert set(blocks["hub"]) <= HUB_KEYS and set(blocks["coordinator"]) <= COORDINATOR_KEYS
    assert set(blocks["node"]) <= NODE_KEYS and set(blocks["node"]["tuning"]) <= TUNING_KEYS


def test_unreachable_hub_is_one_plain_sentence(kit, capsys):
    import socket

    from iaptnet.coordinator.catalogue import catalogue_paths
    from iaptnet.protocol.errors import NetworkError

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    hub = kit / "hub.toml"
    hub.write_text(f'address = "127.0.0.1:{port}"\nca_cert = "pki/ca.crt"\n[services]\nZN1 = "site-a"\n')
    d1 = next(p for p in catalogue_paths() if p.stem == "d1_sessions")
    code, err = run_cli(capsys, "run", str(d1), "--engine", "flower", "--hub", str(hub))
    assert code == NetworkError.exit_code and "Traceback" not in err
    assert f"the hub at 127.0.0.1:{port} did not accept the run: it did not answer" in err and "refused" in err
    assert len(err.strip().splitlines()) == 1 and not re.search(r"[\u2500-\u257f]", err)


def test_network_up_polling_interval(tmp_path, capsys):
    from iaptnet.ops.launcher import default_poll_active, default_poll_idle

    # all processes share one machine: fewer polls as nodes are added, never slower than 1 s
    assert [default_poll_active(n) for n in (1, 3, 4, 8, 20)] == [0.1, 0.1, 0.5, 1.0, 1.0]
    assert [default_poll_idle(n) for n in (1, 3, 4, 20)] == [0.25, 0.25, 1.0, 1.0]
    (tmp_path / "network.toml").write_text('[[node]]\nname = "a"\ndata = "a.csv"\nservices = ["ZN1"]\n')
    (tmp_path / "a.csv").write_text("x,y\n1,0\n")
    code, err = run_cli(capsys, "network", "up", str(tmp_path / "network.toml"), "--poll-active", "0")
    assert code == 2 and "--poll-active 0" in err and "Traceback" not in err
    code, err = run_cli(capsys, "network", "up", str(tmp_path / "network.toml"), "--poll-idle", "5")
    assert code == 2 and "--poll-idle 5" in err and "from 0.05 to 3 seconds" in err and "Traceback" not in err
    assert not (tmp_path / ".iaptnet-network").exists()  # nothing started, nothing written


def test_the_flwr_connection_file_is_never_seen_half_written(tmp_path):
    """`network up` registers node keys four at a time, each registration writing the hub's
    flwr connection file while other `flwr` commands read it (at 128 nodes one read it empty:
    "SuperLink connection 'hub' not found")."""
    import threading
    import tomllib

    from iaptnet.coordinator.hub import CONNECTION, write_connection

    home, ca = tmp_path / "flwr-home", tmp_path / "ca.crt"
    ca.write_text("x")
    write_connection(home, "127.0.0.1:1", ca)
    stop, bad = threading.Event(), []

    def writer(k: int) -> None:
        while not stop.is_set():
            write_connection(home, f"127.0.0.1:{1 + k % 2}", ca)  # alternating: really rewritten

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        for _ in range(3000):
            text = (home / "config.toml").read_text()
            try:
                if CONNECTION not in tomllib.loads(text)["superlink"]:
                    bad.append(text)
            except (tomllib.TOMLDecodeError, KeyError):
                bad.append(text)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not bad, bad[:3]
    assert [p.name for p in home.iterdir()] == ["config.toml"]  # no temporary file left

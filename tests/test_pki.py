"""The network's keys and certificates: a CA, a hub certificate it signs, node key pairs in the
formats Flower's SuperLink and SuperNode read; no overwriting; clear errors for bad files."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from iaptnet import keys as pki
from iaptnet.cli import main
from iaptnet.protocol.errors import SpecError


def test_ca_signs_hub_certificate_with_hosts(tmp_path):
    ca_cert, ca_key = pki.init_ca(tmp_path / "pki")
    cert_path, key_path = pki.issue_certificate(tmp_path / "pki", tmp_path / "hub", ["hub.example.nhs.uk", "10.1.2.3"])
    ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"hub.example.nhs.uk", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("10.1.2.3"),
        ipaddress.ip_address("127.0.0.1"),
    }
    assert cert.not_valid_after_utc <= ca.not_valid_after_utc
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()
    for secret in (ca_key, key_path):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600


def test_node_key_pair_is_what_flower_reads(tmp_path):
    key_path, pub_path = pki.node_key(tmp_path, "trust-a")
    private = serialization.load_ssh_private_key(key_path.read_bytes(), password=None)
    public = serialization.load_ssh_public_key(pub_path.read_bytes().strip())
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(private.curve, ec.SECP256R1)  # cheap for the hub to check on every request
    assert private.public_key().public_numbers() == public.public_numbers()
    pki.check_node_private_key(key_path, "field")
    assert pki.check_node_public_key(pub_path).startswith(b"ecdsa-sha2-nistp256 ")


def test_never_overwrites_without_force(tmp_path):
    pki.init_ca(tmp_path)
    before = (tmp_path / "ca.key").read_bytes()
    with pytest.raises(SpecError, match="refusing to overwrite"):
        pki.init_ca(tmp_path)
    assert (tmp_path / "ca.key").read_bytes() == before
    pki.init_ca(tmp_path, overwrite=True)
    assert (tmp_path / "ca.key").read_bytes() != before


def test_bad_files_are_one_sentence(tmp_path, capsys):
    (tmp_path / "ca.crt").write_text("not a certificate")
    with pytest.raises(SpecError, match="not a PEM certificate"):
        pki.load_certificate(tmp_path / "ca.crt")
    with pytest.raises(SpecError, match="not found"):
        pki.load_ca(tmp_path / "missing")
    (tmp_path / "n.pub").write_text("ssh-rsa AAAA")
    with pytest.raises(SpecError, match="not an OpenSSH public key"):
        pki.check_node_public_key(tmp_path / "n.pub")
    # The command line: an issue without a CA is one line and a non-zero exit.
    code = main(["pki", "issue", "--ca-dir", str(tmp_path / "nowhere"), "--host", "x"])
    err = capsys.readouterr().err
    assert code != 0 and err.startswith("error: ") and "Traceback" not in err


def test_cli_creates_a_network_pki(tmp_path, capsys):
    d = tmp_path / "pki"
    assert main(["pki", "init", "--dir", str(d)]) == 0
    assert main(["pki", "issue", "--ca-dir", str(d), "--host", "localhost"]) == 0
    assert main(["pki", "node-key", "site-a", "--out", str(tmp_path / "keys")]) == 0
    assert {p.name for p in d.iterdir()} == {"ca.crt", "ca.key", "hub.crt", "hub.key"}
    assert {p.name for p in (tmp_path / "keys").iterdir()} == {"site-a.key", "site-a.pub"}

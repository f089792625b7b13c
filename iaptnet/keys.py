"""The network's keys and certificates, made with the `cryptography` package.

* `init_ca` — the network CA (ECDSA P-384, self-signed): `ca.crt` (shared with every Trust and
  analyst) and `ca.key` (kept by the coordinator's operator, offline if possible).
* `issue_certificate` — the hub's TLS certificate signed by the CA, with its host names and IP
  addresses as subject alternative names (localhost and 127.0.0.1 are always added: the hub's
  own ServerApp runtime connects to it locally).
* `node_key` — a node's SuperNode authentication key pair (ECDSA P-256): `NAME.key` (OpenSSH
  private key, stays at the Trust) and `NAME.pub` (OpenSSH public key, sent to the
  coordinator, who registers it with `iaptnet coordinator register-node`). The node signs every
  request it makes and the hub checks each signature: a P-256 check costs the hub a seventh of
  a P-384 one (bench/bench_hub.py), at the 128-bit strength NIST and the NCSC accept. A
  P-384 node key made by an earlier release still works.

Private keys are written with mode 0600 and never overwritten unless asked.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .protocol.errors import SpecError

CA_CERT, CA_KEY = "ca.crt", "ca.key"
CURVE = ec.SECP384R1  # the CA and the hub's TLS certificate
NODE_CURVE = ec.SECP256R1  # node authentication keys (see the module docstring)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write(path: Path, data: bytes, *, private: bool, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise SpecError(f"{path}: already exists; refusing to overwrite it (pass --force to replace it).")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def init_ca(
    folder: str | Path, *, name: str = "iaptnet network CA", days: int = 3650, overwrite: bool = False
) -> tuple[Path, Path]:
    """Create the network CA in `folder`; return (ca.crt, ca.key)."""
    folder = Path(folder)
    key = ec.generate_private_key(CURVE())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    cert_path, key_path = folder / CA_CERT, folder / CA_KEY
    _write(key_path, _pem_key(key), private=True, overwrite=overwrite)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False, overwrite=overwrite)
    return cert_path, key_path


def load_ca(folder: str | Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    folder = Path(folder)
    cert = load_certificate(folder / CA_CERT, "CA certificate")
    try:
        key = serialization.load_pem_private_key((folder / CA_KEY).read_bytes(), password=None)
    except FileNotFoundError:
        raise SpecError(
            f"{folder / CA_KEY}: CA private key not found; create the CA with 'iaptnet pki init'."
        ) from None
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise SpecError(f"{folder / CA_KEY}: not a readable unencrypted PEM private key.") from None
    return cert, key


def load_certificate(path: str | Path, what: str = "certificate") -> x509.Certificate:
    """Read a PEM certificate, or raise SpecError naming the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SpecError(f"{path}: {what} not found.") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the {what} ({exc.strerror}).") from None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise SpecError(f"{path}: not a PEM certificate; expected the {what} as written by 'iaptnet pki'.") from None


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    seen = set()
    for host in [*hosts, "localhost", "127.0.0.1"]:
        host = host.strip()
        if not host or host in seen:
            continue
        seen.add(host)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def issue_certificate(
    ca_folder: str | Path,
    out_folder: str | Path,
    hosts: list[str],
    *,
    name: str = "hub",
    days: int = 825,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Issue a TLS server certificate for `hosts`, signed by the CA; return (NAME.crt, NAME.key)."""
    ca_cert, ca_key = load_ca(ca_folder)
    key = ec.generate_private_key(CURVE())
    now = _now()
    cn = hosts[0] if hosts else "localhost"
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    out = Path(out_folder)
    cert_path, key_path = out / f"{name}.crt", out / f"{name}.key"
    _write(key_path, _pem_key(key), private=True, overwrite=overwrite)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False, overwrite=overwrite)
    return cert_path, key_path


def node_key(out_folder: str | Path, name: str, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Create a SuperNode authentication key pair; return (NAME.key, NAME.pub)."""
    key = ec.generate_private_key(NODE_CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    out = Path(out_folder)
    key_path, pub_path = out / f"{name}.key", out / f"{name}.pub"
    _write(key_path, private, private=True, overwrite=overwrite)
    _write(pub_path, public + f" iaptnet-node-{name}\n".encode(), private=False, overwrite=overwrite)
    return key_path, pub_path


def check_node_private_key(path: str | Path, field: str) -> None:
    """Raise SpecError unless `path` holds an OpenSSH EC private key (what a SuperNode needs)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SpecError(f"{field}: {path} not found; create a key pair with 'iaptnet pki node-key'.") from None
    except OSError as exc:
        raise SpecError(f"{field}: cannot read {path} ({exc.strerror}).") from None
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise SpecError(
            f"{field}: {path} is not an unencrypted OpenSSH private key as written by 'iaptnet pki node-key'."
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SpecError(f"{field}: {path} is not an elliptic-curve key; create one with 'iaptnet pki node-key'.")


def check_pem_private_key(path: str | Path, field: str) -> None:
    """Raise SpecError unless `path` holds an unencrypted PEM private key (the hub's TLS key)."""
    try:
        serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError:
        raise SpecError(f"{field}: cannot read {path}.") from None
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise SpecError(
            f"{field}: {path} is not an unencrypted PEM private key as written by 'iaptnet pki issue'."
        ) from None


def check_node_public_key(path: str | Path) -> bytes:
    """The OpenSSH public key text of a node, checked to be an EC key."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SpecError(f"{path}: public key not found.") from None
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise SpecError(f"{path}: not an OpenSSH public key as written by 'iaptnet pki node-key'.") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise SpecError(f"{path}: not an elliptic-curve public key; create one with 'iaptnet pki node-key'.")
    return data

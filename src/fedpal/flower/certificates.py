"""TLS material for a SuperLink and authentication keys for SuperNodes, in the formats flwr 1.42 reads.

- TLS: a private CA (``ca.crt``/``ca.key``) signs one server certificate (``server.crt``/``server.key``) whose
  subject alternative names cover 127.0.0.1, localhost and the hosts the SuperNodes dial. The SuperLink serves its
  one HTTPS port with ``--ssl-certfile/--ssl-keyfile/--ssl-ca-certfile``; SuperNodes and the ``flwr`` CLI trust
  ``ca.crt``. The SuperLink's own SuperExec and ServerApp dial it on 127.0.0.1, hence that SAN is always present.
- Node keys: ``nodes/node-<i>.key`` is an EC P-384 private key in OpenSSH format (what
  ``flower-supernode --auth-supernode-private-key`` loads) and ``nodes/node-<i>.pub`` its OpenSSH public key (what
  ``flwr supernode register`` sends to the SuperLink's Control API). flwr 1.42 keeps no allow-list file: the
  SuperLink's state database is the list of registered keys.

Existing files are kept, so the command can be rerun to add node keys; private keys are written 0600.
``cryptography`` comes with flwr and is imported only when material is made or checked.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpal.errors import UserError

if TYPE_CHECKING:
    from cryptography import x509

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
NODES = "nodes"
LOOPBACK_NAMES = ("127.0.0.1", "localhost")
CA_DAYS = 3650
SERVER_DAYS = 825  # the longest leaf lifetime common TLS clients accept


@dataclass(frozen=True)
class CertificateFiles:
    """Where the TLS files of one certificates directory are."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / CA_CERT

    @property
    def ca_key(self) -> Path:
        return self.directory / CA_KEY

    @property
    def server_cert(self) -> Path:
        return self.directory / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.directory / SERVER_KEY

    def node_key(self, index: int) -> Path:
        return self.directory / NODES / f"node-{index}.key"

    def node_public_key(self, index: int) -> Path:
        return self.directory / NODES / f"node-{index}.pub"


def _require_cryptography() -> None:
    """cryptography comes with flwr; without it, say how to install the extra."""
    from fedpal.flower import require_flower

    require_flower("fedpal flower certs")


def parse_hosts(text: str) -> list[str]:
    """``"a.example.org,10.0.0.5"`` → the names and addresses the server certificate must also cover."""
    hosts = [h.strip() for h in text.split(",") if h.strip()]
    for host in hosts:
        if any(c.isspace() for c in host) or "/" in host or (":" in host and not _is_ip(host)):
            raise UserError(f"--hosts expects comma-separated host names or IP addresses, got '{host}'")
    return hosts


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _general_name(host: str) -> x509.GeneralName:
    from cryptography import x509

    if _is_ip(host):
        return x509.IPAddress(ipaddress.ip_address(host))
    return x509.DNSName(host)


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` readable by its owner only, with no moment at a wider mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600)  # O_CREAT's mode is filtered by the umask; 0600 is what we promise


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, 0o644)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _pem_key(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _make_ca(files: CertificateFiles) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedpal Flower CA")])
    start = _now() - datetime.timedelta(minutes=5)  # tolerate small clock skew between machines
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    _write_private(files.ca_key, _pem_key(key))
    _write_public(files.ca_cert, cert.public_bytes(serialization.Encoding.PEM))


def _load_ca(files: CertificateFiles) -> tuple[x509.Certificate, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    if not files.ca_key.exists():
        raise UserError(f"{files.ca_key} is missing; it is needed to sign a new server certificate")
    cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
    return cert, key


def _make_server_certificate(files: CertificateFiles, hosts: list[str]) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_cert, ca_key = _load_ca(files)
    key = ec.generate_private_key(ec.SECP256R1())
    names = list(dict.fromkeys([*LOOPBACK_NAMES, *hosts]))
    start = _now() - datetime.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[-1])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    _write_private(files.server_key, _pem_key(key))
    _write_public(files.server_cert, cert.public_bytes(serialization.Encoding.PEM))


def server_certificate_names(path: Path) -> list[str]:
    """The DNS names and IP addresses (as text) a server certificate is valid for."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(path.read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName), *(str(a) for a in san.get_values_for_type(x509.IPAddress))]


def _make_node_key(files: CertificateFiles, index: int) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())  # the curve flwr uses for the keys it makes itself
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_private(files.node_key(index), private)
    _write_public(files.node_public_key(index), public + f" fedpal-node-{index}\n".encode())


def write_certificates(directory: str | Path, hosts: list[str], nodes: int) -> list[Path]:
    """Create what is missing in ``directory``: the CA, the server certificate for loopback plus ``hosts``, and
    node key pairs 0..nodes-1. Returns the files created. A kept server certificate must already cover ``hosts``."""
    _require_cryptography()
    if nodes < 0:
        raise UserError(f"--nodes must be 0 or more, got {nodes}")
    files = CertificateFiles(Path(directory))
    if files.directory.exists() and not files.directory.is_dir():
        raise UserError(f"{files.directory} exists and is not a directory")
    files.directory.mkdir(parents=True, exist_ok=True)
    created: list[Path] = []
    if not files.ca_cert.exists():
        if files.server_cert.exists():
            raise UserError(f"{files.directory} has {SERVER_CERT} but no {CA_CERT}; use an empty directory")
        _make_ca(files)
        created += [files.ca_cert, files.ca_key]
    if files.server_cert.exists():
        missing = [h for h in [*LOOPBACK_NAMES, *hosts] if h not in server_certificate_names(files.server_cert)]
        if missing:
            raise UserError(
                f"{files.server_cert} does not cover {', '.join(missing)}; delete {SERVER_CERT} and {SERVER_KEY} "
                "to issue a new one (the CA is kept, so nodes need no new files)"
            )
    else:
        _make_server_certificate(files, hosts)
        created += [files.server_cert, files.server_key]
    for index in range(nodes):
        if not files.node_key(index).exists():
            _make_node_key(files, index)
            created += [files.node_key(index), files.node_public_key(index)]
    return created


def require_certificates(directory: str | Path, *, server: bool) -> CertificateFiles:
    """The certificates in ``directory``, or a one-line error naming what is missing. A SuperLink needs the CA
    and its server pair; a SuperNode and the CLI need only the CA certificate."""
    files = CertificateFiles(Path(directory))
    if not files.directory.is_dir():
        raise UserError(f"certificates directory {files.directory} does not exist (make it with `fedpal flower certs`)")
    needed = [files.ca_cert, files.server_cert, files.server_key] if server else [files.ca_cert]
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        raise UserError(f"{files.directory} lacks {', '.join(missing)} (make them with `fedpal flower certs`)")
    return files

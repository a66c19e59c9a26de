"""Test credentials for a Flower federation: a CA, the SuperLink's TLS certificate, and SuperNode key pairs.

The same files as these openssl / ssh-keygen steps (what a real deployment would do with its own CA)::

    openssl ecparam -name secp384r1 -genkey -noout -out ca.key
    openssl req -x509 -new -key ca.key -subj "/CN=fedlm test CA" -days 365 -out ca.crt
    openssl ecparam -name secp384r1 -genkey -noout -out server.key
    openssl req -new -key server.key -subj "/CN=superlink" -out server.csr
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 -out server.crt \\
        -extfile <(printf "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:<SERVER_IP>")
    ssh-keygen -t ecdsa -b 384 -N "" -f node0      # node0 (private, for flower-supernode), node0.pub (register it)

SuperNode authentication in Flower 1.41: the SuperLink runs with ``--enable-supernode-auth``; each node's public
key is registered with ``flwr supernode register node0.pub`` (``fedlm flower register``) and the node starts with
``--auth-supernode-private-key node0``. A node whose key is not registered is refused by the SuperLink.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

_DAYS = 365


@dataclass(frozen=True)
class Credentials:
    """The files :func:`create_credentials` wrote."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    node_keys: list[Path]  # OpenSSH private keys; the public key is beside each, with ``.pub``


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    path.chmod(0o600)


def _cert(
    subject: str, public_key: ec.EllipticCurvePublicKey, issuer: x509.Name | None, signer: ec.EllipticCurvePrivateKey, ca: bool, hosts: list[str]
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=_DAYS))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if hosts:
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(signer, hashes.SHA256())


def node_key_pair(path: Path) -> Path:
    """An ECDSA P-384 key pair in OpenSSH format (``ssh-keygen -t ecdsa -b 384``): ``path`` and ``path.pub``."""
    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    path.chmod(0o600)
    path.with_name(path.name + ".pub").write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n"
    )
    return path


def create_credentials(directory: Path, num_nodes: int, hosts: list[str] | None = None) -> Credentials:
    """A CA, a SuperLink certificate for ``hosts`` (always localhost and 127.0.0.1) and ``num_nodes`` node keys."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = _cert("fedlm test CA", ca_key.public_key(), None, ca_key, True, [])
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = _cert("superlink", server_key.public_key(), ca.subject, ca_key, False, ["localhost", "127.0.0.1", *(hosts or [])])
    _write_key(ca_key, directory / "ca.key")
    (directory / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    _write_key(server_key, directory / "server.key")
    (directory / "server.crt").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    nodes = [node_key_pair(directory / f"node{i}") for i in range(num_nodes)]
    return Credentials(directory / "ca.crt", directory / "server.crt", directory / "server.key", nodes)

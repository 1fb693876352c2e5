"""TLS certificates and SuperNode keys for a Flower deployment, made with ``cryptography`` (no openssl).

* :func:`make_certificates`: a self-signed CA (``ca.crt``) and a server certificate it signs (``server.pem``,
  key ``server.key``) whose subject alternative names are the SuperLink's host names and IPs. The SuperLink
  takes ``--ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key``; SuperNodes and the
  ``flwr`` CLI trust ``ca.crt`` (``--root-certificates`` / ``root-certificates`` in ``config.toml``).
* :func:`make_node_key`: one SuperNode's ECDSA P-384 key pair in OpenSSH format (what ``ssh-keygen -t ecdsa
  -b 384`` writes): ``<name>`` for ``--auth-supernode-private-key``, ``<name>.pub`` for
  ``flwr supernode register``.

Private keys are written with mode 0600. For production, keep ``ca.key`` off the SuperLink machine.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("localhost", "127.0.0.1")


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_certificates(
    out_dir: str | os.PathLike, hosts: Sequence[str] = DEFAULT_HOSTS, days: int = 365
) -> dict:
    """Write ``ca.crt``, ``ca.key``, ``server.pem`` and ``server.key`` to ``out_dir``; return their paths.

    ``hosts``: the names and IP addresses SuperNodes and the CLI use to reach the SuperLink (each becomes a
    subject alternative name; TLS checks the address against them).
    """
    if not hosts:
        raise ValueError("hosts must name at least one DNS name or IP address of the SuperLink")
    out = Path(out_dir)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ortho-adapters federation CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    return {
        "ca_cert": _write(out / "ca.crt", ca_cert.public_bytes(pem)),
        "ca_key": _write(out / "ca.key", _key_pem(ca_key), private=True),
        "server_cert": _write(out / "server.pem", server_cert.public_bytes(pem)),
        "server_key": _write(out / "server.key", _key_pem(server_key), private=True),
    }


def make_node_key(out_dir: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Write the SuperNode key pair ``<name>`` (private, OpenSSH) and ``<name>.pub``; return both paths."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    out = Path(out_dir)
    return _write(out / name, private, private=True), _write(out / f"{name}.pub", public + b"\n")

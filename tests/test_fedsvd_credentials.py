"""TLS certificates and SuperNode keys (``ortho-adapters federated-credentials``), checked with
``cryptography``'s own verification and loaders (the ones Flower uses), independent of how they were made."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key
from cryptography.hazmat.primitives.serialization.ssh import load_ssh_public_key

from ortho_adapters.cli import main
from ortho_adapters.fedsvd.flower.credentials import make_certificates, make_node_key


def test_server_certificate_is_signed_by_the_ca_and_names_the_hosts(tmp_path):
    paths = make_certificates(tmp_path, ["superlink.example.org", "127.0.0.1", "::1"])
    ca = x509.load_pem_x509_certificate(paths["ca_cert"].read_bytes())
    server = x509.load_pem_x509_certificate(paths["server_cert"].read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["superlink.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    key = load_pem_private_key(paths["server_key"].read_bytes(), None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()
    for name in ("ca_key", "server_key"):
        assert stat.S_IMODE(paths[name].stat().st_mode) == 0o600
    with pytest.raises(ValueError, match="hosts"):
        make_certificates(tmp_path / "none", [])


def test_node_key_is_an_openssh_p384_pair(tmp_path):
    private_path, public_path = make_node_key(tmp_path, "node-0")
    private = load_ssh_private_key(private_path.read_bytes(), None)
    public = load_ssh_public_key(public_path.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP384R1)
    assert private.public_key().public_numbers() == public.public_numbers()
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert make_node_key(tmp_path, "node-1")[1].read_bytes() != public_path.read_bytes()


def test_cli_writes_certificates_and_node_keys(tmp_path, capsys):
    assert main(["federated-credentials", "--out", str(tmp_path), "--nodes", "2"]) == 0
    names = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert names == [
        "ca.crt",
        "ca.key",
        "node-0",
        "node-0.pub",
        "node-1",
        "node-1.pub",
        "server.key",
        "server.pem",
    ]
    assert "server_cert" in capsys.readouterr().out


def test_the_flower_app_config_lists_every_setting():
    # Flower refuses a run config key the app folder does not declare ("Invalid run configuration")
    import dataclasses
    from pathlib import Path

    from ortho_adapters.fedsvd.flower.settings import FedSettings

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    app = Path(__file__).resolve().parents[1] / "examples" / "fedsvd_app" / "pyproject.toml"
    declared = tomllib.loads(app.read_text())["tool"]["flwr"]["app"]["config"]
    assert sorted(declared) == sorted(f.name for f in dataclasses.fields(FedSettings))
    FedSettings.from_mapping(declared)  # and its defaults are valid settings

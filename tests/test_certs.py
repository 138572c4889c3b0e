"""`fedmed-certs`: a CA, a SuperLink certificate for its names, per-site keys Flower accepts."""

import argparse
import ipaddress
import os
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from flwr.cli.supernode.register import try_load_public_key
from flwr.supercore.primitives.asymmetric import public_key_to_bytes
from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

from fedmed.certs import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def material(tmp_path) -> Path:
    done = subprocess.run([sys.executable, "-m", "fedmed.certs", str(tmp_path / "certs"), "--host", "localhost",
                           "--ip", "127.0.0.1", "--sites", "a", "b"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert done.returncode == 0, done.stderr
    return tmp_path / "certs"


def test_server_certificate_is_signed_by_the_ca_for_its_names(material):
    ca = x509.load_pem_x509_certificate((material / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((material / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    ca.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    server_key = serialization.load_pem_private_key((material / "server.key").read_bytes(), password=None)
    assert public_key_to_bytes(server_key.public_key()) == public_key_to_bytes(server.public_key())


def test_private_keys_are_0600_and_nothing_is_overwritten(material, capsys):
    for name in ("ca.key", "server.key", "a.key", "b.key"):
        assert (material / name).stat().st_mode & 0o777 == 0o600, name
    before = (material / "a.key").read_bytes()
    assert main([str(material), "--sites", "a"]) == 2
    assert "already holds a.key, a.pub" in capsys.readouterr().err
    assert (material / "a.key").read_bytes() == before
    # a site added later: its keys only, the CA untouched
    assert main([str(material), "--sites", "c"]) == 0
    assert (material / "c.key").stat().st_mode & 0o777 == 0o600


def test_site_keys_load_the_way_flower_loads_them(material):
    for site in ("a", "b"):
        # flower-supernode --auth-supernode-private-key SITE.key
        private, public = _try_setup_client_authentication(
            argparse.Namespace(auth_supernode_private_key=str(material / f"{site}.key"), auth_supernode_public_key=None))
        # flwr supernode register SITE.pub
        assert try_load_public_key(material / f"{site}.pub") == public_key_to_bytes(public)
        assert (material / f"{site}.key").read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert (material / "a.pub").read_bytes() != (material / "b.pub").read_bytes()


def _handshake(material: Path, target: str) -> bool:
    """Whether a gRPC client trusting ca.crt completes TLS with a server holding server.pem."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    credentials = grpc.ssl_server_credentials([((material / "server.key").read_bytes(),
                                                (material / "server.pem").read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        channel = grpc.secure_channel(f"{target}:{port}",
                                      grpc.ssl_channel_credentials((material / "ca.crt").read_bytes()))
        try:
            grpc.channel_ready_future(channel).result(timeout=5)
            return True
        except grpc.FutureTimeoutError:
            return False
        finally:
            channel.close()
    finally:
        server.stop(None)


def test_tls_handshake_succeeds_for_the_certified_names_only(material, tmp_path):
    assert _handshake(material, "localhost")
    assert _handshake(material, "127.0.0.1")
    assert main([str(tmp_path / "name-only"), "--host", "localhost"]) == 0
    assert not _handshake(tmp_path / "name-only", "127.0.0.1")  # the address is not in its SANs


def test_bad_requests_are_refused(tmp_path, capsys):
    assert main([str(tmp_path / "x"), "--ip", "localhost"]) == 2
    assert "--ip 'localhost' is not an IP address" in capsys.readouterr().err
    assert main([str(tmp_path / "x"), "--sites", "../evil"]) == 2
    assert "--sites '../evil'" in capsys.readouterr().err
    assert main([str(tmp_path / "x"), "--sites", "server"]) == 2
    assert main([str(tmp_path / "x")]) == 2
    assert "nothing to make" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

"""`fedmed-certs`: a CA, a SuperLink certificate for its names, per-site keys Flower accepts."""

import argparse
import ipaddress
import os
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

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
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedmed.certs",
            str(tmp_path / "certs"),
            "--host",
            "localhost",
            "--ip",
            "127.0.0.1",
            "--sites",
            "a",
            "b",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
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
            argparse.Namespace(auth_supernode_private_key=str(material / f"{site}.key"), auth_supernode_public_key=None)
        )
        # flwr supernode register SITE.pub
        assert try_load_public_key(material / f"{site}.pub") == public_key_to_bytes(public)
        assert (material / f"{site}.key").read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert (material / "a.pub").read_bytes() != (material / "b.pub").read_bytes()


def _handshake(material: Path, server_name: str) -> None:
    """TLS between a client trusting ca.crt and a server holding server.pem, the way Flower 1.42's
    SuperLink serves (uvicorn, Python's ssl); raises ssl.SSLCertVerificationError on a bad name."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(material / "server.pem", material / "server.key")
    client_context = ssl.create_default_context(cafile=str(material / "ca.crt"))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            connection, _ = listener.accept()
            try:
                with server_context.wrap_socket(connection, server_side=True) as tls:
                    tls.recv(1)
            except (ssl.SSLError, OSError):
                pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with client_context.wrap_socket(raw, server_hostname=server_name) as tls:
                    tls.sendall(b"x")
        finally:
            thread.join(timeout=10)


def test_tls_handshake_succeeds_for_the_certified_names_only(material, tmp_path):
    _handshake(material, "localhost")
    _handshake(material, "127.0.0.1")
    assert main([str(tmp_path / "name-only"), "--host", "localhost"]) == 0
    with pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"):
        _handshake(tmp_path / "name-only", "127.0.0.1")  # the address is not in its SANs
    assert main([str(tmp_path / "other-ca"), "--host", "localhost"]) == 0
    (tmp_path / "mixed").mkdir()
    for name in ("server.pem", "server.key"):
        (tmp_path / "mixed" / name).write_bytes((material / name).read_bytes())
    (tmp_path / "mixed" / "ca.crt").write_bytes((tmp_path / "other-ca" / "ca.crt").read_bytes())
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        _handshake(tmp_path / "mixed", "localhost")  # a CA that did not sign it is not trusted


def test_bad_requests_are_refused(tmp_path, capsys):
    assert main([str(tmp_path / "x"), "--ip", "localhost"]) == 2
    assert "--ip 'localhost' is not an IP address" in capsys.readouterr().err
    assert main([str(tmp_path / "x"), "--sites", "../evil"]) == 2
    assert "--sites '../evil'" in capsys.readouterr().err
    assert main([str(tmp_path / "x"), "--sites", "server"]) == 2
    assert main([str(tmp_path / "x")]) == 2
    assert "nothing to make" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

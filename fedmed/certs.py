"""`fedmed-certs`: development TLS certificates and SuperNode authentication keys, in one folder.

    fedmed-certs certs/ --host localhost --ip 127.0.0.1 --sites a b

makes a certificate authority (``ca.crt``, ``ca.key``), a SuperLink certificate it signs for the
given host names and addresses (``server.pem``, ``server.key``: ``flower-superlink
--ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key``) and, per site, an
EC key pair for SuperNode authentication (``a.key``: ``flower-supernode
--auth-supernode-private-key a.key``; ``a.pub``: ``flwr supernode register a.pub``). Site keys are
written in the OpenSSH formats Flower reads (``load_ssh_private_key``/``load_ssh_public_key``),
on NIST P-384 as Flower's documentation generates them with ``ssh-keygen -t ecdsa -b 384``.
Private keys are created with mode 0600. Without ``--host``/``--ip`` only site keys are made, so
a site can be added to an existing folder later. No file is ever overwritten.

For development and tests: a hospital network's own PKI should issue production certificates.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CURVE = ec.SECP384R1()
SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
RESERVED = ("ca", "server")


def make_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(CURVE)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedmed development CA")])
    cert = (
        _builder(name, name, key.public_key(), days)
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
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts: list[str], ips: list[str], days: int
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The SuperLink's certificate: every host name and IP address a SuperNode may dial, as SANs."""
    key = ec.generate_private_key(CURVE)
    names = [x509.DNSName(host) for host in hosts] + [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (hosts + ips)[0])])
    cert = (
        _builder(subject, ca_cert.subject, key.public_key(), days)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def _builder(subject: x509.Name, issuer: x509.Name, public_key, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def site_key_pair(site: str) -> tuple[bytes, bytes]:
    """(OpenSSH private key, OpenSSH public key line) of a new P-384 key for ``site``."""
    key = ec.generate_private_key(CURVE)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + f" {site}\n".encode()


def write_new(path: Path, data: bytes, private: bool) -> None:
    """Create ``path`` (never overwrite); a private key is 0600 from its first byte."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as file:
        file.write(data)


def planned_files(hosts: list[str], ips: list[str], sites: list[str]) -> list[str]:
    names = ["ca.crt", "ca.key", "server.pem", "server.key"] if hosts or ips else []
    return names + [f"{site}.{ext}" for site in sites for ext in ("key", "pub")]


def check_request(out: Path, hosts: list[str], ips: list[str], sites: list[str], days: int) -> None:
    """Refuse bad names and existing files before anything is written."""
    if days < 1:
        raise ValueError(f"--days {days}: a certificate must be valid for at least one day")
    if not (hosts or ips or sites):
        raise ValueError("nothing to make: give --host/--ip for the SuperLink certificate and/or --sites for site keys")
    for ip in ips:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise ValueError(f"--ip {ip!r} is not an IP address (host names go to --host)") from None
    for site in sites:
        if not SITE_NAME.fullmatch(site) or site in RESERVED:
            raise ValueError(
                f"--sites {site!r}: a site name is letters, digits, '.', '_' or '-' (not starting with "
                f"'.' or '-') and not {' or '.join(RESERVED)}"
            )
    if len(set(sites)) != len(sites):
        raise ValueError(f"--sites names a site twice: {' '.join(sites)}")
    existing = [name for name in planned_files(hosts, ips, sites) if (out / name).exists()]
    if existing:
        raise ValueError(
            f"{out} already holds {', '.join(existing)}; fedmed-certs never overwrites keys "
            "(use another folder, or delete them on purpose)"
        )


def make_material(out: Path, hosts: list[str], ips: list[str], sites: list[str], days: int = 365) -> list[Path]:
    """Write the files ``fedmed-certs`` makes into ``out``; returns their paths."""
    check_request(out, hosts, ips, sites, days)
    out.mkdir(parents=True, exist_ok=True)
    if hosts or ips:
        ca_key, ca_cert = make_ca(days)
        server_key, server_cert = make_server_cert(ca_key, ca_cert, hosts, ips, days)
        write_new(out / "ca.key", pem_private(ca_key), private=True)
        write_new(out / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
        write_new(out / "server.key", pem_private(server_key), private=True)
        write_new(out / "server.pem", server_cert.public_bytes(serialization.Encoding.PEM), private=False)
    for site in sites:
        private, public = site_key_pair(site)
        write_new(out / f"{site}.key", private, private=True)
        write_new(out / f"{site}.pub", public, private=False)
    return [out / name for name in planned_files(hosts, ips, sites)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedmed-certs",
        description=__doc__.split("\n\n")[0],
        epilog="Gives the SuperLink: ca.crt server.pem server.key. Gives each site: ca.crt and its SITE.key. "
        "Registers at the SuperLink: SITE.pub. Keep ca.key offline.",
    )
    parser.add_argument("out", type=Path, help="folder to write into (created if missing)")
    parser.add_argument("--host", action="append", default=[], help="a DNS name of the SuperLink (repeatable)")
    parser.add_argument("--ip", action="append", default=[], help="an IP address of the SuperLink (repeatable)")
    parser.add_argument("--sites", nargs="+", default=[], metavar="SITE", help="one key pair per site name")
    parser.add_argument("--days", type=int, default=365, help="certificate validity (default 365)")
    args = parser.parse_args(argv)
    try:
        written = make_material(args.out, args.host, args.ip, args.sites, args.days)
    except (ValueError, OSError) as error:
        print(f"fedmed-certs: {error}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(path.name for path in written)} to {args.out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

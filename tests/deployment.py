"""Real Flower processes on 127.0.0.1 for the deployment tests and benchmark: a SuperLink,
SuperNodes on site files, `flwr` commands against a temporary FLWR_HOME. Every process is
started through ``Processes`` so that ``stop_all`` ends each one, also when a test fails."""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
FIRST_PORT = 19000


def free_port(start: int = FIRST_PORT) -> int:
    """The first port from ``start`` up that nothing listens on."""
    for port in range(start, start + 1000):
        with socket.socket() as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {start}..{start + 999}")


def wait_until(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(interval)


def tool_env(flwr_home: Path) -> dict[str, str]:
    """This interpreter's bin first on PATH (the SuperLink starts `flower-superexec` from it),
    this checkout importable, Flower's files under ``flwr_home``."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(REPO)
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Processes:
    """Long-running processes of one test, each with its log file; ``stop_all`` ends them all."""

    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir = log_dir
        self.env = env
        self.running: dict[str, subprocess.Popen] = {}
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, command: list[str], cwd: Path | None = None) -> subprocess.Popen:
        log = (self.log_dir / f"{name}.log").open("w")
        # a session of its own: stopping it also stops the processes it started
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=cwd,
                                   start_new_session=True)
        self.running[name] = process
        return process

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        """End the process and everything it started (`flower-superexec` starts its apps in a
        session of their own, so the process group alone is not enough)."""
        process = self.running.pop(name)
        family = [process.pid, *descendants(process.pid)]
        _signal_all(family, sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        _signal_all(family, signal.SIGKILL)
        process.wait(timeout)

    def stop_all(self) -> None:
        for name in list(self.running):
            self.stop(name)

    def run(self, command: list[str], timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(command, capture_output=True, text=True, env=self.env, cwd=cwd, timeout=timeout)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _write_private_key(key, path: Path, encoding_format) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, encoding_format, serialization.NoEncryption()))
    path.chmod(0o600)


def make_certificates(directory: Path, sites: list[str]) -> dict[str, Path]:
    """A development CA, a SuperLink certificate for 127.0.0.1/localhost, and an SSH-format EC
    key pair per site (what `flwr supernode register` and `--auth-supernode-private-key` read)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedmed test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now)
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    server_key = ec.generate_private_key(ec.SECP384R1())
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
              .issuer_name(ca_name).public_key(server_key.public_key())
              .serial_number(x509.random_serial_number()).not_valid_before(now)
              .not_valid_after(now + datetime.timedelta(days=1))
              .add_extension(x509.SubjectAlternativeName(names), critical=False)
              .sign(ca_key, hashes.SHA256()))
    paths = {"ca": directory / "ca.crt", "server_cert": directory / "server.pem", "server_key": directory / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["server_cert"].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    _write_private_key(server_key, paths["server_key"], serialization.PrivateFormat.PKCS8)
    for site in sites:
        key = ec.generate_private_key(ec.SECP384R1())
        _write_private_key(key, directory / f"{site}.key", serialization.PrivateFormat.OpenSSH)
        (directory / f"{site}.pub").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
        paths[site] = directory / f"{site}.key"
    return paths


def write_site_files(medmnist_file: Path, directory: Path, count: int, per_site: int, seed: int = 0) -> list[Path]:
    """``count`` disjoint MedMNIST-layout site files (uint8, train/val keys) cut from the
    official train split, ``per_site`` training and ``per_site // 4`` validation images each."""
    directory.mkdir(parents=True, exist_ok=True)
    with np.load(medmnist_file) as data:
        images, labels = data["train_images"], data["train_labels"]
    order = np.random.default_rng(seed).permutation(len(labels))
    n_val = per_site // 4
    paths = []
    for i in range(count):
        rows = order[i * (per_site + n_val):(i + 1) * (per_site + n_val)]
        path = directory / f"site-{i}.npz"
        np.savez(path, train_images=images[rows[:per_site]], train_labels=labels[rows[:per_site]],
                 val_images=images[rows[per_site:]], val_labels=labels[rows[per_site:]])
        paths.append(path)
    return paths

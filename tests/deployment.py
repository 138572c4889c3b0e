"""Real Flower processes on 127.0.0.1 for the deployment tests and benchmark: a SuperLink,
SuperNodes on site files, `flwr` commands against a temporary FLWR_HOME. Every process is
started through ``Processes`` so that ``stop_all`` ends each one, also when a test fails."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
FIRST_PORT = 19000
PORTS_PER_WORKER = 500


def xdist_worker_index() -> int:
    """0, 1, ... for pytest-xdist's workers gw0, gw1, ... (0 outside `pytest -n`): each worker
    looks for free ports in a range of its own, or two starting servers at the same moment both
    find the same port free and one fails to bind it."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(worker[2:]) if worker[2:].isdigit() else 0


def first_port() -> int:
    """Where this process looks for free ports for a deployment."""
    return FIRST_PORT + PORTS_PER_WORKER * xdist_worker_index()


def free_port(start: int | None = None) -> int:
    """The first port from ``start`` (by default this worker's ``first_port``) up that nothing
    listens on."""
    start = first_port() if start is None else start
    for port in range(start, start + PORTS_PER_WORKER):
        with socket.socket() as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {start}..{start + PORTS_PER_WORKER - 1}")


def wait_until(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(interval)


def tool_env(flwr_home: Path) -> dict[str, str]:
    """This interpreter's bin first on PATH (the SuperLink starts `flower-superexec` from it),
    this checkout importable, Flower's files under ``flwr_home``, one PyTorch thread a process:
    here both hospitals and the server share the test machine's cores, and two sites training
    at once with a thread per core each spun against each other (a site's 8 training steps
    took 3 s alone and 22 s beside the other, README "Deploying at hospitals")."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(REPO)
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = "1"
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
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=cwd, start_new_session=True
        )
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


def make_certificates(directory: Path, sites: list[str]) -> dict[str, Path]:
    """`fedmed-certs`: a development CA, a SuperLink certificate for 127.0.0.1/localhost and a
    key pair per site; the paths the SuperLink and SuperNodes are started with."""
    subprocess.run(
        [sys.executable, "-m", "fedmed.certs", str(directory), "--host", "localhost", "--ip", HOST, "--sites", *sites],
        check=True,
        capture_output=True,
        timeout=120,
        cwd=REPO,
    )
    paths = {
        "ca": directory / "ca.crt",
        "server_cert": directory / "server.pem",
        "server_key": directory / "server.key",
    }
    return {**paths, **{site: directory / f"{site}.key" for site in sites}}


def write_site_files(directory: Path, overrides: list[str]) -> list[Path]:
    """`fedmed-sites`: one file per site, the simulation's split of the composed dataset."""
    subprocess.run(
        [sys.executable, "-m", "fedmed.sites", *overrides, f"output_dir={directory}"],
        check=True,
        capture_output=True,
        timeout=600,
        cwd=REPO,
    )
    return sorted(directory.glob("site-*.npz"))

"""A real deployment on 127.0.0.1: a TLS SuperLink with SuperNode authentication, SuperNodes
on site files, runs started and followed with `fedmed-run --wait` (README, "Deploying at
hospitals"). Every wait is bounded and every process is stopped at the end, also on failure."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from fedmed.data import dataset_from_config
from fedmed.models import build_model
from fedmed.report import read_metrics
from fedmed.serialization import load_model_file
from fedmed.train import evaluate
from tests.deployment import HOST, REPO, Processes, free_port, make_certificates, tool_env, wait_until, write_site_files
from tests.helpers import compose_config

# the module's SuperLink and SuperNodes start once, in the first test's setup; each run is
# bounded by RUN_TIMEOUT on its own
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800), pytest.mark.xdist_group("deployment")]

SITES = ["site-a", "site-b"]
CONNECTION = "hospitals"
RUN_TIMEOUT = 600


# the federation's data: the server's test split, and the sites' files cut by `fedmed-sites`
DATA = [
    "dataset=synthetic",
    "dataset.n_train=256",
    "dataset.n_val=64",
    "dataset.n_test=200",
    "seed=0",
    f"federation.num_clients={len(SITES)}",
]


def overrides(output_dir: Path, rounds: int = 2) -> list[str]:
    return [
        *DATA,
        "model=resnet18",
        f"federation.clients_per_round={len(SITES)}",
        f"federation.rounds={rounds}",
        "federation.connect_timeout_s=300",
        "eval.attacks=[]",
        "eval.clients=false",
        "client.batch_size=16",
        f"output_dir={output_dir}",
    ]


class Deployment:
    """A TLS SuperLink with SuperNode authentication, its sites' keys registered."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.flwr_home = root / "flwr-home"
        self.flwr_home.mkdir(parents=True)
        self.certs = make_certificates(root / "certs", [*SITES, "site-x"])
        self.site_files = dict(zip(SITES, write_site_files(root / "sites", DATA)))
        self.port = free_port()
        self.address = f"{HOST}:{self.port}"
        # Flower's own configuration file: the connection `flwr run/ls/supernode` use
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{self.address}"\nroot-certificates = "{self.certs["ca"]}"\n'
        )
        self.processes = Processes(root / "logs", tool_env(self.flwr_home))
        self.node_ports: dict[str, int] = {}

    def start_superlink(self) -> None:
        self.processes.start(
            "superlink",
            [
                "flower-superlink",
                "--ssl-ca-certfile",
                str(self.certs["ca"]),
                "--ssl-certfile",
                str(self.certs["server_cert"]),
                "--ssl-keyfile",
                str(self.certs["server_key"]),
                "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
                "--port",
                str(self.port),
            ],
            cwd=self.root,
        )
        wait_until(lambda: self.flwr("ls", CONNECTION, check=False).returncode == 0, 90, "the SuperLink to serve")

    def flwr(self, *args: str, check: bool = True, timeout: float = 120):
        done = self.processes.run(["flwr", *args], timeout=timeout, cwd=self.root)
        if check:
            assert done.returncode == 0, done.stdout + done.stderr
        return done

    def server_log(self, run_id: int) -> str:
        return self.flwr("log", str(run_id), CONNECTION, "--show").stdout

    def register(self, site: str) -> None:
        self.flwr("supernode", "register", str(self.root / "certs" / f"{site}.pub"), CONNECTION, "--name", site)

    def start_site(
        self, site: str, *extra: str, key: str | None = None, tls: bool = True, auth: bool = True, warm: bool = True
    ) -> None:
        """The site's SuperNode as the README starts it; with ``warm``, ``--isolation process`` and
        `fedmed-warm-exec` beside it (its ClientApp processes forked with PyTorch imported)."""
        port = self.node_ports.setdefault(site, free_port(self.port + 1 + 10 * len(self.node_ports)))
        data = self.site_files.get(site, next(iter(self.site_files.values())))
        security = ["--root-certificates", str(self.certs["ca"])] if tls else ["--insecure"]
        self.processes.start(
            site,
            [
                "fedmed-supernode",  # flower-supernode with shorter waits, as the README starts it
                "--poll-interval",
                "0.2",
                "--heartbeat-interval",
                "10",
                *security,
                "--superlink",
                self.address,
                *(["--auth-supernode-private-key", str(self.certs[key or site])] if auth else []),
                "--port",
                str(port),
                "--node-config",
                f'data-path="{data}" site="{site}"',
                *(["--isolation", "process"] if warm else []),
                *extra,
            ],
            cwd=self.root,
        )
        if warm:
            self.processes.start(
                f"{site}-exec",
                ["fedmed-warm-exec", "--runtime-api-address", f"{HOST}:{port}"],
                cwd=self.root,
            )

    def stop_site(self, site: str, sig: int = signal.SIGTERM) -> None:
        """The site's SuperNode, and its executor if it has one."""
        self.processes.stop(site, sig=sig)
        if f"{site}-exec" in self.processes.running:
            self.processes.stop(f"{site}-exec", sig=sig)

    def activated(self, site: str) -> bool:
        return "SuperNode ID:" in self.processes.log(site)

    def fedmed_run_command(self, run_overrides: list[str]) -> list[str]:
        return [
            sys.executable,
            "-m",
            "fedmed.deploy_run",
            "--app",
            str(REPO),
            "--connection",
            CONNECTION,
            "--wait",
            "--poll",
            "2",
            "--timeout",
            str(RUN_TIMEOUT),
            *run_overrides,
        ]

    def fedmed_run(self, run_overrides: list[str]):
        return self.processes.run(self.fedmed_run_command(run_overrides), timeout=RUN_TIMEOUT + 60, cwd=self.root)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    deployed = Deployment(tmp_path_factory.mktemp("deployment"))
    try:
        deployed.start_superlink()
        for site in SITES:
            deployed.register(site)
            deployed.start_site(site)
        wait_until(lambda: all(deployed.activated(s) for s in SITES), 120, "both SuperNodes to connect")
        yield deployed
    finally:
        deployed.processes.stop_all()


def run_id_of(done) -> int:
    return int(re.search(r"started run (\d+)", done.stdout).group(1))


def test_deployed_run_writes_complete_reproducible_outputs(deployment):
    first, second = deployment.root / "run-1", deployment.root / "run-2"
    done = deployment.fedmed_run(overrides(first))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"outputs in {first}" in done.stdout
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "model.safetensors",
        "plots/accuracy.png",
        "plots/partition.png",
    ):
        assert (first / name).is_file(), name
    rows = read_metrics(first / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    # the clients are the sites, by name, in name order, every round
    assert [[c["site"] for c in r["clients"]] for r in rows[1:]] == [SITES, SITES]
    summary = json.loads((first / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 2
    assert "--token" in summary["command"] and re.search(r"--token(?!\s+\*\*\*)", summary["command"]) is None

    # the server's table shows the sites' own examples per class: name, count per class, total
    log = deployment.server_log(run_id_of(done))
    assert f"writing outputs to {first}" in log
    for site, path in deployment.site_files.items():
        with np.load(path) as data:
            counts = np.bincount(np.concatenate([data["train_labels"].ravel(), data["val_labels"].ravel()]))
        row = [site, *(str(int(c)) for c in counts), str(int(counts.sum()))]
        assert any(
            line.split("│")[1:-1] and [cell.strip() for cell in line.split("│")[1:-1]] == row
            for line in log.splitlines()
        ), (row, log)

    # the saved model re-evaluates to the recorded final accuracy
    dataset = dataset_from_config(OmegaConf.to_container(compose_config(*DATA).dataset, resolve=True), 0)
    model = build_model("resnet18", dataset.num_classes, dataset.channels)
    load_model_file(model, first / "model.safetensors")
    again = evaluate(model, dataset.test.images, dataset.test.labels, device=torch.device("cpu"))
    assert again["accuracy"] == pytest.approx(summary["final"]["accuracy"], abs=1e-9)

    # the same seed and sites again: the same metrics, whatever node ids and timing
    done = deployment.fedmed_run(overrides(second))
    assert done.returncode == 0, done.stdout + done.stderr
    keys = ("round", "loss", "accuracy", "train_loss")
    assert [[r.get(k) for k in keys] for r in read_metrics(second / "metrics.jsonl")] == [
        [r.get(k) for k in keys] for r in rows
    ]


TRAIN_RECEIVED = "Receiving: train message"  # what a SuperNode logs when a training step reaches it


def rows_so_far(path: Path) -> list[dict]:
    return read_metrics(path) if path.exists() else []


def test_a_site_killed_mid_round_is_recorded_by_name_skipped_while_gone_and_back_later(deployment):
    out = deployment.root / "run-killed"
    metrics = out / "metrics.jsonl"
    trained_before = deployment.processes.log("site-b").count(TRAIN_RECEIVED)
    run = deployment.processes.start(
        "run-killed", deployment.fedmed_run_command(overrides(out, 3)), cwd=deployment.root
    )
    wait_until(lambda: len(rows_so_far(metrics)) >= 1, 300, "round 0's evaluation")
    # round 0 is scored before the sites are asked who they are; round 1 follows their answers
    wait_until(lambda: "2 of 2 sites connected" in deployment.processes.log("run-killed"), 300, "both sites")
    # killed as soon as it has round 1's message, before it can train and reply (a second or
    # two): a site killed while its reply is on the way holds the round until Flower gives up
    # on the reply's objects (about 3 minutes), not two heartbeats
    wait_until(
        lambda: deployment.processes.log("site-b").count(TRAIN_RECEIVED) > trained_before,
        300,
        "site-b to receive round 1's training",
        interval=0.05,
    )
    deployment.stop_site("site-b", sig=signal.SIGKILL)
    # the SuperLink declares a node lost after two missed heartbeats (--heartbeat-interval 10)
    wait_until(lambda: len(rows_so_far(metrics)) >= 2, 300, "round 1 to end without site-b")
    deployment.start_site("site-b")
    wait_until(lambda: run.poll() is not None, RUN_TIMEOUT, "the run to end")
    assert run.returncode == 0, deployment.processes.log("run-killed")
    rows = read_metrics(metrics)
    assert [(f["client"], f["kind"]) for f in rows[1]["failures"]] == [("site-b", "lost")]
    assert [c["site"] for c in rows[1]["clients"]] == ["site-a"]
    assert [c["site"] for c in rows[2]["clients"]] == ["site-a"]  # not sampled while gone
    assert [c["site"] for c in rows[3]["clients"]] == SITES  # back
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "degraded" and summary["lost_clients"] == ["site-b"]


def assert_refused(deployment: Deployment, name: str, **start: object) -> None:
    """Start a SuperNode that must not get in; give it a bounded time, then check it never joined."""
    deployment.start_site(name, "--max-wait-time", "20", warm=False, **start)
    try:
        process = deployment.processes.running[name]
        with contextlib.suppress(TimeoutError):  # still retrying is refused too
            wait_until(lambda: process.poll() is not None, 60, f"SuperNode {name} to give up")
        assert not deployment.activated(name), deployment.processes.log(name)
    finally:
        deployment.processes.stop(name)


def test_an_unregistered_key_is_refused(deployment):
    assert_refused(deployment, "site-x")


def test_a_plaintext_supernode_is_refused_by_a_tls_superlink(deployment):
    # no TLS and no key: Flower's SuperNode gives no reason and would retry forever
    assert_refused(deployment, "plain", tls=False, auth=False)
    # no TLS but a registered key: Flower refuses at once, saying TLS is required
    assert_refused(deployment, "plain-with-key", key="site-a", tls=False)
    assert "requires a secure TLS connection" in deployment.processes.log("plain-with-key")

"""What a deployed ClientApp step costs beyond the client's own training.

The same federation (ResNet18 on fedmed's synthetic 28 px images, ``--train`` training
images split IID between 2 sites that hold the simulation's two partitions, every site trained
every round, 1 local epoch) runs (a) in simulation (`fedmed-sim`) and (b) on
real processes on 127.0.0.1: a SuperLink, one SuperNode per site and `fedmed-run --wait`, with
the SuperNodes in each ClientApp mode Flower 1.42 supports:

* ``subprocess``: Flower's default, a fresh `flwr-clientapp` process per message;
* ``process``: ``flower-supernode --isolation process`` with ``fedmed-warm-exec`` beside it,
  which keeps PyTorch and Flower imported and forks a process per message;
* ``process-fast``: the same with ``fedmed-supernode`` (Flower's SuperNode polling every 0.2 s
  instead of 3 s when idle) in place of ``flower-supernode``.

A step's overhead is the server's time for a training step (``train_step_time_s``: sending the
messages until every reply is in) minus the slowest client's own ``train_time_s``, the median
over rounds 2.. (round 1 pays Ray's start in simulation and the FAB's first install when deployed).

    python -m experiments.bench_deployment [--rounds 3] [--modes subprocess,process] [--train 512] [--model resnet18]

Last line: deployment_step_overhead_s=<the fastest deployed mode's overhead>.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402

from fedmed.data import client_share  # noqa: E402
from fedmed.job import Job  # noqa: E402
from fedmed.report import read_metrics  # noqa: E402
from tests.deployment import HOST, Processes, free_port, tool_env, wait_until  # noqa: E402
from tests.helpers import compose_config  # noqa: E402

SITES = ["site-0", "site-1"]
MODES = ("subprocess", "process", "process-fast")


def workload(rounds: int, train: int, model: str = "resnet18") -> list[str]:
    return [
        "dataset=synthetic",
        f"dataset.n_train={train}",
        "dataset.n_val=64",
        "dataset.n_test=128",
        f"model={model}",
        "partition=iid",
        f"federation.num_clients={len(SITES)}",
        f"federation.clients_per_round={len(SITES)}",
        f"federation.rounds={rounds}",
        "eval.attacks=[]",
        "eval.clients=false",
        "client.augment=false",
        "seed=0",
        "progress=false",
    ]


def write_sites(overrides: list[str], directory: Path) -> list[Path]:
    """The simulation's partitions (local train and hold-out) as site files."""
    job = Job.from_config(compose_config(*overrides))
    paths = []
    for pid, site in enumerate(SITES):
        share = client_share(job, pid, len(SITES))
        train, val = share.train_indices, share.val_indices
        path = directory / f"{site}.npz"
        np.savez(
            path,
            train_images=share.images[train],
            train_labels=share.labels[train],
            val_images=share.images[val],
            val_labels=share.labels[val],
        )
        paths.append(path)
    return paths


def step_overheads(rows: list[dict]) -> list[float]:
    return [
        r["train_step_time_s"] - max(c["train_time_s"] for c in r["clients"])
        for r in rows
        if r["round"] >= 2 and r.get("clients")
    ]


def simulated(overrides: list[str], out: Path) -> list[dict]:
    done = subprocess.run(
        [sys.executable, "-m", "fedmed", *overrides, f"output_dir={out}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if done.returncode != 0:
        raise RuntimeError(f"fedmed-sim failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return read_metrics(out / "metrics.jsonl")


def deployed(mode: str, overrides: list[str], site_files: list[Path], work: Path) -> list[dict]:
    """One run on a plaintext SuperLink (the step cost does not depend on TLS) and a SuperNode per site."""
    home = work / "flwr-home"
    home.mkdir(parents=True)
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "{HOST}:{port}"\ninsecure = true\n'
    )
    processes = Processes(work / "logs", tool_env(home))
    try:
        processes.start(
            "superlink",
            ["flower-superlink", "--insecure", "--disable-runtime-dependency-installation", "--port", str(port)],
            cwd=work,
        )
        for i, (site, path) in enumerate(zip(SITES, site_files)):
            node_port = free_port(port + 1 + 10 * i)
            isolation = ["--isolation", "process"] if mode.startswith("process") else []
            supernode = [sys.executable, "-m", "fedmed.supernode"] if mode == "process-fast" else ["flower-supernode"]
            processes.start(
                site,
                [
                    *supernode,
                    "--insecure",
                    "--superlink",
                    f"{HOST}:{port}",
                    "--port",
                    str(node_port),
                    *isolation,
                    "--node-config",
                    f'data-path="{path}" site="{site}"',
                ],
                cwd=work,
            )
            if mode.startswith("process"):
                processes.start(
                    f"{site}-exec",
                    [sys.executable, "-m", "fedmed.warm_exec", "--runtime-api-address", f"{HOST}:{node_port}"],
                    cwd=work,
                )
        wait_until(lambda: all("SuperNode ID:" in processes.log(s) for s in SITES), 300, "the SuperNodes")
        out = work / "out"
        done = processes.run(
            [
                sys.executable,
                "-m",
                "fedmed.deploy_run",
                "--app",
                str(REPO),
                "--connection",
                "bench",
                "--wait",
                "--poll",
                "1",
                "--timeout",
                "1800",
                *overrides,
                f"output_dir={out}",
            ],
            timeout=1900,
            cwd=work,
        )
        if done.returncode != 0:
            raise RuntimeError(f"deployed run ({mode}) failed:\n{done.stdout}\n{done.stderr}")
        return read_metrics(out / "metrics.jsonl")
    finally:
        processes.stop_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--train", type=int, default=512, help="training images in the whole federation")
    parser.add_argument("--keep", action="store_true", help="keep the working folder (logs, outputs)")
    parser.add_argument("--model", default="resnet18", help="the model= option (ResNet18's 45 MB by default)")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    overrides = workload(args.rounds, args.train, args.model)
    work = Path(tempfile.mkdtemp(prefix="bench-deployment-"))
    try:
        site_files = write_sites(overrides, work)
        results = {"simulation": step_overheads(simulated(overrides, work / "sim"))}
        for mode in modes:
            rows = deployed(mode, overrides, site_files, work / mode)
            results[mode] = step_overheads(rows)
            print(
                json.dumps(
                    {
                        "mode": mode,
                        "train_step_time_s": [r.get("train_step_time_s") for r in rows],
                        "client_train_time_s": [[c["train_time_s"] for c in r["clients"]] for r in rows],
                    }
                ),
                flush=True,
            )
        for name, values in results.items():
            if not values:
                raise RuntimeError(f"{name}: no round from 2 on had a client's reply; see the kept logs (--keep)")
            print(
                f"{name}: step overhead {statistics.median(values):.2f} s (rounds 2..: "
                f"{', '.join(f'{v:.2f}' for v in values)})",
                flush=True,
            )
        fastest = min(statistics.median(results[m]) for m in modes)
        print(f"deployment_step_overhead_s={fastest:.2f}")
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

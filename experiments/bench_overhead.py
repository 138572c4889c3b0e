"""What Flower + Ray cost over a bare PyTorch loop doing the same federated work.

Workload: ResNet18, PneumoniaMNIST 28 px, 10 clients all sampled, 3 rounds, 1 local epoch,
batch 32, IID partition, no augmentation; the global model evaluated on the test split after
every round. (a) runs it as one process (experiments/bare_loop.py, the same fedmed training
functions, torch using every core), (b) runs `fedmed-sim` on it. Steady-state round time is the
mean over rounds after the first (the first pays Ray's start-up and actor creation).

    python experiments/bench_overhead.py [--root ../shared/data/medmnist] [--rounds 3]
        [--transport auto,message] [--repeats 3]

Last line: overhead_ratio=<steady-state (b)/(a)>.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bare_loop import bare_fedavg  # noqa: E402

WORKLOAD = dict(model_name="resnet18", num_clients=10, epochs=1, batch_size=32, optimizer="sgd",
                lr=0.01, momentum=0.0, weight_decay=5e-4, augment=False, val_fraction=0.1, seed=0)


def steady_round_s(times: list[float]) -> float:
    """Mean time of rounds 2.. from cumulative times of rounds 0..R."""
    deltas = [b - a for a, b in zip(times[1:], times[2:])]
    return sum(deltas) / len(deltas)


def run_bare(root: str, rounds: int, norm: str) -> tuple[float, float]:
    logging.getLogger("opacus").setLevel(logging.WARNING)
    started = time.monotonic()
    rows = bare_fedavg(dataset="pneumoniamnist", root=root, norm=norm, rounds=rounds,
                       partition={"name": "iid"}, **WORKLOAD)
    return steady_round_s([r["time_s"] for r in rows]), time.monotonic() - started


def run_fedmed(root: str, rounds: int, norm: str, out: Path, transport: str) -> tuple[float, float]:
    w = WORKLOAD
    overrides = [
        "dataset=pneumoniamnist", f"dataset.root={root}", f"model={w['model_name']}", f"model.norm={norm}",
        "partition=iid", f"federation.num_clients={w['num_clients']}",
        f"federation.clients_per_round={w['num_clients']}", f"federation.rounds={rounds}",
        f"client.epochs={w['epochs']}", f"client.batch_size={w['batch_size']}", f"client.lr={w['lr']}",
        f"client.optimizer={w['optimizer']}", f"client.momentum={w['momentum']}",
        f"client.weight_decay={w['weight_decay']}", f"client.augment={w['augment']}",
        f"client.val_fraction={w['val_fraction']}", f"seed={w['seed']}", "progress=false", f"output_dir={out}",
        "eval.attacks=[]",  # the bare loop measures clean test metrics only
        f"ray.model_transport={transport}",
    ]
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "fedmed", *overrides], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    total = time.monotonic() - started
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return steady_round_s([r["time_s"] for r in rows]), total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(HERE.parents[1] / "shared" / "data" / "medmnist"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--norm", default="batch")
    parser.add_argument("--transport", default="auto",
                        help="ray.model_transport of the fedmed-sim runs; several, comma-separated, are "
                             "compared in the same run (e.g. auto,message); the last line is for the first")
    parser.add_argument("--repeats", type=int, default=1,
                        help="alternate the runs this many times and report medians: on a shared machine "
                             "the same run varied by 20%% between two runs")
    args = parser.parse_args()
    transports = args.transport.split(",")
    for transport in transports:
        if transport not in ("auto", "shared_memory", "message"):
            parser.error(f"--transport {transport!r}: choose auto, shared_memory or message")
    os.environ.setdefault("FEDMED_CACHE", tempfile.mkdtemp(prefix="fedmed-bench-cache-"))
    fed: dict[str, list[tuple[float, float]]] = {t: [] for t in transports}
    bare: list[tuple[float, float]] = []
    for _ in range(args.repeats):
        for transport in transports:
            with tempfile.TemporaryDirectory() as tmp:
                fed[transport].append(run_fedmed(args.root, args.rounds, args.norm, Path(tmp) / "run", transport))
        bare.append(run_bare(args.root, args.rounds, args.norm))
    print(f"workload: resnet18 ({args.norm} norm), pneumoniamnist 28px, 10 clients, {args.rounds} rounds, "
          f"1 epoch, batch 32, {os.cpu_count()} cores; median of {args.repeats} alternating runs")
    bare_round, bare_total = (statistics.median(v) for v in zip(*bare))
    print(f"bare PyTorch loop : steady round {bare_round:7.2f} s   total {bare_total:7.1f} s   "
          f"(rounds {', '.join(f'{r:.2f}' for r, _ in bare)})")
    ratios = {}
    for transport in transports:
        fed_round, fed_total = (statistics.median(v) for v in zip(*fed[transport]))
        ratios[transport] = (fed_round / bare_round, fed_total / bare_total)
        print(f"fedmed-sim, ray.model_transport={transport}: steady round {fed_round:7.2f} s   total "
              f"{fed_total:7.1f} s   (rounds {', '.join(f'{r:.2f}' for r, _ in fed[transport])})   "
              f"ratio {ratios[transport][0]:.3f}")
    print(f"total_time_ratio={ratios[transports[0]][1]:.3f}")
    print(f"overhead_ratio={ratios[transports[0]][0]:.3f}")


if __name__ == "__main__":
    main()

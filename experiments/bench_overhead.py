"""What Flower + Ray cost over a bare PyTorch loop doing the same federated work.

Workload: ResNet18, PneumoniaMNIST 28 px, 10 clients all sampled, 3 rounds, 1 local epoch,
batch 32, IID partition, no augmentation; the global model evaluated on the test split after
every round. (a) runs it as one process (experiments/bare_loop.py, the same fedmed training
functions, torch using every core), (b) runs `fedmed-sim` on it. Steady-state round time is the
mean over rounds after the first (the first pays Ray's start-up and actor creation). Fixed cost
is the whole command minus rounds x steady round: (a) runs in a subprocess of its own too, so
both pay the interpreter's start and imports. (c) times the README's first command, `fedmed-sim`
with no arguments (in a temporary folder), and when its first round line (round 0) appears.

Every run after a dataset's first finds its arrays extracted and its split cut in fedmed's cache
(``$FEDMED_CACHE``), so by default one untimed one-round run of each command fills a fresh cache
first, and the timed runs measure that common case; ``--cold`` times the first run instead.

    python -m experiments.bench_overhead [--root ../shared/data/medmnist] [--rounds 3]
        [--transport auto,message] [--repeats 3] [--no-default-run] [--cold]

Last lines: fixed_cost_s=<(b)'s fixed cost>, default_run_s=<(c)>, overhead_ratio=<steady-state (b)/(a)>.
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

from experiments.bare_loop import bare_fedavg  # noqa: E402

WORKLOAD = dict(
    model_name="resnet18",
    num_clients=10,
    epochs=1,
    batch_size=32,
    optimizer="sgd",
    lr=0.01,
    momentum=0.0,
    weight_decay=5e-4,
    augment=False,
    val_fraction=0.1,
    seed=0,
)


def steady_round_s(times: list[float]) -> float:
    """Mean time of rounds 2.. from cumulative times of rounds 0..R."""
    deltas = [b - a for a, b in zip(times[1:], times[2:])]
    return sum(deltas) / len(deltas)


def fixed_cost_s(total: float, steady: float, rounds: int) -> float:
    return total - rounds * steady


def bare_rows(root: str, rounds: int, norm: str) -> list[dict]:
    logging.getLogger("opacus").setLevel(logging.WARNING)
    return bare_fedavg(
        dataset="pneumoniamnist", root=root, norm=norm, rounds=rounds, partition={"name": "iid"}, **WORKLOAD
    )


def run_bare(root: str, rounds: int, norm: str) -> tuple[float, float]:
    """(steady round, whole command) of the bare loop, in a fresh interpreter like fedmed-sim."""
    started = time.monotonic()
    child = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.bench_overhead",
            "--bare-child",
            "--root",
            root,
            "--rounds",
            str(rounds),
            "--norm",
            norm,
        ],
        cwd=HERE.parent,
        check=True,
        capture_output=True,
        text=True,
    )
    total = time.monotonic() - started
    rows = json.loads(child.stdout.strip().splitlines()[-1])
    return steady_round_s([r["time_s"] for r in rows]), total


def run_default(folder: Path) -> tuple[float, float | None]:
    """(whole command, seconds until its round 0 line) of `fedmed-sim` without arguments."""
    started = time.monotonic()
    first_line = None
    with subprocess.Popen(
        [sys.executable, "-m", "fedmed"],
        cwd=folder,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    ) as child:
        for line in child.stdout:
            if first_line is None and line.lstrip().startswith("round 0/"):
                first_line = time.monotonic() - started
    if child.returncode != 0:
        raise RuntimeError(f"fedmed-sim without arguments exited with {child.returncode}")
    return time.monotonic() - started, first_line


def w1_overrides(root: str, rounds: int, norm: str, out: Path, transport: str) -> list[str]:
    w = WORKLOAD
    return [
        "dataset=pneumoniamnist",
        f"dataset.root={root}",
        f"model={w['model_name']}",
        f"model.norm={norm}",
        "partition=iid",
        f"federation.num_clients={w['num_clients']}",
        f"federation.clients_per_round={w['num_clients']}",
        f"federation.rounds={rounds}",
        f"client.epochs={w['epochs']}",
        f"client.batch_size={w['batch_size']}",
        f"client.lr={w['lr']}",
        f"client.optimizer={w['optimizer']}",
        f"client.momentum={w['momentum']}",
        f"client.weight_decay={w['weight_decay']}",
        f"client.augment={w['augment']}",
        f"client.val_fraction={w['val_fraction']}",
        f"seed={w['seed']}",
        "progress=false",
        f"output_dir={out}",
        "eval.attacks=[]",  # the bare loop measures clean test metrics only
        f"ray.model_transport={transport}",
    ]


def warm_cache(root: str, norm: str, default_run: bool) -> None:
    """One untimed round of each command, which extracts the arrays and cuts the splits into the
    cache the timed runs then find (the split depends on the number of clients, not on who trains)."""
    with tempfile.TemporaryDirectory() as tmp:
        w1 = w1_overrides(root, 1, norm, Path(tmp) / "w1", "auto") + ["federation.clients_per_round=2"]
        subprocess.run([sys.executable, "-m", "fedmed", *w1], check=True, capture_output=True)
        if default_run:
            default = ["federation.rounds=1", "eval.attacks=[]", f"output_dir={Path(tmp) / 'default'}"]
            subprocess.run([sys.executable, "-m", "fedmed", *default], check=True, capture_output=True, cwd=tmp)


def run_fedmed(root: str, rounds: int, norm: str, out: Path, transport: str) -> tuple[float, float]:
    overrides = w1_overrides(root, rounds, norm, out, transport)
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "fedmed", *overrides], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    total = time.monotonic() - started
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return steady_round_s([r["time_s"] for r in rows]), total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(HERE.parents[1] / "shared" / "data" / "medmnist"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--norm", default="batch")
    parser.add_argument(
        "--transport",
        default="auto",
        help="ray.model_transport of the fedmed-sim runs; several, comma-separated, are "
        "compared in the same run (e.g. auto,message); the last line is for the first",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="alternate the runs this many times and report medians: on a shared machine "
        "the same run varied by 20%% between two runs",
    )
    parser.add_argument("--no-default-run", action="store_true", help="skip (c), the default command")
    parser.add_argument(
        "--cold", action="store_true", help="time a dataset's first run (arrays and split not yet in the cache)"
    )
    parser.add_argument("--bare-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_child:
        print(json.dumps(bare_rows(args.root, args.rounds, args.norm)))
        return
    transports = args.transport.split(",")
    for transport in transports:
        if transport not in ("auto", "shared_memory", "message"):
            parser.error(f"--transport {transport!r}: choose auto, shared_memory or message")
    os.environ.setdefault("FEDMED_CACHE", tempfile.mkdtemp(prefix="fedmed-bench-cache-"))
    if not args.cold:
        warm_cache(args.root, args.norm, not args.no_default_run)
    fed: dict[str, list[tuple[float, float]]] = {t: [] for t in transports}
    bare: list[tuple[float, float]] = []
    for _ in range(args.repeats):
        for transport in transports:
            with tempfile.TemporaryDirectory() as tmp:
                fed[transport].append(run_fedmed(args.root, args.rounds, args.norm, Path(tmp) / "run", transport))
        bare.append(run_bare(args.root, args.rounds, args.norm))
    print(
        f"workload: resnet18 ({args.norm} norm), pneumoniamnist 28px, 10 clients, {args.rounds} rounds, "
        f"1 epoch, batch 32, {os.cpu_count()} cores; median of {args.repeats} alternating runs; "
        f"{'cold' if args.cold else 'warm'} cache"
    )
    bare_round, bare_total = (statistics.median(v) for v in zip(*bare))
    print(
        f"bare PyTorch loop : steady round {bare_round:7.2f} s   total {bare_total:7.1f} s   "
        f"(rounds {', '.join(f'{r:.2f}' for r, _ in bare)})"
    )
    ratios = {}
    for transport in transports:
        fed_round, fed_total = (statistics.median(v) for v in zip(*fed[transport]))
        ratios[transport] = (fed_round / bare_round, fed_total / bare_total)
        print(
            f"fedmed-sim, ray.model_transport={transport}: steady round {fed_round:7.2f} s   total "
            f"{fed_total:7.1f} s   (rounds {', '.join(f'{r:.2f}' for r, _ in fed[transport])})   "
            f"ratio {ratios[transport][0]:.3f}"
        )
    bare_fixed = fixed_cost_s(bare_total, bare_round, args.rounds)
    fed_round, fed_total = (statistics.median(v) for v in zip(*fed[transports[0]]))
    fed_fixed = fixed_cost_s(fed_total, fed_round, args.rounds)
    print(
        f"fixed cost (command minus {args.rounds} x steady round): fedmed-sim {fed_fixed:.1f} s, bare loop "
        f"{bare_fixed:.1f} s, ratio {fed_fixed / bare_fixed:.2f}"
    )
    print(f"total_time_ratio={ratios[transports[0]][1]:.3f}")
    print(f"fixed_cost_s={fed_fixed:.1f}")
    if not args.no_default_run:
        with tempfile.TemporaryDirectory() as tmp:
            default_total, first_line = run_default(Path(tmp))
        shown = f"{first_line:.1f} s" if first_line is not None else "not seen"
        print(f"fedmed-sim without arguments: {default_total:.1f} s, its round 0 line after {shown}")
        print(f"default_run_s={default_total:.1f}")
    print(f"overhead_ratio={ratios[transports[0]][0]:.3f}")


if __name__ == "__main__":
    main()

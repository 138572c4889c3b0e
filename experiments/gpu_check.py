"""GPU placement check: several simulated clients sharing one GPU, mixed precision off and on,
against one process doing the same training on the same GPU.

Runs where torch sees a CUDA device (it refuses to run elsewhere). For each ``client.amp`` in
``--amp``:

(a) one process: every client's share trained one after another on the GPU, with fedmed's own
    partition, model and training functions (experiments/bare_loop.py), the global model
    evaluated on the test split after each round;
(b) ``fedmed-sim`` with ``device=cuda`` and ``ray.num_gpus_per_client=<--fraction>``: Ray runs
    up to 1/fraction clients on the GPU at once. nvidia-smi is polled meanwhile for how many
    client processes hold GPU memory at the same time.

Both train the same examples per round; throughput is training examples per second of steady
round (rounds after the first, which pays start-up). Checks: every metric of (a) and (b) finite,
(b) learned (final test AUC above 0.6), and, where nvidia-smi can see
processes, at least two client processes on the GPU at once.

    python -m experiments.gpu_check [--root ../shared/data/medmnist] [--model resnet18]
        [--clients 8] [--fraction 0.25] [--rounds 3] [--amp off,bf16,fp16]

Last line: gpu_check=<ok|failed> followed by each amp mode's throughput ratio (b)/(a).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent

from experiments.bare_loop import bare_fedavg  # noqa: E402
from experiments.bench_overhead import steady_round_s  # noqa: E402

TRAINING = dict(epochs=1, batch_size=32, optimizer="sgd", lr=0.01, momentum=0.0, weight_decay=5e-4)


def gpu_processes() -> set[int] | None:
    """PIDs holding memory on the GPU now; None where nvidia-smi lists none or cannot be run (in
    some containers it sees no processes at all)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    pids = {int(line) for line in out.split() if line.strip().isdigit()}
    return pids or None


class GpuProcessWatch:
    """Polls ``gpu_processes`` in a thread: the most processes, other than ``ignore``, seen on the
    GPU at one time."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.most_at_once = 0
        self.seen_any = False
        self.ignore: set[int] = set()
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            pids = gpu_processes()
            if pids:
                self.seen_any = True
                self.most_at_once = max(self.most_at_once, len(pids - self.ignore))
            self._stop.wait(self._interval_s)

    def __enter__(self) -> GpuProcessWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def examples_per_round(row: dict) -> int:
    """Training examples of one round of the federation, from its metrics row's client replies."""
    return sum(int(c["num-examples"]) for c in row.get("clients", []))


def run_one_process(args, amp: str) -> dict:
    rows = bare_fedavg(
        dataset="pneumoniamnist",
        root=args.root,
        model_name=args.model,
        norm="batch",
        num_clients=args.clients,
        rounds=args.rounds,
        partition={"name": "iid"},
        augment=False,
        val_fraction=0.1,
        seed=0,
        device="cuda",
        amp=amp,
        **TRAINING,
    )
    return {"round_s": steady_round_s([r["time_s"] for r in rows]), "rows": rows}


def run_federation(args, amp: str, out: Path) -> dict:
    overrides = [
        "dataset=pneumoniamnist",
        f"dataset.root={args.root}",
        f"model={args.model}",
        "partition=iid",
        f"federation.num_clients={args.clients}",
        f"federation.clients_per_round={args.clients}",
        f"federation.rounds={args.rounds}",
        *(f"client.{k}={v}" for k, v in TRAINING.items()),
        "client.augment=false",
        "client.val_fraction=0.1",
        f"client.amp={amp}",
        "seed=0",
        "device=cuda",
        f"ray.num_gpus_per_client={args.fraction}",
        "eval.attacks=[]",  # (a) measures clean test metrics only
        "progress=false",
        f"output_dir={out}",
        f"hydra.run.dir={out}/hydra",
    ]
    with GpuProcessWatch() as watch:
        with subprocess.Popen(
            [sys.executable, "-m", "fedmed", *overrides], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as child:
            # this process (the one-process run) and fedmed-sim's driver (the server's evaluation)
            # hold GPU memory too: only the clients' processes count
            watch.ignore = {os.getpid(), child.pid}
            output = child.communicate()[0]
    if child.returncode != 0:
        raise RuntimeError(f"fedmed-sim (client.amp={amp}) exited with {child.returncode}:\n{output[-3000:]}")
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "round_s": steady_round_s([r["time_s"] for r in rounds]),
        "rows": rounds,
        "most_on_gpu": watch.most_at_once if watch.seen_any else None,
    }


def all_finite(rows: list[dict]) -> bool:
    """Every numeric value in ``rows`` (nested one level) is finite."""
    numbers = [v for r in rows for v in r.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return all(math.isfinite(v) for v in numbers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(HERE.parents[1] / "shared" / "data" / "medmnist"))
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--fraction", type=float, default=0.25, help="ray.num_gpus_per_client")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--amp", default="off,bf16,fp16", help="client.amp modes, comma-separated")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be >= 2: the first round pays start-up and is not timed")

    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_check: torch sees no CUDA device; run this where a GPU is (the test suite checks the CPU paths)")
    print(
        f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, {os.cpu_count()} cores; "
        f"workload: {args.model}, pneumoniamnist 28px, {args.clients} clients all sampled, "
        f"{args.rounds} rounds, 1 epoch, batch 32; ray.num_gpus_per_client={args.fraction}"
    )
    os.environ.setdefault("FEDMED_CACHE", tempfile.mkdtemp(prefix="fedmed-gpu-cache-"))
    failures: list[str] = []
    ratios: dict[str, float] = {}
    for amp in args.amp.split(","):
        alone = run_one_process(args, amp)
        with tempfile.TemporaryDirectory() as tmp:
            fed = run_federation(args, amp, Path(tmp) / "run")
        examples = examples_per_round(fed["rows"][-1])
        final = fed["rows"][-1]
        ratios[amp] = alone["round_s"] / fed["round_s"]
        on_gpu = fed["most_on_gpu"] if fed["most_on_gpu"] is not None else "not visible"
        rate = f"{examples / fed['round_s']:.0f} vs {examples / alone['round_s']:.0f} examples/s" if examples else ""
        print(
            f"client.amp={amp:4s}: one process {alone['round_s']:6.2f} s/round, fedmed-sim "
            f"{fed['round_s']:6.2f} s/round ({rate}), throughput ratio {ratios[amp]:.2f}; "
            f"final AUC {final['auc']:.3f} (one process {alone['rows'][-1]['auc']:.3f}); "
            f"most client processes on the GPU at once: {on_gpu}"
        )
        if not (all_finite(alone["rows"]) and all_finite(fed["rows"])):
            failures.append(f"amp={amp}: a metric is not finite")
        if not final["auc"] > 0.6:
            failures.append(f"amp={amp}: final test AUC {final['auc']:.3f}: the federation did not learn")
        concurrent = min(args.clients, int(1 / args.fraction + 1e-9))
        if fed["most_on_gpu"] is not None and concurrent >= 2 and fed["most_on_gpu"] < 2:
            failures.append(f"amp={amp}: never more than {fed['most_on_gpu']} client process on the GPU at once")
    status = "failed" if failures else "ok"
    for failure in failures:
        print(f"FAILED {failure}")
    print(f"gpu_check={status} " + " ".join(f"throughput_ratio_{amp}={r:.2f}" for amp, r in ratios.items()))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()

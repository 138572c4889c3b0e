"""Many clients: memory and round time of a 1000-client federation against a 10-client one.

Workload: ResNet18, PneumoniaMNIST 28 px, IID partition, 10 clients sampled a round, 1 local
epoch, batch 32, no robustness assessment, `progress=false`; the same seed in both runs, which
differ only in `federation.num_clients` (10 and 1000). Each runs as `python -m fedmed ...` in a
subprocess while a background thread samples, every `--interval` s, the resident memory summed
over that process and all its descendants (Ray's GCS server, raylet and workers are started by
the driver): the peak of that sum is the figure. RSS counts shared pages (the torch libraries,
the memory-mapped images) once per process, so the sum overstates what the machine gives; the
proportional set size (PSS, shared pages divided among their users) is printed beside it. Each
sample also adds the bytes of the run's files in shared memory (`/dev/shm/fedmed-arrays-<pid>-*`,
``fedmed.shared_arrays.shared_directory``: the global model and the clients' replies waiting for
the server): tmpfs pages are RAM but belong to no process's RSS, and nothing in fedmed maps those
files, so they are counted once, here. Where the peak was, process by process, is printed too.

A round's time is the mean over the rounds after the first (metrics.jsonl `time_s`; the first
pays the Ray workers' start). With the whole training split, 1000 clients hold 4-5 images
each and 10 hold about 470: the 10 sampled clients of the small federation would train 100 times
more, and comparing those rounds says nothing about what 990 unsampled clients cost. So by
default (`--same-work`) the 10-client run reads a copy of the file whose training split is a
seeded subset of 10 x (the 1000-client share) images: every sampled client then holds as many
images in both runs, and the two rounds differ only in the size of the federation.
`--no-same-work` compares on the whole split instead.

    python -m experiments.bench_scale [--root ../shared/data/medmnist] [--rounds 4]
        [--clients 10,1000] [--no-same-work] [--interval 0.2]

Last line: scale_1000_peak_gib=<peak of RSS sum + shared-memory files, 1000 clients, GiB>
scale_round_ratio=<1000-client round / 10-client round>.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

try:
    import psutil
except ImportError:  # Ray bundles psutil and puts it on sys.path when imported
    importlib.import_module("ray")
    psutil = importlib.import_module("psutil")

HERE = Path(__file__).resolve().parent

from experiments.bench_overhead import steady_round_s  # noqa: E402

GIB = 2**30
SHARED_MEMORY = Path("/dev/shm")
SHARED_PREFIX = "fedmed-arrays-"  # fedmed.shared_arrays._PREFIX
CLIENTS_PER_ROUND = 10


def shared_memory_bytes(pids: list[int]) -> int:
    """Bytes that the files of these processes' fedmed directories in shared memory occupy."""
    total = 0
    for pid in pids:
        for directory in SHARED_MEMORY.glob(f"{SHARED_PREFIX}{pid}-*"):
            for file in directory.iterdir() if directory.is_dir() else ():
                try:  # a reply file may be deleted between the listing and the reading
                    total += file.stat().st_blocks * 512
                except FileNotFoundError:
                    continue
    return total


class TreeMemory:
    """Samples, in a thread, the summed RSS (and PSS) of a process and its descendants plus the
    bytes of their files in shared memory (``shared_memory_bytes``)."""

    def __init__(self, pid: int, interval: float) -> None:
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_rss = 0
        self.peak_pss = 0
        self.most_processes = 0
        # at the peak of the RSS sum: (RSS by process, shared-memory bytes)
        self.at_peak: tuple[list[tuple[str, int]], int] = ([], 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample_until_stopped(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        try:
            processes = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        shm = shared_memory_bytes([p.pid for p in processes])
        rss = pss = shm
        each = []
        for process in processes:
            try:  # a process may end between the listing and the reading
                info = process.memory_full_info()
                each.append((_label(process), info.rss))
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
        if rss > self.peak_rss:
            self.peak_rss, self.at_peak = rss, (each, shm)
        self.peak_pss = max(self.peak_pss, pss)
        self.most_processes = max(self.most_processes, len(processes))


def _label(process) -> str:
    """A short name: the module a Python process runs, or Ray's name for its worker."""
    try:
        command = process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "?"
    if "-m" in command[:-1]:
        return command[command.index("-m") + 1]
    name = process.name()
    return name if not command or name.startswith("ray::") else Path(command[0]).name


def same_work_root(root: str, folder: Path, num_clients: int, many: int, seed: int) -> Path:
    """A copy of pneumoniamnist.npz whose training split is a seeded subset of
    ``num_clients`` x (the share of one of ``many`` clients) images; val and test unchanged."""
    with np.load(Path(root) / "pneumoniamnist.npz") as arrays:
        splits = {key: arrays[key] for key in arrays.files}
    n_train = len(splits["train_labels"])
    keep = np.sort(np.random.default_rng(seed).permutation(n_train)[: round(n_train * num_clients / many)])
    splits["train_images"], splits["train_labels"] = splits["train_images"][keep], splits["train_labels"][keep]
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "pneumoniamnist.npz", **splits)
    return folder


def run_fedmed(root: Path, num_clients: int, rounds: int, out: Path, interval: float, exact_file: bool) -> dict:
    overrides = [
        "dataset=pneumoniamnist",
        f"dataset.root={root}",
        f"dataset.verify_md5={exact_file}",
        "model=resnet18",
        "partition=iid",
        f"federation.num_clients={num_clients}",
        f"federation.clients_per_round={CLIENTS_PER_ROUND}",
        f"federation.rounds={rounds}",
        "client.augment=false",
        "seed=0",
        "eval.attacks=[]",
        "progress=false",
        f"output_dir={out}",
    ]
    started = time.monotonic()
    with open(out.parent / f"{out.name}.log", "w") as log:
        # RAY_ADDRESS=local: a Ray instance of its own, even where another `ray start` cluster
        # runs on this machine (ray.init() without an address would join that one)
        env = {**os.environ, "RAY_ADDRESS": "local"}
        command = [sys.executable, "-m", "fedmed", *overrides]
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        with TreeMemory(child.pid, interval) as memory:
            code = child.wait()
    if code != 0:
        tail = Path(log.name).read_text()[-3000:]
        raise RuntimeError(f"fedmed with {num_clients} clients exited with {code}; the end of its log:\n{tail}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = [r["time_s"] for r in rows]
    return {
        "clients": num_clients,
        "round_s": steady_round_s(times),
        "rounds_s": [round(b - a, 2) for a, b in zip(times[1:], times[2:])],
        "first_round_line_s": times[0],
        "total_s": time.monotonic() - started,
        "peak_rss_gib": memory.peak_rss / GIB,
        "peak_pss_gib": memory.peak_pss / GIB,
        "processes": memory.most_processes,
        "at_peak": memory.at_peak,
        "examples_per_client": rows[-1]["clients"][0]["num-examples"] if rows[-1].get("clients") else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(HERE.parents[1] / "shared" / "data" / "medmnist"))
    parser.add_argument("--rounds", type=int, default=4, help="rounds per run (the steady round needs >= 2)")
    parser.add_argument("--clients", default="10,1000", help="the federations' sizes, smallest first")
    parser.add_argument(
        "--same-work",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="give every sampled client as many images in each run (module docstring)",
    )
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between memory samples")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be >= 2: the steady round is measured on rounds after the first")
    sizes = sorted(int(n) for n in args.clients.split(","))
    os.environ.setdefault("FEDMED_CACHE", tempfile.mkdtemp(prefix="fedmed-bench-cache-"))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for num_clients in sizes:
            root = Path(args.root)
            if args.same_work and num_clients < sizes[-1]:
                root = same_work_root(args.root, Path(tmp) / f"data-{num_clients}", num_clients, sizes[-1], 0)
            out, exact = Path(tmp) / f"run-{num_clients}", root == Path(args.root)
            results.append(run_fedmed(root, num_clients, args.rounds, out, args.interval, exact))
    print(
        f"workload: resnet18, pneumoniamnist 28px, iid, {CLIENTS_PER_ROUND} clients a round, {args.rounds} rounds, "
        f"1 epoch, batch 32, eval.attacks=[], {os.cpu_count()} cores, same_work={args.same_work}"
    )
    for r in results:
        rounds = ", ".join(map(str, r["rounds_s"]))
        print(
            f"{r['clients']:5d} clients: steady round {r['round_s']:6.2f} s (rounds {rounds}) "
            f"| {r['examples_per_client']} training examples per client "
            f"| round 0 line at {r['first_round_line_s']:.1f} s "
            f"| command {r['total_s']:.1f} s | peak RSS sum {r['peak_rss_gib']:.2f} GiB, PSS sum "
            f"{r['peak_pss_gib']:.2f} GiB over at most {r['processes']} processes"
        )
    for r in results:
        each, shm = r["at_peak"]
        parts = ", ".join(f"{name} {rss / GIB:.2f}" for name, rss in sorted(each, key=lambda item: -item[1]))
        print(f"{r['clients']:5d} clients at the peak (GiB): shared-memory files {shm / GIB:.2f}, {parts}")
    small, large = results[0], results[-1]
    print(
        f"scale_{large['clients']}_peak_gib={large['peak_rss_gib']:.2f} "
        f"scale_round_ratio={large['round_s'] / small['round_s']:.3f}"
    )


if __name__ == "__main__":
    main()

"""How long each server aggregation takes on model-sized updates, ours against Flower's.

For n = 10, 50, 100 client updates of ResNet50 size (d = 23,512,130, torchvision's resnet50 with
2 classes, parameters only) and of MobileNetV2 size (d = 2,226,434), same inputs, same run:

* ``ours``: ``aggregator.aggregate(U, ...)`` on the stacked updates U (n, d) float32 — the rule
  itself (strategies/aggregators), which is what RobustAggregation calls once per round;
* ``ours e2e``: what Flower's ``aggregate_train`` does too, from the clients' ArrayRecords to the
  new global ArrayRecord: ``stack_updates`` (deserialise every array, subtract the global
  model), the rule, ``apply_update`` (add, serialise). Reply validation is left out of both.
  As in ``RobustAggregation``, the updates are stacked into a buffer kept from round to round
  (``UpdateRows``): the table times rounds after the first; the first round, which allocates
  the buffer, is printed below it with the peak memory of the path (VmHWM above the resident
  memory before it, the replies being already there);
* ``flower``: Flower 1.41's own ``aggregate_train`` (FedMedian, FedTrimmedAvg, Krum, MultiKrum,
  Bulyan) on Messages holding the same weights (global + U). Building the Messages is not timed
  (they wrap the same pre-serialised Arrays); deserialising the arrays is, as it is part of
  Flower's aggregation (Krum's ``compute_distances`` calls ``to_numpy_ndarrays`` itself). Flower
  is given the same f (and m) as ours resolves by default.

Bulyan is timed with its per-coordinate stage fused by torch.compile (``strategy.compile_stage=
true``; the default turns it on from 2^24 selected values, so at every size and n here) and,
on the ``bulyan eager`` row, without; compiling happens before the timings and is printed.

Each time is the median of ``--repeats`` runs. ``GB/s`` is n*d*4 bytes / time (the updates read
once), next to the machine's memory bandwidth measured here (sum and copy of a 1 GiB tensor).
``GEMM`` is one pass U @ U.T (torch, float32): the Krum family needs exactly one, so their
``x GEMM`` column says how close they come to it (target: within 2x). Where a path would not fit
in the memory available (n=100 at ResNet50 size is 9.4 GB of updates; Flower's Krum holds three
copies of them; FoolsGold keeps a history as large as the updates), it is skipped with the
reason printed.

    python -m experiments.bench_aggregation [--sizes resnet50,mobilenet_v2] [--n 10,50,100]
        [--repeats 3] [--threads N] [--strategies krum,bulyan,...]

Last line: krum_speedup_vs_flower=<Flower Krum time / our Krum e2e time at n=50, ResNet50 size>.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import time

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from strategies.aggregators import AGGREGATORS, make_aggregator  # noqa: E402
from strategies.aggregators.fused import FUSE_BLOCK_COLUMNS  # noqa: E402
from strategies.robust_aggregation import UpdateRows, apply_update, batchnorm_statistics, stack_updates  # noqa: E402

GB = 1e9
SIZES = {"resnet50": 23_512_130, "mobilenet_v2": 2_226_434}  # checked against torchvision in main()
FLOWER = ("fedmedian", "trimmed_mean", "krum", "multikrum", "bulyan")
KRUM_FAMILY = ("krum", "multikrum", "bulyan")


def available_bytes() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024.0
    return float("inf")


def fits(needed: float) -> bool:
    return needed * 1.15 + 1.0 * GB < available_bytes()


class PeakMemory:
    """Peak resident memory above the level at ``start``: the kernel's high-water mark (VmHWM),
    reset by writing 5 to /proc/self/clear_refs. It counts every allocation (torch's and numpy's
    too, which tracemalloc does not see)."""

    @staticmethod
    def _status(field: str) -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024.0
        return math.nan

    def start(self) -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.base = self._status("VmRSS")

    def stop(self) -> float:
        return self._status("VmHWM") - self.base


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def parameter_sizes(name: str) -> list[int]:
    import torchvision

    model = getattr(torchvision.models, name)(num_classes=2)
    return [p.numel() for p in model.parameters()]


def memory_bandwidth() -> tuple[float, float]:
    """(read GB/s from a sum, copy GB/s counting read + write) of a 1 GiB float32 tensor."""
    x = torch.ones(1 << 28)
    y = torch.empty_like(x)
    nbytes = x.numel() * 4
    read = nbytes / timed(lambda: x.sum(), 3) / GB
    copy = 2 * nbytes / timed(lambda: y.copy_(x), 3) / GB
    del x, y
    return read, copy


# ---- inputs: the same updates, regenerated row by row so that they need not be held twice ----

LAYERS: dict[int, list[int]] = {}  # d -> the model's parameter sizes, in order


def layer_sizes(d: int) -> list[int]:
    """The model's own parameter tensors (sizes), for the Flower records; one array if unknown."""
    return LAYERS.get(d, [d])


def rows(d: int, n: int, seed: int = 0):
    common = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    for i in range(n):
        row = torch.randn(d, generator=torch.Generator().manual_seed(seed + 1 + i))
        yield row.mul_(0.5 + 2.5 * i / max(n - 1, 1)).add_(common).mul_(0.01)


def stacked(d: int, n: int) -> torch.Tensor:
    u = torch.empty(n, d)
    for i, row in enumerate(rows(d, n)):
        u[i] = row
    return u


def global_weights(d: int) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(12345))


def record(flat: torch.Tensor) -> dict[str, Array]:
    arrays, offset = {}, 0
    values = flat.numpy()
    for i, size in enumerate(layer_sizes(flat.numel())):
        arrays[f"layer{i}"] = Array(np.ascontiguousarray(values[offset : offset + size]))
        offset += size
    return arrays


def messages(records: list[dict[str, Array]]) -> list[Message]:
    out = []
    for i, arrays in enumerate(records):
        ins = Message(RecordDict(), dst_node_id=1 + i, message_type=MessageType.TRAIN)
        content = RecordDict(
            {
                "arrays": ArrayRecord(dict(arrays)),  # shares the serialised bytes
                "metrics": MetricRecord({"num-examples": 10 + i, "partition-id": i}),
            }
        )
        out.append(Message(content, reply_to=ins))
    return out


def flower_strategy(name: str, n: int):
    from flwr.serverapp.strategy import Bulyan, FedMedian, FedTrimmedAvg, Krum, MultiKrum

    krum_f = make_aggregator("krum").max_malicious(n)
    return {
        "fedmedian": lambda: FedMedian(),
        "trimmed_mean": lambda: FedTrimmedAvg(beta=0.2),
        "krum": lambda: Krum(num_malicious_nodes=krum_f),
        "multikrum": lambda: MultiKrum(num_malicious_nodes=krum_f, num_nodes_to_select=n - krum_f),
        "bulyan": lambda: Bulyan(num_malicious_nodes=make_aggregator("bulyan").max_malicious(n)),
    }[name]()


def variants(name: str) -> list[tuple[str, object]]:
    """The rule as timed: Bulyan with its fused stage (``strategy.compile_stage=true``; its
    default switches it on from 2^24 selected values) and, on a second row, without it."""
    if name == "bulyan":
        return [
            ("bulyan", make_aggregator(name, compile_stage=True)),
            ("bulyan eager", make_aggregator(name, compile_stage=False)),
        ]
    return [(name, make_aggregator(name))]


def warm_up(aggregator, u: torch.Tensor | None, counts: torch.Tensor, ids: list[int]) -> None:
    """Compile Bulyan's fused kernel outside the timings (once per n in the process; printed)."""
    if getattr(aggregator, "compile_stage", None) is not True:
        return
    n = len(ids)
    block = (u[:, :FUSE_BLOCK_COLUMNS] if u is not None else torch.randn(n, FUSE_BLOCK_COLUMNS)).contiguous()
    started = time.perf_counter()
    aggregator.aggregate(block, counts, client_ids=ids, generator=torch.Generator())
    if time.perf_counter() - started > 1.0:
        print(
            f"bulyan: compiling its fused stage for n = {n} took {time.perf_counter() - started:.1f} s "
            "(not timed below)",
            flush=True,
        )


def extra_bytes(name: str, n: int, d: int) -> float:
    """Memory a rule needs beyond the updates (FoolsGold's history; blocks are small)."""
    return n * d * 4.0 if name == "foolsgold" else 0.05 * n * d * 4.0


def bench(size: str, d: int, n: int, names: list[str], repeats: int, results: dict) -> None:
    nbytes = n * d * 4.0
    print(f"\n== {size}: d = {d:,}, n = {n} ({nbytes / GB:.2f} GB of updates) ==", flush=True)
    counts = torch.arange(10.0, 10.0 + n)
    ids = list(range(n))
    reference = None
    ours: dict[str, float | str] = {}
    gemm: float | None = None
    if not fits(nbytes):
        print(f"skipped: the updates alone need {nbytes / GB:.1f} GB, {available_bytes() / GB:.1f} GB available")
        return
    u = stacked(d, n)
    gemm = timed(lambda: u @ u.T, repeats)
    for name in names:
        if not fits(extra_bytes(name, n, d) + (d * 4.0 if name == "fltrust" else 0)):
            ours[name] = f"skipped: needs {extra_bytes(name, n, d) / GB:.1f} GB more than the updates"
            continue
        if name == "fltrust":
            reference = u[: n // 2].mean(0)
        for label, aggregator in variants(name):
            warm_up(aggregator, u, counts, ids)
            ours[label] = timed(
                lambda: aggregator.aggregate(
                    u, counts, client_ids=ids, reference=reference, generator=torch.Generator().manual_seed(0)
                ),
                repeats,
            )
            del aggregator
    del u
    gc.collect()

    # ArrayRecords of the weights (global + update), built without holding U
    e2e: dict[str, float | str] = {}
    first: dict[str, float] = {}
    peak_bytes: dict[str, float] = {}
    peak = PeakMemory()
    flower: dict[str, float | str] = {}
    records_bytes = nbytes
    if not fits(records_bytes):
        reason = f"skipped: the clients' ArrayRecords need {records_bytes / GB:.1f} GB"
        e2e = {name: reason for name in names}
        flower = {name: reason for name in names if name in FLOWER}
    else:
        g = global_weights(d)
        global_record = ArrayRecord(record(g))
        records = [record(row.add_(g)) for row in rows(d, n)]
        gc.collect()
        for name in names:
            needed = nbytes + extra_bytes(name, n, d)
            if not isinstance(ours[name], float):
                e2e[name] = ours[name]
            elif not fits(needed):
                e2e[name] = f"skipped: stacking needs {needed / GB:.1f} GB next to the records"
            else:
                aggregator = variants(name)[0][1]
                warm_up(aggregator, None, counts, ids)
                # FLTrust's server update comes from the server's own training, not timed here
                ref = (
                    stack_updates([ArrayRecord(dict(r)) for r in records[: n // 2]], global_record).mean(0)
                    if name == "fltrust"
                    else None
                )

                rows_buffer = UpdateRows()  # a server's, kept from round to round

                def end_to_end():
                    replies = [ArrayRecord(dict(r)) for r in records]
                    updates = stack_updates(replies, global_record, rows_buffer(n, d))
                    result = aggregator.aggregate(
                        updates, counts, client_ids=ids, generator=torch.Generator().manual_seed(0), reference=ref
                    )
                    stats = batchnorm_statistics(replies, counts, result.flagged)
                    return apply_update(global_record, result.update, result.noise, stats)

                # the first round allocates the buffer (and pays its page faults); the others reuse it
                gc.collect()
                peak.start()
                started = time.perf_counter()
                end_to_end()
                first[name] = time.perf_counter() - started
                peak_bytes[name] = peak.stop()
                e2e[name] = timed(end_to_end, repeats)
                del rows_buffer
            if name in FLOWER:
                needed = 2 * nbytes + (d * 8.0)
                if not fits(needed):
                    flower[name] = (
                        f"skipped: Flower's {name} would need {needed / GB:.1f} GB more (it copies "
                        f"the weights into numpy arrays), {available_bytes() / GB:.1f} GB available"
                    )
                    continue
                strategy = flower_strategy(name, n)
                batches = []

                def run_flower():
                    strategy.aggregate_train(1, batches.pop())

                times = []
                for _ in range(repeats):
                    batches.append(messages(records))
                    gc.collect()
                    start = time.perf_counter()
                    run_flower()
                    times.append(time.perf_counter() - start)
                flower[name] = statistics.median(times)
        del records
        gc.collect()

    print(f"one GEMM pass U @ U.T: {gemm:.3f} s ({nbytes / gemm / GB:.1f} GB/s)")
    header = (
        f"{'strategy':<13}{'ours s':>9}{'GB/s':>7}{'x GEMM':>8}{'e2e s':>9}{'flower s':>10}{'GB/s':>7}{'speedup':>9}"
    )
    print(header)
    print("-" * len(header))
    notes = []
    for name in [label for rule in names for label, _ in variants(rule)]:
        o, e, fl = ours.get(name), e2e.get(name), flower.get(name)
        cells = [f"{name:<13}"]
        cells.append(f"{o:9.3f}{nbytes / o / GB:7.1f}" if isinstance(o, float) else f"{'-':>9}{'':>7}")
        cells.append(f"{o / gemm:8.2f}" if isinstance(o, float) and name.split()[0] in KRUM_FAMILY else f"{'':>8}")
        cells.append(f"{e:9.3f}" if isinstance(e, float) else f"{'-':>9}")
        if isinstance(fl, float):
            cells.append(f"{fl:10.3f}{nbytes / fl / GB:7.1f}")
            cells.append(f"{fl / e:8.1f}x" if isinstance(e, float) else f"{'-':>9}")
        else:
            cells.append(f"{'-' if name in FLOWER or name not in names else 'n/a':>10}{'':>7}{'':>9}")
        print("".join(cells))
        for label, value in (("ours", o), ("e2e", e), ("flower", fl)):
            if isinstance(value, str):
                notes.append(f"  {name} ({label}) {value}")
    for note in dict.fromkeys(notes):
        print(note)
    for name in first:
        print(
            f"{name} e2e, first round (allocates the stacking buffer): {first[name]:.3f} s; peak memory "
            f"of the path {peak_bytes[name] / GB:.2f} GB = {peak_bytes[name] / nbytes:.2f} x the stacked updates"
        )
    results[(size, n)] = {"ours": ours, "e2e": e2e, "flower": flower, "gemm": gemm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="resnet50,mobilenet_v2")
    parser.add_argument("--n", default="10,50,100")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch and BLAS threads (default: all cores)")
    parser.add_argument("--strategies", default=",".join(AGGREGATORS))
    args = parser.parse_args()
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0  # Messages need a run id
    import logging

    logging.getLogger("flwr").setLevel(logging.WARNING)
    if args.threads:
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)
    names = [s for s in args.strategies.split(",") if s]
    unknown = set(names) - set(AGGREGATORS)
    if unknown:
        parser.error(f"unknown strategies {sorted(unknown)}; use {', '.join(AGGREGATORS)}")
    sizes = [s for s in args.sizes.split(",") if s]
    for size in sizes:
        if size not in SIZES:
            parser.error(f"--sizes: {size!r} is not one of {', '.join(SIZES)}")
        sizes_of_layers = parameter_sizes(size)
        counted = sum(sizes_of_layers)
        if counted != SIZES[size]:
            print(f"note: torchvision's {size} has {counted:,} parameters (table: {SIZES[size]:,}); using the former")
            SIZES[size] = counted
        LAYERS[counted] = sizes_of_layers
    import sklearn.cluster  # noqa: F401  (FLAME's HDBSCAN: imported here, not inside a timing)

    read, copy = memory_bandwidth()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores; memory "
        f"bandwidth: {read:.1f} GB/s read (sum), {copy:.1f} GB/s copy (read + write)"
    )
    results: dict = {}
    for size in sizes:
        for n in (int(v) for v in args.n.split(",")):
            bench(size, SIZES[size], n, names, args.repeats, results)
    key = ("resnet50", 50)
    speedup = math.nan
    if key in results:
        fl, ours = results[key]["flower"].get("krum"), results[key]["e2e"].get("krum")
        if isinstance(fl, float) and isinstance(ours, float):
            speedup = fl / ours
        else:
            print(f"krum at n=50, ResNet50 size: ours {ours}, Flower {fl}")
    else:
        print("krum_speedup_vs_flower needs --sizes resnet50 --n 50 (not run)")
    print(f"krum_speedup_vs_flower={speedup:.2f}")


if __name__ == "__main__":
    main()

"""Bulyan's second stage, ours against what torch offers, each as a multiple of one GEMM pass.

Bulyan's second stage needs, for every coordinate of the theta selected updates, the beta values
closest to the median. fedmed does it with a sorting network of elementwise min/max, either eager
over column blocks (strategies/aggregators/ops.py) or fused into one kernel by torch.compile
(strategies/aggregators/fused.py, ``strategy.compile_stage``). This script times the whole rule
both ways against torch's own tools for the same stage (sort, median + topk, median alone), each
as a multiple of one GEMM pass U @ U.T over the n stacked updates, on one thread, in one run.
Compiling the fused kernel is done first and not timed.

    python -m experiments.bulyan_alternatives [--n 50] [--d 2226434]
"""

from __future__ import annotations

import argparse
import time

import torch

from strategies.aggregators import make_aggregator  # noqa: E402

BLOCK = 1 << 16


def timed(fn, repeats: int) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def by_blocks(selected: torch.Tensor, stage) -> torch.Tensor:
    out = torch.empty(selected.shape[1])
    for start in range(0, selected.shape[1], BLOCK):
        out[start : start + BLOCK] = stage(selected[:, start : start + BLOCK].T.contiguous())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--d", type=int, default=2_226_434, help="default: MobileNetV2's size")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    n, d = args.n, args.d
    bulyan = make_aggregator("bulyan", compile_stage=False)
    f = bulyan.malicious(n)
    theta, beta = n - 2 * f, n - 4 * f
    updates = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    selected = updates[:theta].contiguous()
    low = (theta - beta) // 2

    def median_topk(block):
        m = block.median(dim=1, keepdim=True).values
        nearest = (block - m).abs().topk(beta, dim=1, largest=False, sorted=False).indices
        return block.gather(1, nearest).mean(1)

    gemm = timed(lambda: updates @ updates.T, args.repeats)
    fused = make_aggregator("bulyan", compile_stage=True)
    rows = {
        "fedmed bulyan, fused stage, whole rule": timed(
            lambda: fused.aggregate(updates, torch.ones(n), client_ids=range(n), generator=torch.Generator()),
            args.repeats,
        ),
        "fedmed bulyan, eager stage, whole rule": timed(
            lambda: bulyan.aggregate(updates, torch.ones(n), client_ids=range(n), generator=torch.Generator()),
            args.repeats,
        ),
        "torch.sort per coordinate, middle beta averaged": timed(
            lambda: by_blocks(selected, lambda b: b.sort(dim=1).values[:, low : low + beta].mean(1)), args.repeats
        ),
        "torch.median + topk of the beta nearest": timed(lambda: by_blocks(selected, median_topk), args.repeats),
        "torch.median alone": timed(lambda: by_blocks(selected, lambda b: b.median(dim=1).values), args.repeats),
    }
    print(f"n={n} d={d} theta={theta} beta={beta}, one thread; one GEMM pass {gemm:.3f} s")
    for name, seconds in rows.items():
        print(f"{name:<50} {seconds:7.3f} s  {seconds / gemm:5.2f} x GEMM")


if __name__ == "__main__":
    main()

"""Bulyan's per-coordinate stage as one fused CPU kernel, compiled by ``torch.compile``.

Why by hand: in eager torch the stage (a sorting network over the theta selected values of every
coordinate, the window of the beta values nearest their median, the per-row count of values
outside it) is some 500 elementwise passes over memory. With the eager version in ``ops``, as
tight as separate torch calls get, the whole rule costs 2.5 GEMM passes at n = 50
(experiments/bulyan_alternatives.py); ``torch.sort`` and ``torch.median`` cost more. Written
once, column by column, the stage compiles with Inductor into a single loop that keeps a
column's theta values in registers: the rule then costs 1.4 GEMM passes, and gives bit for bit
the eager result.

Compiling takes 4-15 s here on first use in a process for each (theta, beta), about 1 s once
Inductor's disk cache holds it, so ``Bulyan`` uses it by default from model-sized stages on
(``FUSE_AUTO_VALUES``: MobileNetV2 at n = 10 has 8 x 2.2M = 17.8M values), where the eager stage
costs 1-3 GEMM passes more every round, and only on the CPU: on a GPU ``torch.sort`` is already
one kernel. Without a working C++ compiler ``torch.compile`` fails;
Bulyan then logs why and stays with the eager stage.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import cache

import torch

from strategies.aggregators.ops import batcher_runs, median_windows

# the stage is fused when theta * d reaches this (2^24, about 16.8M values); test-sized inputs stay eager
FUSE_AUTO_VALUES = 1 << 24
# columns per call of the compiled kernel; the remainder goes through the same function eagerly
FUSE_BLOCK_COLUMNS = 1 << 16

StageResult = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def bulyan_stage(theta: int, beta: int) -> Callable[..., StageResult]:
    """``stage(*rows)``: for theta rows (c,) of one column block, per column the mean, first and
    last of the beta consecutive sorted values nearest the median (the first such window on a
    tie, among those holding a middle value), per row how many of its values lie outside
    [first, last], and how many columns are not all equal. Exactly what ``ops.sort_columns_``,
    ``ops.closest_window`` and ``ops.count_outside`` compute, written to be fused."""
    runs = batcher_runs(theta)
    candidates = median_windows(theta, beta)

    def stage(*rows: torch.Tensor) -> StageResult:
        s = list(rows)
        for a, k, length in runs:
            for i in range(a, a + length):
                s[i], s[i + k] = torch.minimum(s[i], s[i + k]), torch.maximum(s[i], s[i + k])
        center = s[theta // 2] if theta % 2 else (s[theta // 2 - 1] + s[theta // 2]) * 0.5
        best = None
        for j in candidates:
            low, high = s[j], s[j + beta - 1]
            reach = torch.maximum(center - low, high - center)
            total = s[j]
            for t in range(1, beta):  # in order, as the eager stage sums
                total = total + s[j + t]
            if best is None:
                best = [reach, low, high, total]
            else:
                nearer = reach < best[0]  # strictly: the first window wins a tie
                best = [torch.where(nearer, new, old) for new, old in zip((reach, low, high, total), best)]
        _, low, high, total = best
        outside = torch.stack([((row < low) | (row > high)).sum() for row in rows])
        informative = (s[-1] > s[0]).sum()
        return total / beta, low, high, outside, informative

    return stage


@cache
def compiled_bulyan_stage(theta: int, beta: int) -> Callable[..., StageResult]:
    return torch.compile(bulyan_stage(theta, beta), dynamic=False)


def fused_blocks(d: int, block: int = FUSE_BLOCK_COLUMNS) -> Iterator[tuple[slice, bool]]:
    """(columns, compiled?) covering ``d``: full blocks go to the compiled kernel (one shape, one
    compilation), the remainder to the eager function."""
    full = d - d % block
    for start in range(0, full, block):
        yield slice(start, start + block), True
    if full < d:
        yield slice(full, d), False

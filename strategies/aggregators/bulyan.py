"""Bulyan.

El Mhamdi, Guerraoui, Rouault, "The Hidden Vulnerability of Distributed Learning in Byzantium",
ICML 2018.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from fedmed.config import StrategyConfig
from fedmed.logs import log
from strategies.aggregators.base import Aggregate, above_expected
from strategies.aggregators.fused import FUSE_AUTO_VALUES, bulyan_stage, compiled_bulyan_stage, fused_blocks
from strategies.aggregators.krum import Krum
from strategies.aggregators.ops import (
    Scratch,
    closest_window,
    count_outside,
    lowest,
    median_windows,
    middle,
    sorted_column_blocks,
)


@dataclass
class BulyanConfig(StrategyConfig):
    name: str = "bulyan"
    # f (None: the largest f with n >= 4f + 3, (n - 3) // 4)
    num_malicious: Optional[int] = None
    # its per-coordinate stage as one kernel compiled by torch.compile (None: on the CPU when the
    # selected updates hold >= 2^24 values; compiling takes seconds once per process)
    compile_stage: Optional[bool] = None


class Bulyan(Krum):
    """Krum-based selection of theta = n - 2f updates, then a coordinate-wise trimmed mean: in each
    coordinate, the unweighted mean of the beta = theta - 2f selected values closest to the
    selection's median. Needs n >= 4f + 3; ``num_malicious`` f = None takes the largest f that
    allows, (n - 3) // 4 (Flower's ``Bulyan`` defaults to f = 0, i.e. the plain mean).

    As Flower's ``Bulyan``, which we match: the selection is one Multi-Krum pass (the theta lowest
    Krum scores, neighbours n - f - 2, computed once over all n clients). The paper instead runs
    Krum theta times, removing each winner and recomputing the scores over the clients left. The
    median of an even number of values is the mean of the two middle ones (``np.median``).

    Score: the share of the client's coordinates that did not enter the final mean: 1 for the
    2f clients the Krum stage dropped; for the selected, the share of coordinates (where the
    selection does not all agree) in which their value lies outside the window of the beta values
    closest to the median (a value equal to the window's end counts as kept). Every selected
    client loses e = 2f / theta of its coordinates on average, so flagged = score above halfway
    between e and 1: every client the Krum stage dropped, and any selected one trimmed far more
    than the rest.

    ``compile_stage``: run the per-coordinate stage as one kernel compiled by ``torch.compile``
    (``strategies/aggregators/fused.py``; same result bit for bit, the rule 1.4 instead of 2.5
    GEMM passes at n = 50, 4-15 s to compile once per process). None: on the CPU when
    theta * d >= 2^24; True: always on the CPU, and an error if it cannot compile; False: never.
    """

    name = "bulyan"
    config = BulyanConfig
    rule = "Bulyan needs n >= 4f + 3"

    def __init__(self, num_malicious: int | None = None, compile_stage: bool | None = None) -> None:
        super().__init__(num_malicious)
        if compile_stage not in (None, True, False):
            raise ValueError(f"strategy.compile_stage={compile_stage!r} must be true, false or null (automatic)")
        self.compile_stage = compile_stage
        self._compiled: set[tuple[int, int]] = set()  # (theta, beta) that compiled in this process

    def max_malicious(self, n: int) -> int:
        return (n - 3) // 4

    def min_replies(self, f: int) -> int:
        return 4 * f + 3

    def _aggregate(self, updates, num_examples, *, client_ids, generator, reference) -> Aggregate:
        n, d = updates.shape
        f = self.malicious(n)
        theta = n - 2 * f
        beta = theta - 2 * f
        krum = self.scores(updates)
        selected = torch.sort(lowest(krum, client_ids, theta)).values
        if self._fuse(theta, d, updates.device):
            fused = self._fused_stage(updates, selected, theta, beta)
            if fused is not None:
                out, excluded, informative = fused
                return self._result(out, excluded, informative, selected, n, f, theta)
        out = torch.empty(d, dtype=updates.dtype, device=updates.device)
        excluded = torch.zeros(theta, dtype=torch.float64, device=updates.device)
        informative = 0
        rows = selected.to(updates.device)
        scratch = Scratch()
        candidates = median_windows(theta, beta)
        for cols, s in sorted_column_blocks(updates, rows):
            m = middle(s)
            # the beta values closest to the median: a window of beta consecutive sorted values
            # that holds the middle one (or one of the two middle ones)
            out[cols], low, high = closest_window(s, m, beta, candidates, scratch)
            informative += int((s[-1] > s[0]).sum())
            raw = scratch("raw", s)
            torch.index_select(updates[:, cols], 0, rows, out=raw)
            excluded += count_outside(raw, low, high, scratch)
        return self._result(out, excluded, informative, selected, n, f, theta)

    @staticmethod
    def _result(out, excluded, informative, selected, n, f, theta) -> Aggregate:
        scores = torch.ones(n, dtype=torch.float64)
        scores[selected] = excluded.cpu().double() / max(informative, 1)
        return Aggregate(out, scores, above_expected(scores, 2 * f / theta))

    def _fuse(self, theta: int, d: int, device: torch.device) -> bool:
        if device.type != "cpu" or self.compile_stage is False:
            return False
        return self.compile_stage is True or theta * d >= FUSE_AUTO_VALUES

    def _fused_stage(self, updates, selected, theta, beta):
        """(mean (d,), outside counts (theta,), informative columns) from the compiled kernel;
        None if it does not compile and ``compile_stage`` is automatic."""
        key = (theta, beta)
        kernel, eager = compiled_bulyan_stage(theta, beta), bulyan_stage(theta, beta)
        out = torch.empty(updates.shape[1], dtype=updates.dtype)
        excluded = torch.zeros(theta, dtype=torch.int64)
        informative = 0
        rows = selected.tolist()
        for cols, compiled in fused_blocks(updates.shape[1]):
            stage = kernel if compiled else eager
            args = [updates[r, cols] for r in rows]
            if compiled and key not in self._compiled:
                try:
                    result = stage(*args)
                except Exception as error:  # noqa: BLE001 -- torch.compile's failures share no narrower base
                    if self.compile_stage:
                        raise RuntimeError(
                            f"bulyan: torch.compile could not build the fused stage ({error!r}); "
                            "set strategy.compile_stage=false to use the eager one"
                        ) from error
                    log.warning(
                        "bulyan: torch.compile could not build the fused stage (%r); using the "
                        "eager one (strategy.compile_stage=false skips the attempt)",
                        error,
                    )
                    self.compile_stage = False
                    return None
                self._compiled.add(key)
            else:
                result = stage(*args)
            mean, _, _, outside, columns = result
            out[cols] = mean
            excluded += outside
            informative += int(columns)
        return out, excluded, informative

"""Robust federated aggregation: the geometric median by smoothed Weiszfeld iterations.

Pillutla, Kakade, Harchaoui, "Robust Aggregation for Federated Learning", IEEE Transactions on
Signal Processing 70, 2022.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedmed.config import StrategyConfig
from strategies.aggregators.base import Aggregate, Aggregator, check_positive, data_weights
from strategies.aggregators.ops import gram, median, weighted_sum


@dataclass
class RFAConfig(StrategyConfig):
    name: str = "rfa"
    max_iter: int = 10  # smoothed Weiszfeld iterations at most
    nu: float = 1e-6  # smoothing of the Weiszfeld weights
    tol: float = 1e-5  # stop when the objective improves by less than this (relative)


class RFA(Aggregator):
    """Approximate geometric median of the updates with data weights alpha_i = n_i / N.

    Smoothed Weiszfeld, as the paper's Algorithm 2: start from the weighted mean; each iteration
    sets beta_i = alpha_i / max(nu, ||u_i - z||) and z = sum beta_i u_i / sum beta_i; stop after
    ``max_iter`` iterations or when the objective sum alpha_i ||u_i - z|| changes by less than
    ``tol`` times itself. Since z is always a combination of the updates, every distance comes
    from their Gram matrix: one GEMM pass, then the iterations cost O(n^2) each, and z itself is
    formed once at the end.

    Score: the distance ||u_i - z|| to the geometric median. Flagged: the clients whose Weiszfeld
    weight at the final z, relative to their data weight (beta_i / alpha_i, i.e. proportional to
    1 / max(nu, ||u_i - z||)), is below half the median of those ratios — at more than about twice
    the typical distance from the median.
    """

    name = "rfa"
    config = RFAConfig

    def __init__(self, max_iter: int = 10, nu: float = 1e-6, tol: float = 1e-5) -> None:
        if isinstance(max_iter, bool) or int(max_iter) != max_iter or max_iter < 1:
            raise ValueError(f"strategy.max_iter={max_iter!r} must be an integer >= 1")
        self.max_iter = int(max_iter)
        self.nu = check_positive("nu", nu)
        self.tol = check_positive("tol", tol, allow_zero=True)
        self.iterations = 0  # of the last call, for diagnostics

    def _aggregate(self, updates, num_examples, *, client_ids, generator, reference) -> Aggregate:
        g = gram(updates).cpu()
        sq = g.diagonal()
        alpha = data_weights(num_examples)

        def distances(b: torch.Tensor) -> torch.Tensor:
            gb = g @ b
            return (sq - 2.0 * gb + b @ gb).clamp_min(0.0).sqrt()

        b = alpha
        dist = distances(b)
        objective = float(alpha @ dist)
        self.iterations = 0
        for _ in range(self.max_iter):
            beta = alpha / dist.clamp_min(self.nu)
            b = beta / beta.sum()
            dist = distances(b)
            previous, objective = objective, float(alpha @ dist)
            self.iterations += 1
            if abs(previous - objective) < self.tol * objective:
                break
        ratio = 1.0 / dist.clamp_min(self.nu)
        flagged = torch.nonzero(ratio < 0.5 * median(ratio)).flatten().tolist()
        return Aggregate(weighted_sum(b, updates), dist, flagged)

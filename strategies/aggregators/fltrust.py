"""FLTrust: trust bootstrapped from the server's own update on a small root dataset.

Cao, Fang, Liu, Gong, "FLTrust: Byzantine-robust Federated Learning via Trust Bootstrapping",
NDSS 2021.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from fedmed.config import StrategyConfig
from fedmed.logs import log
from strategies.aggregators.base import Aggregate, Aggregator
from strategies.aggregators.ops import weighted_sum


@dataclass
class FLTrustConfig(StrategyConfig):
    name: str = "fltrust"
    # examples of the server's root dataset (from the validation split), on which it computes its
    # reference update each round
    root_samples: int = 100
    # SGD iterations of the server's update, each on a random root batch (None: as many as the
    # round's median client takes, as in the paper)
    root_iterations: Optional[int] = None


class FLTrust(Aggregator):
    """Each client's trust score is TS_i = ReLU(cos(u_i, g0)), g0 being the server's update from
    the same global model on its root dataset (``reference``, required; the server trains it on
    ``strategy.root_samples`` examples). Each update is rescaled to the norm of g0, and the
    aggregate is sum_i TS_i * (||g0|| / ||u_i||) u_i / sum_i TS_i (example counts are not used,
    as in the paper). If every trust score is 0, the update is zero (the global model is kept)
    and a warning is logged.

    Score: 1 - TS_i. Flagged: TS_i == 0 (cosine with g0 not positive, or a zero update).
    """

    name = "fltrust"
    config = FLTrustConfig
    # the server computes its own update on a root dataset each round (strategies/root_update.py)
    needs_root_update = True

    def __init__(self, root_samples: int = 100, root_iterations: int | None = None) -> None:
        if isinstance(root_samples, bool) or not isinstance(root_samples, int) or root_samples < 1:
            raise ValueError(f"strategy.root_samples={root_samples!r} must be an integer >= 1")
        if root_iterations is not None and (
            isinstance(root_iterations, bool) or not isinstance(root_iterations, int) or root_iterations < 1
        ):
            raise ValueError(f"strategy.root_iterations={root_iterations!r} must be an integer >= 1, or null")
        self.root_samples = root_samples
        self.root_iterations = root_iterations

    def _aggregate(self, updates, num_examples, *, client_ids, generator, reference) -> Aggregate:
        n, d = updates.shape
        if reference is None:
            raise ValueError(
                "strategy=fltrust needs the server's reference update on its root dataset "
                "(reference=None): build RobustAggregation with reference_update"
            )
        reference = torch.as_tensor(reference).reshape(-1).to(device=updates.device, dtype=updates.dtype)
        if reference.numel() != d:
            raise ValueError(f"fltrust: the reference update has {reference.numel()} values, the updates {d}")
        if not torch.isfinite(reference).all():
            raise ValueError("fltrust: the reference update holds NaN or Inf")
        ref_norm = float(torch.linalg.vector_norm(reference.double()))
        norms = torch.linalg.vector_norm(updates, dim=1).double().cpu()
        dots = (updates @ reference).double().cpu()
        denominator = norms * ref_norm
        cos = torch.where(denominator > 0, dots / denominator.clamp_min(1e-300), torch.zeros_like(dots))
        trust = cos.clamp(0.0, 1.0)
        flagged = torch.nonzero(trust == 0).flatten().tolist()
        total = float(trust.sum())
        if total == 0.0:
            log.warning("FLTrust: no update has a positive cosine with the server's; the global model is kept")
            return Aggregate(torch.zeros(d, dtype=updates.dtype, device=updates.device), 1.0 - trust, flagged)
        coefficients = trust * ref_norm / norms.clamp_min(1e-300) / total
        return Aggregate(weighted_sum(coefficients, updates), 1.0 - trust, flagged)

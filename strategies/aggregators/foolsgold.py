"""FoolsGold: down-weight clients whose update histories look alike (sybils).

Fung, Yoon, Beschastnikh, "The Limitations of Federated Learning in Sybil Settings", RAID 2020.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedmed.config import StrategyConfig
from fedmed.logs import log
from strategies.aggregators.base import Aggregate, Aggregator
from strategies.aggregators.ops import cosines, gram, weighted_sum

COSINE_TOLERANCE = 1e-6


def foolsgold_weights(cos: torch.Tensor, kappa: float = 1.0) -> torch.Tensor:
    """The paper's Algorithm 1 (lines 7-22) on the cosine similarities (n, n) of the histories."""
    n = cos.shape[0]
    cs = cos.clone()
    cs.fill_diagonal_(0.0)  # the reference implementation subtracts the identity
    v = cs.max(1).values  # >= 0, the diagonal being 0
    # pardoning: when j looks more like someone than i does, scale cs_ij by v_i / v_j
    pardon = v[:, None] < v[None, :]
    cs = torch.where(pardon, cs * (v[:, None] / v[None, :].clamp_min(1e-300)), cs)
    w = (1.0 - cs.max(1).values).clamp_(0.0, 1.0)
    # float32 updates give cosines to about 1e-7: a client within that of a copy of another has
    # weight 0, not a rounding error that the rescaling below would blow up to 1
    w[w < COSINE_TOLERANCE] = 0.0
    if float(w.max()) == 0.0:
        return torch.zeros(n, dtype=torch.float64)
    w = w / w.max()
    w[w == 1.0] = 0.99
    w = kappa * (torch.log(w / (1.0 - w)) + 0.5)  # log(0) = -inf, clipped to 0 below
    return torch.nan_to_num(w, nan=0.0, posinf=1.0, neginf=0.0).clamp_(0.0, 1.0)


@dataclass
class FoolsGoldConfig(StrategyConfig):
    name: str = "foolsgold"
    kappa: float = 1.0  # confidence of the logit that turns similarities into weights


class FoolsGold(Aggregator):
    """FoolsGold, Algorithm 1 of the paper, with confidence kappa = 1.

    The aggregator keeps, per client id, the sum of all the updates that client has sent (this
    round's included). Each round it takes the cosine similarities between the histories of the
    round's clients, applies the paper's pardoning, turns one minus each client's largest
    similarity into a weight (rescaled so the largest is 1, then through the logit
    kappa * (ln(w / (1 - w)) + 0.5), clipped to [0, 1]), and returns the mean of this round's
    updates weighted by those weights (sum w_i u_i / sum w_i; example counts are not used). The
    optional importance weighting of output-layer features (the paper's "feature importance") is
    left out: it needs to know which coordinates are the output layer, and the paper presents it
    as an option. If every weight is 0 (e.g. all clients identical), the update is zero and a
    warning is logged.

    Score: 1 - weight. Flagged: weight < 0.5 (score > 0.5), the logit's own midpoint. The history
    grows with the number of distinct clients (d float32 values each).
    """

    name = "foolsgold"
    config = FoolsGoldConfig

    def __init__(self, kappa: float = 1.0) -> None:
        if not kappa > 0:
            raise ValueError(f"strategy.kappa={kappa!r} must be > 0")
        self.kappa = float(kappa)
        self.history: dict[int, torch.Tensor] = {}

    def state_dict(self) -> dict:
        return {"history": {cid: h.detach().cpu().clone() for cid, h in self.history.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.history = {int(cid): h.clone() for cid, h in state["history"].items()}

    def _aggregate(self, updates, num_examples, *, client_ids, generator, reference) -> Aggregate:
        n, d = updates.shape
        for row, cid in enumerate(client_ids):
            past = self.history.get(cid)
            if past is None or past.shape != (d,) or past.device != updates.device:
                self.history[cid] = updates[row].clone()
            else:
                past += updates[row]
        histories = [self.history[cid] for cid in client_ids]
        weights = foolsgold_weights(cosines(gram(histories).cpu()), self.kappa)
        total = float(weights.sum())
        flagged = torch.nonzero(weights < 0.5).flatten().tolist()
        if total == 0.0:
            log.warning("FoolsGold: every client got weight 0; the global model is kept")
            return Aggregate(torch.zeros(d, dtype=updates.dtype, device=updates.device), 1.0 - weights, flagged)
        return Aggregate(weighted_sum(weights / total, updates), 1.0 - weights, flagged)

"""FLAME: clustering on cosine distances, clipping, and noise.

Nguyen, Rieger, Chen, Yalame, Möllering, Fereidooni, Marchal, Miettinen, Mirhoseini, Zeitouni,
Koushanfar, Sadeghi, Schneider, "FLAME: Taming Backdoors in Federated Learning", USENIX Security
2022.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from fedmed.config import StrategyConfig
from fedmed.logs import log
from strategies.aggregators.base import Aggregate, Aggregator, check_positive
from strategies.aggregators.ops import cosines, gram, median, noise_like, weighted_sum


def largest_cluster(cosine_distances: np.ndarray) -> np.ndarray:
    """Rows of the largest HDBSCAN cluster (noise excluded), as FLAME's model filtering."""
    from sklearn.cluster import HDBSCAN

    n = cosine_distances.shape[0]
    if n == 1:
        return np.array([0])
    labels = (
        HDBSCAN(min_cluster_size=n // 2 + 1, min_samples=1, allow_single_cluster=True, metric="precomputed", copy=True)
        .fit(cosine_distances)
        .labels_
    )
    clusters = labels[labels >= 0]
    if clusters.size == 0:
        return np.array([], dtype=np.int64)
    # min_cluster_size > n / 2 leaves room for one cluster only; the bincount settles it anyway
    return np.flatnonzero(labels == np.bincount(clusters).argmax())


@dataclass
class FlameConfig(StrategyConfig):
    name: str = "flame"
    noise_lambda: float = 0.001  # noise standard deviation = noise_lambda * (median update norm)


class Flame(Aggregator):
    """FLAME's three steps on the updates:

    1. HDBSCAN (``min_cluster_size`` = n // 2 + 1, ``min_samples`` = 1, single cluster allowed) on
       the pairwise cosine distances of the updates (float64); the largest cluster is admitted,
       the rest (HDBSCAN's noise) rejected;
    2. each admitted update clipped to S, the median norm of all the round's updates;
    3. the unweighted mean of the admitted, clipped updates (the paper's average; example counts
       are not used), plus Gaussian noise of standard deviation ``noise_lambda`` * S per
       coordinate (lambda = 0.001, the paper's value for image classification), returned as
       ``Aggregate.noise``: the server adds it to the learned weights only. BatchNorm's running
       statistics are averages of activations, not weights; noise there zeroed small running
       variances and the global model gave NaN (backdoor study, ResNet18 on PneumoniaMNIST).

    FLAME's Algorithm 1 writes the cosine distances on the local models W_i. Between models that
    all start from the same global model, nearly all of that cosine is the global model itself, so
    (docs/architecture.md) we compute it on the updates W_i - G, as the paper's clipping bound already is.

    With a single cluster allowed, HDBSCAN labels the cluster's outskirts as noise (only the
    points that stay until the densest level are members), so FLAME rejects some honest clients
    too, as the paper's own false positives show; clipping and noise are what bound the rest.

    Score: cosine distance between the client's update and the admitted cluster's mean direction
    (the mean of the admitted updates' unit vectors); for a round where nothing is admitted, the
    mean direction of all updates. Flagged: the clients not admitted. If HDBSCAN finds no
    cluster at all (all noise), nothing is admitted, the global model is kept (zero update) and
    a warning is logged.
    """

    name = "flame"
    config = FlameConfig

    def __init__(self, noise_lambda: float = 0.001) -> None:
        self.noise_lambda = check_positive("noise_lambda", noise_lambda, allow_zero=True)

    def _aggregate(self, updates, num_examples, *, client_ids, generator, reference) -> Aggregate:
        n, d = updates.shape
        g = gram(updates).cpu()
        norms = g.diagonal().clamp_min(0.0).sqrt()
        cos = cosines(g)
        distance = (1.0 - cos).clamp_(0.0, 2.0)
        distance.fill_diagonal_(0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            admitted = torch.from_numpy(largest_cluster(distance.numpy()))
        inside = torch.zeros(n, dtype=torch.bool)
        inside[admitted] = True
        members = admitted if admitted.numel() else torch.arange(n)
        direction = cos[:, members].sum(1)
        direction_norm = cos[members][:, members].sum().clamp_min(1e-300).sqrt()
        scores = (1.0 - direction / direction_norm).clamp_(0.0, 2.0)
        flagged = torch.nonzero(~inside).flatten().tolist()
        if admitted.numel() == 0:
            log.warning("FLAME: HDBSCAN found no cluster among %d updates; the global model is kept", n)
            return Aggregate(torch.zeros(d, dtype=updates.dtype, device=updates.device), scores, flagged)
        bound = float(median(norms))
        scale = torch.where(norms > bound, bound / norms.clamp_min(max(bound, 1e-300)), torch.ones_like(norms))
        coefficients = torch.where(inside, scale / admitted.numel(), torch.zeros_like(scale))
        update = weighted_sum(coefficients, updates)
        noise = None
        if self.noise_lambda > 0 and bound > 0:
            noise = noise_like(d, self.noise_lambda * bound, generator, updates.device)
        return Aggregate(update, scores, flagged, noise)

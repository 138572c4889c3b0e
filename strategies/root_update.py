"""FLTrust's server side: the update the server computes itself on a small clean root dataset.

Cao et al., "FLTrust: Byzantine-robust Federated Learning via Trust Bootstrapping" (NDSS 2021):
the server holds a few clean examples, trains the round's global model on them as a client would,
and scores each client's update by its direction against this reference. fedmed's root dataset is
a fixed, seeded sample of ``strategy.root_samples`` images of the official validation split, which
no client trains on and the server does not test on.

As in the paper's ServerUpdate (Algorithm 1), the server takes as many SGD iterations as a client,
each on a batch drawn at random from the root data. Its update's norm becomes the norm of the
aggregate, so it must be of the clients' size: one epoch over 100 root images (4 steps, the last
on 4 images) against a client's 14 gave a reference nearly orthogonal to every client (cosine
-0.04 to 0.14) whose norm ran up to 5x the clients' (3.38 against 0.59-0.86) once the model was off
balance, and the global model swung between the two classes from round to round.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from fedmed.dataset import Split
from fedmed.seeds import Stream, seed_for
from fedmed.serialization import load_arrays, model_to_arrays
from fedmed.train import make_optimizer, train_local
from strategies.robust_aggregation import flat_update


def root_indices(num_images: int, root_samples: int, seed: int) -> np.ndarray:
    if root_samples < 2:
        raise ValueError(f"strategy.root_samples={root_samples} must be >= 2")
    if num_images < root_samples:
        raise ValueError(
            f"strategy.root_samples={root_samples} but the validation split holds only "
            f"{num_images} images; lower strategy.root_samples"
        )
    return np.sort(np.random.default_rng(seed).choice(num_images, size=root_samples, replace=False))


def client_iterations(num_examples: torch.Tensor, epochs: int, batch_size: int) -> int:
    """SGD iterations of the median client of the round: ``epochs`` x ceil(examples / batch).
    The median, because the counts are the clients' own word and a few may lie."""
    if len(num_examples) == 0:
        raise ValueError("no client example counts to match the server's iterations to")
    median = float(torch.as_tensor(num_examples, dtype=torch.float64).median())
    return max(1, epochs * math.ceil(median / batch_size))


def random_batches(
    indices: np.ndarray, iterations: int, batch_size: int, generator: torch.Generator
) -> list[np.ndarray]:
    """``iterations`` batches, each ``batch_size`` distinct indices drawn at random (the paper's
    "randomly sample a batch D_b from D_0")."""
    size = min(batch_size, len(indices))
    return [indices[torch.randperm(len(indices), generator=generator)[:size].numpy()] for _ in range(iterations)]


def make_root_update(
    model: nn.Module,
    root: Split,
    root_samples: int,
    client: dict,
    *,
    device: torch.device,
    seed: int,
    iterations: int | None = None,
) -> Callable[[ArrayRecord, torch.Tensor], torch.Tensor]:
    """``reference_update(global_arrays, num_examples) -> (d,) tensor``: a copy of ``model``
    holding the global weights, trained on the root sample with the clients' settings (``client``
    section: optimizer, lr, momentum, weight decay, batch size, augmentation) for ``iterations``
    SGD steps (None: as many as the median client of the round takes, from the example counts
    ``num_examples`` of its replies and ``client.epochs``), each on a random root batch."""
    if iterations is not None and iterations < 1:
        raise ValueError(f"strategy.root_iterations={iterations} must be >= 1, or null to match the clients")
    indices = root_indices(len(root.labels), root_samples, seed_for(seed, Stream.ROOT_DATA))
    batch_size = int(client["batch_size"])
    calls = Counter()  # fresh batches each round; a checkpoint keeps the count

    def reference_update(global_arrays: ArrayRecord, num_examples: torch.Tensor) -> torch.Tensor:
        steps = (
            iterations if iterations is not None else client_iterations(num_examples, int(client["epochs"]), batch_size)
        )
        calls.value += 1
        round_seed = seed_for(seed, Stream.ROOT_TRAINING, calls.value)
        batches = random_batches(indices, steps, batch_size, torch.Generator().manual_seed(round_seed))
        local = copy.deepcopy(model)
        load_arrays(local, global_arrays)
        optimizer = make_optimizer(
            local.parameters(),
            client["optimizer"],
            float(client["lr"]),
            float(client["momentum"]),
            float(client["weight_decay"]),
        )
        train_local(
            local,
            root.images,
            root.labels,
            indices,
            epochs=1,
            batch_size=batch_size,
            optimizer=optimizer,
            device=device,
            seed=round_seed,
            augment=bool(client["augment"]),
            batches=lambda: batches,
        )
        return flat_update(model_to_arrays(local.cpu()), global_arrays)

    reference_update.calls = calls
    return reference_update


class Counter:
    """How many reference updates the server has computed (``state_dict`` for checkpoints)."""

    def __init__(self) -> None:
        self.value = 0

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = int(state["value"])

"""FLTrust's server side: the update the server computes itself on a small clean root dataset.

Cao et al., "FLTrust: Byzantine-robust Federated Learning via Trust Bootstrapping" (NDSS 2021):
the server holds a few clean examples, trains the round's global model on them as a client would,
and scores each client's update by its direction against this reference. fedmed's root dataset is
a fixed, seeded sample of ``strategy.root_samples`` images of the official validation split, which
no client trains on and the server does not test on.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from fedmed.dataset import Split
from fedmed.serialization import load_arrays, model_to_arrays
from fedmed.train import derive_seed, make_optimizer, train_local
from strategies.robust import flat_update


def root_indices(num_images: int, root_samples: int, seed: int) -> np.ndarray:
    if root_samples < 2:
        raise ValueError(f"strategy.root_samples={root_samples} must be >= 2")
    if num_images < root_samples:
        raise ValueError(f"strategy.root_samples={root_samples} but the validation split holds only "
                         f"{num_images} images; lower strategy.root_samples")
    return np.sort(np.random.default_rng(seed).choice(num_images, size=root_samples, replace=False))


def make_root_update(model: nn.Module, root: Split, root_samples: int, client: dict, *, device: torch.device,
                     seed: int) -> Callable[[ArrayRecord], torch.Tensor]:
    """``reference_update(global_arrays) -> (d,) tensor``: one round of local training of a copy
    of ``model`` holding the global weights on the root sample, with the clients' settings
    (``client`` section: optimizer, lr, epochs, batch size)."""
    indices = root_indices(len(root.labels), root_samples, derive_seed(seed, 11))
    rounds = itertools.count(1)  # a fresh batch order each round

    def reference_update(global_arrays: ArrayRecord) -> torch.Tensor:
        local = copy.deepcopy(model)
        load_arrays(local, global_arrays)
        optimizer = make_optimizer(local.parameters(), client["optimizer"], float(client["lr"]),
                                   float(client["momentum"]), float(client["weight_decay"]))
        train_local(local, root.images, root.labels, indices, epochs=int(client["epochs"]),
                    batch_size=min(int(client["batch_size"]), len(indices)), optimizer=optimizer, device=device,
                    seed=derive_seed(seed, 12, next(rounds)), augment=bool(client["augment"]))
        return flat_update(model_to_arrays(local.cpu()), global_arrays)

    return reference_update

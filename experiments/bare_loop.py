"""Federated averaging as a bare PyTorch loop in one process: no Flower, no Ray.

The reference the overhead benchmark compares `fedmed-sim` against, and a fast way to try
training defaults. It uses fedmed's own data, partition, model and training functions, so the
SGD steps and evaluations are the same as in a federation.
"""

from __future__ import annotations

import time

import torch

from fedmed.data import client_partitions, load_dataset, split_holdout
from fedmed.models import build_model
from fedmed.precision import Precision
from fedmed.seeds import Stream, seed_for
from fedmed.train import evaluate, make_optimizer, train_local


def bare_fedavg(
    *,
    dataset: str,
    root: str | None,
    model_name: str,
    norm: str,
    num_clients: int,
    rounds: int,
    partition: dict,
    epochs: int,
    batch_size: int,
    optimizer: str,
    lr: float,
    momentum: float,
    weight_decay: float,
    augment: bool,
    val_fraction: float,
    seed: int,
    size: int = 28,
    device: str = "cpu",
    amp: str = "off",
) -> list[dict]:
    """Per-round rows (round, accuracy, auc, time_s), round 0 being the initial model.

    ``device`` and ``amp`` (``client.amp``) as in a federation: the GPU check compares clients
    sharing a GPU under Ray against this loop on the same GPU.
    """
    started = time.monotonic()
    device = torch.device(device)
    precision = Precision(amp=amp, device=device)
    # root: the MedMNIST and image-folder options' key; the synthetic option has none
    data = load_dataset(dataset, seed=seed, size=size, **({"root": root} if root is not None else {}))
    torch.manual_seed(seed)
    model = build_model(model_name, data.num_classes, data.channels, norm=norm)
    partitions = client_partitions(data.train.labels, num_clients, partition, seed, data.name)
    shares = [
        split_holdout(p, val_fraction, seed_for(seed, Stream.HOLDOUT, pid))[0] for pid, p in enumerate(partitions)
    ]
    test = data.test
    rows = [
        {"round": 0, **evaluate(model, test.images, test.labels, device=device), "time_s": time.monotonic() - started}
    ]
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    for server_round in range(1, rounds + 1):
        total = sum(len(s) for s in shares)
        summed = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in global_state.items()}
        for pid, indices in enumerate(shares):
            model.load_state_dict(global_state)
            client_seed = seed_for(seed, Stream.CLIENT_ROUND, server_round, pid)
            torch.manual_seed(client_seed)
            opt = make_optimizer(model.parameters(), optimizer, lr, momentum, weight_decay)
            train_local(
                model,
                data.train.images,
                data.train.labels,
                indices,
                epochs=epochs,
                batch_size=batch_size,
                optimizer=opt,
                device=device,
                seed=client_seed,
                augment=augment,
                precision=precision,
            )
            for k, v in model.state_dict().items():
                summed[k] += v.float() * (len(indices) / total)
        global_state = {k: summed[k].to(v.dtype) for k, v in global_state.items()}
        model.load_state_dict(global_state)
        rows.append(
            {
                "round": server_round,
                **evaluate(model, test.images, test.labels, device=device),
                "time_s": time.monotonic() - started,
            }
        )
    return rows

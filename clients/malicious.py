"""What a malicious client does in a round where it attacks (fedmed/poisoning.py decides when).

Outside its attack rounds a malicious client trains honestly on its own clean share, through
the normal path (clients/local_training.py). In an attack round:

- data poisoning (``edge_case``, ``badnets``, ``label_flip``): it trains on its poisoned pool
  (:func:`poisoned_data`) with plain cross entropy (the client-side defence is the honest
  hospitals' choice, not the attacker's), in one of the modes:

  * ``blackbox``: plain training;
  * ``pgd``: every ``attack.project_every`` optimizer steps, and once after the last, the
    model's float parameters are projected onto the L2 ball of radius ``attack.eps`` around
    the received global weights (Wang et al. 2020), so that norm-bounding defences let it pass;
  * ``replacement``: as ``pgd``; then the update (local - global, norm <= eps) is multiplied
    by the scale (Bagdasaryan et al. 2020), so the sent update's norm is <= scale * eps. This
    is the order of Wang et al.'s code (project while training, scale after).

- ``sign_flip``: honest training on its clean share, then it sends global - scale * (local - global).
- ``gaussian``: honest training (so that its BatchNorm statistics and reported metrics look
  like anyone's), then it sends global + scale * N(0, noise_std^2) per parameter coordinate.

The scale (``attack.scale``; None: 1, or the replacement factor in ``replacement`` mode,
fedmed.poisoning.update_scale) multiplies every attack's update. It touches the model's
parameters only: BatchNorm running statistics and other buffers stay as training left them.
The client reports the example count of its clean share and the metrics of an honest client
without a defence (train loss and accuracy); no metric says it is malicious. Under a client-side
defence, honest replies also carry the defence's own metrics (``privacy_epsilon``,
``train_pgd_accuracy``, ...), which an attack round's reply lacks.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from clients.local_training import LocalData
from fedmed.data import ClientShare
from fedmed.logs import log
from fedmed.poisoning import (
    DATA_POISONING,
    add_trigger_uint8,
    attack_section,
    edge_case_split,
    edge_share,
    malicious_ids,
    update_scale,
)
from fedmed.seeds import Stream, seed_for
from fedmed.train import BatchTransform, TrainStep, cross_entropy_step, make_optimizer, train_local


class PoolImages:
    """The uint8 images (N, H, W, C) of an attacker's training pool, read from the shared
    arrays when a batch is drawn: row ``i`` is ``base[rows[i]]``, with the BadNets trigger
    stamped where ``stamp[i]``. Nothing is copied beforehand, however large the images."""

    def __init__(self, base: np.ndarray, rows: np.ndarray, stamp: np.ndarray | None = None, trigger_size: int = 3):
        self.base = base
        self.rows = np.asarray(rows, dtype=np.int64)
        self.stamp = np.zeros(len(self.rows), bool) if stamp is None else np.asarray(stamp, dtype=bool)
        self.trigger_size = int(trigger_size)
        if self.stamp.shape != self.rows.shape:
            raise ValueError("stamp must have one flag per row")

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.base.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.base.dtype

    @property
    def ndim(self) -> int:
        return self.base.ndim

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index) -> np.ndarray:
        if not (isinstance(index, np.ndarray) and index.dtype.kind in "iu"):
            index = np.atleast_1d(np.arange(len(self.rows))[index])
        images = np.asarray(self.base[self.rows[index]])
        stamped = self.stamp[index]
        if stamped.any():
            images = images.copy()
            images[stamped] = add_trigger_uint8(images[stamped], self.trigger_size)
        return images

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        images = self[np.arange(len(self.rows))]
        return images if dtype is None else images.astype(dtype)


def _repeat_to(rows: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` rows drawn from ``rows``: whole copies, then a seeded sample of the remainder."""
    if count <= 0 or len(rows) == 0:
        return np.zeros(0, dtype=np.int64)
    whole, rest = divmod(count, len(rows))
    return np.concatenate([np.tile(rows, whole), rng.choice(rows, size=rest, replace=False)]).astype(np.int64)


def poison_count(clean: int, poison_fraction: float) -> int:
    """Poisoned rows added to ``clean`` clean ones so that they form ``poison_fraction`` of the pool."""
    return int(round(clean * poison_fraction / (1.0 - poison_fraction)))


def poisoned_data(
    share: ClientShare,
    attack: Mapping,
    *,
    partition_id: int,
    malicious: list[int],
    seed: int,
    run_seed: int,
    transform: BatchTransform | None = None,
) -> LocalData:
    """The attacker's training pool for an attack round: its clean train indices plus

    - ``edge_case``: its share of the edge-case attacker set (fedmed.poisoning.edge_share),
      labelled as the target class and repeated (whole copies, then a seeded sample) until the
      poisoned rows form ``attack.poison_fraction`` of the pool (Wang et al. mix about 100 edge
      images with 400 clean ones);
    - ``badnets``: stamped, target-labelled copies of a seeded draw of its own images whose label
      is not the target, forming ``attack.poison_fraction`` of the pool;
    - ``label_flip``: nothing added; its source-class images are labelled as the target.

    ``run_seed`` is the run's seed (the edge-case split is the server's); ``seed`` this round's.
    Only index and label arrays of the attacker's share are built; images are read on demand.
    """
    a = attack_section(attack)
    name, target = a["name"], int(a["target_class"])
    if name not in DATA_POISONING:
        raise ValueError(f"attack={name} poisons no data")
    clean = np.asarray(share.train_indices, dtype=np.int64)
    labels = np.asarray(share.labels, dtype=np.int64)[clean]
    rng = np.random.default_rng(seed_for(seed, Stream.POISON_POOL))
    poison = np.zeros(0, dtype=np.int64)
    stamp = False
    if name == "edge_case":
        split = edge_case_split(
            share.images,
            share.labels,
            int(a["source_class"]),
            float(a["tail_fraction"]),
            float(a["test_fraction"]),
            run_seed,
        )
        mine = edge_share(split, malicious, partition_id)
        if len(mine) == 0:
            log.warning(
                "partition %d: no edge-case images left for it (%d attacker images among %d malicious "
                "partitions); it trains on clean data",
                partition_id,
                len(split.attacker),
                len(malicious),
            )
        poison = _repeat_to(mine, poison_count(len(clean), float(a["poison_fraction"])), rng)
    elif name == "badnets":
        candidates = clean[labels != target]
        poison = _repeat_to(candidates, poison_count(len(clean), float(a["poison_fraction"])), rng)
        stamp = True
    else:
        labels = np.where(labels == int(a["source_class"]), target, labels)
    rows = np.concatenate([clean, poison])
    pool_labels = np.concatenate([labels, np.full(len(poison), target, dtype=np.int64)])
    flags = np.concatenate([np.zeros(len(clean), bool), np.full(len(poison), stamp)])
    images = PoolImages(share.images, rows, flags, int(a["trigger_size"]))
    return LocalData(images, pool_labels, np.arange(len(rows)), transform)


# --- staying close to the global model -----------------------------------------------------------


def float_parameters(model: nn.Module) -> list[torch.Tensor]:
    """The parameters the attack moves (buffers such as BatchNorm statistics are left alone)."""
    return [p for p in model.parameters() if p.is_floating_point()]


@torch.no_grad()
def update_norm(params: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """L2 norm of (params - reference) over all tensors together."""
    total = sum(float(torch.sum((p.detach().double() - r.double()) ** 2)) for p, r in zip(params, reference))
    return float(np.sqrt(total))


@torch.no_grad()
def project_to_ball(params: list[torch.Tensor], reference: list[torch.Tensor], eps: float) -> float:
    """Project ``params`` in place onto the L2 ball of radius ``eps`` around ``reference``;
    returns the distance before projecting."""
    norm = update_norm(params, reference)
    if norm > eps:
        factor = eps / norm
        for p, r in zip(params, reference):
            p.copy_(r + (p - r) * factor)
    return norm


class ProjectedStep:
    """A TrainStep that, before every ``every``-th step after the first, projects the model's
    float parameters onto the L2 ball of radius ``eps`` around ``reference`` (train_local calls
    the step before ``optimizer.step()``, so this projects the result of the previous ``every``
    steps). Call :meth:`finish` after training for the last projection."""

    def __init__(
        self,
        params: list[torch.Tensor],
        reference: list[torch.Tensor],
        eps: float,
        every: int,
        inner: TrainStep = cross_entropy_step,
    ):
        self.params, self.reference, self.eps, self.every, self.inner = params, reference, float(eps), int(every), inner
        self.calls = 0
        self.projections = 0

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.calls and self.calls % self.every == 0:
            self.project()
        self.calls += 1
        return self.inner(model, x, y)

    def project(self) -> float:
        self.projections += 1
        return project_to_ball(self.params, self.reference, self.eps)

    def finish(self) -> float:
        return self.project()


@torch.no_grad()
def send_update(params: list[torch.Tensor], reference: list[torch.Tensor], updates: list[torch.Tensor]) -> None:
    """Set ``params`` to ``reference + update``, tensor by tensor."""
    for p, r, u in zip(params, reference, updates):
        p.copy_(r + u.to(p.device, p.dtype))


def malicious_round(
    model: nn.Module,
    share: ClientShare,
    job: dict,
    *,
    partition_id: int,
    seed: int,
    device: torch.device,
    transform: BatchTransform | None = None,
) -> dict[str, float]:
    """Train ``model`` in place as an attacker in an attack round; returns the metrics an honest
    client without a defence reports (train loss and accuracy)."""
    attack, client = attack_section(job["attack"]), job["client"]
    name, mode = attack["name"], attack["mode"]
    num_clients = int(job["num_clients"])
    params = float_parameters(model)
    reference = [p.detach().clone() for p in params]
    optimizer = make_optimizer(
        model.parameters(),
        client["optimizer"],
        float(client["lr"]),
        float(client["momentum"]),
        float(client["weight_decay"]),
    )
    common = dict(
        epochs=int(client["epochs"]),
        batch_size=int(client["batch_size"]),
        optimizer=optimizer,
        device=device,
        seed=seed,
        augment=bool(client["augment"]),
        transform=transform,
    )
    malicious = malicious_ids(attack, num_clients, int(job["seed"]))
    scale = update_scale(
        attack,
        num_train=len(share.labels),
        num_clients=num_clients,
        clients_per_round=int(job.get("clients_per_round", num_clients)),
        attacker_examples=len(share.train_indices),
        num_malicious=len(malicious),
    )
    if name in DATA_POISONING:
        data = poisoned_data(
            share,
            attack,
            partition_id=partition_id,
            seed=seed,
            run_seed=int(job["seed"]),
            malicious=malicious,
            transform=transform,
        )
        step = cross_entropy_step
        if mode in ("pgd", "replacement"):
            step = ProjectedStep(params, reference, float(attack["eps"]), int(attack["project_every"]))
        result = train_local(model, data.images, data.labels, data.indices, step=step, **common)
        if isinstance(step, ProjectedStep):
            step.finish()
        updates = [(p.detach() - r) * scale for p, r in zip(params, reference)]
    else:
        result = train_local(model, share.images, share.labels, share.train_indices, **common)
        if name == "sign_flip":
            updates = [(r - p.detach()) * scale for p, r in zip(params, reference)]
        elif name == "gaussian":
            generator = torch.Generator().manual_seed(seed_for(seed, Stream.GAUSSIAN_UPDATE))
            std = float(attack["noise_std"]) * scale
            updates = [torch.randn(r.shape, generator=generator, dtype=torch.float32) * std for r in reference]
        else:
            raise ValueError(f"attack={name!r} has no malicious behaviour")
    send_update(params, reference, updates)
    return {"train_loss": result["loss"], "train_accuracy": result["accuracy"]}

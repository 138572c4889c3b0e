"""What a malicious client does in a round where it attacks (fedmed/poisoning/ decides when).

Outside its attack rounds a malicious client trains honestly on its own clean share, through
the normal path (clients/local_training.py). In an attack round:

- a data-poisoning attack (``attack.poison``, e.g. ``edge_case``, ``badnets``, ``label_flip``):
  it trains on its poisoned pool (:func:`poisoned_data`) with plain cross entropy (the
  client-side defence is the honest hospitals' choice, not the attacker's), in one of the modes:

  * ``blackbox``: plain training;
  * ``pgd``: every ``attack.project_every`` optimizer steps, and once after the last, the
    model's float parameters are projected onto the L2 ball of radius ``attack.eps`` around
    the received global weights (Wang et al. 2020), so that norm-bounding defences let it pass;
  * ``replacement``: as ``pgd``; then the update (local - global, norm <= eps) is multiplied
    by the scale (Bagdasaryan et al. 2020), so the sent update's norm is <= scale * eps. This
    is the order of Wang et al.'s code (project while training, scale after).

- a model-poisoning attack (``attack.update``, e.g. ``sign_flip``, ``gaussian``): honest
  training on its clean share (so that its BatchNorm statistics and reported metrics look like
  anyone's), then it sends global + the attack's update instead of the trained one.

The scale (``attack.scale``; None: 1, or the replacement factor in ``replacement`` mode,
fedmed.poisoning.update_scale) multiplies every attack's update. It touches the model's
parameters only: BatchNorm running statistics and other buffers stay as training left them.
The client reports the example count of its clean share and the metrics of an honest client
without a defence (train loss and accuracy); no metric says it is malicious. Under a client-side
defence, honest replies also carry the defence's own metrics (``privacy_epsilon``,
``train_pgd_accuracy``, ...), which an attack round's reply lacks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn

from clients.local_training import LocalData
from fedmed.data import ClientShare
from fedmed.job import Job
from fedmed.poisoning import AttackConfig, DataPoisoningConfig, attack_config, attack_named, malicious_ids, update_scale
from fedmed.seeds import Stream, seed_for
from fedmed.train import BatchTransform, TrainStep, cross_entropy_step, make_optimizer, train_local


class PoolImages:
    """The uint8 images (N, H, W, C) of an attacker's training pool, read from the shared
    arrays when a batch is drawn: row ``i`` is ``base[rows[i]]``, passed through ``stamp`` (the
    attack's trigger, e.g. BadNets') where ``stamped[i]``. Nothing is copied beforehand, however
    large the images."""

    def __init__(
        self,
        base: np.ndarray,
        rows: np.ndarray,
        stamped: np.ndarray | None = None,
        stamp: Callable[[np.ndarray], np.ndarray] | None = None,
    ):
        self.base = base
        self.rows = np.asarray(rows, dtype=np.int64)
        self.stamped = np.zeros(len(self.rows), bool) if stamped is None else np.asarray(stamped, dtype=bool)
        self.stamp = stamp
        if self.stamped.shape != self.rows.shape:
            raise ValueError("stamped must have one flag per row")
        if self.stamped.any() and stamp is None:
            raise ValueError("rows are flagged to be stamped but no stamp is given")

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
        stamped = self.stamped[index]
        if stamped.any():
            images = images.copy()
            images[stamped] = self.stamp(images[stamped])
        return images

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        images = self[np.arange(len(self.rows))]
        return images if dtype is None else images.astype(dtype)


def poisoned_data(
    share: ClientShare,
    attack: Mapping | AttackConfig,
    *,
    partition_id: int,
    malicious: list[int],
    seed: int,
    run_seed: int,
    transform: BatchTransform | None = None,
) -> LocalData:
    """The attacker's training pool for an attack round: its clean train rows, labelled as the
    attack says, plus the rows the attack adds (labelled as the target; see each attack's
    ``poison`` in fedmed/poisoning/). ``run_seed`` is the run's seed (the edge-case split is the
    server's); ``seed`` this round's. Only index and label arrays of the attacker's share are
    built; images are read on demand."""
    config = attack_config(attack)
    make_poison = attack_named(config.name).poison
    if make_poison is None:
        raise ValueError(f"attack={config.name} poisons no data")
    rng = np.random.default_rng(seed_for(seed, Stream.POISON_POOL))
    poison = make_poison(config, share, partition_id=partition_id, malicious=malicious, rng=rng, run_seed=run_seed)
    clean = np.asarray(share.train_indices, dtype=np.int64)
    added = np.asarray(poison.added_rows, dtype=np.int64)
    rows = np.concatenate([clean, added])
    labels = np.concatenate([poison.clean_labels, np.full(len(added), int(config.target_class), dtype=np.int64)])
    stamped = np.concatenate([np.zeros(len(clean), bool), np.full(len(added), poison.stamp is not None)])
    images = PoolImages(share.images, rows, stamped, poison.stamp)
    return LocalData(images, labels, np.arange(len(rows)), transform)


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
    job: Job,
    *,
    partition_id: int,
    seed: int,
    device: torch.device,
    transform: BatchTransform | None = None,
) -> dict[str, float]:
    """Train ``model`` in place as an attacker in an attack round; returns the metrics an honest
    client without a defence reports (train loss and accuracy); the attack is the job's."""
    config = job.attack
    behaviour, client, num_clients = attack_named(config.name), job.client, job.num_clients
    params = float_parameters(model)
    reference = [p.detach().clone() for p in params]
    optimizer = make_optimizer(model.parameters(), client.optimizer, client.lr, client.momentum, client.weight_decay)
    common = dict(
        epochs=client.epochs,
        batch_size=client.batch_size,
        optimizer=optimizer,
        device=device,
        seed=seed,
        augment=client.augment,
        transform=transform,
        balanced=client.balanced_sampling,
    )
    malicious = malicious_ids(config, num_clients, job.seed)
    scale = update_scale(
        config,
        num_train=len(share.labels),
        num_clients=num_clients,
        clients_per_round=job.round_size,
        attacker_examples=len(share.train_indices),
        num_malicious=len(malicious),
    )
    if behaviour.poisons_data:
        data = poisoned_data(
            share,
            config,
            partition_id=partition_id,
            seed=seed,
            run_seed=job.seed,
            malicious=malicious,
            transform=transform,
        )
        step = cross_entropy_step
        if isinstance(config, DataPoisoningConfig) and config.mode in ("pgd", "replacement"):
            step = ProjectedStep(params, reference, float(config.eps), int(config.project_every))
        result = train_local(model, data.images, data.labels, data.indices, step=step, **common)
        if isinstance(step, ProjectedStep):
            step.finish()
        updates = [(p.detach() - r) * scale for p, r in zip(params, reference)]
    elif behaviour.update is not None:
        result = train_local(model, share.images, share.labels, share.train_indices, **common)
        updates = behaviour.update(config, [p.detach() for p in params], reference, seed=seed, scale=scale)
    else:
        raise ValueError(f"attack={config.name!r} has no malicious behaviour")
    send_update(params, reference, updates)
    return {"train_loss": result["loss"], "train_accuracy": result["accuracy"]}

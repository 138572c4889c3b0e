"""What every client defence shares: the base of its structured config, the record that registers
it, and what its training gets for one round.

Kept free of torch at import: ``fedmed-sim`` composes and checks its configuration, defences
included, before it imports torch (that import overlaps Ray's start). A defence's training imports
its torch code inside ``train``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from omegaconf import MISSING

if TYPE_CHECKING:
    import torch
    from flwr.app import RecordDict
    from torch import nn

    from fedmed.train import BatchTransform, TrainStep


@dataclass
class DefenseConfig:
    """Base of every defence's structured config; ``defense=<name>`` picks the option."""

    name: str = MISSING

    def check(self) -> None:
        """Refuse settings that cannot work, naming the key (``defense.<key>``) and what to do."""


@dataclass
class LocalData:
    """A client's training share: the images, their labels, and the rows it may use."""

    images: np.ndarray
    labels: np.ndarray
    indices: np.ndarray
    transform: BatchTransform | None = None


@dataclass
class LocalRound:
    """One client's round, as a defence's ``train`` gets it."""

    model: nn.Module
    data: LocalData
    server_round: int
    rounds: int | None  # of the federation: DP-SGD spreads a target epsilon over them
    seed: int
    device: torch.device
    state: RecordDict  # the client's state across rounds (Flower's Context.state)
    epochs: int
    batch_size: int
    new_optimizer: Callable[[Iterable[Any]], torch.optim.Optimizer]
    # train_local's remaining arguments: augment, precision, balanced
    train_options: dict
    # adds the domain-assimilation modules' texture loss to a training step (identity without them)
    with_texture_loss: Callable[[TrainStep | None], TrainStep | None]

    def train(
        self,
        step: TrainStep | None = None,
        *,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        batches: Callable[[], Iterable[np.ndarray]] | None = None,
        texture_loss: bool = True,
    ) -> dict[str, float]:
        """``fedmed.train.train_local`` over the round's data with ``step`` (plain cross entropy
        when None) and, unless ``texture_loss=False``, the texture loss; by default on the
        round's model with a new optimizer. Returns mean loss and accuracy."""
        from fedmed.train import cross_entropy_step, train_local

        model = self.model if model is None else model
        if texture_loss:
            step = self.with_texture_loss(step)
        return train_local(
            model,
            self.data.images,
            self.data.labels,
            self.data.indices,
            epochs=self.epochs,
            batch_size=self.batch_size,
            optimizer=optimizer if optimizer is not None else self.new_optimizer(model.parameters()),
            device=self.device,
            seed=self.seed,
            step=step or cross_entropy_step,
            batches=batches,
            transform=self.data.transform,
            **self.train_options,
        )


@dataclass(frozen=True)
class Defense:
    """A registered defence: its config name, its structured config, and its round of training.

    ``train(config, local_round)`` trains ``local_round.model`` in place and returns the metrics
    the client reports: ``train_loss``, ``train_accuracy`` and the defence's own.
    ``per_example_gradients``: the defence clips each example's gradient (DP-SGD), which
    BatchNorm makes undefined, so every model of the run gets GroupNorm.
    """

    name: str
    config: type[DefenseConfig]
    train: Callable[[Any, LocalRound], dict[str, float]]
    per_example_gradients: bool = False

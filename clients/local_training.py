"""One client's local training for a round, with the defence the job names (``defense=``,
``fedmed/defenses/``) and the domain-assimilation modules' texture loss."""

from __future__ import annotations

import torch
from flwr.app import RecordDict
from torch import nn

from clients.assimilation import backbone_frozen, with_texture_loss
from fedmed.config import check_assimilation
from fedmed.defenses import LocalData, LocalRound, defense_named
from fedmed.job import Job
from fedmed.precision import Precision
from fedmed.train import make_optimizer

__all__ = ["LocalData", "train_round"]


def train_round(
    model: nn.Module,
    data: LocalData,
    job: Job,
    *,
    server_round: int,
    seed: int,
    device: torch.device,
    state: RecordDict,
) -> dict[str, float]:
    """Train ``model`` in place; returns the metrics the client reports (loss, accuracy, and the
    defence's own: privacy epsilon, robust accuracy on a training batch).

    With domain-assimilation modules, the texture loss joins the defence's step, and the backbone
    is frozen in the first ``assimilation.freeze_backbone_rounds`` rounds."""
    defense, assimilation, client = job.defense, job.assimilation, job.client
    check_assimilation(assimilation, job.model.assimilation, defense)

    def new_optimizer(params) -> torch.optim.Optimizer:
        return make_optimizer(params, client.optimizer, client.lr, client.momentum, client.weight_decay)

    local_round = LocalRound(
        model=model,
        data=data,
        server_round=server_round,
        rounds=job.rounds,
        seed=seed,
        device=device,
        state=state,
        epochs=client.epochs,
        batch_size=client.batch_size,
        new_optimizer=new_optimizer,
        train_options={
            "augment": client.augment,
            "precision": Precision.of(client, device),
            "balanced": client.balanced_sampling,
        },
        with_texture_loss=lambda step: with_texture_loss(step, model, assimilation),
    )
    with backbone_frozen(model, server_round <= assimilation.freeze_backbone_rounds):
        return defense_named(defense.name).train(defense, local_round)

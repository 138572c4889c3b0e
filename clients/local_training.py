"""One client's local training for a round, with the defence the job names (``defense=``,
``fedmed/defenses/``) and the domain-assimilation modules' texture loss."""

from __future__ import annotations

import torch
from flwr.app import RecordDict
from omegaconf import OmegaConf
from torch import nn

from clients.assimilation import assimilation_settings, backbone_frozen, with_texture_loss
from fedmed.config import ClientConfig, check_assimilation
from fedmed.defenses import LocalData, LocalRound, defense_config, defense_named
from fedmed.precision import Precision
from fedmed.train import make_optimizer

__all__ = ["LocalData", "train_round"]


def client_settings(section: dict) -> ClientConfig:
    """The job's typed ``client`` section (keys absent in older jobs take their defaults)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ClientConfig), section))


def train_round(
    model: nn.Module,
    data: LocalData,
    job: dict,
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
    defense = defense_config(job["defense"])
    assimilation = assimilation_settings(job)
    check_assimilation(assimilation, job.get("model", {}).get("assimilation", "none"), job["defense"])
    client = client_settings(job["client"])

    def new_optimizer(params) -> torch.optim.Optimizer:
        return make_optimizer(params, client.optimizer, client.lr, client.momentum, client.weight_decay)

    local_round = LocalRound(
        model=model,
        data=data,
        server_round=server_round,
        rounds=int(job["rounds"]) if "rounds" in job else None,
        seed=seed,
        device=device,
        state=state,
        epochs=client.epochs,
        batch_size=client.batch_size,
        new_optimizer=new_optimizer,
        train_options={"augment": client.augment, "precision": Precision.of(job["client"], device)},
        with_texture_loss=lambda step: with_texture_loss(step, model, assimilation),
    )
    with backbone_frozen(model, server_round <= int(assimilation["freeze_backbone_rounds"])):
        return defense_named(defense.name).train(defense, local_round)

"""One client's local training for a round, with the defence the job names (``defense=``)."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict
from torch import nn

from clients.assimilation import assimilation_settings, backbone_frozen, with_texture_loss
from clients.defenses import METHODS, AdversarialTraining, SoftLabelStep, round_eps, temperature_step
from fedmed.attacks import eval_mode, make_attack
from fedmed.config import check_assimilation, check_defense
from fedmed.logs import log
from fedmed.precision import Precision
from fedmed.train import BatchTransform, cross_entropy_step, derive_seed, gather_batch, make_optimizer, train_local

CHECK_KEY = "fedmed-robust-check"
CHECK_SAMPLES = 64


@dataclass
class LocalData:
    images: np.ndarray
    labels: np.ndarray
    indices: np.ndarray
    transform: BatchTransform | None = None


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
    check_defense(job["defense"])
    assimilation = assimilation_settings(job)
    check_assimilation(assimilation, job.get("model", {}).get("assimilation", "none"), job["defense"])
    with backbone_frozen(model, server_round <= int(assimilation["freeze_backbone_rounds"])):
        return _train_round(
            model, data, job, assimilation, server_round=server_round, seed=seed, device=device, state=state
        )


def _train_round(
    model: nn.Module,
    data: LocalData,
    job: dict,
    assimilation: dict,
    *,
    server_round: int,
    seed: int,
    device: torch.device,
    state: RecordDict,
) -> dict[str, float]:
    defense, client = job["defense"], job["client"]
    name = defense["name"]

    def new_optimizer(params) -> torch.optim.Optimizer:
        return make_optimizer(
            params, client["optimizer"], float(client["lr"]), float(client["momentum"]), float(client["weight_decay"])
        )

    optimizer = new_optimizer(model.parameters())
    common = dict(
        epochs=int(client["epochs"]),
        batch_size=int(client["batch_size"]),
        device=device,
        seed=seed,
        augment=bool(client["augment"]),
        transform=data.transform,
        precision=Precision.of(client, device),
    )
    generator = torch.Generator(device).manual_seed(derive_seed(seed, 3))
    metrics: dict[str, float] = {}
    if name == "dp_sgd":
        from clients.privacy import PrivateRound  # Opacus, imported only by DP-SGD clients

        total_epochs = int(job["rounds"]) * int(client["epochs"])
        with PrivateRound(
            model,
            optimizer,
            data.indices,
            batch_size=int(client["batch_size"]),
            defense=defense,
            total_epochs=total_epochs,
            state=state,
            seed=derive_seed(seed, 4),
        ) as private:
            step = None
            if defense["adversarial"] is not None:
                step = adversarial_step(defense, defense["adversarial"], server_round, generator, private.hooks_off)
            step = with_texture_loss(step, model, assimilation)
            result = train_local(
                private.model,
                data.images,
                data.labels,
                data.indices,
                optimizer=private.optimizer,
                batches=private.batches,
                step=step or cross_entropy_step,
                **common,
            )
            metrics["privacy_epsilon"] = private.epsilon()
            metrics["noise_multiplier"] = private.noise_multiplier
        adversarial = defense["adversarial"]
    elif name == "distillation":
        result = distill(model, new_optimizer, data, defense, common, assimilation)
        adversarial = None
    else:
        step = adversarial_step(defense, name, server_round, generator) if name in METHODS else None
        step = with_texture_loss(step, model, assimilation)
        result = train_local(
            model,
            data.images,
            data.labels,
            data.indices,
            optimizer=optimizer,
            step=step or cross_entropy_step,
            **common,
        )
        adversarial = name if name in METHODS else None
    metrics.update({"train_loss": result["loss"], "train_accuracy": result["accuracy"]})
    if adversarial is not None and defense["overfitting_check"]:
        eps = round_eps(float(defense["eps"]), server_round, int(defense["warmup_rounds"]))
        metrics.update(robust_check(model, data, eps, seed, device, state, server_round))
    return metrics


def adversarial_step(
    defense: dict, name: str, server_round: int, generator: torch.Generator, attack_context=contextlib.nullcontext
) -> AdversarialTraining:
    eps = round_eps(float(defense["eps"]), server_round, int(defense["warmup_rounds"]))
    return AdversarialTraining(
        METHODS[name],
        eps,
        alpha=defense["alpha"],
        steps=int(defense["steps"]),
        clean_weight=float(defense["clean_weight"]),
        generator=generator,
        attack_context=attack_context,
    )


def distill(
    model: nn.Module, new_optimizer, data: LocalData, defense: dict, common: dict, assimilation: dict
) -> dict[str, float]:
    """``defensive``: a copy of the received model is trained at temperature T (the teacher),
    then the model itself learns the teacher's soft labels at T and is sent back (Papernot et
    al. 2016). ``federated``: the received global model, frozen, teaches the local model on a
    mix of its soft labels and the true labels."""
    temperature = float(defense["temperature"])
    teacher = copy.deepcopy(model)
    if defense["mode"] == "defensive":
        train_local(
            teacher,
            data.images,
            data.labels,
            data.indices,
            optimizer=new_optimizer(teacher.parameters()),
            step=temperature_step(temperature),
            **common,
        )
        step = SoftLabelStep(teacher, temperature, soft_weight=1.0)
    else:
        step = SoftLabelStep(teacher, temperature, soft_weight=float(defense["soft_weight"]))
    return train_local(
        model,
        data.images,
        data.labels,
        data.indices,
        optimizer=new_optimizer(model.parameters()),
        step=with_texture_loss(step, model, assimilation),
        **common,
    )


def robust_check(
    model: nn.Module, data: LocalData, eps: float, seed: int, device: torch.device, state: RecordDict, server_round: int
) -> dict[str, float]:
    """FGSM and PGD-10 accuracy on a fixed sample of training images after local training.

    FGSM-based adversarial training can overfit catastrophically (Wong et al. 2020): FGSM
    accuracy stays high while PGD accuracy collapses within an epoch. A fall of PGD accuracy by
    more than 0.2 from the client's previous round is logged as a warning.
    """
    rng = np.random.default_rng(derive_seed(seed, 5))
    count = min(CHECK_SAMPLES, len(data.indices))
    batch = np.sort(rng.choice(data.indices, size=count, replace=False))
    x = gather_batch(data.images, batch, device)
    if data.transform is not None:
        x = data.transform(x)
    y = torch.from_numpy(np.asarray(data.labels)[batch].astype(np.int64)).to(device)
    scores = {}
    for name in ("fgsm", "pgd"):
        x_adv = make_attack(name, eps, seed=derive_seed(seed, 6))(model, x, y)
        with torch.no_grad(), eval_mode(model):
            scores[name] = float((model(x_adv).argmax(1) == y).float().mean())
    previous = state[CHECK_KEY]["pgd"] if CHECK_KEY in state else None
    if previous is not None and float(previous) - scores["pgd"] > 0.2:
        log.warning(
            "round %d: PGD accuracy on training images fell from %.2f to %.2f while FGSM accuracy "
            "is %.2f: catastrophic overfitting (Wong et al. 2020); lower defense.eps or "
            "defense.alpha, or use pgd_at",
            server_round,
            float(previous),
            scores["pgd"],
            scores["fgsm"],
        )
    state[CHECK_KEY] = ConfigRecord({"pgd": scores["pgd"]})
    return {"train_fgsm_accuracy": scores["fgsm"], "train_pgd_accuracy": scores["pgd"]}

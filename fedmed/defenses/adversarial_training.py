"""What the adversarial-training defences share (``fgsm_at``, ``fast_at``, ``pgd_at``, and
``dp_sgd`` with ``adversarial``): their keys, checks and round of training.

Goodfellow et al., ICLR 2015 (FGSM); Wong, Rice & Kolter, ICLR 2020 (fast AT); Madry et al.,
ICLR 2018 (PGD). The training step itself is ``fedmed.defenses.steps.AdversarialTraining``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar, Optional

from fedmed.defenses.base import DefenseConfig, LocalRound


@dataclass
class AdversarialTrainingConfig(DefenseConfig):
    # the attack searched in training: "fgsm" (from the clean point), "fast" (FGSM from a random
    # start) or "pgd" (``steps`` steps from a random start)
    method: ClassVar[str] = "fgsm"

    eps: float = 0.0314  # training epsilon, pixel scale (8/255)
    alpha: Optional[float] = None  # step size; None: FGSM eps, fast AT 1.25 eps, PGD 2.5 eps/steps
    clean_weight: float = 0.0  # loss = clean_weight * clean + (1 - clean_weight) * adversarial
    warmup_rounds: int = 0  # epsilon grows linearly to `eps` over these rounds
    # after local training, PGD accuracy on one batch next to the training attack's: a collapse
    # of the former alone is catastrophic overfitting (Wong et al. 2020)
    overfitting_check: bool = True

    def attack_steps(self) -> int:
        return 1

    def check(self) -> None:
        self.check_adversarial()

    def check_adversarial(self) -> None:
        if self.eps <= 0:
            raise ValueError(
                f"defense.eps={self.eps} must be > 0 for adversarial training (pixel scale: 8/255 = 0.0314)"
            )
        if self.alpha is not None and self.alpha <= 0:
            raise ValueError(f"defense.alpha={self.alpha} must be > 0 (or null for the method's default)")
        if self.attack_steps() < 1:
            raise ValueError(f"defense.steps={self.attack_steps()} must be >= 1")
        if not 0 <= self.clean_weight <= 1:
            raise ValueError(f"defense.clean_weight={self.clean_weight} must be in [0, 1]")
        if self.warmup_rounds < 0:
            raise ValueError(f"defense.warmup_rounds={self.warmup_rounds} must be >= 0")


def adversarial_step(
    config: AdversarialTrainingConfig,
    method: str,
    local_round: LocalRound,
    attack_context=contextlib.nullcontext,
):
    """The round's training step: the attack ``method`` at this round's epsilon (after warm-up)."""
    import torch

    from fedmed.defenses.steps import AdversarialTraining, round_eps
    from fedmed.seeds import Stream, seed_for

    return AdversarialTraining(
        method,
        round_eps(config.eps, local_round.server_round, config.warmup_rounds),
        alpha=config.alpha,
        steps=config.attack_steps(),
        clean_weight=config.clean_weight,
        generator=torch.Generator(local_round.device).manual_seed(seed_for(local_round.seed, Stream.ADVERSARIAL_START)),
        attack_context=attack_context,
    )


def overfitting_check(config: AdversarialTrainingConfig, local_round: LocalRound) -> dict[str, float]:
    """FGSM and PGD accuracy on training images after the round (``defense.overfitting_check``)."""
    if not config.overfitting_check:
        return {}
    from fedmed.defenses.steps import robust_check, round_eps

    eps = round_eps(config.eps, local_round.server_round, config.warmup_rounds)
    return robust_check(
        local_round.model,
        local_round.data,
        eps,
        local_round.seed,
        local_round.device,
        local_round.state,
        local_round.server_round,
    )


def train_adversarially(config: AdversarialTrainingConfig, local_round: LocalRound) -> dict[str, float]:
    result = local_round.train(adversarial_step(config, config.method, local_round))
    metrics = {"train_loss": result["loss"], "train_accuracy": result["accuracy"]}
    return {**metrics, **overfitting_check(config, local_round)}

"""DP-SGD with Opacus (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016):
per-example clipping to ``max_grad_norm``, Gaussian noise, Poisson sampling; give
``noise_multiplier``, or ``target_epsilon`` for the whole run. Every model of the run gets
GroupNorm. With ``adversarial`` (fgsm_at, fast_at or pgd_at) the round trains adversarially under
DP-SGD, with that method's keys (``eps``, ``alpha``, ``steps``, ...)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from fedmed.defenses.adversarial_training import (
    AdversarialTrainingConfig,
    adversarial_step,
    overfitting_check,
)
from fedmed.defenses.base import Defense, LocalRound

# the adversarial-training option each `adversarial` value stands for, by its attack
ADVERSARIAL_METHODS = {"fgsm_at": "fgsm", "fast_at": "fast", "pgd_at": "pgd"}


@dataclass
class DpSgdConfig(AdversarialTrainingConfig):
    name: str = "dp_sgd"
    noise_multiplier: Optional[float] = 1.0  # noise per step; or null with target_epsilon
    target_epsilon: Optional[float] = None  # privacy budget over all rounds
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    adversarial: Optional[str] = None  # fgsm_at | fast_at | pgd_at under DP-SGD
    steps: int = 7  # adversarial=pgd_at

    def attack_steps(self) -> int:
        return self.steps if self.adversarial == "pgd_at" else 1

    def check(self) -> None:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(
                "defense=dp_sgd needs exactly one of defense.noise_multiplier (noise per step) or "
                "defense.target_epsilon (privacy budget over all rounds); its default is "
                "noise_multiplier=1.0, so with a target epsilon add defense.noise_multiplier=null"
            )
        if self.noise_multiplier is not None and self.noise_multiplier < 0:
            raise ValueError(f"defense.noise_multiplier={self.noise_multiplier} must be >= 0")
        if self.target_epsilon is not None and self.target_epsilon <= 0:
            raise ValueError(f"defense.target_epsilon={self.target_epsilon} must be > 0")
        if not 0 < self.delta < 1:
            raise ValueError(f"defense.delta={self.delta} must be in (0, 1), well below 1/(client examples)")
        if self.max_grad_norm <= 0:
            raise ValueError(f"defense.max_grad_norm={self.max_grad_norm} must be > 0")
        if self.adversarial is None:
            return
        if self.adversarial not in ADVERSARIAL_METHODS:
            raise ValueError(
                f"defense.adversarial={self.adversarial!r} cannot run under DP-SGD: use one of "
                f"{', '.join(ADVERSARIAL_METHODS)} (distillation's teacher would see the data without "
                "privacy accounting)"
            )
        if self.clean_weight != 0:
            raise ValueError(
                "defense=dp_sgd with defense.adversarial needs defense.clean_weight=0: Opacus clips "
                "each example's gradient of a single loss, and Poisson sampling refuses the second "
                "backward pass a clean + adversarial mix needs"
            )
        self.check_adversarial()


def train_privately(config: DpSgdConfig, local_round: LocalRound) -> dict[str, float]:
    from fedmed.defenses.privacy import PrivateRound  # Opacus, imported only by DP-SGD clients
    from fedmed.seeds import Stream, seed_for

    if local_round.rounds is None:
        raise ValueError("defense=dp_sgd: the client's job has no `rounds` (federation.rounds), over which it accounts")
    model = local_round.model
    with PrivateRound(
        model,
        local_round.new_optimizer(model.parameters()),
        local_round.data.indices,
        batch_size=local_round.batch_size,
        noise_multiplier=config.noise_multiplier,
        target_epsilon=config.target_epsilon,
        delta=config.delta,
        max_grad_norm=config.max_grad_norm,
        total_epochs=local_round.rounds * local_round.epochs,
        state=local_round.state,
        seed=seed_for(local_round.seed, Stream.PRIVACY_NOISE),
    ) as private:
        step = None
        if config.adversarial is not None:
            method = ADVERSARIAL_METHODS[config.adversarial]
            step = adversarial_step(config, method, local_round, private.hooks_off)
        result = local_round.train(step, model=private.model, optimizer=private.optimizer, batches=private.batches)
        metrics = {"privacy_epsilon": private.epsilon(), "noise_multiplier": private.noise_multiplier}
    metrics.update({"train_loss": result["loss"], "train_accuracy": result["accuracy"]})
    if config.adversarial is not None:
        metrics.update(overfitting_check(config, local_round))
    return metrics


DEFENSE = Defense("dp_sgd", DpSgdConfig, train_privately, per_example_gradients=True)

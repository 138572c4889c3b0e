"""The training steps of the client defences, for ``fedmed.train.train_local`` (torch code, imported
when a defence trains; the options themselves are the other modules of this package).

* ``AdversarialTraining``: FGSM adversarial training (Goodfellow et al., "Explaining and
  Harnessing Adversarial Examples", ICLR 2015), fast adversarial training — FGSM from a random
  start with step 1.25 eps (Wong, Rice & Kolter, "Fast is better than free", ICLR 2020) — and PGD
  adversarial training (Madry et al., "Towards Deep Learning Models Resistant to Adversarial
  Attacks", ICLR 2018).
* ``temperature_step`` and ``SoftLabelStep``: knowledge distillation at temperature T
  (Hinton et al. 2015), used for defensive distillation (Papernot et al., "Distillation as a
  Defense to Adversarial Perturbations against Deep Neural Networks", S&P 2016) and for
  federated distillation, where the received global model teaches the local one
  (``fedmed/defenses/distillation.py``).

Training-time attacks run with the model in training mode, as Wong et al. and Madry et al. do;
the server's assessment (``fedmed/evasion/``) attacks in eval mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ConfigRecord, RecordDict
from torch import nn

from fedmed.defenses.base import LocalData
from fedmed.evasion import eval_mode, make_attack
from fedmed.logs import log
from fedmed.seeds import Stream, seed_for
from fedmed.train import gather_batch

CHECK_KEY = "fedmed-robust-check"
CHECK_SAMPLES = 64


def round_eps(eps: float, server_round: int, warmup_rounds: int) -> float:
    """Epsilon warm-up: grows linearly from eps / warmup_rounds in round 1 to eps."""
    if warmup_rounds <= 0:
        return eps
    return eps * min(1.0, server_round / warmup_rounds)


def default_alpha(method: str, eps: float, steps: int) -> float:
    """Step sizes of the papers: FGSM eps, fast AT 1.25 eps, PGD 2.5 eps / steps."""
    return {"fgsm": eps, "fast": 1.25 * eps, "pgd": 2.5 * eps / steps}[method]


class AdversarialTraining:
    """One step of adversarial training: ``loss = w * CE(x) + (1 - w) * CE(x_adv)``.

    Parameters
    ----------
    method : "fgsm", "fast" or "pgd"
        FGSM from the clean point; FGSM from a uniform random start in the eps ball; PGD with
        ``steps`` steps from a random start.
    eps, alpha, steps : float, float | None, int
        L-inf radius and step size in pixel scale ([0, 1] images); ``alpha=None`` takes the
        method's step size from its paper.
    clean_weight : float
        ``w`` above.
    generator : torch.Generator
        Draws the random starts (on the training device), so that a seed fixes them.
    attack_context : callable returning a context manager
        Entered while the adversarial example is searched; DP-SGD uses it to switch Opacus's
        per-example gradient hooks off for those passes.
    """

    def __init__(
        self,
        method: str,
        eps: float,
        *,
        alpha: float | None = None,
        steps: int = 7,
        clean_weight: float = 0.0,
        generator: torch.Generator | None = None,
        attack_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> None:
        if method not in ("fgsm", "fast", "pgd"):
            raise ValueError(f"adversarial training method {method!r} is not known; use fgsm, fast or pgd")
        self.method = method
        self.eps = float(eps)
        self.steps = int(steps) if method == "pgd" else 1
        self.alpha = float(alpha) if alpha is not None else default_alpha(method, self.eps, self.steps)
        self.clean_weight = float(clean_weight)
        self.generator = generator
        self.attack_context = attack_context

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The adversarial batch, within eps of ``x`` and in [0, 1]; parameters' .grad untouched."""
        if self.method == "fgsm":
            delta = torch.zeros_like(x)
        else:
            delta = torch.rand(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)
            delta = (delta * 2 - 1) * self.eps
            delta = (x + delta).clamp_(0, 1) - x
        with self.attack_context():
            for _ in range(self.steps):
                delta.requires_grad_(True)
                loss = F.cross_entropy(model(x + delta), y)
                (grad,) = torch.autograd.grad(loss, delta)
                delta = (delta.detach() + self.alpha * grad.sign()).clamp_(-self.eps, self.eps)
                delta = (x + delta).clamp_(0, 1) - x
        return (x + delta).detach()

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.clean_weight
        loss_clean = torch.zeros((), device=x.device)
        if self.method == "fgsm" and w > 0:
            # FGSM starts at the clean point: one backward gives both the clean loss's parameter
            # gradients and the input gradient the attack needs, which keeps FGSM-AT near 2x clean.
            x_in = x.detach().clone().requires_grad_(True)
            loss_clean = F.cross_entropy(model(x_in), y)
            (w * loss_clean).backward()
            x_adv = (x + self.eps_step() * x_in.grad.sign()).clamp_(0, 1).detach()
        else:
            x_adv = self.perturb(model, x, y)
            if w > 0:
                loss_clean = F.cross_entropy(model(x), y)
                (w * loss_clean).backward()
        logits_adv = model(x_adv)
        loss_adv = F.cross_entropy(logits_adv, y)
        ((1 - w) * loss_adv).backward()
        return (w * loss_clean + (1 - w) * loss_adv).detach(), logits_adv.detach()

    def eps_step(self) -> float:
        # FGSM's single step, at most eps
        return min(self.alpha, self.eps)


def temperature_step(temperature: float):
    """Cross entropy at temperature T (the defensive-distillation teacher's training).

    Multiplied by T so the gradient on the logits keeps the size of plain training, ``p_T - y``,
    at the configured learning rate (otherwise T = 20 would train 20 times slower).
    """

    def step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x)
        loss = temperature * F.cross_entropy(logits / temperature, y)
        loss.backward()
        return loss.detach(), logits.detach()

    return step


class SoftLabelStep:
    """Distillation: the model learns the teacher's soft labels at temperature T.

    ``loss = soft_weight * s * KL(teacher_T || model_T) + (1 - soft_weight) * CE(model, y)``,
    with the teacher in eval mode and without gradients. ``s`` rescales the soft term so that
    its gradient keeps the size of plain training: T for defensive distillation, where soft
    labels are the whole loss; T^2 (Hinton et al. 2015) when mixed with hard labels.
    """

    def __init__(self, teacher: nn.Module, temperature: float, soft_weight: float = 1.0) -> None:
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.temperature = float(temperature)
        self.soft_weight = float(soft_weight)
        self.scale = self.temperature if soft_weight == 1.0 else self.temperature**2

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.temperature
        with torch.no_grad():
            teacher_probs = F.softmax(self.teacher(x) / t, dim=1)
        logits = model(x)
        soft = F.kl_div(F.log_softmax(logits / t, dim=1), teacher_probs, reduction="batchmean")
        loss = self.soft_weight * self.scale * soft
        if self.soft_weight < 1.0:
            loss = loss + (1 - self.soft_weight) * F.cross_entropy(logits, y)
        loss.backward()
        return loss.detach(), logits.detach()


def robust_check(
    model: nn.Module, data: LocalData, eps: float, seed: int, device: torch.device, state: RecordDict, server_round: int
) -> dict[str, float]:
    """FGSM and PGD-10 accuracy on a fixed sample of training images after local training.

    FGSM-based adversarial training can overfit catastrophically (Wong et al. 2020): FGSM
    accuracy stays high while PGD accuracy collapses within an epoch. A fall of PGD accuracy by
    more than 0.2 from the client's previous round is logged as a warning.
    """
    rng = np.random.default_rng(seed_for(seed, Stream.OVERFITTING_CHECK, 1))
    count = min(CHECK_SAMPLES, len(data.indices))
    batch = np.sort(rng.choice(data.indices, size=count, replace=False))
    x = gather_batch(data.images, batch, device)
    if data.transform is not None:
        x = data.transform(x)
    y = torch.from_numpy(np.asarray(data.labels)[batch].astype(np.int64)).to(device)
    scores = {}
    for name in ("fgsm", "pgd"):
        x_adv = make_attack(name, eps, seed=seed_for(seed, Stream.OVERFITTING_CHECK, 2))(model, x, y)
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

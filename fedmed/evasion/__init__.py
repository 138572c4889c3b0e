"""Evasion attacks on batches of images, in pixel space [0, 1]: one module per attack, one registry.

An attack is an ``EvasionAttack`` (``base.py``): its name in ``eval.attacks``, how it attacks one
batch at one radius, whether it draws a random start (it then gets a seeded generator), and, where
it can, how it attacks every radius of the assessment in one batch (``each_eps``). To add one: a
module in this package defining its ``ATTACK``, and its line in the registration at the end of
this file. ``eval.attacks=[<name>]`` then takes it: its name is checked before any process
starts, the server and the clients assess with it (``fedmed.adversarial_eval``), and the
defences' overfitting check can use it. A family of names (``pgd<k>``) is an ``AttackFamily``.

Input normalisation lives inside our models (:class:`fedmed.models.MedicalClassifier`), so every
attack here perturbs raw pixels: ``eps = 8/255`` means the same for every dataset and model
(docs/architecture.md). All attacks share these rules:

- ``x`` is a float batch (N, C, H, W) in [0, 1] and ``y`` its labels (N,); with
  ``targeted=True``, ``y`` holds the *target* labels and the loss is minimised instead.
- The loss is cross entropy on the logits with mean reduction (as in torchattacks). Only the
  sign (L-inf) or the per-sample direction (L2, MI-FGSM) of its gradient is used, so the
  reduction does not change the result.
- The model runs in eval mode during the attack (BatchNorm uses its running statistics and is
  not updated) and every module's previous mode is restored afterwards, also on errors.
- Gradients are taken with respect to the input only (``torch.autograd.grad``): no parameter's
  ``.grad`` is created or changed. Attacks work under an outer ``torch.no_grad()`` too.
- The result is detached, within ``eps`` of ``x`` (L-inf, or L2 for ``pgd(norm="l2")``) and
  clamped to [0, 1]. ``eps = 0`` returns ``x`` unchanged.

The attack functions, with all their keyword arguments (``steps``, ``alpha``, ``targeted``, a
start for PGD), are in their modules: ``fedmed.evasion.fgsm.fgsm``, ``fedmed.evasion.bim.bim``,
``fedmed.evasion.mifgsm.mifgsm`` and ``fedmed.evasion.pgd.pgd``.

:func:`make_attack` turns a name from the configuration (``eval.attacks``) into a seeded,
picklable callable ``attack(model, x, y) -> x_adv``; :func:`attack_each_eps` attacks one batch
at several radii.
"""

from __future__ import annotations

from fedmed.evasion import bim, fgsm, mifgsm, pgd
from fedmed.evasion._common import DEFAULT_STEPS, eval_mode
from fedmed.evasion.base import Attack, AttackFamily, Copies, EvasionAttack
from fedmed.evasion.registry import (
    ATTACKS,
    attack_each_eps,
    attack_named,
    check_attack_names,
    make_attack,
    register,
    register_family,
)

# the attacks, in the order the README lists them
for _attack in (fgsm.ATTACK, bim.ATTACK, mifgsm.ATTACK, pgd.ATTACK, pgd.ATTACK_L2):
    register(_attack)
register_family(pgd.STEPS_FAMILY)

# the built-in attacks' names (pgd<k> aside); ATTACKS holds these and any registered later
ATTACK_NAMES: tuple[str, ...] = tuple(ATTACKS)

__all__ = [
    "ATTACKS",
    "ATTACK_NAMES",
    "DEFAULT_STEPS",
    "Attack",
    "AttackFamily",
    "Copies",
    "EvasionAttack",
    "attack_each_eps",
    "attack_named",
    "check_attack_names",
    "eval_mode",
    "make_attack",
    "register",
    "register_family",
]

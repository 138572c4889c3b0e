"""The server's evaluation of each round's global model on the official test split."""

from __future__ import annotations

from collections.abc import Callable

import torch
from flwr.app import ArrayRecord
from torch import nn

from fedmed.dataset import Split
from fedmed.poisoning import BackdoorTestSet, backdoor_asr
from fedmed.serialization import load_arrays
from fedmed.train import evaluate
from strategies.global_assessment import global_robustness


def holds_no_weights_between_rounds(model: nn.Module) -> bool:
    """Whether the model's storage can be freed between evaluations: only when its state dict
    covers every tensor (what it lacked would come back uninitialised)."""
    tensors = {name for name, _ in (*model.named_parameters(), *model.named_buffers())}
    return set(model.state_dict()) == tensors


class GlobalEvaluation:
    """Clean test metrics every round; on assessment rounds (``assess(round)``) accuracy and AUC
    under each of ``attacks`` at each of ``eps``; under a targeted attack the backdoor's success
    rate (``backdoor/asr``) on its held-out inputs.

    While the clients train, the server's model needs no weights: it gets the new global model
    to evaluate it, so its storage is freed in between (45 MB for ResNet18 at the run's peak,
    the end of training) unless ``keep_weights`` (FLTrust's root update copies this model).
    """

    def __init__(
        self,
        model: nn.Module,
        test: Split,
        *,
        device: torch.device,
        batch_size: int,
        assess: Callable[[int], bool],
        attacks: list[str],
        eps: list[float],
        max_samples: int | None,
        assessment_seed: int,
        backdoor_set: BackdoorTestSet | None = None,
        keep_weights: bool = False,
    ) -> None:
        self.model, self.test, self.device, self.batch_size = model, test, device, batch_size
        self.assess, self.attacks, self.eps, self.max_samples = assess, attacks, eps, max_samples
        self.assessment_seed = assessment_seed
        self.backdoor_set = backdoor_set
        self.keep_weights = keep_weights or not holds_no_weights_between_rounds(model)
        self._home = next(model.parameters()).device  # where the weights go back to

    def load(self, arrays: ArrayRecord) -> nn.Module:
        """The model with ``arrays`` as its weights."""
        if not self.keep_weights:
            self.model.to_empty(device=self._home)
        load_arrays(self.model, arrays)
        return self.model

    def release(self) -> None:
        if not self.keep_weights:
            self._home = next(self.model.parameters()).device
            self.model.to_empty(device="meta")

    def __call__(self, server_round: int, arrays: ArrayRecord) -> dict:
        model = self.load(arrays)
        row = dict(evaluate(model, self.test.images, self.test.labels, batch_size=self.batch_size, device=self.device))
        if self.assess(server_round):
            row.update(
                global_robustness(
                    model,
                    self.test.images,
                    self.test.labels,
                    attacks=self.attacks,
                    eps=self.eps,
                    max_samples=self.max_samples,
                    batch_size=self.batch_size,
                    device=self.device,
                    seed=self.assessment_seed,
                )
            )
        if self.backdoor_set is not None:
            row["backdoor/asr"] = backdoor_asr(model, self.backdoor_set, batch_size=self.batch_size, device=self.device)
        self.release()
        return row

"""DP-SGD for one client round with Opacus (Abadi et al., "Deep Learning with Differential
Privacy", CCS 2016): per-example gradient clipping, Gaussian noise, Poisson sampling, and an RDP
accountant whose history survives across rounds in the client's ``Context.state``."""

from __future__ import annotations

import contextlib
import json
import warnings

import torch
from flwr.app import ConfigRecord, RecordDict
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

STATE_KEY = "fedmed-privacy"


@contextlib.contextmanager
def _quiet_opacus():
    """Seeded noise is the point of a reproducible simulation; and Opacus's hooks fire on the
    first layer, whose input needs no gradient: both warnings would repeat every round for nothing.
    Scoped here rather than set for the whole process at import."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield


def load_history(state: RecordDict) -> list[tuple[float, float, int]]:
    """The accountant's (noise multiplier, sample rate, steps) entries of earlier rounds."""
    if STATE_KEY not in state:
        return []
    return [tuple(entry) for entry in json.loads(str(state[STATE_KEY]["history"]))]


def save_history(state: RecordDict, history: list[tuple[float, float, int]]) -> None:
    state[STATE_KEY] = ConfigRecord({"history": json.dumps([list(h) for h in history])})


def noise_for(
    noise_multiplier: float | None, target_epsilon: float | None, delta: float, sample_rate: float, total_epochs: int
) -> float:
    """``noise_multiplier``, or if None the one that spends ``target_epsilon`` over
    ``total_epochs`` epochs at ``delta`` (a client that joins every round)."""
    if noise_multiplier is not None:
        return float(noise_multiplier)
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=float(target_epsilon),
            target_delta=float(delta),
            sample_rate=sample_rate,
            epochs=total_epochs,
            accountant="rdp",
        )
    )


class PrivateRound:
    """Opacus's PrivacyEngine around ``model`` and ``optimizer`` for one round.

    Use as a context manager: inside it, ``model``/``optimizer`` are the private ones and
    ``batches()`` yields Poisson-sampled index batches. On exit the per-example hooks come off
    the model (the client's model object is reused next round) and the accountant's history is
    written back to ``state``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        indices,
        *,
        batch_size: int,
        noise_multiplier: float | None,
        target_epsilon: float | None,
        delta: float,
        max_grad_norm: float,
        total_epochs: int,
        state: RecordDict,
        seed: int,
    ) -> None:
        self.state = state
        self.delta = float(delta)
        sample_rate = batch_size / len(indices)
        self.noise_multiplier = noise_for(noise_multiplier, target_epsilon, delta, sample_rate, total_epochs)
        loader = DataLoader(TensorDataset(torch.as_tensor(indices)), batch_size=batch_size)
        generator = torch.Generator().manual_seed(seed)
        # entered here and left in __exit__: the engine, make_private and every training step warn
        self._quiet = _quiet_opacus()
        self._quiet.__enter__()
        try:
            # imported here: Opacus takes seconds to import, in every client process, and only
            # defense=dp_sgd needs it
            from opacus import PrivacyEngine

            self.engine = PrivacyEngine(accountant="rdp")
            self.engine.accountant.load_state_dict({"history": load_history(state), "mechanism": "rdp"})
            self.model, self.optimizer, self.loader = self.engine.make_private(
                module=model.train(),
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=self.noise_multiplier,
                max_grad_norm=float(max_grad_norm),
                poisson_sampling=True,
                noise_generator=generator,
            )
        except BaseException:
            self._quiet.__exit__(None, None, None)
            raise

    def batches(self):
        return (batch[0].numpy() for batch in self.loader)

    @contextlib.contextmanager
    def hooks_off(self):
        """Passes that must not produce per-example gradients (searching adversarial examples)."""
        self.model.disable_hooks()
        try:
            yield
        finally:
            self.model.enable_hooks()

    def epsilon(self) -> float:
        return float(self.engine.accountant.get_epsilon(self.delta))

    def __enter__(self) -> PrivateRound:
        return self

    def __exit__(self, *exc) -> None:
        try:
            save_history(self.state, list(self.engine.accountant.state_dict()["history"]))
            self.model.cleanup()
        finally:
            self._quiet.__exit__(None, None, None)

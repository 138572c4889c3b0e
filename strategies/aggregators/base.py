"""The interface every aggregator implements, and the checks they share.

An aggregator turns the round's client updates (client weights minus the global weights,
flattened and stacked: ``updates`` (n, d) float32) into one update to add to the global weights,
and says how suspicious it found each client. It decides only from what a real server sees (the
updates, the example counts, the clients' node identities); it never learns who is malicious.

Contract, tested in tests/test_aggregators.py:

* deterministic given its inputs (and, for stateful rules, the rounds before);
* permutation-equivariant: shuffling the rows together with ``client_ids`` and ``num_examples``
  permutes ``scores`` and ``flagged`` the same way and leaves ``update`` unchanged up to float
  rounding (ties in a selection are broken by client id, not by row position);
* distances and similarities are computed on the updates, vectorised (``ops.gram``), never on
  raw weights and never in a Python loop over clients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import ClassVar

import torch


@dataclass
class Aggregate:
    """What an aggregator decided in one round.

    update : (d,) float32, the aggregated update, to add to the global weights.
    scores : (n,) float64, suspicion per client (row), higher = more suspicious; each rule
        documents its definition.
    flagged : sorted row indices the rule rejected or down-weighted.
    noise : (d,) float32 or None, Gaussian noise the rule adds (FLAME, weak DP). Kept apart from
        ``update`` because the server adds it to the learned weights only, not to BatchNorm's
        running statistics (``strategies.robust_aggregation.apply_update``).
    """

    update: torch.Tensor
    scores: torch.Tensor
    flagged: list[int]
    noise: torch.Tensor | None = None


class TooFewReplies(ValueError):
    """The rule cannot aggregate this many replies with its parameters (e.g. Bulyan, n < 4f + 3).

    ``RobustAggregation`` keeps the global model for that round and logs why; at start-up the
    same check runs against ``federation.clients_per_round`` (``Aggregator.check_replies``).
    """


class Aggregator:
    """Base class: subclasses set ``name`` and ``config`` (their structured config, a dataclass
    whose keys are the constructor's parameters) and implement ``_aggregate``. A rule that needs
    the server's own update on a root dataset each round (FLTrust) sets ``needs_root_update``
    and takes ``root_samples`` and ``root_iterations``; the server app builds that input for it."""

    name: ClassVar[str] = ""
    config: ClassVar[type] = type(None)
    needs_root_update: ClassVar[bool] = False
    # the example-weighted mean itself: the server sums it one reply at a time (FedMedStrategy)
    # instead of stacking every update
    streamed: ClassVar[bool] = False

    @classmethod
    def from_config(cls, config) -> Aggregator:
        """The rule with the typed ``config``'s values (every key but ``name``)."""
        return cls(**{key: value for key, value in vars(config).items() if key != "name"})

    @classmethod
    def params(cls) -> tuple[str, ...]:
        """The ``strategy.*`` keys this rule takes."""
        return tuple(f.name for f in fields(cls.config) if f.name != "name")

    def aggregate(
        self,
        updates: torch.Tensor,
        num_examples: torch.Tensor,
        *,
        client_ids: Sequence[int],
        generator: torch.Generator,
        reference: torch.Tensor | None = None,
    ) -> Aggregate:
        """Aggregate ``updates`` (n, d) float32 of clients ``client_ids`` with ``num_examples`` (n,).

        ``generator`` seeds any noise the rule adds; ``reference`` is FLTrust's server update (d,).
        """
        if not isinstance(updates, torch.Tensor) or updates.dim() != 2:
            got = getattr(updates, "shape", type(updates))
            raise TypeError(f"{self.name}: updates must be a (n, d) tensor, got {got}")
        if updates.dtype != torch.float32:
            raise TypeError(f"{self.name}: updates must be float32, got {updates.dtype}")
        n = updates.shape[0]
        if n == 0:
            raise TooFewReplies(f"strategy={self.name}: no update to aggregate")
        num_examples = torch.as_tensor(num_examples, dtype=torch.float64).reshape(-1).cpu()
        if num_examples.numel() != n:
            raise ValueError(f"{self.name}: {num_examples.numel()} example counts for {n} updates")
        if not (torch.isfinite(num_examples).all() and (num_examples > 0).all()):
            raise ValueError(f"{self.name}: example counts must be finite and positive, got {num_examples.tolist()}")
        client_ids = [int(c) for c in client_ids]
        if len(client_ids) != n or len(set(client_ids)) != n:
            raise ValueError(f"{self.name}: need {n} distinct client ids, got {client_ids}")
        self.check_replies(n)
        result = self._aggregate(updates, num_examples, client_ids=client_ids, generator=generator, reference=reference)
        result.scores = result.scores.to(device="cpu", dtype=torch.float64)
        result.flagged = sorted(int(i) for i in result.flagged)
        return result

    def check_replies(self, n: int) -> None:
        """Raise ``TooFewReplies`` when the rule cannot aggregate ``n`` replies with its parameters."""

    def state_dict(self) -> dict:
        """What a stateful rule carries from round to round (tensors and plain values; a copy),
        for checkpoints. Stateless rules: nothing."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"strategy={self.name} keeps no state, but the checkpoint holds {sorted(state)}")

    def _aggregate(
        self,
        updates: torch.Tensor,
        num_examples: torch.Tensor,
        *,
        client_ids: list[int],
        generator: torch.Generator,
        reference: torch.Tensor | None,
    ) -> Aggregate:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{p}={getattr(self, p)!r}" for p in self.params())
        return f"{type(self).__name__}({args})"


# ---- parameter checks shared by the rules: each message names the configuration key ----------


def check_optional_count(key: str, value: int | None, minimum: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise ValueError(f"strategy.{key}={value!r} must be an integer >= {minimum} (or null for the rule's default)")
    return int(value)


def check_positive(key: str, value: float, *, allow_zero: bool = False, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if (
        value is None
        or not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not value == value
        or value < 0
        or (value == 0 and not allow_zero)
        or value == float("inf")
    ):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(
            f"strategy.{key}={value!r} must be a finite number {bound}"
            + (" (or null for the rule's default)" if allow_none else "")
        )
    return float(value)


def none_flagged(n: int) -> tuple[torch.Tensor, list[int]]:
    return torch.zeros(n, dtype=torch.float64), []


def data_weights(num_examples: torch.Tensor) -> torch.Tensor:
    """n_i / N, float64."""
    return num_examples / num_examples.sum()


def above_expected(scores: torch.Tensor, expected: float) -> list[int]:
    """Rows whose share of discarded coordinates is above halfway between ``expected`` (the share
    every client would lose if all were alike) and 1: the coordinate-wise rules' "flagged"."""
    return torch.nonzero(scores > (1.0 + expected) / 2).flatten().tolist()

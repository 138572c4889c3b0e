"""Scoring a strategy's flags against the ground truth, which only the runner holds.

A strategy reports, per round, the partition ids it rejected or down-weighted; it decides from
the clients' arrays and example counts alone (docs/architecture.md). The runner knows which partitions are
malicious and whether they attacked in the round (``fedmed.poisoning``) and scores the flags:

* a positive is a client that took part in the round *and attacked in it*; a malicious client
  before ``attack.start_round`` (or off its ``attack.frequency``) trains honestly, so flagging it
  then is a false positive, and missing it is no miss;
* ``detection/tpr`` = flagged attackers / attackers that took part (None when none did);
* ``detection/fpr`` = flagged honest participants / honest participants (None when there were none).

Over the run the counts are summed into precision and recall (summary.json).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class RoundDetection:
    flagged: list[int]
    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def tpr(self) -> float | None:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else None

    @property
    def fpr(self) -> float | None:
        return self.fp / (self.fp + self.tn) if self.fp + self.tn else None

    def metrics(self) -> dict:
        return {"detection/flagged": self.flagged, "detection/tpr": self.tpr, "detection/fpr": self.fpr}


def score_round(flagged: Iterable[int], participants: Iterable[int], attackers: Iterable[int]) -> RoundDetection:
    """Confusion counts of one round. ``participants``: partition ids whose replies reached the
    server (rejected ones included: a rejection is a flag); ``attackers``: those that attacked."""
    participants, attackers = set(participants), set(attackers)
    flagged = sorted(set(flagged))
    unknown = set(flagged) - participants
    if unknown:
        raise ValueError(f"flagged partitions {sorted(unknown)} did not take part in the round")
    attackers &= participants
    flagged_set = set(flagged)
    tp = len(flagged_set & attackers)
    fp = len(flagged_set - attackers)
    return RoundDetection(flagged, tp, fp, len(attackers) - tp, len(participants - attackers) - fp)


def run_totals(rounds: Iterable[RoundDetection]) -> dict:
    """Counts over the run, with precision (flags that were attackers) and recall (attacks flagged);
    each is None when undefined (nothing flagged, or no attack took place)."""
    tp = fp = fn = tn = 0
    for r in rounds:
        tp, fp, fn, tn = tp + r.tp, fp + r.fp, fn + r.fn, tn + r.tn
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / (tp + fn) if tp + fn else None,
        "fpr": fp / (fp + tn) if fp + tn else None,
    }

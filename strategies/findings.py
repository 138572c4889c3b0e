"""What a round found, handed from the strategy and the round loop to the server app.

The strategy fills a round's ``RoundFindings`` as Flower calls it (training replies, then local
evaluations); the round loop takes it once the round is over (``FedMedStrategy.take_findings``),
adds the clients that failed, and passes it to the server app's evaluation of the round. Nothing
of a finished round stays behind in the strategy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from strategies.replies import Rejection


@dataclass
class Detection:
    """The aggregator's view of the round's accepted replies: a suspicion score per partition
    (higher: more suspect; FedAvg suspects nobody) and the partitions it left out or down-weighted."""

    scores: dict[int, float] = field(default_factory=dict)
    flagged: list[int] = field(default_factory=list)


@dataclass
class RoundFindings:
    """One round, as the server saw it."""

    server_round: int
    # the accepted training replies' own metrics, in partition order, with their partition id
    clients: list[dict] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    detection: Detection | None = None
    # seconds from sending the training messages to having the replies (a deployed step's
    # overhead is measured against it: experiments/bench_deployment.py)
    train_step_time_s: float | None = None
    # the local evaluations' metrics (and robustness assessments), in partition order
    client_eval: list[dict] = field(default_factory=list)
    # clients that raised, were lost or timed out (the round loop's record)
    failures: list[dict] = field(default_factory=list)
    # why the round's aggregate was not installed, if it was not
    skipped: str | None = None

"""One row of ``metrics.jsonl`` per round: the global model's evaluation and the round's findings,
with the strategy's detection scored against the attack's ground truth, and the progress line."""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console

from fedmed.detection import RoundDetection, score_round
from fedmed.report import MetricsLog, round_line
from strategies.findings import RoundFindings
from strategies.global_assessment import weakest_client


def round_detection(findings: RoundFindings, malicious: list[int], attacking: bool) -> RoundDetection | None:
    """Score the strategy's flags of one round against the ground truth, which only the server
    app holds (the strategy never sees ``malicious``). A rejected reply counts as flagged."""
    rejected = [r.partition_id for r in findings.rejected if r.partition_id is not None]
    accepted = [int(c["partition-id"]) for c in findings.clients]
    if not accepted and not rejected:
        return None
    flagged = (findings.detection.flagged if findings.detection else []) + rejected
    return score_round(flagged, accepted + rejected, malicious if attacking else [])


class RoundRecorder:
    """Writes each round's row and keeps what the run's summary and checkpoint need across
    rounds: the detections scored so far and the largest privacy epsilon a client has spent.

    ``malicious`` and ``attacks_in_round`` are the attack's ground truth, for scoring only.
    ``console``: where the progress line goes (None: quiet). ``started``: the run's
    ``time.monotonic()`` start (moved back by a resumed run's elapsed time).
    """

    def __init__(
        self,
        metrics_log: MetricsLog,
        *,
        total_rounds: int,
        malicious: list[int],
        attacks_in_round: Callable[[int], bool],
        attacks: list[str],
        eps: list[float],
        started: float,
        console: Console | None = None,
        detections: list[RoundDetection] | None = None,
        largest_epsilon: list[float] | None = None,
    ) -> None:
        self.metrics_log = metrics_log
        self.total_rounds = total_rounds
        self.malicious, self.attacks_in_round = malicious, attacks_in_round
        self.attacks, self.eps = attacks, eps
        self.started = started
        self.console = console
        self.detections: list[RoundDetection] = list(detections or [])
        self.largest_epsilon: list[float] = list(largest_epsilon or [])

    def record(self, server_round: int, evaluation: dict, findings: RoundFindings) -> dict:
        row: dict = {"round": server_round, **evaluation}
        detection = round_detection(findings, self.malicious, self.attacks_in_round(server_round))
        if detection is not None:
            self.detections.append(detection)
            row.update(detection.metrics())
            if findings.detection is not None:
                row["detection/scores"] = {str(pid): score for pid, score in findings.detection.scores.items()}
        clients = findings.clients
        row["num_clients"] = len(clients)
        if clients:
            total = sum(c["num-examples"] for c in clients)
            row["train_loss"] = sum(c["train_loss"] * c["num-examples"] for c in clients) / total
            spent = [c["privacy_epsilon"] for c in clients if "privacy_epsilon" in c]
            if spent:
                self.largest_epsilon.append(max(spent))
        if self.largest_epsilon:
            row["privacy/epsilon"] = max(self.largest_epsilon)
        row["clients"] = clients
        row["rejected"] = [vars(r) for r in findings.rejected]
        row["failures"] = findings.failures
        if findings.skipped is not None:
            row["skipped"] = findings.skipped
        if findings.train_step_time_s is not None:
            row["train_step_time_s"] = findings.train_step_time_s
        if findings.client_eval:
            row["client_eval"] = findings.client_eval
            row.update(weakest_client(findings.client_eval, self.attacks, self.eps))
        row["time_s"] = time.monotonic() - self.started
        self.metrics_log.append(row)
        if self.console is not None:
            self.console.print(round_line(row, self.total_rounds, self._seconds_left(server_round, row)))
        return row

    def _seconds_left(self, server_round: int, row: dict) -> float | None:
        if not server_round:
            return None
        per_round = (row["time_s"] - self.metrics_log.rows[0]["time_s"]) / server_round
        return per_round * (self.total_rounds - server_round)

    def state(self) -> dict:
        """What a checkpoint keeps of it (``rows`` are the metrics log's)."""
        return {
            "rows": self.metrics_log.rows,
            "detections": [vars(d) for d in self.detections],
            "largest_epsilon": list(self.largest_epsilon),
        }

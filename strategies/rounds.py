"""The rounds of a run: Flower's ``Strategy.start`` loop, made to survive failing clients.

Differences from ``Strategy.start``:

* it can begin at any round (``first_round``), so a run resumes from its checkpoint;
* clients that raised (an error reply), were lost (Flower answers for a node that missed its
  heartbeats) or sent nothing within ``federation.round_timeout_s`` are recorded per round in
  ``failures`` (by partition id, and by site name when deployed) and never reach the strategy;
* a round with fewer than ``federation.min_replies`` valid training replies stops the run
  (``NotEnoughReplies``): the run's last complete round is then its checkpoint;
* an aggregate holding NaN or Inf is never installed: the round keeps the previous model and
  says so in the log and in ``skipped``;
* it waits for replies in slices of ``POLL_S``, so a stop request (Ctrl-C) is seen at once,
  where ``grid.send_and_receive`` would wait out the whole timeout;
* it keeps the simulated clients' persistent state per partition (``client_states``,
  ``fedmed.client_state``): collected from their training replies, sent back with their next
  training message, saved in checkpoints;
* ``evaluate_fn(server_round, arrays, findings)`` gets the round's findings
  (``strategies.findings.RoundFindings``: the strategy's, with the round's failures and skip);
* ``end_of_round(server_round, arrays)`` runs after each round's evaluation (checkpoints).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedmed.client_state import STATE_RECORD, record_from, records_of
from fedmed.logs import log
from fedmed.memory import return_free_memory
from fedmed.serialization import array_view
from strategies.findings import RoundFindings
from strategies.strategy import FedMedStrategy

POLL_S = 0.1
MAX_REASON = 400  # characters of a client's error kept in metrics.jsonl (Ray's run to pages)


class NotEnoughReplies(RuntimeError):
    """A round got fewer valid training replies than ``federation.min_replies``."""


class RunStopped(RuntimeError):
    """The run was asked to stop (SIGINT/SIGTERM) while waiting for replies."""


def non_finite_keys(arrays: ArrayRecord) -> list[str]:
    """Keys of floating-point arrays holding NaN or Inf."""
    bad = []
    for key, array in arrays.items():
        values = array_view(array)
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            bad.append(key)
    return bad


def error_message(reason: str) -> str:
    """The client's own exception message out of Flower's error reason (which in simulation
    carries the whole remote traceback; Flower has logged it already)."""
    message = reason.rsplit("Message: ", 1)[-1] if "Message: " in reason else reason.strip().splitlines()[-1]
    message = message.strip().removesuffix("'>").strip()
    return message if len(message) <= MAX_REASON else message[:MAX_REASON] + " [...]"


def exchange(
    grid: Grid,
    messages: Iterable[Message],
    timeout: float,
    stop: threading.Event | None = None,
    on_reply: Callable[[Message], None] | None = None,
) -> tuple[list[tuple[int, Message]], list[int]]:
    """Send ``messages`` and collect the replies until all are in or ``timeout`` seconds pass.
    Returns (node the message went to, its reply) pairs and the node ids that did not reply in
    time. The node comes from the message replied to: Flower itself (node id 1) answers for a
    node it has lost. ``on_reply(reply)`` runs on each reply as it comes in."""
    messages = list(messages)
    if not messages:
        return [], []
    node_of = dict(zip(grid.push_messages(messages), (m.metadata.dst_node_id for m in messages)))
    waiting = set(node_of)
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while waiting:
        if stop is not None and stop.is_set():
            raise RunStopped("stop requested while waiting for the clients' replies")
        for reply in grid.pull_messages(waiting):
            waiting.discard(reply.metadata.reply_to_message_id)
            replies.append((node_of[reply.metadata.reply_to_message_id], reply))
            if on_reply is not None and not reply.has_error():
                on_reply(reply)
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(POLL_S)
    return replies, sorted(node_of[m] for m in waiting)


class RoundLoop:
    """Runs rounds of ``strategy`` on ``grid`` and keeps what went wrong in each.

    ``failures[round]``: list of ``{"partition_id", "node_id", "phase", "reason"}``;
    ``skipped[round]``: why the round's aggregate was not installed; ``timed_out``: some client
    never replied, so its Ray actor may still be busy when the run ends.
    """

    def __init__(
        self,
        strategy: FedMedStrategy,
        grid: Grid,
        *,
        timeout: float,
        min_replies: int,
        stop: threading.Event | None = None,
    ) -> None:
        if min_replies < 1:
            raise ValueError(f"federation.min_replies={min_replies} must be >= 1")
        if min_replies > strategy.clients_per_round:
            raise ValueError(
                f"federation.min_replies={min_replies} is more than federation.clients_per_round="
                f"{strategy.clients_per_round}: no round could complete"
            )
        self.strategy = strategy
        self.grid = grid
        self.timeout = timeout
        self.min_replies = min_replies
        self.stop = stop
        self.failures: dict[int, list[dict]] = {}
        self.skipped: dict[int, str] = {}
        self.timed_out = False
        self.client_states: dict[int, dict] = {}

    def _with_states(self, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        for msg in messages:
            records = self.client_states.get(self.strategy.partition_of_node.get(msg.metadata.dst_node_id))
            if records is not None:  # a copy: Flower's messages of a round share one RecordDict
                msg.content = RecordDict({**dict(msg.content.items()), STATE_RECORD: record_from(records)})
        return messages

    def _collect_states(self, replies: list[Message]) -> None:
        for reply in replies:
            if STATE_RECORD in reply.content:
                pid = self.strategy.partition_of_node.get(reply.metadata.src_node_id)
                records = records_of(reply.content[STATE_RECORD])
                # only clients that keep state are remembered: the checkpoint and the messages
                # grow with them, not with every client ever sampled
                if records:
                    self.client_states[pid] = records
                else:
                    self.client_states.pop(pid, None)
                del reply.content[STATE_RECORD]

    def _replies(self, server_round: int, phase: str, messages: Iterable[Message]) -> list[Message]:
        """The round's replies that carry content; failed and missing clients recorded."""
        on_reply = getattr(self.strategy, "reply_arrived", None) if phase == "train" else None
        replies, missing = exchange(self.grid, messages, self.timeout, self.stop, on_reply)
        failures = self.failures.setdefault(server_round, [])
        online = set(self.grid.get_node_ids()) if missing else set()
        for node in missing:
            self.timed_out = True
            kind = "timeout" if node in online else "lost"
            self._fail(
                failures,
                server_round,
                phase,
                node,
                kind,
                f"no reply within federation.round_timeout_s={self.timeout:g}"
                if kind == "timeout"
                else "the node went offline during the round",
            )
        answered = []
        for node, reply in replies:
            if not reply.has_error():
                answered.append(reply)
            elif reply.metadata.src_node_id != node:  # Flower's answer for a node it lost
                self._fail(failures, server_round, phase, node, "lost", error_message(reply.error.reason))
            else:
                self._fail(
                    failures, server_round, phase, node, "raised", f"client raised: {error_message(reply.error.reason)}"
                )
        return answered

    def _fail(self, failures: list[dict], server_round: int, phase: str, node: int, kind: str, reason: str) -> None:
        pid = self.strategy.partition_of_node.get(node)
        federation = getattr(self.strategy, "federation", None)
        client = federation.name(pid) if federation is not None else pid
        log.warning("round %d: client %s %s in %s: %s", server_round, client, kind, phase, reason)
        failures.append(
            {"client": client, "partition_id": pid, "node_id": node, "phase": phase, "kind": kind, "reason": reason}
        )

    def run(
        self,
        arrays: ArrayRecord,
        *,
        first_round: int,
        num_rounds: int,
        train_config: ConfigRecord,
        evaluate_config: ConfigRecord,
        evaluate_fn: Callable[[int, ArrayRecord, RoundFindings], MetricRecord | None],
        end_of_round: Callable[[int, ArrayRecord], None] | None = None,
    ) -> ArrayRecord:
        """Rounds ``first_round``..``num_rounds``; returns the final global model. The caller
        evaluates round 0 itself (a resumed run has it already)."""
        strategy = self.strategy
        for server_round in range(first_round, num_rounds + 1):
            return_free_memory()  # what the last evaluation and checkpoint freed
            messages = self._with_states(strategy.configure_train(server_round, arrays, train_config, self.grid))
            replies = self._replies(server_round, "train", messages)
            self._collect_states(replies)
            new_arrays, _ = strategy.aggregate_train(server_round, replies)
            return_free_memory()  # what the sum freed
            trained = strategy.findings_of(server_round)
            if len(trained.clients) < self.min_replies:
                raise NotEnoughReplies(
                    f"round {server_round}: {len(trained.clients)} valid training replies, fewer than "
                    f"federation.min_replies={self.min_replies} ({len(self.failures.get(server_round, []))} "
                    f"clients failed, {len(trained.rejected)} replies rejected; see the log above)"
                )
            if new_arrays is not None:
                bad = non_finite_keys(new_arrays)
                if bad:
                    reason = f"the aggregate holds NaN or Inf in {len(bad)} arrays (first: {bad[0]})"
                    log.warning(
                        "round %d: %s; the round is skipped and the previous global model kept",
                        server_round,
                        reason,
                    )
                    self.skipped[server_round] = reason
                else:
                    arrays = new_arrays
            replies = self._replies(
                server_round, "evaluate", strategy.configure_evaluate(server_round, arrays, evaluate_config, self.grid)
            )
            strategy.aggregate_evaluate(server_round, replies)
            findings = strategy.take_findings(server_round)
            findings.failures = self.failures.get(server_round, [])
            findings.skipped = self.skipped.get(server_round)
            evaluate_fn(server_round, arrays, findings)
            if end_of_round is not None:
                end_of_round(server_round, arrays)
        return arrays

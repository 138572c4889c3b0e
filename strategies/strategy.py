"""FedAvg with what a real server needs around it.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
AISTATS 2017 — the aggregate is Flower's ``FedAvg`` bit for bit, computed one reply at a time
(``strategies.streamed``: in simulation the server holds one Array of one reply at a time, not
the round's replies). This class also

* samples clients by partition id with a seeded ``random.Random``, so the same seed picks the same
  clients (Flower samples node ids, which are random per run);
* rejects replies with NaN/Inf or huge values, wrong keys, shapes or dtypes, or an example count
  that is missing, not a whole positive number or absurd next to the others', logging each
  (``strategies.replies``);
* aggregates in partition-id order, so the floating-point sum is the same in every run;
* keeps each client's own metrics per round instead of only their average (with the site's name
  when deployed), in the round's findings (``strategies.findings``), which the round loop takes
  from it when the round is over (``take_findings``);
* samples only nodes the SuperLink counts as online, so a lost site is not sampled until it
  has reconnected (``strategies.nodes``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords, validate_message_reply_consistency

from fedmed.job import ASSESS_KEY
from fedmed.logs import log
from fedmed.packed_arrays import pack, unpack_reply
from fedmed.seeds import Stream, seed_for
from fedmed.serialization import array_from_numpy
from fedmed.shared_arrays import ARRAYS_FILE_KEY, SharedArrays
from strategies.findings import Detection, RoundFindings
from strategies.nodes import Federation, online_partitions
from strategies.replies import WEIGHT_KEY, Rejection, outlying_counts, reply_partition_id, training_reply_problem
from strategies.streamed import Candidate, open_reply, values_problem_of, weighted_sum


def _metrics_of(msg: Message) -> dict:
    return dict(next(iter(msg.content.metric_records.values())))


class FedMedStrategy(FedAvg):
    """FedAvg with seeded sampling, reply validation and per-client metrics.

    Parameters
    ----------
    partition_of_node : dict[int, int]
        Node id -> partition id, as the nodes reported it (see ``discover_partitions``).
    clients_per_round : int
        How many nodes train each round.
    seed : int
        Seeds the sampling of nodes.
    fraction_evaluate : float
        Share of nodes that evaluate the global model on their local hold-out each round.
    assess_round : callable, optional
        ``assess_round(server_round)`` is true on rounds where every node also assesses the
        global model's robustness on its hold-out (``strategies/global_assessment.py``).
    shared_arrays : SharedArrays, optional
        Simulation on one machine: the global model and the replies' weights travel as files
        in shared memory, not inside the messages (``fedmed.shared_arrays``).
    assess_max_clients : int, optional
        At most this many nodes (a seeded sample of those online) take part in an assessment
        round (``eval.max_clients``); None: every node.
    """

    # ``reply_arrived`` checks reply files as they come in (robust rules load them all anyway)
    checks_on_arrival = True

    def __init__(
        self,
        partition_of_node: dict[int, int],
        clients_per_round: int,
        seed: int,
        fraction_evaluate: float = 0.0,
        assess_round: Callable[[int], bool] | None = None,
        shared_arrays: SharedArrays | None = None,
        assess_max_clients: int | None = None,
    ) -> None:
        num_nodes = len(partition_of_node)
        if not 1 <= clients_per_round <= num_nodes:
            raise ValueError(
                f"federation.clients_per_round={clients_per_round} must be between 1 and "
                f"federation.num_clients={num_nodes}"
            )
        if not 0.0 <= fraction_evaluate <= 1.0:
            raise ValueError(f"federation.fraction_evaluate={fraction_evaluate} must be in [0, 1]")
        super().__init__(
            fraction_train=clients_per_round / num_nodes,
            # configure_evaluate below samples with `local_eval_fraction`; 1.0 here only keeps
            # Flower from warning that evaluation is off.
            fraction_evaluate=1.0,
            min_train_nodes=clients_per_round,
            min_evaluate_nodes=0,
            min_available_nodes=num_nodes,
            train_metrics_aggr_fn=_average_without_ids,
        )
        self.local_eval_fraction = fraction_evaluate
        self.assess_round = assess_round or (lambda server_round: False)
        self.assess_max_clients = assess_max_clients
        self.partition_of_node = dict(partition_of_node)
        self.clients_per_round = clients_per_round
        self.rng = random.Random(seed_for(seed, Stream.CLIENT_SAMPLING))
        self.shared_arrays = shared_arrays
        self._global_arrays: ArrayRecord | None = None
        # what the rounds not yet taken by the round loop found (``take_findings``)
        self._findings: dict[int, RoundFindings] = {}
        # deployed sites' names (set by the server app)
        self.federation: Federation | None = None
        self._grid: Grid | None = None
        self._sent_at = 0.0
        # message id -> why its values cannot be aggregated, or None: checked as replies arrive
        self._checked_on_arrival: dict[str, str | None] = {}

    def findings_of(self, server_round: int) -> RoundFindings:
        """What round ``server_round`` has found so far (filled as Flower calls the strategy)."""
        if server_round not in self._findings:
            self._findings[server_round] = RoundFindings(server_round)
        return self._findings[server_round]

    def take_findings(self, server_round: int) -> RoundFindings:
        """The findings of a finished round, handed over: the strategy keeps nothing of it."""
        findings = self.findings_of(server_round)
        del self._findings[server_round]
        return findings

    def online(self) -> list[int]:
        """Partitions that can be sampled now: those whose node is online (all without a grid)."""
        if self._grid is None:
            return sorted(self.partition_of_node.values())
        return online_partitions(self._grid, self.partition_of_node)

    def sample_partitions(self, count: int, available: list[int] | None = None) -> list[int]:
        """Node ids of ``count`` partitions (at most all ``available`` ones, by default every
        partition) drawn by the seeded generator, in partition order."""
        node_of_partition = {p: n for n, p in self.partition_of_node.items()}
        candidates = sorted(node_of_partition if available is None else available)
        chosen = sorted(self.rng.sample(candidates, min(count, len(candidates))))
        return [node_of_partition[p] for p in chosen]

    def _messages(
        self, arrays: ArrayRecord, config: ConfigRecord, node_ids: list[int], kind: str, server_round: int
    ) -> list[Message]:
        config["server-round"] = server_round
        if self.shared_arrays is not None:
            config[ARRAYS_FILE_KEY] = str(self.shared_arrays.publish(arrays))
            record = RecordDict({self.configrecord_key: config})
        else:
            record = RecordDict({self.arrayrecord_key: pack(arrays), self.configrecord_key: config})
        return self._construct_messages(record, node_ids, kind)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global_arrays = arrays
        self._grid = grid
        self._checked_on_arrival.clear()
        available = self.online()
        if len(available) < self.clients_per_round:
            log.warning(
                "round %d: only %d of %d clients online; sampling %d",
                server_round,
                len(available),
                len(self.partition_of_node),
                len(available),
            )
        node_ids = self.sample_partitions(self.clients_per_round, available)
        self._sent_at = time.monotonic()
        return self._messages(arrays, config, node_ids, MessageType.TRAIN, server_round)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        assess = self.assess_round(server_round)
        available = self.online()
        if assess:
            count = len(available) if self.assess_max_clients is None else min(self.assess_max_clients, len(available))
            node_ids = self.sample_partitions(count, available)
        else:
            count = int(round(self.local_eval_fraction * len(self.partition_of_node)))
            if count == 0:
                return []
            node_ids = self.sample_partitions(count, available)
        config = ConfigRecord({**config, ASSESS_KEY: assess})
        return self._messages(arrays, config, node_ids, MessageType.EVALUATE, server_round)

    def accepted_replies(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """Valid replies in partition order; the others are logged and recorded as rejected."""
        self._training_done(server_round)
        accepted, rejected = [], []
        for msg in replies:
            pid = reply_partition_id(msg, self.partition_of_node)
            problem = self.shared_arrays.collect(msg) if self.shared_arrays is not None else unpack_reply(msg)
            problem = problem or training_reply_problem(msg, self._global_arrays)
            if problem is None:
                accepted.append((pid, msg))
            else:
                _reject(server_round, rejected, pid, msg, problem)
        accepted.sort(key=lambda item: (item[0] is None, item[0]))
        accepted = self._without_outlying_counts(server_round, accepted, rejected)
        findings = self.findings_of(server_round)
        findings.rejected = rejected
        findings.clients = [self.client_metrics(pid, msg) for pid, msg in accepted]
        return [msg for _, msg in accepted]

    def _training_done(self, server_round: int) -> None:
        """The round's training replies are in: time the step, drop the model's file."""
        assert self._global_arrays is not None, "configure_train must run before aggregate_train"
        self.findings_of(server_round).train_step_time_s = time.monotonic() - self._sent_at
        if self.shared_arrays is not None:
            self.shared_arrays.unpublish()

    def client_metrics(self, pid: int | None, msg: Message) -> dict:
        """A reply's own metrics under the server's partition id, and its site's name if deployed."""
        metrics = {**_metrics_of(msg), "partition-id": pid}
        if self.federation is not None and self.federation.deployed:
            metrics["site"] = self.federation.name(pid)
        return metrics

    def _without_outlying_counts(self, server_round: int, accepted: list, rejected: list[Rejection]) -> list:
        counts = [float(_metrics_of(msg)[WEIGHT_KEY]) for _, msg in accepted]
        kept = []
        for (pid, msg), problem in zip(accepted, outlying_counts(counts)):
            if problem is None:
                kept.append((pid, msg))
            else:
                _reject(server_round, rejected, pid, msg, problem)
        return kept

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's FedAvg over the valid replies, bit for bit, reading, checking and adding one
        reply's Arrays at a time instead of holding them all (``strategies.streamed``)."""
        self._training_done(server_round)
        rejected: list[Rejection] = []
        candidates: list[Candidate] = []
        try:
            for msg in replies:
                pid = reply_partition_id(msg, self.partition_of_node)
                source, problem, files = open_reply(msg, self.shared_arrays, self._global_arrays)
                candidate = Candidate(pid, msg, source, files)
                if problem is None and msg.metadata.message_id and msg.metadata.message_id in self._checked_on_arrival:
                    problem = self._checked_on_arrival[msg.metadata.message_id]
                    candidate.checked = problem is None
                if problem is None:
                    candidates.append(candidate)
                else:
                    self._reject(server_round, rejected, candidate, problem)
            candidates.sort(key=lambda c: (c.pid is None, c.pid))
            accepted, summed = self._streamed_average(server_round, candidates, rejected)
        finally:
            self._checked_on_arrival.clear()
            for candidate in candidates:
                candidate.release()
        findings = self.findings_of(server_round)
        findings.rejected = rejected
        findings.clients = [self.client_metrics(c.pid, c.msg) for c in accepted]
        if not accepted:
            log.warning("round %d: no valid reply; the global model stays as it was", server_round)
            findings.detection = Detection()
            return None, None
        findings.detection = Detection({c.pid: 0.0 for c in accepted})
        contents = [c.msg.content for c in accepted]
        # what Flower's FedAvg.aggregate_train checks besides the arrays (raises as it did)
        validate_message_reply_consistency(contents, self.weighted_by_key, check_arrayrecord=False)
        arrays = ArrayRecord()
        for key in list(summed):  # one Array serialised at a time, its sum dropped
            arrays[key] = array_from_numpy(summed.pop(key))
        return arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)

    def _reject(self, server_round: int, rejected: list[Rejection], candidate: Candidate, problem: str) -> None:
        _reject(server_round, rejected, candidate.pid, candidate.msg, problem)
        candidate.release()

    def _streamed_average(
        self, server_round: int, candidates: list[Candidate], rejected: list[Rejection]
    ) -> tuple[list[Candidate], dict | None]:
        """The accepted candidates (partition order) and their FedAvg sum; the others rejected.

        As in ``accepted_replies``, a reply is first judged on its own (values included) and the
        example counts then compared among those that pass (``outlying_counts``). Every pass
        assumes that the values of replies not yet read are fine; when one is not, it is
        rejected, and the counts are compared and the sum computed again (``strategies.streamed``
        says why the sum cannot be patched instead).
        """
        pending = list(candidates)
        check_first = False  # after a reply failed mid-sum: check every reply before summing
        while True:
            counts = [float(_metrics_of(c.msg)[WEIGHT_KEY]) for c in pending]
            problems = outlying_counts(counts)
            kept = [c for c, problem in zip(pending, problems) if problem is None]
            outlying = [(c, problem) for c, problem in zip(pending, problems) if problem is not None]
            # a reply's own values are judged before its count (the reason recorded is theirs)
            unchecked = [c for c, _ in outlying] + (kept if check_first else [])
            failed = [(c, problem) for c in unchecked if not c.checked and (problem := values_problem_of(c))]
            if not failed and kept:
                weights = [_metrics_of(c.msg)[self.weighted_by_key] for c in kept]  # as Flower reads them
                total_weight = sum(weights)
                # every reply checked already (on arrival, ``reply_arrived``): no sum again, so
                # the files are freed as they are read, and the sum takes no memory of its own
                consume = all(c.checked for c in kept)
                summed, failure = weighted_sum(kept, [w / total_weight for w in weights], consume)
                if failure is None:
                    break
                if consume:  # a file went missing or changed since it was checked
                    return self._unsummable(server_round, kept, outlying, failure, rejected)
                failed, check_first = [failure], True
            for c, problem in failed:
                self._reject(server_round, rejected, c, problem)
                pending.remove(c)
            if not failed:  # nothing kept: nothing to sum
                summed = None
                break
        for c, problem in outlying:
            self._reject(server_round, rejected, c, problem)
        return kept, summed

    def _unsummable(
        self, server_round: int, kept: list[Candidate], outlying: list, failure: tuple, rejected: list[Rejection]
    ) -> tuple[list[Candidate], None]:
        """A reply failed while the files were consumed: the others cannot be read again, so
        the round has no aggregate (never seen: a file would have to change after its check)."""
        broken, problem = failure
        for c in kept:
            reason = problem if c is broken else f"its files were consumed by a sum that partition {broken.pid} broke"
            self._reject(server_round, rejected, c, reason)
        for c, reason in outlying:
            self._reject(server_round, rejected, c, reason)
        return [], None

    def reply_arrived(self, msg: Message) -> None:
        """A training reply has come in while others are still training: check its arrays file
        now (keys, shapes, dtypes, values; read one Array at a time), so that ``aggregate_train``
        finds every reply checked and reads each file once more only, freeing it as it goes.
        Replies that carry their arrays themselves are checked in ``aggregate_train``."""
        if not self.checks_on_arrival or self.shared_arrays is None or self._global_arrays is None:
            return
        if not msg.metadata.message_id:  # a message never sent (tests): nothing to key it by
            return
        if not self.shared_arrays.reply_files(msg):
            return
        source, problem, files = open_reply(msg, self.shared_arrays, self._global_arrays)
        if problem is None:
            self._checked_on_arrival[msg.metadata.message_id] = values_problem_of(Candidate(None, msg, source, files))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        results = []
        for msg in replies:
            if msg.has_error():
                log.warning(
                    "round %d: local evaluation failed on node %d: %s",
                    server_round,
                    msg.metadata.src_node_id,
                    msg.error.reason,
                )
                continue
            results.append(self.client_metrics(reply_partition_id(msg, self.partition_of_node), msg))
        results.sort(key=lambda m: m.get("partition-id", -1))
        self.findings_of(server_round).client_eval = results
        return None


def _reject(server_round: int, rejected: list[Rejection], pid: int | None, msg: Message, problem: str) -> None:
    """Record (and log) that the reply ``msg`` of partition ``pid`` is not aggregated, and why."""
    log.warning("round %d: rejected reply of partition %s: %s", server_round, pid, problem)
    rejected.append(Rejection(msg.metadata.src_node_id, pid, problem))


def _average_without_ids(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    averaged = aggregate_metricrecords(records, weighted_by_key)
    averaged.pop("partition-id", None)
    return averaged

"""Robust aggregation as a Flower strategy.

``RobustAggregation`` keeps everything ``FedMedStrategy`` does around aggregation (seeded sampling by
partition id, reply validation, partition-ordered replies, per-client metrics) and replaces the
weighted mean by one of the aggregators of ``strategies/aggregators``: each accepted reply
becomes an update (client weights minus the round's global weights, learned floating-point
arrays only, flattened in the global ArrayRecord's key order, float32), the updates are stacked
(n, d), the aggregator returns one update and its suspicion of each client, and the new global
model is the old one plus that update. BatchNorm's running statistics are not weights: they are
the example-weighted mean over the clients the rule did not flag (``float_keys`` says why).
Arrays that are not floating point (``num_batches_tracked``) keep the global value. What the
aggregator flagged is in the round's findings (``strategies.findings.Detection``), by partition
id, for the server app to score against the ground truth it alone knows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord

from fedmed.logs import log
from fedmed.seeds import Stream, seed_for
from fedmed.serialization import array_from_numpy, array_view
from fedmed.shared_arrays import SharedArrays
from strategies.aggregators.base import Aggregator, TooFewReplies
from strategies.findings import Detection
from strategies.replies import reply_partition_id
from strategies.strategy import FedMedStrategy


def is_batchnorm_statistic(key: str) -> bool:
    return key.endswith(("running_mean", "running_var"))


def float_keys(global_arrays: ArrayRecord) -> list[str]:
    """Keys of the learned floating-point arrays, in the record's order: the ones the rules see.

    BatchNorm's running statistics are left out. They are averages of activations, not weights,
    and their change in a round dwarfs the weights' (ResNet18, PneumoniaMNIST, one local epoch
    from the initial model: norm 47.6 against 0.80), so on the whole state dict every distance,
    cosine, norm bound and FLAME's noise scale (0.001 x the median norm, per coordinate) would
    be about the statistics: FLAME's noise then wrecked the weights. Attack of the Tails' code
    likewise vectorises ``net.parameters()``. The statistics are averaged separately
    (``batchnorm_statistics``).
    """
    return [
        key
        for key, array in global_arrays.items()
        if np.issubdtype(np.dtype(array.dtype), np.floating) and not is_batchnorm_statistic(key)
    ]


def _flat_globals(global_arrays: ArrayRecord) -> list[np.ndarray]:
    return [array_view(global_arrays[key]) for key in float_keys(global_arrays)]


def update_size(global_arrays: ArrayRecord) -> int:
    return sum(int(np.prod(global_arrays[key].shape, dtype=np.int64)) for key in float_keys(global_arrays))


def _fill(out: torch.Tensor, records: Sequence[ArrayRecord], keys: list[str], globals_: list[np.ndarray]) -> None:
    """Row i of ``out`` = ``records[i]`` minus the global arrays, array by array: each reply's bytes
    are read in place and each value written once. Arrays outer, replies inner, so that a global
    array small enough for the cache is read from memory once, not once per reply."""
    target = out.numpy()
    offset = 0
    for key, g in zip(keys, globals_):
        part = target[:, offset : offset + g.size]
        for row, arrays in zip(part, records):
            w = array_view(arrays[key])
            if w.dtype == np.float32 and g.dtype == np.float32:
                np.subtract(w, g, out=row)
            else:
                row[:] = w.astype(np.float64) - g.astype(np.float64)
        offset += g.size


def flat_update(arrays: ArrayRecord, global_arrays: ArrayRecord) -> torch.Tensor:
    """(d,) float32: ``arrays`` minus ``global_arrays`` on the floating-point arrays, flattened in
    the global record's key order."""
    return stack_updates([arrays], global_arrays)[0]


def stack_updates(
    records: Sequence[ArrayRecord], global_arrays: ArrayRecord, buffer: torch.Tensor | None = None
) -> torch.Tensor:
    """(n, d) float32, row i = ``flat_update(records[i], global_arrays)``, each value copied once.

    ``buffer``: a float32 (m, d) tensor with m >= n to write the rows into (its first n rows are
    returned) instead of a fresh allocation; see ``UpdateRows``.
    """
    keys = float_keys(global_arrays)
    globals_ = _flat_globals(global_arrays)
    shape = (len(records), sum(g.size for g in globals_))
    if buffer is None:
        out = torch.empty(shape, dtype=torch.float32)
    elif (
        buffer.dtype != torch.float32
        or buffer.dim() != 2
        or buffer.shape[0] < shape[0]
        or buffer.shape[1] != shape[1]
        or not buffer.is_contiguous()
    ):
        raise ValueError(
            f"buffer of shape {tuple(buffer.shape)}, {buffer.dtype}: need a contiguous float32 "
            f"(>= {shape[0]}, {shape[1]})"
        )
    else:
        out = buffer[: shape[0]]
    _fill(out, records, keys, globals_)
    return out


class UpdateRows:
    """The server's (n, d) float32 buffer for the stacked updates, kept from round to round.

    The first touch of fresh memory costs a page fault per 4 KiB page, and on the machines
    measured (README, "Server aggregation") those faults took longer than the subtraction that
    fills the rows. Kept, the buffer is faulted in once, in the first round; it is reallocated
    only when a round brings more replies or the model changes size. The rules never keep a view
    of the updates past their round (they clone what they keep, as FoolsGold's history).
    """

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def __call__(self, n: int, d: int) -> torch.Tensor:
        if self._buffer is None or self._buffer.shape[0] < n or self._buffer.shape[1] != d:
            self._buffer = None  # the old one goes before the new one is allocated
            self._buffer = torch.empty(n, d, dtype=torch.float32)
        return self._buffer


def batchnorm_statistics(
    records: Sequence[ArrayRecord], num_examples: torch.Tensor, flagged: Sequence[int]
) -> dict[str, np.ndarray] | None:
    """BatchNorm running statistics of the round: the example-weighted mean over the rows the
    rule did not flag, in float64 and back to each array's dtype; None when every row is flagged."""
    excluded = set(flagged)
    rows = [row for row in range(len(records)) if row not in excluded]
    if not rows:
        return None
    weights = np.asarray(num_examples, dtype=np.float64)[rows]
    weights = weights / weights.sum()
    keys = [key for key in records[0].keys() if is_batchnorm_statistic(key)]
    result = {}
    for key in keys:
        total = sum(w * array_view(records[row][key]).astype(np.float64) for w, row in zip(weights, rows))
        result[key] = np.asarray(total).astype(records[0][key].dtype).reshape(records[0][key].shape)
    return result


def apply_update(
    global_arrays: ArrayRecord,
    update: torch.Tensor,
    noise: torch.Tensor | None = None,
    statistics: dict[str, np.ndarray] | None = None,
) -> ArrayRecord:
    """A new ArrayRecord, same keys and order: the learned floating-point arrays (``float_keys``)
    = global + their slice of ``update`` and of ``noise`` (an aggregator's ``Aggregate.noise``),
    in the global dtype; BatchNorm's running statistics from ``statistics`` (None: the global
    ones); everything else a copy of the global value."""
    update = update.detach().to("cpu").reshape(-1)
    size = update_size(global_arrays)
    if update.numel() != size:
        raise ValueError(f"the update has {update.numel()} values, the model's learned floating-point arrays {size}")
    if noise is not None:
        noise = noise.detach().to("cpu").reshape(-1)
        if noise.numel() != size:
            raise ValueError(f"the noise has {noise.numel()} values, the model's learned floating-point arrays {size}")
        update = update + noise
    floats = set(float_keys(global_arrays))
    values = update.numpy()
    # each new array is summed into one reusable buffer and serialised from it (one copy)
    largest = max((int(np.prod(global_arrays[key].shape, dtype=np.int64)) for key in floats), default=0)
    total = np.empty(largest, dtype=values.dtype)
    result = ArrayRecord()
    offset = 0
    for key, array in global_arrays.items():
        if key in floats:
            g = array_view(array)
            part = values[offset : offset + g.size]
            offset += g.size
            if g.dtype == part.dtype:
                new = np.add(g, part, out=total[: g.size])
            else:
                new = (g.astype(np.float64) + part).astype(g.dtype)
            result[key] = array_from_numpy(new.reshape(array.shape))
        elif statistics is not None and key in statistics:
            result[key] = array_from_numpy(np.ascontiguousarray(statistics[key]).reshape(array.shape))
        else:  # the global value: its serialised bytes, which never change, are shared
            result[key] = Array(dtype=array.dtype, shape=tuple(array.shape), stype=array.stype, data=array.data)
    return result


def round_generator(seed: int, server_round: int) -> torch.Generator:
    """The round's generator for the aggregator's noise, derived from ``seed`` and the round."""
    return torch.Generator().manual_seed(seed_for(seed, Stream.AGGREGATOR_NOISE, server_round))


class RobustAggregation(FedMedStrategy):
    """``FedMedStrategy`` with a robust aggregator (``strategies.aggregators.make_aggregator``).

    Parameters
    ----------
    partition_of_node, clients_per_round, seed, fraction_evaluate, assess_round, shared_arrays
        As ``FedMedStrategy``; ``seed`` also seeds the aggregator's noise (one generator per round).
    aggregator : Aggregator
        The rule. Its requirements on the number of replies (e.g. Bulyan's n >= 4f + 3) are
        checked against ``clients_per_round`` here; a round in which too few valid replies
        arrive keeps the global model and logs why.
    reference_update : callable, optional
        ``reference_update(global_arrays, num_examples) -> (d,) tensor``: the server's own update
        from the round's global model on its root dataset (FLTrust, which requires it), given the
        accepted replies' example counts to match its number of iterations to the clients'.

    The round's ``Detection`` (``strategies.findings``) holds the aggregator's suspicion score
    per partition and the partitions it flagged. Client ids given to the aggregator (FoolsGold's history) are the
    partition ids the replies report (else the node's partition, else its node id).
    """

    def __init__(
        self,
        partition_of_node: dict[int, int],
        clients_per_round: int,
        seed: int,
        fraction_evaluate: float = 0.0,
        assess_round: Callable[[int], bool] | None = None,
        shared_arrays: SharedArrays | None = None,
        assess_max_clients: int | None = None,
        *,
        aggregator: Aggregator,
        reference_update: Callable[[ArrayRecord, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__(
            partition_of_node,
            clients_per_round,
            seed,
            fraction_evaluate,
            assess_round,
            shared_arrays,
            assess_max_clients,
        )
        try:
            aggregator.check_replies(clients_per_round)
        except TooFewReplies as error:
            raise ValueError(f"{error} (federation.clients_per_round={clients_per_round} replies per round)") from None
        if aggregator.needs_root_update and reference_update is None:
            raise ValueError(
                f"strategy={aggregator.name} needs reference_update: the server's update on its root dataset"
            )
        self.aggregator = aggregator
        self.seed = seed
        self.reference_update = reference_update
        self._update_rows = UpdateRows()

    checks_on_arrival = False  # every reply is loaded whole (``accepted_replies``)

    def _client_id(self, msg: Message) -> int:
        pid = reply_partition_id(msg, self.partition_of_node)
        return int(pid) if pid is not None else int(msg.metadata.src_node_id)

    def aggregate_train(self, server_round: int, replies) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted = self.accepted_replies(server_round, replies)
        findings = self.findings_of(server_round)
        if not accepted:
            log.warning("round %d: no valid reply; the global model stays as it was", server_round)
            findings.detection = Detection()
            return None, None
        assert self._global_arrays is not None
        ids = [self._client_id(msg) for msg in accepted]
        records = [next(iter(msg.content.array_records.values())) for msg in accepted]
        num_examples = torch.tensor(
            [float(next(iter(msg.content.metric_records.values()))[self.weighted_by_key]) for msg in accepted],
            dtype=torch.float64,
        )
        metrics = self.train_metrics_aggr_fn([msg.content for msg in accepted], self.weighted_by_key)
        rows = self._update_rows(len(records), update_size(self._global_arrays))
        updates = stack_updates(records, self._global_arrays, rows)
        reference = None
        if self.reference_update is not None:
            reference = self.reference_update(self._global_arrays, num_examples)
        try:
            result = self.aggregator.aggregate(
                updates,
                num_examples,
                client_ids=ids,
                generator=round_generator(self.seed, server_round),
                reference=reference,
            )
        except TooFewReplies as error:
            log.warning("round %d: %s; the global model stays as it was", server_round, error)
            findings.detection = Detection()
            return None, metrics
        statistics = batchnorm_statistics(records, num_examples, result.flagged)
        flagged = [ids[i] for i in result.flagged]
        findings.detection = Detection(
            {pid: float(score) for pid, score in zip(ids, result.scores.tolist())}, sorted(flagged)
        )
        if flagged:
            log.info("round %d: %s flagged partitions %s", server_round, self.aggregator.name, sorted(flagged))
        return apply_update(self._global_arrays, result.update, result.noise, statistics), metrics

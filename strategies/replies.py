"""Checks a server runs on every client reply before it may touch the global model.

A reply is rejected, with the reason logged and recorded, when the client failed, when its
arrays do not have the global model's keys, shapes and floating-point dtypes, when any floating-point value is
NaN, Inf or larger in magnitude than ``MAX_ABS_VALUE``, or when its example count is missing,
not a whole number >= 1, or more than ``MAX_COUNT_RATIO`` times the median count of the round's
other replies (``outlying_counts``). Rejected replies are never aggregated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, Message

from fedmed.serialization import array_view

WEIGHT_KEY = "num-examples"
# No trained weight or BatchNorm statistic comes near 1e6, and below it every later sum stays
# finite in float32: FedAvg's weighted sums, and the squared norms and Gram products of robust
# rules (d * (2e6)^2 < 3.4e38 for any model of fewer than 8e25 values). A finite 3e38 passed the
# NaN/Inf check alone and FedAvg made a 2e38 model of it.
MAX_ABS_VALUE = 1e6
# A client claiming more than this many times the examples of the round's median other client
# would take nearly all of FedAvg's weight: a sanity bound on a number only the client states,
# not a defence (quantity-skewed partitions differ by far less).
MAX_COUNT_RATIO = 1000


@dataclass(frozen=True)
class Rejection:
    node_id: int
    partition_id: int | None
    reason: str


def reply_partition_id(msg: Message, partition_of_node: dict[int, int]) -> int | None:
    """Partition id from the reply's metrics, else from the node map (failed replies carry none)."""
    if not msg.has_error():
        for record in msg.content.metric_records.values():
            if "partition-id" in record:
                return int(record["partition-id"])
    return partition_of_node.get(msg.metadata.src_node_id)


def training_reply_problem(msg: Message, global_arrays: ArrayRecord) -> str | None:
    """Why this training reply cannot be aggregated, or None when it can."""
    if msg.has_error():
        return f"client failed: {msg.error.reason}"
    content = msg.content
    if len(content.array_records) != 1:
        return f"expected one ArrayRecord, got {len(content.array_records)}"
    if len(content.metric_records) != 1:
        return f"expected one MetricRecord, got {len(content.metric_records)}"
    metrics = next(iter(content.metric_records.values()))
    weight = metrics.get(WEIGHT_KEY)
    if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 1 or weight != int(weight):
        return f"'{WEIGHT_KEY}' missing or not a whole number >= 1: {weight!r}"
    arrays = next(iter(content.array_records.values()))
    missing = set(global_arrays.keys()) - set(arrays.keys())
    extra = set(arrays.keys()) - set(global_arrays.keys())
    if missing or extra:
        return f"array keys differ from the global model (missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]})"
    for key, reference in global_arrays.items():
        value = arrays[key]
        if tuple(value.shape) != tuple(reference.shape):
            return f"array '{key}' has shape {tuple(value.shape)}, the global model {tuple(reference.shape)}"
        if value.dtype != reference.dtype and _floating(value.dtype) and _floating(reference.dtype):
            # only between floating-point dtypes: Flower's FedAvg hands BatchNorm's integer
            # counters back as float64, and clients send them as int64
            return f"array '{key}' has dtype {value.dtype}, the global model {reference.dtype}"
        problem = values_problem(array_view(value))
        if problem is not None:
            return f"array '{key}' {problem}"
    return None


def _floating(dtype: str) -> bool:
    return np.issubdtype(np.dtype(dtype), np.floating)


def values_problem(values: np.ndarray) -> str | None:
    """Why these values cannot be aggregated (NaN, Inf, magnitude above ``MAX_ABS_VALUE``), or None."""
    if not np.issubdtype(values.dtype, np.floating) or values.size == 0:
        return None
    low, high = values.min(), values.max()  # NaN propagates into both; no temporary array
    if -MAX_ABS_VALUE <= low and high <= MAX_ABS_VALUE:
        return None
    if not (np.isfinite(low) and np.isfinite(high)):
        return "holds NaN or Inf"
    return f"holds {max(-float(low), float(high)):.3g} in magnitude, above the limit {MAX_ABS_VALUE:g}"


def outlying_counts(counts: list[float]) -> list[str | None]:
    """Per reply: why its example count is implausible against the round's other replies
    (more than ``MAX_COUNT_RATIO`` times their median), or None. A lone reply has no others."""
    problems: list[str | None] = []
    for i, count in enumerate(counts):
        others = counts[:i] + counts[i + 1 :]
        median = float(np.median(others)) if others else None
        if median is not None and count > MAX_COUNT_RATIO * median:
            problems.append(
                f"'{WEIGHT_KEY}'={count:g} is more than {MAX_COUNT_RATIO} times the median of "
                f"the round's other replies ({median:g})"
            )
        else:
            problems.append(None)
    return problems

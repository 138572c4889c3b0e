"""Checks a server runs on every client reply before it may touch the global model.

A reply is rejected, with the reason logged and recorded, when the client failed, when its
arrays do not have the global model's keys, shapes and floating-point dtypes, when any floating-point value is
NaN, Inf or larger in magnitude than ``MAX_ABS_VALUE``, or when its example count is missing,
not a whole number >= 1, or more than ``MAX_COUNT_RATIO`` times the median count of the round's
other replies (``outlying_counts``). Rejected replies are never aggregated.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Message

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
    problem = content_problem(msg, len(msg.content.array_records) if not msg.has_error() else 1)
    if problem is not None:
        return problem
    arrays = next(iter(msg.content.array_records.values()))
    problem = keys_problem(arrays.keys(), global_arrays)
    if problem is not None:
        return problem
    for key, reference in global_arrays.items():
        value = arrays[key]
        problem = layout_entry_problem(key, value.dtype, value.shape, reference) or array_problem(key, value)
        if problem is not None:
            return problem
    return None


def content_problem(msg: Message, array_sources: int) -> str | None:
    """Why this training reply cannot be aggregated, judged without its arrays: the client
    failed, it has not one source of arrays (``array_sources``: its ArrayRecords, or the files
    it points to) and one MetricRecord, or its example count is not a whole number >= 1."""
    if msg.has_error():
        return f"client failed: {msg.error.reason}"
    content = msg.content
    if array_sources != 1:
        return f"expected one ArrayRecord, got {array_sources}"
    if len(content.metric_records) != 1:
        return f"expected one MetricRecord, got {len(content.metric_records)}"
    metrics = next(iter(content.metric_records.values()))
    weight = metrics.get(WEIGHT_KEY)
    if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 1 or weight != int(weight):
        return f"'{WEIGHT_KEY}' missing or not a whole number >= 1: {weight!r}"
    return None


def keys_problem(keys: Iterable[str], global_arrays: ArrayRecord) -> str | None:
    """Why a reply with these array keys cannot be aggregated (keys differ from the model's)."""
    keys = set(keys)
    missing = set(global_arrays.keys()) - keys
    extra = keys - set(global_arrays.keys())
    if missing or extra:
        return f"array keys differ from the global model (missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]})"
    return None


def layout_problem(layout: list[tuple[str, str, tuple[int, ...]]], global_arrays: ArrayRecord) -> str | None:
    """Why a reply whose arrays have this (key, dtype, shape) layout cannot be aggregated: keys,
    shapes or floating-point dtypes differ from the global model's. Values are not looked at."""
    problem = keys_problem((key for key, _, _ in layout), global_arrays)
    if problem is not None:
        return problem
    if len(layout) != len(global_arrays):
        return f"array keys repeat: {len(layout)} arrays for the global model's {len(global_arrays)}"
    entries = {key: (dtype, shape) for key, dtype, shape in layout}
    for key, reference in global_arrays.items():
        problem = layout_entry_problem(key, *entries[key], reference)
        if problem is not None:
            return problem
    return None


def layout_entry_problem(key: str, dtype: str, shape: Iterable[int], reference: Array) -> str | None:
    if tuple(shape) != tuple(reference.shape):
        return f"array '{key}' has shape {tuple(shape)}, the global model {tuple(reference.shape)}"
    if dtype != reference.dtype and _floating(dtype) and _floating(reference.dtype):
        # only between floating-point dtypes: Flower's FedAvg hands BatchNorm's integer
        # counters back as float64, and clients send them as int64
        return f"array '{key}' has dtype {dtype}, the global model {reference.dtype}"
    return None


def array_problem(key: str, array: Array) -> str | None:
    """Why this Array's values cannot be aggregated (``values_problem``, or fewer or more of
    them than its shape says), or None."""
    values = array_view(array)
    expected = math.prod(array.shape)
    if values.size != expected:
        return f"array '{key}' holds {values.size} values, not the {expected} of its shape {tuple(array.shape)}"
    problem = values_problem(values)
    return None if problem is None else f"array '{key}' {problem}"


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

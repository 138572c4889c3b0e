"""Checks a server runs on every client reply before it may touch the global model.

A reply is rejected, with the reason logged and recorded, when the client failed, when its
arrays do not have the global model's keys and shapes, when any value is NaN or Inf, or when its
example count is missing or not positive. Rejected replies are never aggregated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, Message

from fedmed.serialization import array_view

WEIGHT_KEY = "num-examples"


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
    if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        return f"'{WEIGHT_KEY}' missing or not positive: {weight!r}"
    arrays = next(iter(content.array_records.values()))
    missing = set(global_arrays.keys()) - set(arrays.keys())
    extra = set(arrays.keys()) - set(global_arrays.keys())
    if missing or extra:
        return f"array keys differ from the global model (missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]})"
    for key, reference in global_arrays.items():
        value = arrays[key]
        if tuple(value.shape) != tuple(reference.shape):
            return f"array '{key}' has shape {tuple(value.shape)}, the global model {tuple(reference.shape)}"
        values = array_view(value)
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            return f"array '{key}' holds NaN or Inf"
    return None

"""Injected faults for chaos testing a simulated federation (``fault=[...]``, simulation only).

Chosen partitions, from a chosen round, in training or in local evaluation:

* ``raise``: the ClientApp raises ``InjectedFault``; Flower turns it into an error reply;
* ``hang``: the ClientApp sleeps ``hang_s`` seconds (None: for good), past the server's
  ``federation.round_timeout_s``;
* ``garbage``: the client skips training and replies with the global model spoiled one way
  (``GARBAGE``), which the server's reply checks must reject (``strategies/replies.py``).
"""

from __future__ import annotations

import threading

import numpy as np
from flwr.app import Array, ArrayRecord

from fedmed.config import FaultConfig
from fedmed.serialization import array_view

KINDS = ("raise", "hang", "garbage")
PHASES = ("train", "evaluate")
# A finite float32 far beyond any weight: FedAvg used to average it into a 2e38 model.
HUGE = 3e38
GARBAGE = ("nan", "inf", "huge", "shape", "dtype", "missing_key", "negative_count", "absurd_count")


class InjectedFault(RuntimeError):
    """Raised by a client that a ``raise`` fault names."""


def check_faults(faults: list[FaultConfig], num_clients: int) -> None:
    """Refuse a fault list that cannot act as written, naming the entry and key."""
    for i, fault in enumerate(faults):
        where = f"fault[{i}]"
        if fault.kind not in KINDS:
            raise ValueError(f"{where}.kind={fault.kind!r}: choose one of {', '.join(KINDS)}")
        if fault.phase not in PHASES:
            raise ValueError(f"{where}.phase={fault.phase!r}: choose train or evaluate")
        if fault.kind == "garbage":
            if fault.phase != "train":
                raise ValueError(f"{where}: garbage replaces the weights of a training reply; use phase=train")
            if fault.garbage not in GARBAGE:
                raise ValueError(f"{where}.garbage={fault.garbage!r}: choose one of {', '.join(GARBAGE)}")
        if not fault.partitions or not all(0 <= p < num_clients for p in fault.partitions):
            raise ValueError(
                f"{where}.partitions={list(fault.partitions)}: give partition ids in "
                f"[0, {num_clients - 1}] (federation.num_clients={num_clients})"
            )
        if fault.start_round < 1:
            raise ValueError(f"{where}.start_round={fault.start_round} must be >= 1")


def active_fault(faults: list[FaultConfig], partition_id: int, server_round: int, phase: str) -> FaultConfig | None:
    """The first fault that acts on this partition in this round and phase, or None."""
    for fault in faults:
        if partition_id in fault.partitions and server_round >= fault.start_round and fault.phase == phase:
            return fault
    return None


def misbehave(fault: FaultConfig, partition_id: int, server_round: int) -> None:
    """Raise or hang, as the fault says (garbage acts on the reply instead)."""
    if fault.kind == "raise":
        raise InjectedFault(f"injected fault: partition {partition_id} raises in {fault.phase}, round {server_round}")
    if fault.kind == "hang":
        threading.Event().wait(fault.hang_s)


def garbage_reply(global_arrays: ArrayRecord, num_examples: int, garbage: str) -> tuple[ArrayRecord, int]:
    """The global model and example count spoiled as ``garbage`` names (see ``GARBAGE``)."""
    arrays = ArrayRecord({key: array for key, array in global_arrays.items()})
    key = next(k for k, a in arrays.items() if np.issubdtype(np.dtype(a.dtype), np.floating))
    values = np.array(array_view(arrays[key]), copy=True).reshape(arrays[key].shape)
    if garbage in ("nan", "inf", "huge"):
        values.flat[0] = {"nan": np.nan, "inf": np.inf, "huge": HUGE}[garbage]
        arrays[key] = Array(values)
    elif garbage == "shape":
        arrays[key] = Array(values.reshape(-1)[:-1].copy())
    elif garbage == "dtype":
        arrays[key] = Array(values.astype(np.float64))
    elif garbage == "missing_key":
        del arrays[key]
    elif garbage == "negative_count":
        num_examples = -num_examples
    elif garbage == "absurd_count":
        num_examples = num_examples * 10**9
    else:
        raise ValueError(f"garbage={garbage!r}: choose one of {', '.join(GARBAGE)}")
    return arrays, num_examples

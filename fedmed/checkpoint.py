"""Checkpoints of a run, and continuing a run from one (``fedmed-sim resume=<run folder>``).

At the end of every ``checkpoint.every``-th round (and of the last one, and when a run stops
early) the server writes ``checkpoint.pt`` in the run folder, atomically (a temporary file, then
a rename): the global model, the round, the strategy's state (its seeded sampling generator,
FoolsGold's history, FLTrust's count of reference updates), the simulated clients' persistent
state (DP-SGD accountants, ``fedmed.client_state``), the server process's generators (Python,
NumPy, torch) and the metrics rows so far. Everything else a round uses is derived from the seed
and the round number (client batches, attacks, FLAME's and weak DP's noise), so a run killed after
round k and resumed writes the same metrics.jsonl as one never interrupted (timings aside).

The file holds tensors and plain values only and is read with ``torch.load(weights_only=True)``:
loading it runs no code.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from fedmed import options
from fedmed.datasets import own_keys
from fedmed.serialization import array_from_numpy, array_view

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = "fedmed-checkpoint-1"
# Test hook: SIGKILL this process right after the checkpoint of this round is on disk.
KILL_AFTER_ENV = "FEDMED_TEST_KILL_AFTER_CHECKPOINT"
# Overrides that may accompany `resume=`: how the run is shown, where Ray runs and how long the
# server waits; none changes a number the run computes.
RESUME_OVERRIDES = (
    "resume",
    "progress",
    "checkpoint.every",
    "federation.round_timeout_s",
    "federation.connect_timeout_s",
    "ray.address",
    "ray.num_cpus",
    "ray.model_transport",
    "output_dir",
)


def arrays_to_tensors(arrays: ArrayRecord, copy: bool = True) -> dict[str, torch.Tensor]:
    """The arrays as tensors: copies, or with ``copy=False`` read-only views of the arrays'
    serialised bytes, which must then never be written to (the keeper's snapshot of a round
    only saves them: a copy held one model more, 45 MB for ResNet18, through the whole run)."""
    if copy:
        return {
            key: torch.from_numpy(array_view(array).copy()).reshape(tuple(array.shape)) for key, array in arrays.items()
        }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return {key: torch.from_numpy(array_view(array)).reshape(tuple(array.shape)) for key, array in arrays.items()}


def tensors_to_arrays(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    # t.contiguous(), not np.ascontiguousarray, which makes BatchNorm's 0-d counters 1-d
    return ArrayRecord({key: array_from_numpy(t.contiguous().numpy()) for key, t in tensors.items()})


def generator_states() -> dict:
    """The server process's global generators (Python's ``random``, NumPy's legacy, torch's CPU)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
    }


def restore_generators(states: dict) -> None:
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))


def strategy_state(strategy) -> dict:
    """What the strategy carries between rounds (``strategies.strategy`` / ``strategies.robust_aggregation``)."""
    state = {"sampling": strategy.rng.getstate()}
    aggregator = getattr(strategy, "aggregator", None)
    if aggregator is not None:
        state["aggregator"] = aggregator.state_dict()
    calls = getattr(getattr(strategy, "reference_update", None), "calls", None)
    if calls is not None:
        state["reference_update"] = calls.state_dict()
    return state


def restore_strategy(strategy, state: dict) -> None:
    strategy.rng.setstate(state["sampling"])
    if "aggregator" in state:
        strategy.aggregator.load_state_dict(state["aggregator"])
    if "reference_update" in state:
        strategy.reference_update.calls.load_state_dict(state["reference_update"])


def write_checkpoint(path: Path, state: dict) -> Path:
    partial = path.with_name(path.name + ".partial")
    torch.save({"format": FORMAT, **state}, partial)
    os.replace(partial, path)
    return path


def read_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: the run wrote no checkpoint (it stopped before its "
            "first round ended, or checkpoint.every is larger than the rounds it ran)"
        )
    state = torch.load(path, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fedmed checkpoint ({FORMAT})")
    return state


class CheckpointKeeper:
    """Holds the state at the end of the last complete round and writes it when due.

    ``end_of_round`` is called by the server thread; ``flush`` (write what is not on disk yet)
    and ``close`` (flush, then write nothing more) also by the main thread when the run is
    interrupted. A lock keeps the two from writing at once.
    """

    def __init__(self, path: Path, every: int) -> None:
        if every < 1:
            raise ValueError(f"checkpoint.every={every} must be >= 1")
        self.path = path
        self.every = every
        self.latest: dict | None = None
        self.written_round: int | None = None
        self.closed = False
        self._lock = threading.Lock()

    def end_of_round(self, server_round: int, last_round: int, state: Callable[[], dict]) -> None:
        with self._lock:
            if self.closed:
                return
            self.latest = {"round": server_round, **state()}
            if server_round % self.every == 0 or server_round == last_round:
                self._write()
        kill_after = os.environ.get(KILL_AFTER_ENV)
        if kill_after is not None and int(kill_after) == server_round:
            os.kill(os.getpid(), signal.SIGKILL)

    def _write(self) -> None:
        if self.latest is not None and self.written_round != self.latest["round"]:
            write_checkpoint(self.path, self.latest)
            self.written_round = self.latest["round"]

    def flush(self) -> None:
        with self._lock:
            self._write()

    def close(self) -> None:
        with self._lock:
            self._write()
            self.closed = True


def stopped_summary(output_dir: Path, keeper: CheckpointKeeper, reason: str, wall_time_s: float) -> dict:
    """summary.json of a run that stopped early: the metrics of its last complete round (the
    checkpoint's), ``status: interrupted``, why, and the command that continues it."""
    from fedmed.report import write_summary

    rows = json.loads(keeper.latest["rows"]) if keeper.latest else []
    extra = {
        "status": "interrupted",
        "stop_reason": reason,
        "resume": f"fedmed-sim resume={output_dir.resolve()}" if keeper.written_round is not None else None,
    }
    return write_summary(output_dir / "summary.json", rows, wall_time_s, extra)


def resumed_config(run_dir: Path, cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The run folder's configuration with the few harmless ``overrides`` applied; any other
    override that would change the saved value is refused with its key and both values."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise FileNotFoundError(f"resume={run_dir}: no config.yaml there; give the folder of a fedmed-sim run")
    saved = OmegaConf.load(saved_path)
    # a folder from before each option had its own keys holds the union of every option's keys
    if "dataset" in saved:
        saved.dataset = own_keys(saved.dataset)
    for group in ("defense", "attack", "strategy"):  # as Hydra's ConfigStore holds their options
        option = ConfigStore.instance().repo.get(group, {}).get(f"{saved.get(group, {}).get('name')}.yaml")
        if option is not None:
            saved[group] = options.own_keys(option.node, saved[group])
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key.startswith("hydra.") or key in RESUME_OVERRIDES:
            continue
        ours, theirs = OmegaConf.select(cfg, key, default=None), OmegaConf.select(saved, key, default=None)
        if OmegaConf.is_config(ours):
            ours = OmegaConf.to_container(ours, resolve=True)
        if OmegaConf.is_config(theirs):
            theirs = OmegaConf.to_container(theirs, resolve=True)
        if ours != theirs:
            raise ValueError(
                f"resume={run_dir}: `{override}` would change the experiment (the run has {key}={theirs!r}); "
                f"a resumed run keeps its config.yaml. Only {', '.join(RESUME_OVERRIDES[1:-1])} may change"
            )
    for key in RESUME_OVERRIDES[1:-1]:
        if any(o.split("=", 1)[0].lstrip("+~") == key for o in overrides):
            OmegaConf.update(saved, key, OmegaConf.select(cfg, key), force_add=True)
    saved.resume = str(run_dir)
    saved.output_dir = str(run_dir)
    return saved

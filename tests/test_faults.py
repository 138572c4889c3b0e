"""Faults inside a federation: failing, hanging and garbage-sending clients (``fault=[...]``),
``federation.min_replies``, and the guard against a non-finite aggregate."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from clients.faults import GARBAGE, HUGE, check_faults, garbage_reply
from fedmed.config import FaultConfig
from strategies.findings import RoundFindings
from strategies.replies import MAX_ABS_VALUE, outlying_counts, training_reply_problem, values_problem
from strategies.rounds import NotEnoughReplies, RoundLoop, RunStopped, exchange
from tests.helpers import compose_config

REPO = Path(__file__).resolve().parents[1]


def model_arrays(scale=1.0):
    rng = np.random.default_rng(0)
    return ArrayRecord(
        {"w": Array((rng.standard_normal((4, 3)) * scale).astype(np.float32)), "n": Array(np.array(3, dtype=np.int64))}
    )


def reply(arrays, count):
    return Message(
        RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": count})}),
        dst_node_id=1,
        message_type="train",
    )


@pytest.mark.parametrize("garbage", GARBAGE)
def test_every_garbage_reply_is_rejected_with_its_reason(garbage, task_identity):
    global_arrays = model_arrays()
    arrays, count = garbage_reply(global_arrays, 50, garbage)
    problem = training_reply_problem(reply(arrays, count), global_arrays)
    if garbage == "absurd_count":  # plausible alone; absurd next to the round's other replies
        assert problem is None
        assert outlying_counts([50, 60, count])[:2] == [None, None]
        assert "more than 1000 times the median" in outlying_counts([50, 60, count])[2]
        return
    expected = {
        "nan": "NaN or Inf",
        "inf": "NaN or Inf",
        "huge": "above the limit",
        "shape": "has shape",
        "dtype": "has dtype float64",
        "missing_key": "missing ['w']",
        "negative_count": "not a whole number >= 1: -50",
    }[garbage]
    assert problem is not None and expected in problem, problem
    assert training_reply_problem(reply(global_arrays, 50), global_arrays) is None


def test_magnitude_limit_is_an_explicit_bound():
    assert values_problem(np.array([HUGE, 0.0], dtype=np.float32)).startswith("holds 3e+38 in magnitude")
    assert values_problem(np.array([-2 * MAX_ABS_VALUE], dtype=np.float32)) is not None
    assert values_problem(np.array([MAX_ABS_VALUE, -MAX_ABS_VALUE], dtype=np.float32)) is None
    assert values_problem(np.array([np.nan], dtype=np.float32)) == "holds NaN or Inf"
    assert values_problem(np.array([10**9], dtype=np.int64)) is None  # counters are not weights
    assert outlying_counts([70]) == [None]  # a lone reply has no others to compare with


def test_fault_config_is_checked():
    ok = {"kind": "raise", "partitions": [1], "start_round": 1, "phase": "train", "garbage": "nan", "hang_s": None}
    check_faults([FaultConfig(**ok)], num_clients=2)
    for bad, words in (
        ({"kind": "explode"}, "fault[0].kind"),
        ({"partitions": [2]}, "fault[0].partitions"),
        ({"kind": "garbage", "phase": "evaluate"}, "use phase=train"),
        ({"kind": "garbage", "garbage": "zeros"}, "fault[0].garbage"),
        ({"start_round": 0}, "fault[0].start_round"),
    ):
        with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
            check_faults([FaultConfig(**{**ok, **bad})], num_clients=2)


class FakeGrid:
    """Answers each pushed message with ``answer(message)`` (None: never)."""

    def __init__(self, answer):
        self.answer = answer
        self.pending = {}

    def get_node_ids(self):
        return [11, 12]  # both online: a missing reply is a timeout

    def push_messages(self, messages):
        ids = []
        for i, msg in enumerate(messages):
            mid = f"{msg.metadata.dst_node_id}-{time.monotonic_ns()}-{i}"
            self.pending[mid] = msg
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        out = []
        for mid in list(ids):
            msg = self.pending.pop(mid, None)
            if msg is not None and (answer := self.answer(msg)) is not None:
                answer.metadata.__dict__["_reply_to_message_id"] = mid
                out.append(answer)
        return out


class FakeStrategy:
    """Two partitions; the aggregate is whatever ``make_aggregate`` returns."""

    clients_per_round = 2

    def __init__(self, make_aggregate):
        self.partition_of_node = {11: 0, 12: 1}
        self.make_aggregate = make_aggregate
        self.findings: dict[int, RoundFindings] = {}

    def findings_of(self, server_round):
        return self.findings.setdefault(server_round, RoundFindings(server_round))

    def take_findings(self, server_round):
        return self.findings.pop(server_round, RoundFindings(server_round))

    def configure_train(self, server_round, arrays, config, grid):
        return [
            Message(RecordDict({"config": ConfigRecord()}), dst_node_id=n, message_type="train")
            for n in self.partition_of_node
        ]

    def configure_evaluate(self, server_round, arrays, config, grid):
        return []

    def aggregate_train(self, server_round, replies):
        self.findings_of(server_round).clients = [{} for _ in replies]
        return self.make_aggregate(), None

    def aggregate_evaluate(self, server_round, replies):
        return None


def answer_all(msg):
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)


def test_non_finite_aggregate_is_never_installed(task_identity, caplog):
    bad = ArrayRecord({"w": Array(np.array([1.0, np.inf], dtype=np.float32))})
    loop = RoundLoop(FakeStrategy(lambda: bad), FakeGrid(answer_all), timeout=5, min_replies=1)
    start = model_arrays()
    evaluated = {}
    final = loop.run(
        start,
        first_round=1,
        num_rounds=2,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
        evaluate_fn=lambda r, a, findings: evaluated.setdefault(r, (a, findings)),
    )
    assert final is start and {r: a for r, (a, _) in evaluated.items()} == {1: start, 2: start}
    assert "NaN or Inf in 1 arrays (first: w)" in loop.skipped[1]
    # the server app gets the skip with the round's findings
    assert evaluated[1][1].skipped == loop.skipped[1] and evaluated[1][1].server_round == 1
    assert "the round is skipped and the previous global model kept" in caplog.text


def test_missing_replies_are_failures_and_too_few_stop_the_run(task_identity):
    # node 12 never answers: a failure by timeout; with min_replies=2 the round cannot complete
    grid = FakeGrid(lambda m: answer_all(m) if m.metadata.dst_node_id == 11 else None)
    loop = RoundLoop(FakeStrategy(model_arrays), grid, timeout=0.3, min_replies=1)
    evaluated = {}
    loop.run(
        model_arrays(),
        first_round=1,
        num_rounds=1,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
        evaluate_fn=lambda r, a, findings: evaluated.setdefault(r, findings),
    )
    assert [(f["partition_id"], f["phase"]) for f in loop.failures[1]] == [(1, "train")]
    assert evaluated[1].failures == loop.failures[1]
    assert "no reply within federation.round_timeout_s=0.3" in loop.failures[1][0]["reason"] and loop.timed_out
    loop = RoundLoop(FakeStrategy(model_arrays), grid, timeout=0.3, min_replies=2)
    with pytest.raises(NotEnoughReplies, match="1 valid training replies, fewer than federation.min_replies=2"):
        loop.run(
            model_arrays(),
            first_round=1,
            num_rounds=1,
            train_config=ConfigRecord(),
            evaluate_config=ConfigRecord(),
            evaluate_fn=lambda r, a, findings: None,
        )


def test_a_stop_request_ends_the_wait_for_replies_at_once(task_identity):
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    with pytest.raises(RunStopped):
        exchange(FakeGrid(lambda m: None), [Message(RecordDict(), dst_node_id=1, message_type="train")], 60, stop)
    assert time.monotonic() - started < 2


GARBAGE_FAULTS = ",".join(f"{{kind:garbage,garbage:{g},partitions:[{i}]}}" for i, g in enumerate(GARBAGE))


@pytest.mark.slow
def test_faulty_clients_inside_a_federation(tmp_path, on_cluster):
    """11 clients in one federation: partitions 0-7 send each kind of garbage, 8 raises in
    training, 9 raises in its local evaluation and 10 is honest; from round 2 on, 10 raises
    too, which leaves one valid reply: fewer than federation.min_replies=2, so the run stops
    with a checkpoint of round 1 and a summary marked interrupted."""
    from fedmed.runner import run

    faults = (
        GARBAGE_FAULTS + ",{kind:raise,partitions:[8]},{kind:raise,phase:evaluate,partitions:[9]}"
        ",{kind:raise,partitions:[10],start_round:2}"
    )
    cfg = compose_config(
        *on_cluster,
        "federation.num_clients=11",
        "federation.clients_per_round=11",
        "federation.rounds=2",
        "federation.min_replies=2",
        "federation.fraction_evaluate=1.0",
        "eval.attacks=[]",
        "dataset.n_train=440",
        "progress=false",
        f"output_dir={tmp_path}",
        f"fault=[{faults}]",
    )
    with pytest.raises(NotEnoughReplies, match="round 2: 1 valid training replies"):
        run(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    row = rows[1]
    assert [c["partition-id"] for c in row["clients"]] == [9, 10]  # the round completed with these
    reasons = {r["partition_id"]: r["reason"] for r in row["rejected"]}
    assert sorted(reasons) == list(range(8))
    for pid, words in enumerate(
        [
            "NaN or Inf",
            "NaN or Inf",
            "3e+38 in magnitude",
            "has shape",
            "dtype float64",
            "missing ['backbone.conv1.weight']",
            "not a whole number >= 1",
            "more than 1000 times the median",
        ]
    ):
        assert words in reasons[pid], (pid, reasons[pid])
    failures = {(f["partition_id"], f["phase"]): f["reason"] for f in row["failures"]}
    assert failures == {
        (8, "train"): "client raised: injected fault: partition 8 raises in train, round 1",
        (9, "evaluate"): "client raised: injected fault: partition 9 raises in evaluate, round 1",
    }
    assert np.isfinite(row["loss"]) and row["accuracy"] is not None
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "federation.min_replies=2" in summary["stop_reason"]
    assert summary["rounds"] == 1 and summary["resume"] == f"fedmed-sim resume={tmp_path.resolve()}"
    from fedmed.checkpoint import read_checkpoint

    assert read_checkpoint(tmp_path / "checkpoint.pt")["round"] == 1


@pytest.mark.slow
def test_a_hanging_client_times_out_and_the_run_still_ends(tmp_path):
    """Partition 1 hangs for good from round 1 (a real, never-returning Ray actor call). Each
    round completes with partition 0 after federation.round_timeout_s, the timeout is recorded
    in metrics.jsonl, and the process exits 0 although two Ray workers are still stuck."""
    command = [
        sys.executable,
        "-m",
        "fedmed",
        "federation.num_clients=2",
        "federation.clients_per_round=2",
        "federation.rounds=2",
        "federation.round_timeout_s=15",
        "ray.num_cpus=3",
        "eval.attacks=[]",
        "dataset.n_train=200",
        "progress=false",
        f"output_dir={tmp_path}",
        f"hydra.run.dir={tmp_path}",
        "fault=[{kind:hang,partitions:[1]}]",
    ]
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = process.communicate(timeout=400)
    finally:
        process.kill()
    assert process.returncode == 0, output[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for row in rows[1:]:
        assert [c["partition-id"] for c in row["clients"]] == [0]
        assert [(f["partition_id"], f["reason"]) for f in row["failures"]] == [
            (1, "no reply within federation.round_timeout_s=15")
        ]
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "completed"

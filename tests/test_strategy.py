"""The server's FedAvg: reply validation, failed clients, seeded sampling, aggregation order."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from fedmed.job import ASSESS_KEY
from strategies.strategy import FedMedStrategy

pytestmark = pytest.mark.usefixtures("task_identity")


NODES = {101: 0, 202: 1, 303: 2, 404: 3}


def arrays(*values: np.ndarray) -> ArrayRecord:
    return ArrayRecord({f"w{i}": Array(v) for i, v in enumerate(values)})


GLOBAL = arrays(np.zeros((2, 3), np.float32), np.zeros(4, np.float32))


def reply(node: int, record: ArrayRecord, num_examples=10, extra: dict | None = None) -> Message:
    ins = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    metrics = MetricRecord(
        {"num-examples": num_examples, "partition-id": NODES[node], "train_loss": 1.0, **(extra or {})}
    )
    return Message(RecordDict({"arrays": record, "metrics": metrics}), reply_to=ins)


def failed(node: int) -> Message:
    ins = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(Error(code=0, reason="CUDA out of memory"), reply_to=ins)


def strategy(clients_per_round=4, seed=0) -> FedMedStrategy:
    s = FedMedStrategy(NODES, clients_per_round=clients_per_round, seed=seed)
    list(s.configure_train(1, GLOBAL, ConfigRecord(), grid=None))
    return s


def good(value: float) -> ArrayRecord:
    return arrays(np.full((2, 3), value, np.float32), np.full(4, value, np.float32))


def test_weighted_average_of_valid_replies():
    s = strategy()
    agg, metrics = s.aggregate_train(1, [reply(101, good(1.0), 10), reply(202, good(4.0), 30)])
    np.testing.assert_allclose(agg["w0"].numpy(), np.full((2, 3), 3.25))
    assert "partition-id" not in metrics
    assert [c["partition-id"] for c in s.findings_of(1).clients] == [0, 1]


def test_a_rounds_findings_are_handed_over_and_not_kept():
    s = strategy()
    s.aggregate_train(1, [reply(101, good(1.0), 10), reply(202, good(np.nan), 30)])
    s.aggregate_evaluate(1, [])
    findings = s.take_findings(1)
    assert findings.server_round == 1 and [c["partition-id"] for c in findings.clients] == [0]
    assert [r.partition_id for r in findings.rejected] == [1] and "NaN" in findings.rejected[0].reason
    assert vars(findings.detection) == {"scores": {0: 0.0}, "flagged": []}
    assert findings.train_step_time_s >= 0 and findings.client_eval == []
    assert s.findings_of(1).clients == []  # nothing of round 1 stayed in the strategy


@pytest.mark.parametrize(
    "bad, reason",
    [
        (arrays(np.full((2, 3), np.nan, np.float32), np.zeros(4, np.float32)), "NaN or Inf"),
        (arrays(np.zeros((2, 3), np.float32), np.full(4, np.inf, np.float32)), "NaN or Inf"),
        (arrays(np.zeros((3, 2), np.float32), np.zeros(4, np.float32)), "shape"),
        (arrays(np.zeros((2, 3), np.float32)), "keys differ"),
    ],
)
def test_bad_replies_are_rejected_and_never_aggregated(bad, reason):
    s = strategy()
    agg, _ = s.aggregate_train(1, [reply(101, good(1.0)), reply(202, bad), reply(303, good(3.0))])
    np.testing.assert_allclose(agg["w0"].numpy(), np.full((2, 3), 2.0))
    assert np.isfinite(agg["w1"].numpy()).all()
    (rejection,) = s.findings_of(1).rejected
    assert rejection.partition_id == 1 and reason in rejection.reason


def test_zero_examples_and_failed_clients_do_not_stop_the_round():
    s = strategy()
    agg, _ = s.aggregate_train(1, [failed(404), reply(101, good(2.0)), reply(202, good(9.0), num_examples=0)])
    np.testing.assert_allclose(agg["w1"].numpy(), np.full(4, 2.0))
    reasons = {r.partition_id: r.reason for r in s.findings_of(1).rejected}
    assert "CUDA out of memory" in reasons[3] and "num-examples" in reasons[1]


def test_round_with_only_bad_replies_keeps_the_global_model():
    s = strategy()
    agg, metrics = s.aggregate_train(1, [failed(101), failed(202)])
    assert agg is None and metrics is None and len(s.findings_of(1).rejected) == 2


def test_aggregation_does_not_depend_on_reply_order():
    values = [np.random.default_rng(i).normal(size=(2, 3)).astype(np.float32) for i in range(4)]
    replies = [reply(n, arrays(v, v[0].repeat(2)[:4]), 7 + i) for i, (n, v) in enumerate(zip(NODES, values))]
    a, _ = strategy().aggregate_train(1, replies)
    b, _ = strategy().aggregate_train(1, list(reversed(replies)))
    assert np.array_equal(a["w0"].numpy(), b["w0"].numpy())


def test_sampling_is_seeded_by_partition_not_node_id():
    picks = [strategy(clients_per_round=2, seed=3).sample_partitions(2) for _ in range(3)]
    assert picks[0] == picks[1] == picks[2]
    other = {tuple(strategy(clients_per_round=2, seed=s).sample_partitions(2)) for s in range(10)}
    assert len(other) > 1
    # The same partitions are drawn whatever ids the nodes got in this run.
    renamed = {n + 7: p for n, p in NODES.items()}
    first = FedMedStrategy(NODES, clients_per_round=2, seed=3).sample_partitions(2)
    first_renamed = FedMedStrategy(renamed, clients_per_round=2, seed=3).sample_partitions(2)
    assert [renamed[n] for n in first_renamed] == [NODES[n] for n in first]


def test_clients_per_round_out_of_range_is_refused():
    with pytest.raises(ValueError, match="clients_per_round"):
        FedMedStrategy(NODES, clients_per_round=5, seed=0)


@pytest.mark.parametrize("max_clients, expected", [(None, 4), (2, 2), (10, 4)])
def test_the_final_assessment_asks_at_most_eval_max_clients(max_clients, expected):
    """A federation of 1000 need not make 1000 assessment calls after its last round."""
    s = FedMedStrategy(
        NODES, clients_per_round=2, seed=0, assess_round=lambda r: r == 3, assess_max_clients=max_clients
    )
    assessed = list(s.configure_evaluate(3, GLOBAL, ConfigRecord(), grid=None))
    assert len(assessed) == expected
    assert len({m.metadata.dst_node_id for m in assessed}) == expected
    assert all(m.content["config"][ASSESS_KEY] for m in assessed)
    # a round without assessment is unchanged: fraction_evaluate=0 sends nothing
    assert list(s.configure_evaluate(2, GLOBAL, ConfigRecord(), grid=None)) == []

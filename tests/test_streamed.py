"""FedAvg read, checked and added one reply at a time (strategies/streamed.py) gives Flower's
FedAvg bit for bit, also when a reply is rejected for its values in the middle of the sum, with
the replies' arrays in the messages or in files of shared memory."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedmed.shared_arrays import ARRAYS_FILE_KEY, ArraysFile, SharedArrays, write_arrays
from strategies import streamed
from strategies.strategy import FedMedStrategy

pytestmark = pytest.mark.usefixtures("task_identity")

NODES = {100 + p: p for p in range(6)}


def model(rng: np.random.Generator, scale: float = 1.0) -> ArrayRecord:
    return ArrayRecord(
        {
            "conv.weight": Array((rng.normal(size=(4, 3, 3, 3)) * scale).astype(np.float32)),
            "bn.running_var": Array(rng.uniform(0.5, 2.0, size=4).astype(np.float32)),
            "bn.num_batches_tracked": Array(np.array(int(rng.integers(1, 50)), np.int64)),
            "fc.bias": Array((rng.normal(size=3) * scale).astype(np.float32)),
        }
    )


GLOBAL = model(np.random.default_rng(99))


def with_nan(record: ArrayRecord) -> ArrayRecord:
    values = record["fc.bias"].numpy().copy()
    values[1] = np.nan
    return ArrayRecord({**dict(record.items()), "fc.bias": Array(values)})


def content(record: ArrayRecord, pid: int, count: int) -> RecordDict:
    metrics = MetricRecord({"num-examples": count, "partition-id": pid, "train_loss": 0.5 + pid})
    return RecordDict({"arrays": record, "metrics": metrics})


def reply(pid: int, body: RecordDict) -> Message:
    ins = Message(RecordDict(), dst_node_id=100 + pid, message_type=MessageType.TRAIN)
    return Message(body, reply_to=ins)


def file_reply(pid: int, body: RecordDict, directory) -> Message:
    """The same reply as a simulated client sends it: its arrays in a file, the path in a ConfigRecord."""
    path = write_arrays(body["arrays"], directory / f"reply-{pid}.bin")
    return reply(
        pid, RecordDict({"arrays-file": ConfigRecord({ARRAYS_FILE_KEY: str(path)}), "metrics": body["metrics"]})
    )


def ours(shared: SharedArrays | None = None) -> FedMedStrategy:
    s = FedMedStrategy(NODES, clients_per_round=len(NODES), seed=0, shared_arrays=shared)
    list(s.configure_train(1, GLOBAL, ConfigRecord(), grid=None))
    return s


def flower(bodies: dict[int, RecordDict]) -> ArrayRecord:
    """Flower's FedAvg over these replies, in partition order."""
    arrays, _ = FedAvg().aggregate_train(1, [reply(pid, bodies[pid]) for pid in sorted(bodies)])
    return arrays


def assert_bit_equal(got: ArrayRecord, expected: ArrayRecord) -> None:
    assert list(got.keys()) == list(expected.keys())
    for key, array in expected.items():
        assert (got[key].dtype, tuple(got[key].shape)) == (array.dtype, tuple(array.shape)), key
        assert got[key].numpy().tobytes() == array.numpy().tobytes(), key


def round_bodies(seed: int = 0) -> dict[int, RecordDict]:
    rng = np.random.default_rng(seed)
    counts = [5, 4, 471, 5, 13, 4]
    return {pid: content(model(rng, scale=1 + pid), pid, count) for pid, count in enumerate(counts)}


@pytest.mark.parametrize("in_files", [False, True])
def test_streamed_fedavg_equals_flowers_bit_for_bit(in_files, tmp_path):
    bodies = round_bodies()
    shared = SharedArrays(tmp_path) if in_files else None
    order = [3, 0, 5, 1, 4, 2]  # arrival order: the sum is in partition order all the same
    replies = [file_reply(p, bodies[p], tmp_path) if in_files else reply(p, bodies[p]) for p in order]
    got, metrics = ours(shared).aggregate_train(1, replies)
    assert_bit_equal(got, flower(bodies))
    _, flower_metrics = FedAvg().aggregate_train(1, [reply(p, bodies[p]) for p in sorted(bodies)])
    assert metrics["train_loss"] == flower_metrics["train_loss"]
    if in_files:
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith("reply-")] == []


@pytest.mark.parametrize("in_files", [False, True])
def test_a_reply_rejected_for_nan_in_the_middle_leaves_flowers_fedavg_of_the_others(in_files, tmp_path):
    """The NaN is found only while summing, after the weights were computed with its count: the
    sum starts again over the others, so the weights are those of the accepted replies."""
    bodies = round_bodies(1)
    bodies[2] = content(with_nan(bodies[2]["arrays"]), 2, 471)  # the largest weight, read third
    shared = SharedArrays(tmp_path) if in_files else None
    replies = [file_reply(p, bodies[p], tmp_path) if in_files else reply(p, bodies[p]) for p in sorted(bodies)]
    s = ours(shared)
    got, _ = s.aggregate_train(1, replies)
    accepted = {p: b for p, b in bodies.items() if p != 2}
    assert_bit_equal(got, flower(accepted))
    (rejection,) = s.findings_of(1).rejected
    assert rejection.partition_id == 2 and "NaN or Inf" in rejection.reason
    assert [m["partition-id"] for m in s.findings_of(1).clients] == [0, 1, 3, 4, 5]
    assert vars(s.findings_of(1).detection) == {"scores": {p: 0.0 for p in accepted}, "flagged": []}
    if in_files:
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith("reply-")] == []


def test_after_a_failed_sum_every_reply_is_checked_before_the_next(tmp_path, monkeypatch):
    """Two bad replies cost one restart, not two: after the first failure the values of all the
    others are checked before the sum starts again."""
    bodies = round_bodies(2)
    for p in (1, 4):
        bodies[p] = content(with_nan(bodies[p]["arrays"]), p, 5)
    sums = []
    real = streamed.weighted_sum
    monkeypatch.setattr(
        "strategies.strategy.weighted_sum",
        lambda kept, factors, consume=False: sums.append(len(kept)) or real(kept, factors, consume),
    )
    s = ours(SharedArrays(tmp_path))
    got, _ = s.aggregate_train(1, [file_reply(p, bodies[p], tmp_path) for p in sorted(bodies)])
    assert_bit_equal(got, flower({p: b for p, b in bodies.items() if p not in (1, 4)}))
    assert sums == [6, 4]  # the second sum already without both
    assert sorted(r.partition_id for r in s.findings_of(1).rejected) == [1, 4]


def test_an_outlying_count_is_judged_among_replies_that_passed_their_own_checks():
    """As before streaming: counts are compared among replies whose values are fine. Here the
    NaN reply's tiny count would make 2000 an outlier (median 1); without it the median is 1000."""
    rng = np.random.default_rng(3)
    bodies = {0: content(model(rng), 0, 1), 1: content(model(rng), 1, 1000), 2: content(model(rng), 2, 2000)}
    bodies[0] = content(with_nan(bodies[0]["arrays"]), 0, 1)
    s = ours()
    got, _ = s.aggregate_train(1, [reply(p, bodies[p]) for p in sorted(bodies)])
    assert_bit_equal(got, flower({1: bodies[1], 2: bodies[2]}))
    (rejection,) = s.findings_of(1).rejected
    assert rejection.partition_id == 0 and "NaN" in rejection.reason


def test_an_outlier_with_nan_is_rejected_for_its_values():
    rng = np.random.default_rng(4)
    bodies = {p: content(model(rng), p, 10) for p in range(3)}
    bodies[1] = content(with_nan(bodies[1]["arrays"]), 1, 10**6)
    s = ours()
    got, _ = s.aggregate_train(1, [reply(p, bodies[p]) for p in sorted(bodies)])
    assert_bit_equal(got, flower({0: bodies[0], 2: bodies[2]}))
    (rejection,) = s.findings_of(1).rejected
    assert rejection.partition_id == 1 and "NaN or Inf" in rejection.reason


def test_a_file_cut_short_is_rejected_and_deleted(tmp_path):
    rng = np.random.default_rng(5)
    bodies = {p: content(model(rng), p, 10) for p in range(3)}
    s = ours(SharedArrays(tmp_path))
    replies = [file_reply(p, bodies[p], tmp_path) for p in range(3)]
    cut = tmp_path / "reply-1.bin"
    cut.write_bytes(cut.read_bytes()[:-3])
    got, _ = s.aggregate_train(1, replies)
    assert_bit_equal(got, flower({0: bodies[0], 2: bodies[2]}))
    (rejection,) = s.findings_of(1).rejected
    assert rejection.partition_id == 1 and "truncated at array 'fc.bias'" in rejection.reason
    assert not cut.exists()


def test_replies_checked_on_arrival_are_summed_reading_each_file_once_and_freeing_it(tmp_path, monkeypatch):
    """What the round loop does in simulation: each reply file is checked as it comes in, so
    the sum cannot fail and consumes the files (cut short behind each Array read)."""
    bodies = round_bodies(6)
    bodies[3] = content(with_nan(bodies[3]["arrays"]), 3, 5)
    s = ours(SharedArrays(tmp_path))
    replies = [file_reply(p, bodies[p], tmp_path) for p in sorted(bodies)]
    for p, msg in enumerate(replies):
        msg.metadata.__dict__["_message_id"] = f"reply-{p}"
        s.reply_arrived(msg)
    sums = []
    real = streamed.weighted_sum
    monkeypatch.setattr(
        "strategies.strategy.weighted_sum",
        lambda kept, factors, consume=False: sums.append(consume) or real(kept, factors, consume),
    )
    got, _ = s.aggregate_train(1, replies)
    assert_bit_equal(got, flower({p: b for p, b in bodies.items() if p != 3}))
    assert sums == [True]  # one sum, consuming the files
    (rejection,) = s.findings_of(1).rejected
    assert rejection.partition_id == 3 and "NaN or Inf" in rejection.reason
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("reply-")] == []


def test_consuming_a_file_gives_its_arrays_last_first_and_frees_it(tmp_path):
    record = model(np.random.default_rng(7))
    path = write_arrays(record, tmp_path / "r.bin")
    arrays_file = ArraysFile(path)
    sizes = []
    read = {}
    for key, array in arrays_file.consume():
        read[key] = array
        sizes.append(path.stat().st_size)
    assert list(read) == list(reversed(list(record.keys())))
    assert all(read[key].data == array.data for key, array in record.items())
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] == arrays_file._start

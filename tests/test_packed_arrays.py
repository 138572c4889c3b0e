"""Models packed into one Array when they travel inside messages (fedmed/packed_arrays.py):
byte-exact round trips, a handful of Flower objects instead of one per tensor, clear refusals of
damaged packs, and the server and clients packing and unpacking on their side."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from clients.client_app import train
from fedmed.models import build_model
from fedmed.packed_arrays import PACKED_KEY, is_packed, pack, unpack, unpack_reply
from fedmed.serialization import model_to_arrays
from strategies.aggregators import make_aggregator
from strategies.robust_aggregation import RobustAggregation
from strategies.strategy import FedMedStrategy
from tests.test_client_app import context, job, message

pytestmark = pytest.mark.usefixtures("task_identity")


def odd_record() -> ArrayRecord:
    rng = np.random.default_rng(0)
    return ArrayRecord(
        {
            "z.conv": Array(rng.normal(size=(3, 2, 2)).astype(np.float32)),
            "a.half": Array(np.float16([1.5, -2.0])),
            "m.count": Array(np.array(9, np.int64)),
            "empty": Array(np.zeros((0, 3), np.float32)),
            "be": Array(np.arange(3, dtype=">f4")),
        }
    )


def described(record: ArrayRecord) -> list[tuple]:
    return [(key, array.dtype, tuple(array.shape), array.stype, array.data) for key, array in record.items()]


def test_pack_and_unpack_give_the_record_back_byte_for_byte():
    original = odd_record()
    packed = pack(original)
    assert list(packed.keys()) == [PACKED_KEY] and is_packed(packed)
    back = unpack(packed)
    assert described(back) == described(original)
    assert unpack(original) is original  # a record that is not packed stays as it is


def flower_objects(record: ArrayRecord) -> int:
    """How many objects Flower moves, each in its own request, for a message holding ``record``
    (a private helper of Flower's, used by its own transport)."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return len(get_all_nested_objects(Message(RecordDict({"arrays": record}), dst_node_id=1, message_type="train")))


def test_a_packed_resnet18_is_a_handful_of_flower_objects():
    arrays = model_to_arrays(build_model("resnet18", 3, 1))
    assert len(arrays) > 100  # one Array per tensor of the state dict
    plain, packed = flower_objects(arrays), flower_objects(pack(arrays))
    assert plain > 50  # each Array and each chunk of one (identical ones shared) is an object
    # 45 MB in 5 MB chunks, the Array, the ArrayRecord, the RecordDict and the Message
    assert packed <= 15, packed


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda data: data[:-5], "end inside array 'be'"),
        (lambda data: data + b"\0\0", "2 bytes after their last array"),
        (lambda data: b"\xff" * 8 + data[8:], "not a fedmed arrays file"),
        (lambda data: data[:8] + b"[" + data[9:], "not a fedmed arrays file"),
        (lambda data: b"", "not a fedmed arrays file"),
    ],
)
def test_a_damaged_pack_is_refused_with_what_is_wrong(damage, words):
    data = damage(pack(odd_record())[PACKED_KEY].data)
    damaged = ArrayRecord({PACKED_KEY: Array(dtype="uint8", shape=(len(data),), stype="fedmed.arrayrecord", data=data)})
    with pytest.raises(ValueError, match=words):
        unpack(damaged)
    reply = Message(RecordDict({"arrays": damaged, "metrics": MetricRecord({"num-examples": 5})}), 1, "train")
    assert words in unpack_reply(reply)


def arrays_reply(arrays: ArrayRecord, count: int, pid: int) -> Message:
    return Message(
        RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": count, "partition-id": pid})}),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )


@pytest.mark.parametrize("rule", ["fedavg", "fedmedian"])
def test_server_sends_packed_models_and_aggregates_packed_replies(rule):
    """FedAvg reads replies one at a time (strategies/streamed.py), robust rules stack them
    (strategies/robust_aggregation.py): both unpack; with two replies the median is their mean."""
    nodes = {101: 0, 202: 1}
    one = ArrayRecord({"w": Array(np.full(3, 1.0, np.float32))})
    three = ArrayRecord({"w": Array(np.full(3, 3.0, np.float32))})
    if rule == "fedavg":
        strategy = FedMedStrategy(nodes, clients_per_round=2, seed=0)
    else:
        strategy = RobustAggregation(nodes, clients_per_round=2, seed=0, aggregator=make_aggregator(rule))
    sent = list(strategy.configure_train(1, one, ConfigRecord(), grid=None))
    assert all(is_packed(m.content["arrays"]) and unpack(m.content["arrays"])["w"].data == one["w"].data for m in sent)
    # one reply packed, one not (any client of the same app packs; both are read)
    replies = [arrays_reply(pack(three), 10, 0), arrays_reply(one, 30, 1)]
    averaged, _ = strategy.aggregate_train(1, replies)
    assert np.allclose(averaged["w"].numpy(), 1.5 if rule == "fedavg" else 2.0)
    # a damaged pack is rejected with its reason, the round goes on with the others
    bad = pack(three)
    bad[PACKED_KEY] = Array(dtype="uint8", shape=(3,), stype="fedmed.arrayrecord", data=b"abc")
    list(strategy.configure_train(2, one, ConfigRecord(), grid=None))
    averaged, _ = strategy.aggregate_train(2, [arrays_reply(bad, 10, 0), arrays_reply(pack(three), 30, 1)])
    assert np.allclose(averaged["w"].numpy(), 3.0)
    rejected = strategy.take_findings(2).rejected
    assert [(r.partition_id, "packed arrays could not be read" in r.reason) for r in rejected] == [(0, True)]


def test_deployed_client_unpacks_the_model_and_packs_its_reply():
    job_dict = job()
    msg = message(MessageType.TRAIN, job_dict)
    sent = msg.content["arrays"]
    msg.content["arrays"] = pack(sent)
    reply = train(msg, context({"partition-id": 0, "num-partitions": 2}))
    assert is_packed(reply.content["arrays"])
    returned = unpack(reply.content["arrays"])
    assert list(returned.keys()) == list(sent.keys())
    assert any(not np.array_equal(sent[k].numpy(), returned[k].numpy()) for k in sent.keys())

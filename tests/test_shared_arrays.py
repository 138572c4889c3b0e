"""Models as files in shared memory (simulation on one machine): byte-exact round trips, the
server's bookkeeping of the files, and the same aggregate as when arrays travel in messages."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from omegaconf import OmegaConf

from clients.client_app import train
from fedmed.packed_arrays import unpack
from fedmed.runner import uses_shared_arrays
from fedmed.shared_arrays import (
    ARRAYS_FILE_KEY,
    SharedArrays,
    read_arrays,
    remove_orphans,
    shared_directory,
    write_arrays,
)
from strategies.strategy import FedMedStrategy
from tests.test_client_app import context, job, message

pytestmark = pytest.mark.usefixtures("task_identity")

NODES = {101: 0, 202: 1}


def record(value: float) -> ArrayRecord:
    return ArrayRecord(
        {
            "w": Array(np.full((2, 3), value, np.float32)),
            "b": Array(np.full(4, value, np.float64)),
            "steps": Array(np.array(7, np.int64)),
        }
    )


def test_write_and_read_give_the_record_back_byte_for_byte(tmp_path):
    rng = np.random.default_rng(0)
    original = ArrayRecord(
        {
            "z.conv": Array(rng.normal(size=(3, 2, 2)).astype(np.float32)),
            "a.half": Array(np.float16([1.5, -2.0])),
            "m.count": Array(np.array(9, np.int64)),
            "empty": Array(np.zeros((0, 3), np.float32)),
            "be": Array(np.arange(3, dtype=">f4")),
        }
    )
    back = read_arrays(write_arrays(original, tmp_path / "model.safetensors"))
    assert list(back.keys()) == list(original.keys())
    for key, array in original.items():
        assert (back[key].dtype, back[key].shape, back[key].stype, back[key].data) == (
            array.dtype,
            array.shape,
            array.stype,
            array.data,
        )
    assert not list(tmp_path.glob("*.partial"))


def test_array_from_numpy_matches_flowers_bytes_and_load_arrays_restores_a_model():
    import torch

    from fedmed.models import build_model
    from fedmed.serialization import array_from_numpy, load_arrays, model_to_arrays

    rng = np.random.default_rng(0)
    for values in (
        rng.normal(size=(3, 4)).astype(np.float32),
        np.array(7, np.int64),
        np.zeros((0, 3), np.float16),
        np.arange(3, dtype=">f4"),
        np.asfortranarray(rng.normal(size=(3, 4))),
        rng.normal(size=(2, 3))[:, 1],
    ):
        ours, flowers = array_from_numpy(values), Array(values)
        assert (ours.dtype, ours.shape, ours.stype, ours.data) == (
            flowers.dtype,
            flowers.shape,
            flowers.stype,
            flowers.data,
        )
    source, target = build_model("resnet18", 3, 1), build_model("resnet18", 3, 1)
    load_arrays(target, model_to_arrays(source))
    for (key, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), key


def test_truncated_or_padded_files_are_refused(tmp_path):
    path = write_arrays(record(1.0), tmp_path / "model.bin")
    whole = path.read_bytes()
    path.write_bytes(whole[:-5])
    with pytest.raises(ValueError, match="truncated at array 'steps'"):
        read_arrays(path)
    path.write_bytes(whole + b"xx")
    with pytest.raises(ValueError, match="2 bytes after its last array"):
        read_arrays(path)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="not a fedmed arrays file"):
        read_arrays(path)


def test_a_file_that_is_not_ours_is_refused(tmp_path):
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(3, np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a fedmed arrays file"):
        read_arrays(tmp_path / "other.safetensors")


def test_shared_directory_is_private_and_new(tmp_path):
    first, second = shared_directory(1 << 20), shared_directory(1 << 20)
    try:
        assert first != second and first.is_dir() and (first.stat().st_mode & 0o077) == 0
    finally:
        SharedArrays(first).close()
        SharedArrays(second).close()
    assert not first.exists()


def test_directories_of_killed_runs_are_removed(tmp_path):
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    ).stdout.strip()
    orphan, mine, other = (
        tmp_path / f"fedmed-arrays-{gone}-abc",
        tmp_path / f"fedmed-arrays-{os.getpid()}-def",
        tmp_path / "unrelated",
    )
    for directory in (orphan, mine, other):
        directory.mkdir()
        (directory / "global-1.bin").write_bytes(b"x")
    assert remove_orphans(tmp_path) == [orphan]
    assert not orphan.exists() and mine.exists() and other.exists()


def strategy(shared: SharedArrays | None) -> FedMedStrategy:
    return FedMedStrategy(NODES, clients_per_round=2, seed=0, shared_arrays=shared)


def reply_to(ins: Message, content: RecordDict) -> Message:
    return Message(content, reply_to=ins)


def file_reply(ins: Message, rec: ArrayRecord, pid: int, directory) -> Message:
    path = write_arrays(rec, directory / f"reply-{pid}.safetensors")
    return reply_to(
        ins,
        RecordDict(
            {
                "arrays-file": ConfigRecord({ARRAYS_FILE_KEY: str(path)}),
                "metrics": MetricRecord({"num-examples": 10 * (pid + 1), "partition-id": pid}),
            }
        ),
    )


def test_strategy_sends_a_path_and_aggregates_file_replies_like_message_replies(tmp_path):
    shared = SharedArrays(tmp_path)
    global_arrays = record(0.0)
    with_files = strategy(shared)
    messages = list(with_files.configure_train(1, global_arrays, ConfigRecord(), grid=None))
    assert all(len(m.content.array_records) == 0 for m in messages)
    paths = {m.content["config"][ARRAYS_FILE_KEY] for m in messages}
    assert len(paths) == 1  # one file per round, whatever the number of clients
    sent = read_arrays(Path(paths.pop()))
    assert all(sent[k].data == global_arrays[k].data for k in global_arrays.keys())
    by_file, _ = with_files.aggregate_train(
        1, [file_reply(m, record(float(i + 1)), i, tmp_path) for i, m in enumerate(messages)]
    )
    # reply files are deleted once read, and the round's model file once the replies are in
    assert list(tmp_path.iterdir()) == []

    in_messages = strategy(None)
    plain = list(in_messages.configure_train(1, global_arrays, ConfigRecord(), grid=None))
    assert all("arrays" in m.content for m in plain)
    by_message, _ = in_messages.aggregate_train(
        1,
        [
            reply_to(
                m,
                RecordDict(
                    {
                        "arrays": record(float(i + 1)),
                        "metrics": MetricRecord({"num-examples": 10 * (i + 1), "partition-id": i}),
                    }
                ),
            )
            for i, m in enumerate(plain)
        ],
    )
    for key in global_arrays.keys():
        np.testing.assert_array_equal(by_file[key].numpy(), by_message[key].numpy())
    np.testing.assert_allclose(by_file["w"].numpy(), np.full((2, 3), (1 * 10 + 2 * 20) / 30))


def test_missing_or_foreign_reply_files_are_rejected(tmp_path, caplog):
    shared = SharedArrays(tmp_path / "run")
    (tmp_path / "run").mkdir()
    s = strategy(shared)
    messages = list(s.configure_train(1, record(0.0), ConfigRecord(), grid=None))
    gone = file_reply(messages[0], record(1.0), 0, tmp_path / "run")
    (tmp_path / "run" / "reply-0.safetensors").unlink()
    outside = file_reply(messages[1], record(1.0), 1, tmp_path)
    out, _ = s.aggregate_train(1, [gone, outside])
    assert out is None
    reasons = {r.partition_id: r.reason for r in s.findings_of(1).rejected}
    assert "could not be read" in reasons[0] and "outside the run's directory" in reasons[1]
    assert outside.content["arrays-file"][ARRAYS_FILE_KEY] and (tmp_path / "reply-1.safetensors").exists()


def test_publish_writes_once_per_model_and_removes_the_previous(tmp_path):
    shared = SharedArrays(tmp_path)
    first = record(0.0)
    path = shared.publish(first)
    assert shared.publish(first) == path
    second = shared.publish(record(1.0))
    assert second != path and not path.exists() and second.exists()
    shared.close()
    assert not tmp_path.exists()


def test_simulated_client_reads_the_file_and_replies_with_one_beside_it(tmp_path):
    msg = message(MessageType.TRAIN, job())
    global_arrays = msg.content["arrays"]
    path = SharedArrays(tmp_path).publish(global_arrays)
    by_file = Message(
        RecordDict({"config": ConfigRecord({**msg.content["config"], ARRAYS_FILE_KEY: str(path)})}),
        dst_node_id=7,
        message_type=MessageType.TRAIN,
    )
    reply = train(by_file, context({"partition-id": 1, "num-partitions": 2}))
    assert len(reply.content.array_records) == 0
    reply_path = reply.content["arrays-file"][ARRAYS_FILE_KEY]
    assert reply_path.startswith(str(tmp_path))
    returned = read_arrays(Path(reply_path))
    in_message = unpack(train(msg, context({"partition-id": 1, "num-partitions": 2})).content["arrays"])
    for key in global_arrays.keys():  # the same training either way: same seed, same data
        np.testing.assert_array_equal(returned[key].numpy(), in_message[key].numpy())


def test_deployed_client_refuses_a_file_path(tmp_path):
    images = np.zeros((8, 28, 28), np.uint8)
    np.savez(
        tmp_path / "site.npz",
        train_images=images,
        train_labels=np.arange(8) % 3,
        val_images=images,
        val_labels=np.arange(8) % 3,
    )
    msg = message(MessageType.TRAIN, job())
    path = SharedArrays(tmp_path).publish(msg.content["arrays"])
    by_file = Message(
        RecordDict({"config": ConfigRecord({**msg.content["config"], ARRAYS_FILE_KEY: str(path)})}),
        dst_node_id=7,
        message_type=MessageType.TRAIN,
    )
    with pytest.raises(ValueError, match="only simulated clients"):
        train(by_file, context({"data-path": str(tmp_path / "site.npz")}))


@pytest.mark.parametrize(
    "transport, address, expected",
    [("auto", None, True), ("auto", "auto", False), ("shared_memory", "10.0.0.1:6379", True), ("message", None, False)],
)
def test_model_transport_setting(transport, address, expected):
    assert uses_shared_arrays(OmegaConf.create({"model_transport": transport, "address": address})) is expected


def test_unknown_model_transport_is_refused():
    with pytest.raises(ValueError, match="ray.model_transport='plasma'"):
        uses_shared_arrays(OmegaConf.create({"model_transport": "plasma", "address": None}))

"""The ClientApp's handlers called directly: simulation partitions and deployed sites' own data."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from clients.client_app import evaluate_local, train
from fedmed.job import JOB_KEY, encode_job, job_from_config
from fedmed.models import build_model
from fedmed.serialization import model_to_arrays
from tests.helpers import compose_config

pytestmark = pytest.mark.usefixtures("task_identity")


def job(num_classes=3, *overrides):
    cfg = compose_config("dataset.n_train=120", "dataset.n_val=30", "dataset.n_test=30",
                         "federation.num_clients=2", "client.batch_size=16", *overrides)
    result = job_from_config(cfg)
    result["num_classes"] = num_classes
    result["channels"], result["image_size"] = 1, 28  # what the server sets from its test split
    return result


def message(kind: str, job_dict: dict, num_classes=3, channels=1) -> Message:
    model = build_model("resnet18", num_classes, channels)
    content = RecordDict({"arrays": model_to_arrays(model),
                          "config": ConfigRecord({JOB_KEY: encode_job(job_dict), "server-round": 1})})
    return Message(content, dst_node_id=7, message_type=kind)


def context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def test_simulated_client_trains_its_partition():
    job_dict = job()
    msg = message(MessageType.TRAIN, job_dict)
    reply = train(msg, context({"partition-id": 1, "num-partitions": 2}))
    metrics = reply.content["metrics"]
    assert metrics["partition-id"] == 1
    assert metrics["num-examples"] == 54  # half of 120, less the 10% local hold-out
    assert np.isfinite(metrics["train_loss"])
    sent, returned = msg.content["arrays"], reply.content["arrays"]
    assert set(sent.keys()) == set(returned.keys())
    assert any(not np.array_equal(sent[k].numpy(), returned[k].numpy()) for k in sent.keys())


@pytest.mark.parametrize("partition", ["dirichlet", "quantity", "site"])
def test_every_partition_trains(partition):
    reply = train(message(MessageType.TRAIN, job(3, f"partition={partition}", "partition.min_partition_size=5")),
                  context({"partition-id": 0, "num-partitions": 2}))
    assert reply.content["metrics"]["num-examples"] > 0
    assert np.isfinite(reply.content["metrics"]["train_loss"])


def test_deployed_site_trains_and_evaluates_on_its_own_file(tmp_path):
    rng = np.random.default_rng(0)
    site = tmp_path / "site.npz"
    np.savez(site, train_images=rng.integers(0, 256, (40, 28, 28), dtype=np.uint8),
             train_labels=rng.integers(0, 3, (40, 1)), val_images=rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
             val_labels=rng.integers(0, 3, (12, 1)))
    job_dict = job()
    reply = train(message(MessageType.TRAIN, job_dict), context({"data-path": str(site)}))
    assert reply.content["metrics"]["num-examples"] == 40
    assert reply.content["metrics"]["partition-id"] == 7  # a site reports its node id
    evaluated = evaluate_local(message(MessageType.EVALUATE, job_dict), context({"data-path": str(site)}))
    assert evaluated.content["metrics"]["num-examples"] == 12
    assert 0.0 <= evaluated.content["metrics"]["val_accuracy"] <= 1.0


def test_site_labels_outside_the_model_are_refused(tmp_path):
    site = tmp_path / "site.npz"
    images = np.zeros((4, 28, 28), np.uint8)
    np.savez(site, train_images=images, train_labels=np.array([0, 1, 2, 5]), val_images=images,
             val_labels=np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="label 5"):
        train(message(MessageType.TRAIN, job()), context({"data-path": str(site)}))


def test_node_without_partition_or_data_path_is_told_what_to_set():
    with pytest.raises(KeyError, match="data-path"):
        train(message(MessageType.TRAIN, job()), context({}))

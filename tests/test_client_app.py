"""The ClientApp's handlers called directly: simulation partitions and deployed sites' own data."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from clients.client_app import evaluate_local, query, train
from fedmed.job import JOB_KEY, Job, encode_job
from fedmed.models import build_model
from fedmed.packed_arrays import unpack
from fedmed.serialization import model_to_arrays
from tests.helpers import compose_config

pytestmark = pytest.mark.usefixtures("task_identity")


def job(num_classes=3, *overrides):
    cfg = compose_config(
        "dataset.n_train=120",
        "dataset.n_val=30",
        "dataset.n_test=30",
        "federation.num_clients=2",
        "client.batch_size=16",
        *overrides,
    )
    result = Job.from_config(cfg)
    result.num_classes = num_classes
    result.channels, result.image_size = 1, 28  # what the server sets from its test split
    return result


def message(kind: str, job_dict: dict, num_classes=3, channels=1) -> Message:
    model = build_model("resnet18", num_classes, channels)
    content = RecordDict(
        {"arrays": model_to_arrays(model), "config": ConfigRecord({JOB_KEY: encode_job(job_dict), "server-round": 1})}
    )
    return Message(content, dst_node_id=7, message_type=kind)


def context(node_config: dict, node_id: int = 7) -> Context:
    return Context(run_id=1, node_id=node_id, node_config=node_config, state=RecordDict(), run_config={})


def test_simulated_client_trains_its_partition():
    job_dict = job()
    msg = message(MessageType.TRAIN, job_dict)
    reply = train(msg, context({"partition-id": 1, "num-partitions": 2}))
    metrics = reply.content["metrics"]
    assert metrics["partition-id"] == 1
    assert metrics["num-examples"] == 54  # half of 120, less the 10% local hold-out
    assert np.isfinite(metrics["train_loss"])
    sent, returned = msg.content["arrays"], unpack(reply.content["arrays"])
    assert set(sent.keys()) == set(returned.keys())
    assert any(not np.array_equal(sent[k].numpy(), returned[k].numpy()) for k in sent.keys())


@pytest.mark.parametrize("partition", ["dirichlet", "quantity", "site"])
def test_every_partition_trains(partition):
    reply = train(
        message(MessageType.TRAIN, job(3, f"partition={partition}", "partition.min_partition_size=5")),
        context({"partition-id": 0, "num-partitions": 2}),
    )
    assert reply.content["metrics"]["num-examples"] > 0
    assert np.isfinite(reply.content["metrics"]["train_loss"])


def write_site(path, train_labels, val_labels):
    rng = np.random.default_rng(0)
    np.savez(
        path,
        train_images=rng.integers(0, 256, (len(train_labels), 28, 28), dtype=np.uint8),
        train_labels=np.asarray(train_labels).reshape(-1, 1),
        val_images=rng.integers(0, 256, (len(val_labels), 28, 28), dtype=np.uint8),
        val_labels=np.asarray(val_labels).reshape(-1, 1),
    )


def test_deployed_site_trains_and_evaluates_on_its_own_file(tmp_path):
    site = tmp_path / "site.npz"
    write_site(site, np.random.default_rng(1).integers(0, 3, 40), np.random.default_rng(2).integers(0, 3, 12))
    job_dict = job()
    node_config = {"data-path": str(site), "site": "st-mary"}
    msg = message(MessageType.TRAIN, job_dict)
    reply = train(msg, context(node_config, node_id=7))
    assert reply.content["metrics"]["num-examples"] == 40
    assert "partition-id" not in reply.content["metrics"]  # the server knows a site by its node
    # the site's seed comes from its name, not from the random node id Flower gave it this run
    again = train(msg, context(node_config, node_id=123456789))
    assert again.content["metrics"]["train_loss"] == reply.content["metrics"]["train_loss"]
    evaluated = evaluate_local(message(MessageType.EVALUATE, job_dict), context(node_config))
    assert evaluated.content["metrics"]["num-examples"] == 12
    assert 0.0 <= evaluated.content["metrics"]["val_accuracy"] <= 1.0


def test_query_reports_the_site_name_and_class_counts(tmp_path):
    site = tmp_path / "hospital-b.npz"
    write_site(site, [0, 2, 2, 0, 2], [1, 2])
    ask = Message(RecordDict(), dst_node_id=7, message_type=MessageType.QUERY)
    by_stem = query(ask, context({"data-path": str(site)}))
    assert by_stem.content["site"]["name"] == "hospital-b"
    assert list(by_stem.content["metrics"]["class-counts"]) == [2, 1, 4]
    named = query(ask, context({"data-path": str(site), "site": "st-mary"}))
    assert named.content["site"]["name"] == "st-mary"
    simulated = query(ask, context({"partition-id": 3, "num-partitions": 4}))
    assert simulated.content["metrics"]["partition-id"] == 3 and "site" not in simulated.content


def test_site_labels_outside_the_model_are_refused(tmp_path):
    site = tmp_path / "site.npz"
    images = np.zeros((4, 28, 28), np.uint8)
    np.savez(
        site,
        train_images=images,
        train_labels=np.array([0, 1, 2, 5]),
        val_images=images,
        val_labels=np.zeros(4, np.int64),
    )
    with pytest.raises(ValueError, match="label 5"):
        train(message(MessageType.TRAIN, job()), context({"data-path": str(site)}))


def test_node_without_partition_or_data_path_is_told_what_to_set():
    with pytest.raises(KeyError, match="data-path"):
        train(message(MessageType.TRAIN, job()), context({}))


def test_the_client_app_imports_no_library_it_does_not_use():
    """A deployed step starts a process that imports the client app: no plotting, no Ray, no
    Hydra, no Opacus (DP-SGD imports it), no scikit-learn (evaluation imports it), no Flower
    Datasets (simulated splits import it). (rich comes with Flower's own command-line code.)"""
    heavy = ("matplotlib", "ray", "hydra", "opacus", "sklearn", "datasets", "flwr_datasets", "pandas")
    done = subprocess.run(
        [sys.executable, "-c", f"import sys, clients.client_app; print([m for m in {heavy!r} if m in sys.modules])"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        cwd=Path(__file__).parents[1],
    )
    assert done.stdout.strip() == "[]"

"""client.balanced_sampling: class-balanced batches for skewed local shares."""

import numpy as np
import pytest
import torch

from fedmed.defenses import LocalData
from fedmed.job import Job
from fedmed.models import build_model
from fedmed.train import balanced_batch_order, batch_order
from strategies.preflight import prepare_config
from tests.helpers import compose_config


def skewed_share():
    # 90 images of class 0, 10 of class 2, class 1 absent; the share is a subset of a larger split
    labels = np.zeros(300, dtype=np.int64)
    share = np.arange(100, 200)
    labels[190:200] = 2
    labels[:100] = 1  # outside the share: never drawn
    return labels, share


def test_every_class_of_the_share_is_drawn_equally_often():
    labels, share = skewed_share()
    generator = torch.Generator().manual_seed(0)
    drawn = np.concatenate([np.concatenate(balanced_batch_order(share, labels, 16, generator)) for _ in range(50)])
    assert set(drawn) <= set(share)  # only the client's own rows
    counts = np.bincount(labels[drawn], minlength=3)
    assert counts[1] == 0
    assert counts[2] / counts.sum() == pytest.approx(0.5, abs=0.03)  # 0.1 of the share, half of the draws
    # shuffled batches keep the share's skew
    plain = np.concatenate([np.concatenate(batch_order(share, 16, generator)) for _ in range(50)])
    assert np.bincount(labels[plain], minlength=3)[2] / len(plain) == pytest.approx(0.1)


def test_an_epoch_has_as_many_draws_as_images_and_a_seed_fixes_it():
    labels, share = skewed_share()

    def epoch(seed):
        return balanced_batch_order(share, labels, 16, torch.Generator().manual_seed(seed))

    first = epoch(3)
    assert [len(b) for b in first] == [16] * 6 + [4]
    assert all(np.array_equal(a, b) for a, b in zip(first, epoch(3)))
    assert not all(np.array_equal(a, b) for a, b in zip(first, epoch(4)))


def test_a_client_round_trains_on_balanced_batches(monkeypatch):
    """The job's client.balanced_sampling reaches fedmed.train.train_local through the defence."""
    from flwr.app import RecordDict

    import fedmed.train
    from clients.local_training import train_round

    seen = []
    original = fedmed.train.balanced_batch_order

    def recording(indices, labels, batch_size, generator):
        batches = original(indices, labels, batch_size, generator)
        seen.extend(batches)
        return batches

    monkeypatch.setattr(fedmed.train, "balanced_batch_order", recording)
    labels, share = skewed_share()
    images = np.random.default_rng(0).integers(0, 255, (300, 28, 28, 1), dtype=np.uint8)
    cfg = compose_config("client.balanced_sampling=true", "client.epochs=1", "client.batch_size=20")
    job = Job.from_config(cfg)
    model = build_model("resnet18", 3, 1)
    result = train_round(
        model,
        LocalData(images, labels, share),
        job,
        server_round=1,
        seed=0,
        device=torch.device("cpu"),
        state=RecordDict(),
    )
    assert np.isfinite(result["train_loss"])
    drawn = np.concatenate(seen)
    assert len(drawn) == len(share) and np.mean(labels[drawn] == 2) > 0.3  # 0.1 without it


def test_dp_sgd_refuses_balanced_sampling_naming_the_key():
    with pytest.raises(ValueError, match=r"client\.balanced_sampling=true with defense=dp_sgd"):
        prepare_config(compose_config("client.balanced_sampling=true", "defense=dp_sgd"))
    prepare_config(compose_config("client.balanced_sampling=true", "defense=fgsm_at"))

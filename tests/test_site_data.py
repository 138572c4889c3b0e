"""A deployed site's data file checked before training: every bad file refused with one message
naming the file, the key and what the federation expects; nothing unpickled."""

import dataclasses
import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType, RecordDict

from clients.client_app import evaluate_local, train
from clients.local_data import class_counts, device_setting, local_share, site_name
from fedmed.data import site_share
from fedmed.site_data import SiteDataError
from tests.test_client_app import context, job, message

pytestmark = pytest.mark.usefixtures("task_identity")
REPO = Path(__file__).resolve().parents[1]


def good_arrays(n_train=24, n_val=8, size=28) -> dict:
    rng = np.random.default_rng(0)
    return {
        "train_images": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % 3).astype(np.uint8).reshape(-1, 1),
        "val_images": rng.integers(0, 256, (n_val, size, size), dtype=np.uint8),
        "val_labels": (np.arange(n_val) % 3).astype(np.uint8).reshape(-1, 1),
    }


def write_site(path: Path, **changes) -> Path:
    arrays = {**good_arrays(), **changes}
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


BAD_FILES = {
    "rgb_in_grey": (
        dict(train_images=np.zeros((24, 28, 28, 3), np.uint8)),
        r"train_images holds images with 3 channel\(s\) \(RGB\); the federation's have 1 \(grey\)",
    ),
    "32px_in_28px": (
        dict(val_images=np.zeros((8, 32, 32), np.uint8)),
        r"val_images holds 32x32 images; the federation's are 28x28",
    ),
    "label_minus_one": (
        dict(train_labels=np.r_[-1, np.zeros(23, np.int64)]),
        r"train_labels holds label -1; the federation has 3 classes, so labels must lie in 0..2",
    ),
    "label_too_large": (
        dict(val_labels=np.r_[3, np.zeros(7, np.int64)]),
        r"val_labels holds label 3; the federation has 3 classes",
    ),
    "labels_2d": (
        dict(train_labels=np.zeros((24, 2), np.int64)),
        r"train_labels has shape \(24, 2\); expected \(N,\) or \(N, 1\)",
    ),
    "lengths_differ": (
        dict(train_labels=np.zeros(23, np.int64)),
        r"train_images holds 24 images but train_labels 23 labels",
    ),
    "missing_key": (dict(val_labels=None), r"lacks val_labels"),
    "float_out_of_range": (
        dict(train_images=np.full((24, 28, 28), 300.0, np.float32)),
        r"train_images is float32 with values 300..300; expected uint8 pixels 0..255",
    ),
    "float_labels": (
        dict(train_labels=np.zeros(24, np.float64)),
        r"train_labels is float64; expected integer class indices 0..2",
    ),
    "sixteen_bit": (
        dict(train_images=np.full((24, 28, 28), 4000, np.uint16)),
        r"train_images is uint16 with values 4000..4000; expected uint8",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_site_file_refused_by_site_share(tmp_path, case):
    changes, expected = BAD_FILES[case]
    path = write_site(tmp_path / "site.npz", **changes)
    with pytest.raises(SiteDataError, match=re.escape(str(path)) + ".*" + expected):
        site_share(str(path), job())


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_site_file_refused_by_the_client_app_before_training(tmp_path, case):
    changes, expected = BAD_FILES[case]
    path = write_site(tmp_path / "site.npz", **changes)
    with pytest.raises(SiteDataError, match=expected):
        train(message(MessageType.TRAIN, job()), context({"data-path": str(path)}))


def test_a_file_that_is_not_an_archive_says_so(tmp_path):
    path = tmp_path / "site.npz"
    path.write_text("train_images,train_labels\n1,2\n")
    expected = re.escape(f"site data file {path} is not a .npz archive")
    with pytest.raises(SiteDataError, match=expected):
        site_share(str(path), job())
    with pytest.raises(SiteDataError, match=expected):
        train(message(MessageType.TRAIN, job()), context({"data-path": str(path)}))


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(
        SiteDataError, match=re.escape(f"site data file {tmp_path / 'gone.npz'} (node config data-path) does not exist")
    ):
        site_share(str(tmp_path / "gone.npz"), job())


@pytest.mark.parametrize("scale", [1.0, 255.0])
def test_float_images_are_rescaled_not_truncated(tmp_path, caplog, scale):
    pixels = good_arrays()["train_images"]
    path = write_site(tmp_path / "site.npz", train_images=(pixels / 255.0 * scale).astype(np.float32))
    with caplog.at_level(logging.WARNING, logger="fedmed"):
        share = site_share(str(path), job())
    np.testing.assert_array_equal(share.images[share.train_indices, ..., 0], pixels)  # not black: the same pixels
    assert f"[0, {scale:g}]" in caplog.text and "train_images" in caplog.text
    with caplog.at_level(logging.WARNING, logger="fedmed"):
        reply = train(message(MessageType.TRAIN, job()), context({"data-path": str(path)}))
    assert reply.content["metrics"]["num-examples"] == 24
    assert "float32" in caplog.text


def test_rgb_site_in_an_rgb_federation_is_read_and_a_grey_one_refused(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (24, 28, 28, 3), dtype=np.uint8)
    path = write_site(tmp_path / "site.npz", train_images=rgb, val_images=rgb[:8])
    share = site_share(str(path), dataclasses.replace(job(), channels=3))
    np.testing.assert_array_equal(share.images[share.train_indices], rgb)
    assert share.labels.shape == (32,) and share.labels.dtype == np.int64
    grey = write_site(tmp_path / "grey.npz")
    with pytest.raises(SiteDataError, match=r"1 channel\(s\) \(grey\); the federation's have 3 \(RGB\)"):
        site_share(str(grey), dataclasses.replace(job(), channels=3))


class _MakesFolderWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_site_never_unpickles_its_file(tmp_path):
    marker = tmp_path / "unpickled"
    payload = np.array([_MakesFolderWhenUnpickled(marker)] * 24, dtype=object)
    path = write_site(tmp_path / "site.npz", train_labels=payload)
    with pytest.raises(SiteDataError, match="train_labels holds Python objects, which a site never unpickles"):
        train(message(MessageType.TRAIN, job()), context({"data-path": str(path)}))
    assert not marker.exists()
    np.load(path, allow_pickle=True)["train_labels"]  # what unpickling would have done
    assert marker.exists()


def test_site_never_unpickles_what_the_server_sends(tmp_path):
    marker = tmp_path / "unpickled"
    site = write_site(tmp_path / "site.npz")
    msg = message(MessageType.TRAIN, job())
    arrays = dict(msg.content["arrays"].items())
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.array([_MakesFolderWhenUnpickled(marker)], dtype=object), allow_pickle=True)
    name = next(iter(arrays))
    arrays[name] = Array(dtype="object", shape=(1,), stype="numpy.ndarray", data=buffer.getvalue())
    evil = Message(
        RecordDict({"arrays": ArrayRecord(arrays), "config": msg.content["config"]}),
        dst_node_id=7,
        message_type=MessageType.TRAIN,
    )
    with pytest.raises(ValueError, match="allow_pickle"):
        train(evil, context({"data-path": str(site)}))
    assert not marker.exists()


def test_client_and_site_code_never_unpickles():
    """Every np.load on the client side passes allow_pickle=False; nothing calls pickle."""
    for folder in ("clients", "fedmed"):
        for source in (REPO / folder).glob("*.py"):
            text = source.read_text()
            for call in re.findall(r"np\.load\([^)]*\)", text):
                assert "allow_pickle=False" in call, f"{source.name}: {call}"
            assert not re.search(r"pickle\.loads?\(|allow_pickle=True|weights_only=False", text), source.name


def test_deployed_site_refuses_an_attack(tmp_path):
    site = write_site(tmp_path / "site.npz")
    for handler, kind in ((train, MessageType.TRAIN), (evaluate_local, MessageType.EVALUATE)):
        with pytest.raises(ValueError, match="attack=edge_case: attack= is simulation only"):
            handler(message(kind, job(3, "attack=edge_case", "attack.fraction=0.5")), context({"data-path": str(site)}))
    # the same job trains a simulated partition
    reply = train(
        message(MessageType.TRAIN, job(3, "attack=edge_case", "attack.fraction=0.5")),
        context({"partition-id": 0, "num-partitions": 2}),
    )
    assert reply.content["metrics"]["num-examples"] > 0


def test_deployed_site_uses_its_own_device(tmp_path, monkeypatch):
    site = str(tmp_path / "site.npz")
    gpu_job = dataclasses.replace(job(), device="cuda")
    assert device_setting(gpu_job, {"data-path": site}) == "auto"
    assert device_setting(gpu_job, {"data-path": site, "device": "cpu"}) == "cpu"
    assert device_setting(gpu_job, {"partition-id": 0}) == "cuda"  # simulated clients follow the job
    with pytest.raises(ValueError, match="node config device='gpu'"):
        device_setting(job(), {"data-path": site, "device": "gpu"})
    # the handler: a job asking for CUDA on a machine without one still trains on the site's CPU
    write_site(tmp_path / "site.npz")
    import clients.client_app as client_app

    asked = []
    real = client_app.resolve_device
    monkeypatch.setattr(client_app, "resolve_device", lambda device: asked.append(device) or real("cpu"))
    cuda_message = message(MessageType.TRAIN, dataclasses.replace(job(), device="cuda"))
    train(cuda_message, context({"data-path": site, "device": "cpu"}))
    evaluate_local(
        message(MessageType.EVALUATE, dataclasses.replace(job(), device="cuda")),
        context({"data-path": site, "device": "cpu"}),
    )
    assert asked == ["cpu", "cpu"]


def test_site_name_and_class_counts(tmp_path):
    path = write_site(tmp_path / "hospital-a.npz")
    assert site_name({"data-path": str(path)}) == "hospital-a"
    assert site_name({"data-path": str(path), "site": "north"}) == "north"
    assert site_name({"data-path": str(tmp_path) + "/"}) == tmp_path.name  # an image folder
    assert site_name({"partition-id": 2, "num-partitions": 4}) == "site-2"
    with pytest.raises(ValueError, match="node config site is empty"):
        site_name({"data-path": str(path), "site": " "})
    counts = class_counts(local_share(job(), {"data-path": str(path)}))
    assert counts == {"train": [8, 8, 8], "val": [3, 3, 2]}


def test_job_from_an_older_server_is_named(tmp_path):
    path = write_site(tmp_path / "site.npz")
    old = dataclasses.replace(job(), channels=None, image_size=None)
    with pytest.raises(KeyError, match="lacks channels, image_size"):
        site_share(str(path), old)


def test_site_image_folder_stays_supported(tmp_path):
    from PIL import Image

    for label, name in enumerate(("a", "b", "c")):
        (tmp_path / "site" / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((40, 40, 3), 40 * label + i, np.uint8)).save(tmp_path / "site" / name / f"{i}.png")
    share = site_share(str(tmp_path / "site"), job())
    assert share.images.shape[1:] == (28, 28, 1)  # resized and made grey like the federation
    assert sum(class_counts(share)["train"]) + sum(class_counts(share)["val"]) == len(share.labels)
    with pytest.raises(SiteDataError, match="has 3 class folders \\(a, b, c\\); the federation has 2 classes"):
        site_share(str(tmp_path / "site"), job(2))

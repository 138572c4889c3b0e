"""Partitioning of the train split among clients, and the per-site appearance shift."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmed.partition import METHODS, partition_indices
from fedmed.partition_report import format_label_table, label_count_table, plot_label_counts
from fedmed.site_shift import SiteShift, apply_site_shift, site_shifts

NUM_CLASSES = 10


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    """10 classes x 1000 samples, in random order."""
    return np.random.default_rng(0).permutation(np.repeat(np.arange(NUM_CLASSES), 1000))


def mean_label_skew(labels: np.ndarray, partitions: list[np.ndarray]) -> float:
    """Mean over clients of the total-variation distance to the global label distribution."""
    counts = label_count_table(labels, partitions, NUM_CLASSES)
    client_dists = counts / counts.sum(axis=1, keepdims=True)
    global_dist = np.bincount(labels, minlength=NUM_CLASSES) / len(labels)
    return float(0.5 * np.abs(client_dists - global_dist).sum(axis=1).mean())


# --- partition sizes and shape ------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_partitions_are_sorted_int64_disjoint_and_cover_all(labels, method):
    partitions = partition_indices(labels, 8, method, seed=1)
    assert len(partitions) == 8
    for indices in partitions:
        assert indices.dtype == np.int64
        assert np.all(np.diff(indices) > 0)  # sorted and no repeats
    every_index = np.concatenate(partitions)
    assert len(np.unique(every_index)) == len(every_index)
    assert np.array_equal(np.sort(every_index), np.arange(len(labels)))


@pytest.mark.parametrize("method", ["iid", "site"])
def test_iid_sizes_are_near_equal(labels, method):
    sizes = [len(p) for p in partition_indices(labels, 7, method, seed=1)]
    assert max(sizes) - min(sizes) <= 1


def test_iid_partitions_are_shuffled_not_contiguous(labels):
    first = partition_indices(labels, 4, "iid", seed=1)[0]
    assert first[-1] - first[0] > 2 * len(first)


def test_quantity_gives_clearly_unequal_sizes(labels):
    sizes = np.array([len(p) for p in partition_indices(labels, 10, "quantity", seed=1)])
    assert sizes.max() >= 3 * sizes.min()
    assert sizes.min() >= 10


def test_dirichlet_respects_min_partition_size(labels):
    def smallest(min_partition_size: int) -> int:
        partitions = partition_indices(
            labels, 20, "dirichlet", seed=3, alpha=0.3, min_partition_size=min_partition_size
        )
        return min(len(p) for p in partitions)

    assert smallest(1) < 100  # the first draw for this seed has a small client...
    assert smallest(100) >= 100  # ...which the minimum makes it redraw


def test_label_skew_falls_as_alpha_grows(labels):
    skew = {
        alpha: mean_label_skew(labels, partition_indices(labels, 10, "dirichlet", seed=0, alpha=alpha))
        for alpha in (0.1, 1.0, 100.0)
    }
    assert skew[0.1] > skew[1.0] > skew[100.0]
    assert skew[100.0] < 0.1  # near iid
    assert skew[0.1] > 0.5  # most of each client's labels are off the global mix


# --- determinism ---------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_partitions_other_seed_differs(labels, method):
    first = partition_indices(labels, 5, method, seed=11)
    again = partition_indices(labels, 5, method, seed=11)
    other = partition_indices(labels, 5, method, seed=12)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


# --- errors --------------------------------------------------------------------------


def test_unknown_method_lists_valid_ones(labels):
    with pytest.raises(ValueError, match="iid, dirichlet, quantity, site"):
        partition_indices(labels, 4, "pathological", seed=0)


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan")])
def test_alpha_must_be_positive(labels, alpha):
    with pytest.raises(ValueError, match="alpha"):
        partition_indices(labels, 4, "dirichlet", seed=0, alpha=alpha)


def test_more_partitions_than_samples():
    with pytest.raises(ValueError, match="num_partitions=11"):
        partition_indices(np.arange(10) % 2, 11, "iid", seed=0)


def test_min_size_beyond_dataset_size(labels):
    with pytest.raises(ValueError, match="min_partition_size=2000"):
        partition_indices(labels, 10, "quantity", seed=0, min_partition_size=2000)


def test_dirichlet_min_size_that_sampling_cannot_meet(labels):
    # Possible in total (10 x 999 <= 10000), but at alpha 0.05 some client always ends short.
    with pytest.raises(ValueError, match="num_partitions=10") as error:
        partition_indices(labels, 10, "dirichlet", seed=0, alpha=0.05, min_partition_size=999)
    assert "alpha=0.05" in str(error.value) and "min_partition_size=999" in str(error.value)


def test_dirichlet_alpha_so_small_that_a_label_gets_no_client(labels):
    # flwr-datasets would give the label wholly to the last client (a 0/0 share).
    with pytest.raises(ValueError, match=r"alpha=0\.001.*raise alpha"):
        partition_indices(labels, 5, "dirichlet", seed=1, alpha=0.001, min_partition_size=1)


def test_labels_must_be_one_dimensional(labels):
    with pytest.raises(ValueError, match="ravel"):
        partition_indices(labels.reshape(-1, 1), 4, "iid", seed=0)


# --- label table and plot ------------------------------------------------------------


def test_label_count_table_values():
    labels = np.array([0, 1, 1, 2, 2, 2])
    partitions = [np.array([0, 1]), np.array([2, 3, 4, 5])]
    counts = label_count_table(labels, partitions, 3)
    assert counts.tolist() == [[1, 1, 0], [0, 1, 3]]
    table = format_label_table(counts, ["a", "b", "c"])
    assert table.row_count == 2
    assert [column.header for column in table.columns] == ["client", "a", "b", "c", "total"]
    assert list(table.columns[-1].cells) == ["2", "4"]


def test_label_count_table_sums_to_partition_sizes(labels):
    partitions = partition_indices(labels, 6, "dirichlet", seed=2)
    counts = label_count_table(labels, partitions, NUM_CLASSES)
    assert counts.sum(axis=1).tolist() == [len(p) for p in partitions]
    assert counts.sum(axis=0).tolist() == [1000] * NUM_CLASSES


def test_plot_label_counts_writes_png(tmp_path):
    counts = np.array([[5, 1, 0], [2, 2, 9]])
    path = plot_label_counts(counts, ["a", "b", "c"], tmp_path / "plots" / "labels.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_class_names_must_match_counts():
    with pytest.raises(ValueError, match="class names"):
        format_label_table(np.zeros((2, 3), dtype=np.int64), ["a", "b"])


# --- site shift ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Smooth RGB images (a blurred noise field) so blur and noise change them visibly."""
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(16, 3, 8, 8, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=32, mode="bilinear", align_corners=False)


def test_site_shift_keeps_shape_dtype_and_range(images):
    strong = SiteShift(brightness=0.3, contrast=1.8, colour_gains=(1.3, 0.8, 1.0), blur_sigma=1.0, noise_std=0.2)
    out = apply_site_shift(images, strong, torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    assert out.dtype == images.dtype
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_site_shift_works_on_grey_images(images):
    grey = images[:, :1]
    out = apply_site_shift(grey, site_shifts(3, seed=0)[2], torch.Generator().manual_seed(0))
    assert out.shape == grey.shape


def test_site_shift_is_deterministic_with_a_seeded_generator(images):
    shift = site_shifts(3, seed=0)[1]
    first = apply_site_shift(images, shift, torch.Generator().manual_seed(5))
    again = apply_site_shift(images, shift, torch.Generator().manual_seed(5))
    other = apply_site_shift(images, shift, torch.Generator().manual_seed(6))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_site_shifts_are_deterministic_and_stable_in_num_sites():
    assert site_shifts(4, seed=3) == site_shifts(4, seed=3)
    assert site_shifts(4, seed=3)[:2] == site_shifts(2, seed=3)
    assert site_shifts(4, seed=3) != site_shifts(4, seed=4)


def test_different_sites_give_different_image_statistics(images):
    def channel_means(shift: SiteShift) -> torch.Tensor:
        out = apply_site_shift(images, shift, torch.Generator().manual_seed(0))
        return out.mean(dim=(0, 2, 3))

    means = torch.stack([channel_means(shift) for shift in site_shifts(4, seed=0)])
    for a in range(4):
        for b in range(a + 1, 4):
            assert (means[a] - means[b]).abs().max() > 0.005, (a, b)


def test_blur_and_noise_change_sharpness_as_expected(images):
    def detail(x: torch.Tensor) -> float:  # mean absolute difference between neighbours
        return float((x[..., 1:] - x[..., :-1]).abs().mean())

    blurred = apply_site_shift(images, SiteShift(blur_sigma=1.2))
    noisy = apply_site_shift(images, SiteShift(noise_std=0.05), torch.Generator().manual_seed(0))
    assert detail(blurred) < detail(images) < detail(noisy)


def test_identity_shift_leaves_images_unchanged(images):
    assert torch.equal(apply_site_shift(images, SiteShift()), images)
    for shift in site_shifts(3, seed=0, strength=0.0):
        assert torch.equal(apply_site_shift(images, shift), images)


def test_site_shift_rejects_bad_inputs(images):
    with pytest.raises(ValueError, match="float tensor"):
        apply_site_shift((images * 255).to(torch.uint8), SiteShift())
    with pytest.raises(ValueError, match="strength"):
        site_shifts(2, seed=0, strength=-1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_site_shift_on_cuda_matches_shape_and_needs_a_cuda_generator(images):
    cuda_images = images.cuda()
    shift = SiteShift(noise_std=0.05, blur_sigma=0.8)
    out = apply_site_shift(cuda_images, shift, torch.Generator(device="cuda").manual_seed(0))
    assert out.device == cuda_images.device and out.shape == images.shape
    with pytest.raises(ValueError, match="torch.Generator"):
        apply_site_shift(cuda_images, shift, torch.Generator().manual_seed(0))

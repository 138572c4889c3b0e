"""A generated, medical-looking classification dataset that needs no download.

Each image is a textured "tissue" background (smooth noise at several scales inside a soft
body outline, random brightness and contrast) on which class-dependent lesions are painted:

    normal      no lesion, at most a faint diffuse region (as do all classes, as a distractor)
    nodule      one round, sharp-edged nodule
    irregular   one elongated lesion with a lobulated outline
    ring        one ring-shaped lesion (bright rim, background centre)
    multifocal  three or four small spots
    cyst        one round lesion darker than the tissue

Positions, sizes, opacity and intensity are random, some lesions are faint, and every image
gets pixel noise, so the task is learnable by a small CNN but not trivially, and a linear
model on raw pixels does clearly worse (the class is in the shape, not at a fixed place).
RGB images are tinted like H&E histology, dermoscopy or fundus photographs (chosen per image,
independent of the class). Everything derives from ``seed``.
"""

from __future__ import annotations

import numpy as np

from fedmed.dataset import ArrayDataset, Split

CLASS_NAMES = ("normal", "nodule", "irregular", "ring", "multifocal", "cyst")

# Background and lesion colours (RGB in [0, 1]) of the three looks an RGB image may take.
PALETTES = {
    "h&e": {"background": (0.92, 0.70, 0.82), "bright": (0.50, 0.28, 0.62), "dark": (0.30, 0.12, 0.40)},
    "dermoscopy": {"background": (0.86, 0.66, 0.55), "bright": (0.55, 0.35, 0.22), "dark": (0.25, 0.14, 0.10)},
    "fundus": {"background": (0.80, 0.38, 0.18), "bright": (0.97, 0.88, 0.45), "dark": (0.40, 0.08, 0.05)},
}

MAX_LESIONS = 4  # multifocal paints up to 4 spots; every image may also get one distractor
IMAGES_PER_CHUNK = 128  # bounds the float32 temporaries at 224 px to a few tens of MB


def make_synthetic(
    num_classes: int = 3,
    channels: int = 1,
    size: int = 28,
    n_train: int = 2000,
    n_val: int = 300,
    n_test: int = 600,
    seed: int = 0,
) -> ArrayDataset:
    """Generate train/val/test splits of uint8 (N, size, size, channels) images, balanced classes.

    Classes are the first ``num_classes`` of ``CLASS_NAMES`` (2 to 6). Each split has its own
    random stream, so changing ``n_train`` leaves the val and test images unchanged.
    """
    if not 2 <= num_classes <= len(CLASS_NAMES):
        raise ValueError(
            f"num_classes must be between 2 and {len(CLASS_NAMES)} (classes: {CLASS_NAMES}), got {num_classes!r}."
        )
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}.")
    if not isinstance(size, (int, np.integer)) or size < 8:
        raise ValueError(f"size must be an integer of at least 8 pixels, got {size!r}.")
    counts = {"train": n_train, "val": n_val, "test": n_test}
    for split, n in counts.items():
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n_{split} must be a non-negative integer, got {n!r}.")

    split_seeds = np.random.SeedSequence(seed).spawn(len(counts))
    splits = {
        split: _make_split(n, num_classes, channels, size, split_seed)
        for (split, n), split_seed in zip(counts.items(), split_seeds)
    }
    return ArrayDataset(
        name="synthetic",
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        class_names=CLASS_NAMES[:num_classes],
    )


def _make_split(n: int, num_classes: int, channels: int, size: int, seed_seq: np.random.SeedSequence) -> Split:
    label_seed, *chunk_seeds = seed_seq.spawn(1 + (n + IMAGES_PER_CHUNK - 1) // IMAGES_PER_CHUNK)
    # Exactly balanced (up to one image), in random order.
    labels = np.random.default_rng(label_seed).permutation(np.arange(n) % num_classes)
    images = np.empty((n, size, size, channels), dtype=np.uint8)
    for i, chunk_seed in enumerate(chunk_seeds):
        rows = slice(i * IMAGES_PER_CHUNK, min(n, (i + 1) * IMAGES_PER_CHUNK))
        rng = np.random.default_rng(chunk_seed)
        images[rows] = _render(labels[rows], channels, size, rng)
    return Split(images=images, labels=labels.astype(np.int64))


def _render(labels: np.ndarray, channels: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Images (n, size, size, channels) uint8 for the given labels."""
    n = len(labels)
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size  # pixel centres in [0, 1]
    tissue, grain = _background(n, coords, rng)  # (n, H, W) in about [0, 1], texture ~N(0, 1)

    if channels == 1:
        image = tissue[..., None]
        # Lesion grey levels per image: bright lesions and dark (cyst-like) ones.
        bright = rng.uniform(0.7, 1.0, (n, 1))
        dark = rng.uniform(0.0, 0.25, (n, 1))
    else:
        # Each image takes one of the palettes, whatever its class, with a little jitter.
        looks = [PALETTES[name] for name in rng.choice(list(PALETTES), size=n)]
        background = np.array([look["background"] for look in looks]) * rng.uniform(0.9, 1.1, (n, 3))
        bright = np.array([look["bright"] for look in looks])
        dark = np.array([look["dark"] for look in looks])
        # Tissue brightness (about 0.5 on average) scales the palette's background colour.
        shade = np.clip(tissue * 1.6, 0, 1.3)[..., None]
        image = shade * background[:, None, None, :].astype(np.float32)
    image = image.astype(np.float32)

    for lesions in _lesion_layers(labels, rng):
        idx = lesions["image"]
        if len(idx) == 0:
            continue
        jitter = rng.uniform(0.9, 1.1, (len(idx), 1))
        colour = (np.where(lesions["dark"][:, None], dark[idx], bright[idx]) * jitter).astype(np.float32)
        strength = lesions["opacity"].astype(np.float32)[:, None, None, None]
        opacity = _lesion_profile(lesions, coords)[..., None] * strength
        # Lesions have their own texture: modulate their colour with the fine grain.
        lesion_colour = colour[:, None, None, :] * (1 + 0.12 * grain[idx])[..., None]
        image[idx] = image[idx] * (1 - opacity) + lesion_colour * opacity

    noise_level = rng.uniform(0.01, 0.04, (n, 1, 1, 1)).astype(np.float32)
    image += noise_level * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)


def _smooth_noise(n: int, coords: np.ndarray, knots: int, rng: np.random.Generator) -> np.ndarray:
    """Per-image smooth random fields (n, H, W), zero mean and unit variance.

    Random values on a ``knots`` x ``knots`` grid are spread with a Gaussian kernel (A Z A^T,
    two matrix products), which is cheap at any image size and has no bilinear creases.
    """
    size = len(coords)
    grid = (np.arange(knots, dtype=np.float32) + 0.5) / knots
    width = 1.0 / knots
    distance = (coords[:, None] - grid[None, :]) / width
    # Cut the tails at 4 widths: the far weights would be float32 denormals, which make the
    # matrix products below many times slower.
    kernel = np.where(np.abs(distance) < 4, np.exp(-0.5 * distance**2), 0).astype(np.float32)
    kernel /= kernel.sum(axis=1, keepdims=True)
    values = rng.standard_normal((n, knots, knots), dtype=np.float32)
    # field[i] = kernel @ values[i] @ kernel.T, written as two large 2D products: numpy's
    # batched matmul of many small matrices is much slower (and can leave the BLAS path).
    columns = (values.reshape(n * knots, knots) @ kernel.T).reshape(n, knots, size)
    stacked = columns.transpose(1, 0, 2).reshape(knots, n * size)
    field = (kernel @ stacked).reshape(size, n, size).transpose(1, 0, 2).copy()
    field -= field.mean(axis=(1, 2), keepdims=True)
    field /= field.std(axis=(1, 2), keepdims=True) + 1e-6
    return field


def _background(n: int, coords: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Tissue-like intensity (n, H, W) and the fine texture field used again inside lesions."""
    organ = _smooth_noise(n, coords, 3, rng)
    texture = _smooth_noise(n, coords, 7, rng)
    grain = _smooth_noise(n, coords, min(14, len(coords) // 2), rng)
    brightness = rng.uniform(0.35, 0.6, (n, 1, 1)).astype(np.float32)
    contrast = rng.uniform(0.06, 0.16, (n, 1, 1)).astype(np.float32)
    tissue = brightness + contrast * (0.5 * organ + 0.3 * texture + 0.2 * grain)

    # A soft elliptical body outline, darker outside (like an X-ray or a slide's edge).
    centre = rng.uniform(0.42, 0.58, (n, 2, 1, 1)).astype(np.float32)
    radii = rng.uniform(0.42, 0.6, (n, 2, 1, 1)).astype(np.float32)
    y, x = coords[None, :, None], coords[None, None, :]
    r = np.sqrt(((x - centre[:, 0]) / radii[:, 0]) ** 2 + ((y - centre[:, 1]) / radii[:, 1]) ** 2)
    body = 1 / (1 + np.exp((r - 1) / 0.08))
    outside = rng.uniform(0.45, 0.8, (n, 1, 1)).astype(np.float32)
    return tissue * (outside + (1 - outside) * body), grain


def _lesion_layers(labels: np.ndarray, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    """Lesion parameters, one layer per lesion slot; each layer lists the images it paints.

    Within a layer an image appears at most once, so layers can be painted with plain
    fancy-index assignment. Sizes and positions are fractions of the image side.
    """
    n = len(labels)
    shape = _draw_shapes(n, rng)  # round, sharp-edged, bright lesions by default
    layers = []

    # Slot 0: the main lesion of every class but "normal", shaped by class.
    kind = np.array(CLASS_NAMES)[labels]
    is_irregular, is_ring = kind == "irregular", kind == "ring"
    is_multi, is_cyst = kind == "multifocal", kind == "cyst"
    shape["radius_b"] = np.where(is_irregular, shape["radius_a"] / rng.uniform(2.0, 3.5, n), shape["radius_b"])
    shape["radius_a"] = np.where(is_irregular, shape["radius_a"] * 1.5, shape["radius_a"])
    shape["lobes"] = np.where(is_irregular, rng.uniform(0.15, 0.35, n), 0.0)
    shape["ring"] = is_ring
    shape["radius_a"] = np.where(is_multi, rng.uniform(0.03, 0.05, n), shape["radius_a"])
    shape["radius_b"] = np.where(is_multi, shape["radius_a"], shape["radius_b"])
    shape["dark"] = is_cyst
    layers.append(_select(shape, kind != "normal"))

    # Slots 1..3: the further spots of multifocal images (3 or 4 spots in all).
    n_spots = rng.integers(3, MAX_LESIONS + 1, n)
    for slot in range(1, MAX_LESIONS):
        spot = _draw_shapes(n, rng)
        spot["radius_a"] = spot["radius_b"] = rng.uniform(0.03, 0.05, n)
        layers.append(_select(spot, is_multi & (n_spots > slot)))

    # Distractor in every class: a faint, soft, large diffuse region, bright or dark.
    diffuse = _draw_shapes(n, rng)
    diffuse["radius_a"] = rng.uniform(0.15, 0.3, n)
    diffuse["radius_b"] = diffuse["radius_a"] * rng.uniform(0.7, 1.0, n)
    diffuse["softness"] = rng.uniform(0.4, 0.7, n)
    diffuse["opacity"] = rng.uniform(0.1, 0.35, n)
    diffuse["dark"] = rng.random(n) < 0.5
    layers.append(_select(diffuse, rng.random(n) < 0.6))
    return layers


def _draw_shapes(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Default lesion parameters: a round, sharp-edged, bright nodule at a random place."""
    radius = rng.uniform(0.11, 0.18, n)
    return {
        "x": rng.uniform(0.25, 0.75, n),
        "y": rng.uniform(0.25, 0.75, n),
        "radius_a": radius,
        "radius_b": radius.copy(),
        "angle": rng.uniform(0, np.pi, n),
        "lobes": np.zeros(n),  # depth of the outline's lobulation (0 = smooth)
        "lobe_count": rng.integers(3, 6, n).astype(np.float64),
        "lobe_phase": rng.uniform(0, 2 * np.pi, n),
        "softness": rng.uniform(0.08, 0.2, n),  # edge width, as a fraction of the radius
        "ring": np.zeros(n, dtype=bool),
        "ring_width": rng.uniform(0.2, 0.35, n),
        # Some lesions are faint on purpose: they cap the accuracy a model can reach.
        "opacity": rng.uniform(0.6, 1.0, n),
        "dark": np.zeros(n, dtype=bool),
    }


def _select(params: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    layer = {key: value[mask] for key, value in params.items()}
    layer["image"] = np.flatnonzero(mask)
    return layer


def _lesion_profile(lesion: dict[str, np.ndarray], coords: np.ndarray) -> np.ndarray:
    """Opacity maps (m, H, W) in [0, 1] of the layer's lesions."""

    def column(key: str) -> np.ndarray:
        return lesion[key].astype(np.float32)[:, None, None]

    dx = coords[None, None, :] - column("x")
    dy = coords[None, :, None] - column("y")
    cos, sin = np.cos(column("angle")), np.sin(column("angle"))
    u, v = dx * cos + dy * sin, -dx * sin + dy * cos
    r = np.sqrt((u / column("radius_a")) ** 2 + (v / column("radius_b")) ** 2)
    # A lobulated outline: the radius swells and shrinks with the angle.
    theta = np.arctan2(v, u)
    r = r / (1 + column("lobes") * np.cos(column("lobe_count") * theta + column("lobe_phase")))
    # Clipped so that exp stays finite far outside the lesion.
    filled = 1 / (1 + np.exp(np.minimum((r - 1) / column("softness"), 50)))
    # Capped at exp(-50): smaller values would be float32 denormals, which are very slow.
    ring = np.exp(-np.minimum(((r - 1) / column("ring_width")) ** 2, 50))
    return np.where(lesion["ring"][:, None, None], ring, filled).astype(np.float32)

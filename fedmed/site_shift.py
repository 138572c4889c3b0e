"""Scanner / site appearance shift for the ``site`` partition.

Hospitals image with different scanners and protocols, so the same anatomy arrives
brighter or darker, with more or less contrast, a colour cast, some blur and sensor
noise. Each site gets one fixed ``SiteShift``; ``apply_site_shift`` applies it to whole
float batches in [0, 1] on the training device (no PIL, no per-sample loop).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# Blur below this sigma (pixels) changes a pixel by well under 1% and is skipped.
MIN_BLUR_SIGMA = 0.1
# Above this strength the contrast range would reach 0 or below.
MAX_STRENGTH = 3.0
# Site 0 is the mild reference site: its draws are scaled down by this factor.
MILD_SITE_SCALE = 0.25


@dataclass(frozen=True)
class SiteShift:
    """One site's appearance. The defaults are the identity (no change)."""

    brightness: float = 0.0  # added to every pixel
    contrast: float = 1.0  # multiplies each image's deviation from its own mean
    colour_gains: tuple[float, float, float] = (1.0, 1.0, 1.0)  # per RGB channel; grey uses their mean
    blur_sigma: float = 0.0  # Gaussian blur, pixels
    noise_std: float = 0.0  # additive Gaussian noise, pixel scale


def site_shifts(num_sites: int, seed: int, strength: float = 1.0) -> list[SiteShift]:
    """A fixed, varied ``SiteShift`` per site, deterministic from ``seed``.

    At ``strength`` 1.0 sites draw brightness in +-0.15, contrast in 0.7..1.3, colour
    gains in 0.85..1.15, blur sigma in 0..1.2 px and noise std in 0..0.05; ``strength``
    scales every range (0 gives identity shifts). Site 0 is mild (a quarter of that).
    Site k's shift does not depend on ``num_sites``.
    """
    if isinstance(num_sites, bool) or not isinstance(num_sites, (int, np.integer)) or num_sites < 1:
        raise ValueError(f"num_sites must be a positive integer, got {num_sites!r}")
    _check_seed_and_strength(seed, strength)
    # Draw the same count of uniforms for every site, so site k stays the same whatever num_sites is.
    draws = _site_stream(seed).uniform(-1.0, 1.0, size=(num_sites, DRAWS_PER_SITE))
    return [_shift_from(site, row, strength) for site, row in enumerate(draws)]


def site_shift(site: int, seed: int, strength: float = 1.0) -> SiteShift:
    """``site_shifts(n, seed, strength)[site]`` for any n > site, without drawing the other sites':
    the stream jumps to the site's draws (one 64-bit step per uniform double), so a client of a
    1000-site federation builds its own shift only."""
    if isinstance(site, bool) or not isinstance(site, (int, np.integer)) or site < 0:
        raise ValueError(f"site must be a non-negative integer, got {site!r}")
    _check_seed_and_strength(seed, strength)
    stream = _site_stream(seed)
    stream.bit_generator.advance(DRAWS_PER_SITE * int(site))
    return _shift_from(int(site), stream.uniform(-1.0, 1.0, size=DRAWS_PER_SITE), strength)


DRAWS_PER_SITE = 7  # brightness, contrast, red, green and blue gains, blur, noise


def _site_stream(seed: int) -> np.random.Generator:
    # A stream of its own (tag 2), so the shifts do not reuse the partition's draws.
    return np.random.default_rng([seed, 2])


def _check_seed_and_strength(seed: int, strength: float) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not (math.isfinite(strength) and 0.0 <= strength <= MAX_STRENGTH):
        raise ValueError(f"strength must lie in [0, {MAX_STRENGTH}] (1.0 gives the reference ranges), got {strength!r}")


def _shift_from(site: int, draws: np.ndarray, strength: float) -> SiteShift:
    scale = strength * (MILD_SITE_SCALE if site == 0 else 1.0)
    brightness, contrast, red, green, blue, blur, noise = draws
    return SiteShift(
        brightness=float(0.15 * scale * brightness),
        contrast=float(1.0 + 0.3 * scale * contrast),
        colour_gains=tuple(float(1.0 + 0.15 * scale * gain) for gain in (red, green, blue)),
        blur_sigma=float(1.2 * scale * (blur + 1.0) / 2.0),
        noise_std=float(0.05 * scale * (noise + 1.0) / 2.0),
    )


def apply_site_shift(images: torch.Tensor, shift: SiteShift, generator: torch.Generator | None = None) -> torch.Tensor:
    """Return ``images`` (float (N, C, H, W) in [0, 1], C = 1 or 3) as seen at ``shift``'s site.

    Order: contrast around each image's mean, brightness, colour gains, Gaussian blur,
    noise, clamp to [0, 1]. Steps at their identity value are skipped, so the identity
    shift returns the images unchanged. The noise comes from ``generator`` (the global
    RNG when None), which must live on the images' device: a CPU generator cannot draw
    CUDA noise, use ``torch.Generator(device=images.device)``. Same generator state, same
    output.
    """
    _check_images(images)
    if generator is not None and generator.device.type != images.device.type:
        raise ValueError(
            f"generator is on {generator.device} but images are on {images.device}; "
            f"create it with torch.Generator(device={str(images.device)!r})"
        )
    out = images
    if shift.contrast != 1.0:
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = (out - mean) * shift.contrast + mean
    if shift.brightness != 0.0:
        out = out + shift.brightness
    if any(gain != 1.0 for gain in shift.colour_gains):
        out = out * _channel_gains(shift.colour_gains, out)
    if shift.blur_sigma >= MIN_BLUR_SIGMA:
        out = _gaussian_blur(out, shift.blur_sigma)
    if shift.noise_std > 0.0:
        noise = torch.randn(out.shape, generator=generator, device=out.device, dtype=out.dtype)
        out = out + shift.noise_std * noise
    # clamp is exact inside [0, 1], so the identity shift still returns equal values.
    return out.clamp(0.0, 1.0)


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.ndim != 4:
        raise ValueError(
            "images must be a float tensor (N, C, H, W) in [0, 1], got "
            f"{getattr(images, 'dtype', type(images))} {tuple(getattr(images, 'shape', ()))}; "
            "convert uint8 (N, H, W, C) batches with x.permute(0, 3, 1, 2).float() / 255"
        )
    if images.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 (grey) or 3 (RGB) channels, got {images.shape[1]}")


def _channel_gains(colour_gains: tuple[float, float, float], images: torch.Tensor) -> torch.Tensor:
    """Gains shaped (1, C, 1, 1); a grey image takes the mean gain of the three channels."""
    gains = colour_gains if images.shape[1] == 3 else (sum(colour_gains) / 3.0,)
    return torch.tensor(gains, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur, each channel on its own, borders replicated."""
    radius = max(1, math.ceil(3.0 * sigma))  # +-3 sigma holds 99.7% of the kernel's mass
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    # Replicate padding works on any image size (reflect needs the pad below the side).
    padded = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    horizontal = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    vertical = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    blurred = F.conv2d(padded, horizontal, groups=channels)
    return F.conv2d(blurred, vertical, groups=channels)

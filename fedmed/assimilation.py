"""Domain assimilation (Chen & Luo, "Adversarial-Robust Transfer Learning for Medical Imaging via
Domain Assimilation", PAKDD 2024, arXiv 2402.16005): a texture module and a colour module in front
of an ImageNet backbone move grey, low-texture medical images towards the natural-image domain,
and a loss on grey-level co-occurrence (GLCM) statistics keeps the adapted image's texture close
to the original's.

The paper's idea is the texture module, the colour module and the GLCM texture-preservation
loss; the layers below are our design (its full text was not at hand): residual modules whose
last convolution starts at zero, so that a model with modules starts exactly as the model
without them, and a colourisation U-Net as in Morra et al. (ICPR 2020).

GLCM (Haralick, Shanmugam & Dinstein 1973) with scikit-image's ``graycomatrix(symmetric=True,
normed=True)`` and ``graycoprops`` definitions, made differentiable by soft binning: a pixel of
intensity ``v`` belongs to level ``k`` with weight ``max(0, 1 - |v (L - 1) - k|)`` (triangular
membership), so an image already quantised to the ``L`` levels gets exactly the hard GLCM.

Offsets are ``(row step, column step)`` integer pairs. :func:`glcm_offsets` gives the usual
angles the way ``graycomatrix``'s code computes them (row = round(sin(angle) d), column =
round(cos(angle) d), rows counted downwards): 0 degrees is the pixel to the right, 45 degrees the
one below-right, 90 degrees the one below, 135 degrees below-left. scikit-image's docstring says
"pi/4: top-right, pi/2: above" instead; the code is what it computes (scikit-image issues #6011,
#7919), and with symmetric matrices below-right and above-left count the same pairs. Diagonal
steps at distance ``d`` are ``d`` rows and ``d`` columns (Haralick's chessboard distance), not
graycomatrix's ``round(d / sqrt 2)``, which makes distances 1 and 2 the same pairs at 45 degrees.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ASSIMILATIONS",
    "ColourModule",
    "TextureModule",
    "build_modules",
    "check_kind",
    "glcm_features",
    "glcm_offsets",
    "luminance",
    "soft_glcm",
    "texture_loss",
    "texture_statistics",
]

ASSIMILATIONS: tuple[str, ...] = ("none", "texture", "colour", "both")
FEATURES: tuple[str, ...] = ("contrast", "homogeneity", "energy", "correlation")

# graycomatrix's angles 0, 45, 90 and 135 degrees as unit (row, column) steps
_ANGLE_STEPS: tuple[tuple[int, int], ...] = ((0, 1), (1, 1), (1, 0), (1, -1))
# ITU-R BT.601 luma weights (what PIL's convert("L") uses)
_LUMA = (0.299, 0.587, 0.114)


# --- GLCM ----------------------------------------------------------------------------------


def glcm_offsets(distances: Sequence[int] = (1, 2, 4)) -> list[tuple[int, int]]:
    """(row step, column step) for every distance at 0, 45, 90 and 135 degrees, distance-major."""
    for d in distances:
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"GLCM distances must be integers >= 1, got {list(distances)}")
    if not distances:
        raise ValueError("GLCM distances must not be empty")
    return [(d * dr, d * dc) for d in distances for dr, dc in _ANGLE_STEPS]


def _check_offsets(offsets: Sequence[tuple[int, int]], height: int, width: int) -> list[tuple[int, int]]:
    checked = []
    for offset in offsets:
        dr, dc = (int(v) for v in offset)
        if (dr, dc) == (0, 0) or abs(dr) >= height or abs(dc) >= width:
            raise ValueError(
                f"GLCM offset {tuple(offset)} pairs no pixels in a {height}x{width} image "
                "(it must be non-zero and shorter than the image)"
            )
        checked.append((dr, dc))
    if not checked:
        raise ValueError("GLCM offsets must not be empty")
    return checked


def soft_glcm(images: torch.Tensor, levels: int, offsets: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Symmetric, normalised soft GLCMs: (B, n_offsets, levels, levels) for images (B, 1, H, W).

    Intensities are clamped to [0, 1] and soft-binned into ``levels`` levels (triangular
    membership); entry (i, j) of an offset's matrix is the share of pixel pairs (p, p + offset),
    counted both ways, with levels i and j.
    """
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"soft_glcm expects grey images (B, 1, H, W), got {tuple(images.shape)}")
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"GLCM levels must be an integer >= 2, got {levels!r}")
    height, width = images.shape[-2:]
    offsets = _check_offsets(offsets, height, width)
    centres = torch.arange(levels, device=images.device, dtype=images.dtype).view(1, levels, 1, 1)
    membership = F.relu(1 - (images.clamp(0, 1) * (levels - 1) - centres).abs())  # (B, L, H, W)

    counts = []
    for dr, dc in offsets:
        rows, cols = height - abs(dr), width - abs(dc)
        r0, c0 = max(0, -dr), max(0, -dc)
        first = membership[:, :, r0 : r0 + rows, c0 : c0 + cols].flatten(2)
        second = membership[:, :, r0 + dr : r0 + dr + rows, c0 + dc : c0 + dc + cols].flatten(2)
        counts.append(torch.bmm(first, second.transpose(1, 2)))
    glcm = torch.stack(counts, 1)
    glcm = glcm + glcm.transpose(-1, -2)
    return glcm / glcm.sum((-2, -1), keepdim=True)


def glcm_features(P: torch.Tensor) -> dict[str, torch.Tensor]:
    """scikit-image's ``graycoprops`` contrast, homogeneity, energy and correlation of normalised
    GLCMs ``P`` (..., L, L): a dict of tensors shaped ``P.shape[:-2]``.

    Correlation is 1 where either marginal's standard deviation is below 1e-15 (a constant
    image), as in graycoprops; gradients stay finite there.
    """
    levels = P.shape[-1]
    i = torch.arange(levels, device=P.device, dtype=P.dtype).view(levels, 1)
    j = i.view(1, levels)
    total = (-2, -1)
    squared = (i - j) ** 2
    mean_i, mean_j = (P * i).sum(total, keepdim=True), (P * j).sum(total, keepdim=True)
    var_i = (P * (i - mean_i) ** 2).sum(total)
    var_j = (P * (j - mean_j) ** 2).sum(total)
    cov = (P * (i - mean_i) * (j - mean_j)).sum(total)
    constant = (var_i < 1e-30) | (var_j < 1e-30)
    safe = torch.where(constant, torch.ones_like(var_i), var_i * var_j)
    return {
        "contrast": (P * squared).sum(total),
        "homogeneity": (P / (1 + squared)).sum(total),
        "energy": (P**2).sum(total).sqrt(),
        "correlation": torch.where(constant, torch.ones_like(cov), cov / safe.sqrt()),
    }


def luminance(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W): grey images as they are, RGB ones through the BT.601 luma weights."""
    if images.shape[1] == 1:
        return images
    weights = torch.tensor(_LUMA, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True)


def texture_statistics(images: torch.Tensor, levels: int, offsets: Sequence[tuple[int, int]]) -> torch.Tensor:
    """(B, 4, n_offsets): the four GLCM features of the images' luminance; contrast divided by
    (levels - 1)^2 so that all four lie in [-1, 1] and weigh alike in :func:`texture_loss`."""
    features = glcm_features(soft_glcm(luminance(images), levels, offsets))
    features["contrast"] = features["contrast"] / (levels - 1) ** 2
    return torch.stack([features[name] for name in FEATURES], 1)


def texture_loss(
    original: torch.Tensor, adapted: torch.Tensor, levels: int, offsets: Sequence[tuple[int, int]]
) -> torch.Tensor:
    """Mean absolute difference of the GLCM statistics of ``original`` and of ``adapted``'s
    luminance, over the four features, all offsets and the batch (the texture-preservation loss)."""
    with torch.no_grad():
        target = texture_statistics(original, levels, offsets)
    return (texture_statistics(adapted, levels, offsets) - target).abs().mean()


# --- modules -------------------------------------------------------------------------------


class _Scale(nn.Module):
    """A learnable scalar gain, as a layer of its own so that Opacus computes its per-example
    gradients (it handles leaf modules it does not know through functorch)."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([float(value)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    # GroupNorm, not BatchNorm: no running statistics to average, and DP-SGD can clip per example
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.GroupNorm(min(4, out_channels), out_channels),
        nn.ReLU(),
    )


def _zero_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = _conv_block(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class TextureModule(nn.Module):
    """``t = x + a * tanh(g(x))``: g a few conv-GroupNorm-ReLU residual blocks whose last
    convolution starts at zero (so t = x at first), ``a`` learnable. Keeps the channel count."""

    def __init__(self, channels: int, width: int = 8, blocks: int = 2, gain: float = 0.1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv_block(channels, width), *[_Residual(width) for _ in range(blocks)], _zero_conv(width, channels)
        )
        self.scale = _Scale(gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale(torch.tanh(self.body(x)))


class ColourModule(nn.Module):
    """A small U-Net (three down blocks, two up blocks with skip connections) ``h``.

    Grey input (1 channel): ``grey replicated to RGB + b * tanh(h(t))``, a colourisation.
    RGB input (RetinaMNIST): ``t + b * tanh(h(t))``, a residual colour correction 3 -> 3.
    The last convolution starts at zero, so the output starts as the grey-replicated (or the
    unchanged RGB) image; ``b`` is learnable.
    """

    def __init__(self, in_channels: int, width: int = 8, gain: float = 0.1) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.down1 = _conv_block(in_channels, width)
        self.down2 = _conv_block(width, 2 * width)
        self.down3 = _conv_block(2 * width, 4 * width)
        self.up1 = _conv_block(6 * width, 2 * width)
        self.up2 = _conv_block(3 * width, width)
        self.out = _zero_conv(width, 3)
        self.scale = _Scale(gain)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        s1 = self.down1(t)
        s2 = self.down2(F.avg_pool2d(s1, 2, ceil_mode=True))
        s3 = self.down3(F.avg_pool2d(s2, 2, ceil_mode=True))
        u = self.up1(torch.cat([_resize_to(s3, s2), s2], 1))
        u = self.up2(torch.cat([_resize_to(u, s1), s1], 1))
        base = t.expand(-1, 3, -1, -1) if self.in_channels == 1 else t
        return base + self.scale(torch.tanh(self.out(u)))


def _resize_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


def check_kind(kind: str) -> None:
    if kind not in ASSIMILATIONS:
        raise ValueError(f"model.assimilation={kind!r} is not known; use one of {', '.join(ASSIMILATIONS)}")


def build_modules(kind: str, in_channels: int) -> tuple[TextureModule | None, ColourModule | None]:
    """The modules ``model.assimilation=kind`` puts in front of the backbone."""
    check_kind(kind)
    texture = TextureModule(in_channels) if kind in ("texture", "both") else None
    colour = ColourModule(in_channels) if kind in ("colour", "both") else None
    return texture, colour

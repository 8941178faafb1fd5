"""Colour palettes, mask colouring, overlays and image grids for logs and predictions."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["palette", "colorize", "to_display", "overlay", "image_grid"]


def palette(num_colors: int = 256) -> Tensor:
    """The PASCAL VOC bit-interleaved palette: (num_colors, 3) uint8 (the runtime's, as a tensor)."""
    from .deploy.visual import palette as numpy_palette

    return torch.from_numpy(numpy_palette(num_colors))


_PALETTE = palette()


def colorize(mask: Tensor, ignore_index: int = 255) -> Tensor:
    """Class-index mask (H, W) -> RGB float image (3, H, W) in [0, 1]; ignored pixels are white."""
    m = mask.long().cpu()
    rgb = _PALETTE[m.clamp(0, 255)].permute(2, 0, 1).float() / 255.0  # (3, H, W)
    rgb[:, m == ignore_index] = 1.0
    return rgb


def to_display(image: Tensor) -> Tensor:
    """A normalised image (C, H, W) -> RGB (3, H, W) in [0, 1] (min-max per image; 1 channel -> gray)."""
    x = image.detach().float().cpu()
    x = x[:3] if x.shape[0] >= 3 else x[:1].expand(3, -1, -1)
    lo, hi = x.amin(), x.amax()
    return (x - lo) / (hi - lo).clamp_min(1e-6)


def overlay(image: Tensor, mask: Tensor, alpha: float = 0.5, ignore_index: int = 255) -> Tensor:
    """Blend the coloured mask over the image: (3, H, W) in [0, 1]."""
    return (1 - alpha) * to_display(image) + alpha * colorize(mask, ignore_index)


def image_grid(rows: list[list[Tensor]], pad: int = 2) -> Tensor:
    """Stack rows of equally sized (3, H, W) images into one (3, H', W') grid with white padding."""
    h = max(img.shape[1] for row in rows for img in row)
    w = max(img.shape[2] for row in rows for img in row)
    ncol = max(len(r) for r in rows)
    grid = torch.ones(3, len(rows) * (h + pad) + pad, ncol * (w + pad) + pad)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[:, y : y + img.shape[1], x : x + img.shape[2]] = img
    return grid

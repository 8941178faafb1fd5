"""What a prediction looks like: the class palette, coloured masks, overlays and mask files (numpy, Pillow)."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

__all__ = ["colorize", "overlay", "palette", "save_mask"]


def palette(num_colors: int = 256) -> np.ndarray:
    """The PASCAL VOC bit-interleaved palette: (num_colors, 3) uint8, distinct for nearby indices."""
    out = np.zeros((num_colors, 3), np.uint8)
    for i in range(num_colors):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[i] = (r, g, b)
    return out


_PALETTE = palette()


def colorize(mask: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """Class-index mask (H, W) -> RGB (3, H, W) float32 in [0, 1]; ignored pixels are white."""
    rgb = _PALETTE[np.clip(mask, 0, 255)].transpose(2, 0, 1).astype(np.float32) / 255.0
    rgb[:, mask == ignore_index] = 1.0
    return rgb


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5, ignore_index: int = 255) -> np.ndarray:
    """Coloured mask blended over a (C, H, W) image (min-max scaled): (H, W, 3) uint8."""
    x = image[:3] if image.shape[0] >= 3 else np.repeat(image[:1], 3, axis=0)
    lo, hi = x.min(), x.max()
    shown = (x - lo) / max(hi - lo, 1e-6)
    vis = (1 - alpha) * shown + alpha * colorize(mask, ignore_index)
    return np.round(vis * 255).clip(0, 255).astype(np.uint8).transpose(1, 2, 0)


def save_mask(labels: np.ndarray, path: str | os.PathLike, num_classes: int) -> None:
    """Write class indices (H, W) as an 8-bit PNG, or 16-bit beyond 255 classes."""
    Image.fromarray(labels.astype(np.uint8 if num_classes <= 255 else np.uint16)).save(path)

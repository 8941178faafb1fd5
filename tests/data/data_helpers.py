"""Helpers for the data-layer tests (imported by name): tiny image writers, the real-data root."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[2]


def real_data_root() -> Path:
    """``$HYBRIDVISION_DATA`` if set, else ``<repo>/../shared/data``."""
    env = os.environ.get("HYBRIDVISION_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


def save(path: Path, array: np.ndarray, palette: list[int] | None = None) -> Path:
    """Write ``array`` as an image file (format from the suffix), creating parent folders.

    With ``palette`` (flat RGB list) a uint8 (H, W) array is saved as a palette (mode P) image.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    if palette is not None:
        img.putpalette(palette)
    img.save(path)
    return path


def write_corrupt(path: Path) -> Path:
    """A file with an image suffix whose bytes are not an image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not an image at all" * 20)
    return path


def write_truncated(path: Path, shape: tuple[int, int] = (32, 32)) -> Path:
    """A PNG cut in the middle of its pixel data (valid header, decoding fails)."""
    rng = np.random.default_rng(0)
    save(path, rng.integers(0, 256, (*shape, 3), dtype=np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path

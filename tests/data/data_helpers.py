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


def save_with_orientation(path: Path, upright: np.ndarray, orientation: int, **save_kwargs) -> Path:
    """Write an image whose EXIF orientation tag is ``orientation`` and whose *displayed* picture
    (the stored pixels turned as the tag says, as ``PIL.ImageOps.exif_transpose`` does) is
    ``upright`` (H, W[, C]) uint8. Supported: 1, 3, 6 (rotate 90 clockwise to display), 8."""
    # stored = the inverse turn of the displayed picture
    stored = {1: upright, 3: upright[::-1, ::-1], 6: np.rot90(upright, 1), 8: np.rot90(upright, -1)}
    img = Image.fromarray(np.ascontiguousarray(stored[orientation]))
    exif = img.getexif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, exif=exif.tobytes(), **save_kwargs)
    return path


_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _filter_rows(rows: np.ndarray, bpp: int) -> bytes:
    """PNG-filter (H, row_bytes) uint8 rows, cycling through all five filter types (spec 9.2)."""
    out = []
    prior = np.zeros(rows.shape[1], dtype=np.int32)
    for y, row in enumerate(rows.astype(np.int32)):
        kind = y % 5
        left = np.concatenate([np.zeros(bpp, np.int32), row[:-bpp]])
        upper_left = np.concatenate([np.zeros(bpp, np.int32), prior[:-bpp]])
        if kind == 0:
            predictor = np.zeros_like(row)
        elif kind == 1:
            predictor = left
        elif kind == 2:
            predictor = prior
        elif kind == 3:
            predictor = (left + prior) // 2
        else:  # Paeth
            p = left + prior - upper_left
            pa, pb, pc = np.abs(p - left), np.abs(p - prior), np.abs(p - upper_left)
            predictor = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prior, upper_left))
        out.append(bytes([kind]) + ((row - predictor) % 256).astype(np.uint8).tobytes())
        prior = row
    return b"".join(out)


def write_png16(path: Path, array: np.ndarray, interlace: bool = False) -> Path:
    """Write a 16-bit-per-channel PNG (gray, gray+alpha, RGB or RGBA from (H, W[, C]) uint16),
    which PIL cannot write, with every row filter type and optionally Adam7 interlacing."""
    import struct
    import zlib

    array = array if array.ndim == 3 else array[:, :, None]
    height, width, channels = array.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    big_endian = array.astype(">u2").view(np.uint8).reshape(height, width, channels * 2)
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    data = b""
    for x0, y0, dx, dy in passes:
        sub = big_endian[y0::dy, x0::dx]  # (h, w, bytes per pixel)
        if sub.size:
            data += _filter_rows(sub.reshape(sub.shape[0], -1), channels * 2)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, int(interlace))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(data))
        + chunk(b"IEND", b"")
    )
    return path

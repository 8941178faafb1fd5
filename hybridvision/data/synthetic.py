"""Procedurally generated segmentation data: textured shapes on varied backgrounds.

Built so that the whole pipeline (pretrain -> fine-tune -> distill) runs offline in minutes, on a
task that still needs a model: each foreground class is one *shape* filled with one *texture*,
with random colours per instance, so neither colour nor texture nor shape alone gives the class
away. Background-class distractors (a class's shape with another class's texture, and speckled
bars) punish shortcuts, and later shapes occlude earlier ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from hybridvision.data.io import Sample, apply_transform

__all__ = ["SHAPE_CLASSES", "ShapeClass", "ShapesRendering", "SyntheticShapesDataset"]

# Geometry and texture scales are given for a 64-pixel image and scaled with the image size.
_BASE_SIZE = 64.0
_RADIUS_RANGE = (0.12, 0.25)  # shape radius, fraction of the shorter image side
_NOISE_GRID = 4  # control points per side of the smooth background noise


@dataclass(frozen=True)
class ShapeClass:
    """One foreground class: a shape filled with a texture.

    Attributes:
        name: Human-readable class name.
        shape: Shape kind, a key of ``_SHAPES``.
        texture: Texture kind, a key of ``_TEXTURES``.
    """

    name: str
    shape: str
    texture: str


SHAPE_CLASSES: tuple[ShapeClass, ...] = (
    ShapeClass("striped_disk", "disk", "stripes"),
    ShapeClass("checkered_rectangle", "rectangle", "checker"),
    ShapeClass("dotted_triangle", "triangle", "dots"),
    ShapeClass("gradient_ring", "ring", "gradient"),
    ShapeClass("gridded_hexagon", "hexagon", "grid"),
    ShapeClass("rippled_cross", "cross", "ripples"),
)
"""Foreground classes 1..6 in order; class 0 is background. ``num_classes`` takes a prefix."""


@dataclass
class ShapesRendering:
    """Everything drawn for one sample.

    Attributes:
        image: (H, W, C) float32 in [0, 1].
        mask: (H, W) int64 class ids (0 = background, distractors included).
        instances: (H, W) int64 index into ``colors`` of the shape that owns each pixel, -1
            where background or a speckled bar is visible.
        colors: (N, 2, C) float32, the two colours each shape's texture blends between.
        labels: (N,) int64 class id of each shape (0 for distractors).
    """

    image: np.ndarray
    mask: np.ndarray
    instances: np.ndarray
    colors: np.ndarray
    labels: np.ndarray


# --------------------------------------------------------------------------- shapes
# Each takes local coordinates (u, v) (H, W) already rotated into the shape's frame, and its
# radius r in pixels; returns a bool (H, W) inside-mask.


def _regular_polygon(u: np.ndarray, v: np.ndarray, r: float, sides: int) -> np.ndarray:
    apothem = r * math.cos(math.pi / sides)
    inside = np.ones(u.shape, dtype=bool)
    for k in range(sides):
        phi = 2.0 * math.pi * k / sides
        inside &= u * math.cos(phi) + v * math.sin(phi) <= apothem
    return inside


def _disk(u, v, r, rng):
    return u * u + v * v <= r * r


def _rectangle(u, v, r, rng):
    half_w, half_h = r * rng.uniform(0.55, 1.0), r * rng.uniform(0.55, 1.0)
    return (np.abs(u) <= half_w) & (np.abs(v) <= half_h)


def _triangle(u, v, r, rng):
    return _regular_polygon(u, v, r * 1.15, 3)


def _ring(u, v, r, rng):
    d2 = u * u + v * v
    return (d2 <= r * r) & (d2 >= (r * rng.uniform(0.45, 0.65)) ** 2)


def _hexagon(u, v, r, rng):
    return _regular_polygon(u, v, r, 6)


def _cross(u, v, r, rng):
    arm = r * rng.uniform(0.25, 0.35)
    au, av = np.abs(u), np.abs(v)
    return ((au <= arm) & (av <= r)) | ((av <= arm) & (au <= r))


_SHAPES: dict[str, Callable[..., np.ndarray]] = {
    "disk": _disk,
    "rectangle": _rectangle,
    "triangle": _triangle,
    "ring": _ring,
    "hexagon": _hexagon,
    "cross": _cross,
}

# --------------------------------------------------------------------------- textures
# Each takes offsets (dx, dy) (H, W) from the shape centre in pixels, the shape radius r and the
# scale f = image side / 64; returns t (H, W) float32 in [0, 1], the blend between two colours.


def _rotated(dx, dy, rng):
    alpha = rng.uniform(0.0, math.pi)
    c, s = math.cos(alpha), math.sin(alpha)
    return dx * c + dy * s, -dx * s + dy * c


def _stripes(dx, dy, r, f, rng):
    a, _ = _rotated(dx, dy, rng)
    half_period = rng.uniform(2.0, 3.5) * f
    return (np.floor(a / half_period + rng.uniform(0, 2)) % 2).astype(np.float32)


def _checker(dx, dy, r, f, rng):
    a, b = _rotated(dx, dy, rng)
    cell = rng.uniform(2.5, 4.0) * f
    return ((np.floor(a / cell) + np.floor(b / cell)) % 2).astype(np.float32)


def _dots(dx, dy, r, f, rng):
    a, b = _rotated(dx, dy, rng)
    spacing = rng.uniform(4.5, 6.5) * f
    fa = (a / spacing + rng.uniform(0, 1)) % 1.0 - 0.5
    fb = (b / spacing + rng.uniform(0, 1)) % 1.0 - 0.5
    return (fa * fa + fb * fb <= rng.uniform(0.25, 0.32) ** 2).astype(np.float32)


def _gradient(dx, dy, r, f, rng):
    a, _ = _rotated(dx, dy, rng)
    return np.clip(0.5 + a / (2.0 * r), 0.0, 1.0).astype(np.float32)


def _grid(dx, dy, r, f, rng):
    a, b = _rotated(dx, dy, rng)
    spacing, width = rng.uniform(4.0, 5.5) * f, rng.uniform(1.0, 1.6) * f
    return (((a % spacing) < width) | ((b % spacing) < width)).astype(np.float32)


def _ripples(dx, dy, r, f, rng):
    period = rng.uniform(4.0, 6.0) * f
    d = np.sqrt(dx * dx + dy * dy)
    return (0.5 + 0.5 * np.cos(2.0 * math.pi * d / period + rng.uniform(0, 2 * math.pi))).astype(np.float32)


_TEXTURES: dict[str, Callable[..., np.ndarray]] = {
    "stripes": _stripes,
    "checker": _checker,
    "dots": _dots,
    "gradient": _gradient,
    "grid": _grid,
    "ripples": _ripples,
}


class SyntheticShapesDataset(Dataset):
    """Textured-shapes segmentation set, deterministic per ``(seed, index)``.

    Every sample is drawn from its own generator seeded with ``(seed, index)``, so the bytes do
    not depend on access order, DataLoader workers or processes. Per image: a background (linear
    colour gradient + smooth noise), 1..``max_shapes`` class shapes and 0..``max_distractors``
    background-class distractors, in random order (the last-drawn owns a pixel; masks are exact,
    no anti-aliasing), then Gaussian noise. Colours are random per instance.

    Samples: ``{"image": (C, H, W) float32 in [0, 1], "mask": (H, W) int64, "id": str}``;
    ``labelled=False`` drops ``"mask"`` (for pretraining).

    Args:
        num_samples: Length of the dataset.
        image_size: Side, or (H, W).
        num_classes: Classes including background, 2..7 (a prefix of :data:`SHAPE_CLASSES`).
        in_chans: Image channels (colours are drawn per channel).
        seed: Dataset seed; different seeds give different images.
        labelled: Whether samples carry a ``"mask"``.
        transform: Callable on the sample dict (``tv_tensors.Image`` / ``tv_tensors.Mask``).
        noise_std: Typical standard deviation of the additive Gaussian noise (per image it is
            drawn in [0.5, 1.5] x ``noise_std``).
        max_shapes: Most class shapes per image (at least one is drawn).
        max_distractors: Most background-class distractors per image.
    """

    def __init__(
        self,
        num_samples: int = 512,
        image_size: int | tuple[int, int] = 64,
        num_classes: int = 4,
        in_chans: int = 3,
        seed: int = 0,
        labelled: bool = True,
        transform: Callable[[Sample], Any] | None = None,
        noise_std: float = 0.05,
        max_shapes: int = 5,
        max_distractors: int = 2,
    ) -> None:
        if not 2 <= num_classes <= len(SHAPE_CLASSES) + 1:
            raise ValueError(f"num_classes must be in [2, {len(SHAPE_CLASSES) + 1}], got {num_classes}")
        if num_samples < 1 or in_chans < 1 or max_shapes < 1 or max_distractors < 0 or noise_std < 0:
            raise ValueError(
                "need num_samples >= 1, in_chans >= 1, max_shapes >= 1, max_distractors >= 0, "
                f"noise_std >= 0; got {num_samples}, {in_chans}, {max_shapes}, {max_distractors}, {noise_std}"
            )
        self.num_samples = num_samples
        self.height, self.width = (image_size, image_size) if isinstance(image_size, int) else image_size
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.seed = seed
        self.labelled = labelled
        self.transform = transform
        self.noise_std = noise_std
        self.max_shapes = max_shapes
        self.max_distractors = max_distractors
        self.classes = SHAPE_CLASSES[: num_classes - 1]
        """Foreground classes in use; class id = position + 1."""
        # Pixel-centre coordinates, (H, W) each.
        self._ys, self._xs = np.mgrid[0 : self.height, 0 : self.width].astype(np.float32) + 0.5
        self._interp_y = _bilinear_matrix(self.height, _NOISE_GRID)  # (H, G)
        self._interp_x = _bilinear_matrix(self.width, _NOISE_GRID)  # (W, G)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        drawn = self.render(index)
        # (H, W, C) -> (C, H, W)
        sample: Sample = {"image": torch.from_numpy(np.ascontiguousarray(drawn.image.transpose(2, 0, 1)))}
        if self.labelled:
            sample["mask"] = torch.from_numpy(drawn.mask)
        sample["id"] = f"{self.seed}-{index}"
        return apply_transform(sample, self.transform)

    def render(self, index: int) -> ShapesRendering:
        """Draw sample ``index`` with its per-pixel owner map (for inspection and tests)."""
        rng = np.random.default_rng([self.seed, index])
        height, width, chans = self.height, self.width, self.in_chans
        scale = min(height, width) / _BASE_SIZE
        image = self._background(rng)
        mask = np.zeros((height, width), dtype=np.int64)
        instances = np.full((height, width), -1, dtype=np.int64)
        colors: list[np.ndarray] = []
        labels: list[int] = []

        # (label, shape, texture); texture None = speckled bar.
        items: list[tuple[int, str, str | None]] = []
        for _ in range(rng.integers(1, self.max_shapes + 1)):
            k = int(rng.integers(len(self.classes)))
            items.append((k + 1, self.classes[k].shape, self.classes[k].texture))
        for _ in range(rng.integers(0, self.max_distractors + 1)):
            items.append((0, *self._distractor(rng)))
        order = rng.permutation(len(items))

        for i in order:
            label, shape, texture = items[i]
            cy, cx = rng.uniform(0.1, 0.9) * height, rng.uniform(0.1, 0.9) * width
            radius = rng.uniform(*_RADIUS_RANGE) * min(height, width)
            theta = rng.uniform(0.0, 2.0 * math.pi)
            # Work inside the item's bounding window only (every shape fits in 1.45 r, bars in 2.6 r).
            extent = radius * (2.6 if texture is None else 1.45)
            y0, y1 = max(0, int(cy - extent)), min(height, int(cy + extent) + 2)
            x0, x1 = max(0, int(cx - extent)), min(width, int(cx + extent) + 2)
            dx, dy = self._xs[y0:y1, x0:x1] - cx, self._ys[y0:y1, x0:x1] - cy  # (h, w) offsets
            c, s = math.cos(theta), math.sin(theta)
            u, v = dx * c + dy * s, -dx * s + dy * c  # shape frame
            if texture is None:  # speckled bar: a long thin rectangle of per-pixel noise
                inside = (np.abs(u) <= radius * 2.5) & (np.abs(v) <= radius * rng.uniform(0.15, 0.3))
                low, high = rng.random(chans, dtype=np.float32), rng.random(chans, dtype=np.float32)
                t = rng.random(inside.shape, dtype=np.float32)
                owner = -1
            else:
                inside = _SHAPES[shape](u, v, radius, rng)
                t = _TEXTURES[texture](dx, dy, radius, scale, rng)
                low = rng.random(chans, dtype=np.float32)
                # Every channel differs by 0.35..0.65 (cyclically) so the texture always shows.
                high = (low + rng.uniform(0.35, 0.65, chans).astype(np.float32)) % 1.0
                owner = len(colors)
                colors.append(np.stack([low, high]))
                labels.append(label)
            paint = low + t[inside][:, None] * (high - low)  # (n, C) for the n covered pixels
            image[y0:y1, x0:x1][inside] = paint
            mask[y0:y1, x0:x1][inside] = label
            instances[y0:y1, x0:x1][inside] = owner

        if self.noise_std > 0:
            sigma = self.noise_std * rng.uniform(0.5, 1.5)
            image = image + sigma * rng.standard_normal(image.shape, dtype=np.float32)
        image = np.clip(image, 0.0, 1.0, dtype=np.float32)
        packed = np.stack(colors) if colors else np.zeros((0, 2, chans), dtype=np.float32)
        return ShapesRendering(
            image=image,
            mask=mask,
            instances=instances,
            colors=packed,
            labels=np.array(labels, dtype=np.int64),
        )

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        """Linear gradient between two random colours plus smooth noise, (H, W, C) float32."""
        chans = self.in_chans
        start, end = rng.random(chans, dtype=np.float32), rng.random(chans, dtype=np.float32)
        alpha = rng.uniform(0.0, 2.0 * math.pi)
        along_x, along_y = math.cos(alpha) / self.width, math.sin(alpha) / self.height
        ramp = (self._xs - self.width / 2) * along_x + (self._ys - self.height / 2) * along_y
        ramp = np.clip(ramp + 0.5, 0.0, 1.0)[..., None]  # (H, W, 1)
        grid = rng.random((_NOISE_GRID, _NOISE_GRID, chans), dtype=np.float32) - 0.5  # (G, G, C)
        # (H, G) @ (G, G*C) -> (H, G, C); then (W, G) @ (H, G, C) -> (H, W, C)
        rows = (self._interp_y @ grid.reshape(_NOISE_GRID, -1)).reshape(-1, _NOISE_GRID, chans)
        smooth = np.matmul(self._interp_x, rows)
        return start + ramp * (end - start) + rng.uniform(0.1, 0.4) * smooth

    def _distractor(self, rng: np.random.Generator) -> tuple[str, str | None]:
        """A background-class item: a class shape with a foreign texture, or a speckled bar."""
        if rng.random() < 0.3:
            return "rectangle", None
        own = self.classes[int(rng.integers(len(self.classes)))]
        others = [c for c in SHAPE_CLASSES if c != own]
        other = others[int(rng.integers(len(others)))]
        # Shapes and textures are all distinct in the table, so both pairs are foreign.
        return (own.shape, other.texture) if rng.random() < 0.5 else (other.shape, own.texture)


def _bilinear_matrix(size: int, points: int) -> np.ndarray:
    """(size, points) weights that linearly interpolate ``points`` control values over ``size`` pixels."""
    pos = (np.arange(size, dtype=np.float32) + 0.5) / size * (points - 1)  # (size,)
    return np.clip(1.0 - np.abs(pos[:, None] - np.arange(points, dtype=np.float32)[None, :]), 0.0, 1.0)

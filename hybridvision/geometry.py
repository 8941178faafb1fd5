"""Sizes and window placement shared by training, inference and the runtime (numpy only, no torch).

Training (:class:`hybridvision.data.transforms.RandomResize`, the padded crops), evaluation
(:mod:`hybridvision.inference`) and the PyTorch-free predictor (:mod:`hybridvision.deploy.runtime`)
take their scales, window offsets, blending weights and padding from here, so the three cannot
drift apart. Nothing here imports torch or any other module of the project.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "FLIP_AXES",
    "IMAGE_PAD_VALUE",
    "Scale",
    "gaussian_window",
    "rescaled_size",
    "window_positions",
    "window_starts",
]

#: Value of the pixels added around a *normalised* image, by training crops
#: (:func:`hybridvision.data.transforms.build_seg_transforms`) and inference windows alike: 0, the
#: normalisation mean (MMSegmentation's ``SegDataPreProcessor(pad_val=0)``); masks get ``ignore_index``.
IMAGE_PAD_VALUE = 0.0

#: Test-time flips by name: the axes of an (..., H, W) array or tensor they reverse.
FLIP_AXES: dict[str, tuple[int, ...]] = {"h": (-1,), "v": (-2,), "hv": (-2, -1)}


class Scale(NamedTuple):
    """A rescaling target (``data.resize``, ``--resize``, the exported ``resize``): see :func:`rescaled_size`.

    The one typed form of the setting; every reader goes through :meth:`parse`.
    """

    short: int  # the short side after rescaling
    max_long: int = 0  # limit on the long side (0: none)

    @classmethod
    def parse(cls, value: Any) -> Scale | None:
        """``value`` as a scale: None or ``"native"`` -> None; ``S``, ``[S]``, ``[S, L]`` -> ``Scale``.

        Raises:
            ValueError: anything else (the message says what is accepted).
        """
        items = value.split() if isinstance(value, str) else value if isinstance(value, Sequence) else [value]
        if value is None or [str(v).strip().lower() for v in items] == ["native"]:
            return None
        try:
            values = [int(v) for v in items]
        except (TypeError, ValueError):
            values = []
        if len(values) not in (1, 2) or values[0] < 1 or (len(values) == 2 and values[1] < 0):
            raise ValueError(f"give native, SHORT or [SHORT, MAX_LONG] pixels (SHORT >= 1); got {value!r}")
        if len(values) == 2 and 0 < values[1] < values[0]:
            raise ValueError(f"the long-side limit {values[1]} is below the short side {values[0]}")
        return cls(*values)


def rescaled_size(height: int, width: int, resize: Sequence[int] | None) -> tuple[int, int]:
    """(H, W) of an image rescaled to the scale ``resize = [short_side, max_long_side]``, aspect kept.

    The short side becomes ``short_side`` unless the long side would then exceed ``max_long_side``
    (0: no limit), in which case the long side becomes ``max_long_side`` (MMSegmentation's
    ``Resize(scale=(long, short), keep_ratio=True)``). ``None`` keeps the size. Shared by training
    (:class:`hybridvision.data.transforms.RandomResize`), evaluation
    (:class:`hybridvision.inference.Predictor`) and the runtime, so all three agree.
    """
    if not resize:
        return int(height), int(width)
    short, long_max = int(resize[0]), int(resize[1]) if len(resize) > 1 else 0
    factor = short / min(height, width)
    if long_max and max(height, width) * factor > long_max:
        factor = long_max / max(height, width)
    return max(1, round(height * factor)), max(1, round(width * factor))


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Evenly spaced window offsets covering ``[0, size)``; the last window ends at ``size``.

    Uses the fewest windows whose spacing is at most ``stride`` (nnU-Net's placement), so the image
    border is never padded when ``size >= window``.
    """
    if size <= window:
        return [0]
    steps = math.ceil((size - window) / stride) + 1
    return [round(i * (size - window) / (steps - 1)) for i in range(steps)]


def window_positions(
    height: int, width: int, window: tuple[int, int], overlap: float
) -> list[tuple[int, int]]:
    """(top, left) of every sliding window over an image, row by row.

    The image (H, W) is taken as padded bottom/right to at least the window; along each side the
    windows are placed by :func:`window_starts` with a stride of at most ``window * (1 - overlap)``.

    Args:
        height: H of the image.
        width: W of the image.
        window: (h, w) of the window.
        overlap: fraction of the window shared by neighbours, in [0, 1).

    Returns:
        Offsets (y, x), in the order of ``itertools.product(ys, xs)``.
    """
    wh, ww = window
    ys = window_starts(max(height, wh), wh, max(1, int(wh * (1 - overlap))))
    xs = window_starts(max(width, ww), ww, max(1, int(ww * (1 - overlap))))
    return list(itertools.product(ys, xs))


def gaussian_window(size: tuple[int, int], sigma_scale: float = 0.125) -> np.ndarray:
    """Gaussian importance map centred on the window (nnU-Net), maximum 1, strictly positive.

    Args:
        size: (h, w) of the window.
        sigma_scale: standard deviation as a fraction of each side.

    Returns:
        (h, w) float32 weights.
    """
    axes = []
    for n in size:
        coords = np.arange(n, dtype=np.float64) - (n - 1) / 2
        sigma = max(n * sigma_scale, 1e-6)
        axes.append(np.exp(-0.5 * (coords / sigma) ** 2))
    weights = axes[0][:, None] * axes[1][None, :]  # (h, w)
    weights = weights / weights.max()
    # far corners can underflow to 0; floor them so every pixel keeps a positive weight
    return np.maximum(weights, max(weights[weights > 0].min(), 1e-6)).astype(np.float32)

"""Config sections fine-tuning and distillation share: the segmentation loss, augmentation, evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..config import ConfigError

__all__ = ["LossConfig", "AugmentConfig", "EvalConfig"]


@dataclass
class LossConfig:
    """Segmentation loss: a weighted sum of terms (ce is BCE when data.num_classes=1)."""

    weights: dict[str, float] = field(
        default_factory=lambda: {"ce": 1.0, "dice": 1.0, "focal": 0.5, "boundary": 0.1}
    )  # term -> weight; terms: ce, dice, focal, boundary
    class_weights: list[float] = field(default_factory=list)  # per-class CE weights (empty: uniform)
    label_smoothing: float = 0.0  # CE label smoothing


@dataclass
class AugmentConfig:
    """Joint image+mask training augmentations (torchvision v2)."""

    scale: tuple[float, float] = (0.5, 2.0)  # random rescale range before the crop
    hflip: bool = True  # random horizontal flip
    vflip: bool = False  # random vertical flip
    rot90: bool = False  # random 90-degree rotations
    color_jitter: float = 0.0  # brightness/contrast/saturation jitter strength (RGB only)
    elastic: float = 0.0  # elastic deformation strength (0: off)
    size_schedule: list[tuple[int, int]] = field(
        default_factory=list
    )  # progressive resizing: [[step, side], ...]

    def __post_init__(self) -> None:
        steps = [s for s, _ in self.size_schedule]
        if steps != sorted(steps):
            raise ConfigError(f"augment.size_schedule steps must increase, got {self.size_schedule}")


@dataclass
class EvalConfig:
    """How evaluation predicts."""

    mode: Literal["whole", "slide"] = "whole"  # whole image or sliding window
    window: tuple[int, int] = (256, 256)  # sliding-window size
    overlap: float = 0.25  # sliding-window overlap fraction
    blend: Literal["uniform", "gaussian"] = "gaussian"  # window blending
    tta_flips: list[str] = field(default_factory=list)  # flip TTA: h, v
    batch_size: int = 4  # evaluation images per batch (windows are batched too)
    grid_images: int = 4  # images in the input | ground truth | prediction grid (0: none)

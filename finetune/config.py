"""Configuration of the fine-tuning stage (``finetune/run.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from hybridvision.config import ConfigError, DataConfig, OptimConfig, TrainConfig

#: where ``model.init=auto`` looks for an encoder (the default output of pretrain/run.py)
DEFAULT_PRETRAINED_ENCODER = "runs/pretrain/encoder"
#: architecture used when neither model.name nor model.init names one: ResNet stages + global
#: attention at stride 32 + U-Net decoder, chosen by benchmarks/realdata.sh (ISBI and CamVid at
#: equal CPU seconds against smp's U-Net-R18); ``model.name=hybrid_nano`` is the fast preset
FALLBACK_MODEL = "sequential_unet_tiny"


@dataclass
class FinetuneModelConfig:
    """The segmenter and where its weights start from."""

    name: str = ""  # preset or encoder ('' = the encoder in model.init, else sequential_unet_tiny)
    init: str = "auto"  # auto | '' (scratch) | encoder/model dir | hub id | timm weights file
    init_strict: bool = True  # shape mismatches are errors (false: skip and list them)
    decoder: str = ""  # decoder name ('' = the preset's, or segformer_mlp)
    decoder_kwargs: dict[str, Any] = field(default_factory=dict)  # decoder overrides, e.g. {embed_dim: 128}
    overrides: dict[str, Any] = field(default_factory=dict)  # encoder overrides, e.g. {drop_path_rate: 0.1}
    ema_decay: float = 0.0  # EMA of weights for evaluation and export (0: off; e.g. 0.999)

    def __post_init__(self) -> None:
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"model.ema_decay must be in [0, 1), got {self.ema_decay}")


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


@dataclass
class FinetuneConfig:
    """``finetune/run.py``: train a segmenter and evaluate it."""

    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            output_dir="runs/finetune",
            max_steps=300,
            batch_size=16,
            ckpt_every=100,
            eval_every=100,
            mixed_precision="auto",
        )
    )
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=2e-3, weight_decay=0.01, warmup_steps=20)
    )
    data: DataConfig = field(default_factory=lambda: DataConfig(image_size=(64, 64), synthetic_samples=1024))
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

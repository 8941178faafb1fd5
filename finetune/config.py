"""Configuration of the fine-tuning stage (``finetune/run.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hybridvision.config import ConfigError, DataConfig, OptimConfig, TrainConfig
from hybridvision.segmentation.config import AugmentConfig, EvalConfig, LossConfig

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

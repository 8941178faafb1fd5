"""Configuration of the pretraining stage (``pretrain/run.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from hybridvision.config import ConfigError, DataConfig, ModelConfig, OptimConfig, TrainConfig


@dataclass
class ObjectiveConfig:
    """Self-supervised objective(s)."""

    # what to optimise; dense_contrastive: point-level NT-Xent between two views (pretrain/dense.py)
    name: Literal["contrastive", "mim", "contrastive_mim", "dense_contrastive"] = "contrastive_mim"
    contrastive_weight: float = 1.0  # weight of NT-Xent in contrastive_mim
    mim_weight: float = 1.0  # weight of the reconstruction loss in contrastive_mim
    temperature: float = 0.2  # NT-Xent temperature
    projection_dim: int = 128  # projection head output size
    projection_hidden_dim: int = 0  # projection head hidden size (0: last-stage channels)
    projection_layers: int = 2  # linear layers in the projection head
    dense_points: int = 64  # dense_contrastive: points sampled per image (positives across the views)
    mask_patch_size: int = 32  # MIM mask block side (pixels)
    mask_ratio: float = 0.6  # MIM fraction of masked blocks
    # reconstruction decoder; segmenter: the fine-tuning model's own decoder (model.name = a segmenter
    # preset or an encoder + model.decoder), so the whole encoder-decoder is pretrained and exported
    mim_decoder: Literal["auto", "multiscale", "pixel_shuffle", "segmenter"] = "auto"
    mim_decoder_dim: int = 256  # multiscale decoder width at the deepest scale (halves per finer scale)
    mim_loss: Literal["l1", "mse"] = "l1"  # reconstruction loss on masked pixels
    norm_pix_loss: bool = False  # MAE per-patch normalised targets
    # MIM: attention stages encode the visible tokens only (MAE / GreenMIM; swin_*, hybrid_*,
    # sequential_* encoders, multiscale decoder): swin_tiny steps ~2x faster, hybrid_nano ~1.2x
    visible_only: bool = False
    sync_batchnorm: bool = True  # convert BatchNorm to SyncBatchNorm under multi-GPU DDP (CUDA only)
    augment_preset: Literal["auto", "rgb", "grayscale", "multiband"] = "auto"  # view augmentations
    min_crop_scale: float = 0.25  # smallest area fraction of a contrastive crop (SimCLR: 0.08)
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"  # scale optim.lr by global batch / 256

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"objective.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.temperature <= 0:
            raise ConfigError(f"objective.temperature must be > 0, got {self.temperature}")
        if self.visible_only and self.name in ("contrastive", "dense_contrastive"):
            raise ConfigError(
                f"objective.visible_only=true is an option of MIM; objective.name={self.name} has no MIM "
                "term: use objective.name=mim or contrastive_mim"
            )
        if self.visible_only and self.mim_decoder not in ("auto", "multiscale"):
            raise ConfigError(
                f"objective.visible_only=true needs objective.mim_decoder=multiscale (or auto), got "
                f"{self.mim_decoder}: only its mask embeddings fill the positions the encoder leaves empty"
            )
        if self.mim_decoder == "segmenter" and self.name in ("contrastive", "dense_contrastive"):
            raise ConfigError(
                "objective.mim_decoder=segmenter trains the decoder by reconstruction: "
                "use objective.name=mim or contrastive_mim"
            )


@dataclass
class ProbeConfig:
    """SSL evaluation: a dense linear probe on frozen features (logged as eval/probe_*)."""

    source: str = "synthetic"  # labelled data for the probe: synthetic | images+masks folder | none
    split: str = "train"  # probe-train split of a folder source
    val_split: str = "val"  # probe-val split of a folder source
    num_classes: int = 4  # classes of the probe data
    train_images: int = 128  # images used to fit the probe
    val_images: int = 64  # images used to score it
    stages: list[int] = field(default_factory=lambda: [-3, -2, -1])  # feature stages concatenated
    at_start: bool = True  # also probe the initial (random) encoder


@dataclass
class PretrainModelConfig(ModelConfig):
    """The encoder (or, with objective.mim_decoder=segmenter, the segmenter) and where it starts from."""

    name: str = ""  # encoder / segmenter name ('' = hybrid_nano, or the architecture model.init holds)
    init: str = ""  # continue from: our encoder/ segmenter/ model/ dir, a timm or transformers dir or hub id, a weights file
    init_strict: bool = True  # tensors that do not fit are errors (false: keep their random init, list them)


@dataclass
class PretrainConfig:
    """``pretrain/run.py``: self-supervised pretraining of an encoder."""

    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            output_dir="runs/pretrain",
            max_steps=150,
            batch_size=32,
            ckpt_every=50,
            eval_every=75,
            mixed_precision="auto",
            log_images_every=50,
        )
    )
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=2e-3, weight_decay=0.05, warmup_steps=15)
    )
    data: DataConfig = field(default_factory=lambda: DataConfig(image_size=(64, 64), synthetic_samples=2048))
    model: PretrainModelConfig = field(default_factory=PretrainModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)

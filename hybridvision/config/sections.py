"""The config sections every stage shares: train, optim, data, model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from ..geometry import Scale
from .errors import _check_resize, _non_negative, _positive, field_error

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# Sections shared by every stage
# --------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """The training loop (same keys in every stage)."""

    output_dir: str = "runs/default"  # where checkpoints, logs and exported models go
    max_steps: int = 200  # optimizer steps to train for
    batch_size: int = 16  # samples per process per micro-batch
    grad_accum_steps: int = 1  # micro-batches accumulated into one optimizer step
    # autocast dtype (Accelerate); auto: bf16 on GPUs that support it (else fp16), on CPUs bf16 only
    # with AMX (without it bf16 matmuls/convs run slower than fp32: benchmarks/precision.py), else no
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "no"
    seed: int = 0  # global seed (model init, data order, augmentations)
    resume: str = "auto"  # auto: newest complete checkpoint in output_dir; never; or a checkpoint path
    log_every: int = 10  # steps between scalar logs
    ckpt_every: int = 100  # steps between checkpoints (a final one is always written)
    keep_last: int = 3  # checkpoints kept (older ones are deleted)
    eval_every: int = 0  # steps between evaluations (0: only at the end)
    grad_clip: float = 1.0  # max global grad norm (0 disables clipping)
    skip_nonfinite: bool = False  # skip steps with a NaN/inf loss instead of stopping
    max_nonfinite: int = 20  # with skip_nonfinite: stop after this many skipped steps
    log_images_every: int = 0  # steps between image logs (0: at evaluations only)
    progress_bar: bool = True  # tqdm bar on the main process
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])  # accelerate trackers

    def __post_init__(self) -> None:
        _positive(self, "max_steps", "batch_size", "grad_accum_steps", "log_every", "ckpt_every", "keep_last")
        _non_negative(self, "eval_every", "grad_clip", "log_images_every", "max_nonfinite")


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: Literal["adamw", "sgd"] = "adamw"  # optimizer
    lr: float = 1e-3  # peak learning rate (after warmup)
    weight_decay: float = 0.05  # decoupled weight decay (not applied to norms, biases, tokens)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    momentum: float = 0.9  # SGD momentum
    warmup_steps: int = 10  # linear warmup from warmup_start_ratio * lr to lr
    warmup_start_ratio: float = 0.0  # LR at step 0 as a fraction of lr
    schedule: Literal["cosine", "poly", "constant"] = "cosine"  # decay after warmup
    min_lr_ratio: float = 0.0  # final LR as a fraction of lr
    poly_power: float = 1.0  # exponent of the poly schedule
    lr_mult: dict[str, float] = field(default_factory=dict)  # parameter-name prefix -> LR multiplier
    layer_decay: float = 1.0  # layer-wise LR decay for transformer encoders (1.0: off)

    def __post_init__(self) -> None:
        _positive(self, "lr")
        _non_negative(self, "weight_decay", "warmup_steps", "min_lr_ratio", "warmup_start_ratio")
        if not 0.0 < self.layer_decay <= 1.0:
            raise field_error(self, "layer_decay", f"must be in (0, 1], got {self.layer_decay}")


@dataclass
class DataConfig:
    """Where samples come from and how they are loaded."""

    source: str = "synthetic"  # synthetic | a folder path | a HF dataset id or local datasets dir
    split: str = "train"  # training split (folder layouts: images/<split>)
    val_split: str = "val"  # evaluation split ('' disables evaluation)
    val_ids: list[str] = field(default_factory=list)  # hold these ids of `split` out for evaluation
    label_fraction: float = 1.0  # train on this seeded fraction of the labelled split (train.seed picks it)
    labelled_ids: list[str] = field(default_factory=list)  # or on exactly these ids of `split` (empty: all)
    in_chans: int = 3  # image channels given to the model
    image_size: tuple[int, int] = (64, 64)  # training crop size (H, W)
    resize: list[int] | str = "auto"  # scale: [short, max_long] px | native | auto (native if sizes agree)
    num_classes: int = 4  # classes (1: binary with BCE); synthetic: shape classes incl. background
    class_names: list[str] = field(default_factory=list)  # names for logs and metrics.json
    ignore_index: int = 255  # mask value excluded from losses and metrics
    mask_values: list[int] = field(default_factory=list)  # stored value of class 0, 1, ...: [0, 255]
    on_bad_file: Literal["error", "skip"] = "error"  # unreadable file: stop and name it | skip it
    num_workers: int = 0  # DataLoader worker processes per training process
    persistent_workers: bool = False  # keep workers alive between epochs
    pin_memory: bool = True  # pinned host memory (used only with CUDA)
    streaming: bool = False  # HF datasets: stream instead of materialising
    image_column: str = "image"  # HF datasets: image column
    mask_column: str = "label"  # HF datasets: mask column
    synthetic_samples: int = 512  # synthetic: samples in the training set
    synthetic_val_samples: int = 64  # synthetic: samples in the evaluation set
    normalize: str = "imagenet"  # imagenet | per_image | none (ignored when data.mean/data.std are set)
    mean: list[float] = field(default_factory=list)  # per-channel normalisation mean (with data.std)
    std: list[float] = field(default_factory=list)  # per-channel normalisation std (with data.mean)
    window: tuple[float, float] | None = None  # CT windowing (center, width) applied before normalize

    def __post_init__(self) -> None:
        _positive(self, "in_chans", "num_classes", "synthetic_samples")
        _non_negative(self, "num_workers", "synthetic_val_samples")
        if not 0.0 < self.label_fraction <= 1.0:
            raise field_error(self, "label_fraction", f"must be in (0, 1], got {self.label_fraction}")
        if self.labelled_ids and self.label_fraction < 1.0:
            raise field_error(self, "label_fraction", "and data.labelled_ids exclude each other: set one")
        if any(s <= 0 for s in self.image_size):
            raise field_error(self, "image_size", f"must be positive, got {self.image_size}")
        self.resize = _check_resize(self, self.resize)
        classes = max(self.num_classes, 2)
        if self.class_names and len(self.class_names) != classes:
            raise field_error(
                self,
                "class_names",
                f"has {len(self.class_names)} names but data.num_classes={self.num_classes} needs {classes}",
            )
        if self.normalize not in ("imagenet", "per_image", "none"):
            raise field_error(
                self, "normalize", f"must be imagenet, per_image or none; got {self.normalize!r}"
            )
        if self.mask_values:
            if len(self.mask_values) != classes:
                raise field_error(
                    self,
                    "mask_values",
                    f"has {len(self.mask_values)} values but data.num_classes={self.num_classes} needs "
                    f"{classes} (the stored value of class 0, 1, ...; e.g. [0, 255] for 0/255 binary masks)",
                )
            if len(set(self.mask_values)) != len(self.mask_values):
                raise field_error(self, "mask_values", f"has repeated values: {self.mask_values}")
        if bool(self.mean) != bool(self.std):
            raise field_error(
                self, "mean" if not self.mean else "std", "must be set together with data.mean/data.std"
            )
        if self.mean:
            for name in ("mean", "std"):
                if len(getattr(self, name)) != self.in_chans:
                    raise field_error(
                        self,
                        name,
                        f"has {len(getattr(self, name))} values but data.in_chans={self.in_chans}",
                    )
            if any(v <= 0 for v in self.std):
                raise field_error(self, "std", f"values must be > 0, got {self.std}")
        elif self.normalize == "imagenet" and self.in_chans not in (1, 3):
            raise field_error(
                self,
                "normalize",
                f"is 'imagenet', whose statistics are for 1 or 3 channels, but data.in_chans={self.in_chans}: set "
                f"data.mean and data.std ({self.in_chans} values each) or data.normalize=per_image",
            )

    @property
    def resize_scale(self) -> Scale | None:
        """The scale to rescale to, or None for native sizes.

        ``auto`` must have been resolved first (:func:`hybridvision.data.from_config.resolve_resize`).
        """
        if self.resize == "auto":
            raise RuntimeError("data.resize=auto is resolved from the training images before use")
        return Scale.parse(self.resize)

    @property
    def normalization(self) -> str | tuple[list[float], list[float]]:
        """What transforms take as ``normalize``: ``(data.mean, data.std)`` if set, else ``data.normalize``."""
        return (list(self.mean), list(self.std)) if self.mean else self.normalize


@dataclass
class ModelConfig:
    """Which registered model to build."""

    name: str = "hybrid_nano"  # registered encoder / segmenter name (see hybridvision.models.list_models())
    overrides: dict[str, Any] = field(
        default_factory=dict
    )  # preset fields to override, e.g. {drop_path_rate: 0.1}

"""Configuration of the distillation stage (``distill/run.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from hybridvision.config import ConfigError, DataConfig, OptimConfig, TrainConfig
from hybridvision.segmentation.config import AugmentConfig, EvalConfig, LossConfig

#: where ``teacher`` points by default: the output of ``python finetune/run.py``
DEFAULT_TEACHER = "runs/finetune/model"

#: values of ``data.*`` meaning "what the teacher was trained with"
FROM_TEACHER = "teacher"


@dataclass
class DistillDataConfig(DataConfig):
    """Labelled data as in fine-tuning, plus optional unlabelled images for the distillation terms.

    ``num_classes``, ``in_chans`` (0) and ``normalize`` (``teacher``) default to what the teacher was
    trained with, so the student sees inputs exactly as the teacher did.
    """

    num_classes: int = 0  # classes (0: the teacher's; another value must equal it)
    in_chans: int = 0  # image channels (0: the teacher's)
    normalize: str = FROM_TEACHER  # teacher | imagenet | per_image | none
    unlabelled_source: str = ""  # folder / HF dataset of extra unlabelled images (KD terms only)
    unlabelled_split: str = "train"  # split of unlabelled_source (folder layouts: images/<split>)
    unlabelled_max: int = 0  # use at most this many unlabelled images (0: all)

    def __post_init__(self) -> None:
        # validate with placeholders for the "from the teacher" values; resolve_data fills them in
        saved = (self.num_classes, self.in_chans, self.normalize, self.class_names)
        if self.num_classes < 0 or self.in_chans < 0:
            raise ConfigError("data.num_classes and data.in_chans must be >= 0 (0: the teacher's)")
        self.num_classes = self.num_classes or 1
        self.in_chans = self.in_chans or 1
        if self.normalize == FROM_TEACHER:
            self.normalize = "none"
        if saved[0] == 0:
            self.class_names = []
        try:
            super().__post_init__()
        finally:
            self.num_classes, self.in_chans, self.normalize, self.class_names = saved
        if self.unlabelled_max < 0:
            raise ConfigError(f"data.unlabelled_max must be >= 0, got {self.unlabelled_max}")


@dataclass
class StudentConfig:
    """The student: any zoo segmenter, or an encoder + decoder, optionally initialised."""

    name: str = "unet_resnet_nano"  # segmenter preset or encoder name
    decoder: str = ""  # decoder name ('' = the preset's, or segformer_mlp)
    decoder_kwargs: dict[str, Any] = field(default_factory=dict)  # decoder overrides
    overrides: dict[str, Any] = field(default_factory=dict)  # encoder overrides
    init: str = ""  # '' (scratch) | pretrain encoder dir | model dir | hub id | timm weights file
    init_strict: bool = True  # shape mismatches at init are errors (false: skip and list them)
    prune: float = 0.0  # fraction of conv channels removed before distilling (0: off; see docs/stages.md)
    prune_importance: Literal["magnitude", "taylor"] = "magnitude"  # channel criterion: L2 norm | Taylor
    prune_batches: int = 2  # training batches whose gradients give the Taylor importance

    def __post_init__(self) -> None:
        if not 0.0 <= self.prune < 1.0:
            raise ConfigError(f"student.prune must be in [0, 1), got {self.prune}")
        if self.prune_batches < 1:
            raise ConfigError(f"student.prune_batches must be >= 1, got {self.prune_batches}")
        if self.prune > 0 and not self.init and (self.decoder or self.decoder_kwargs or self.overrides):
            raise ConfigError(
                "student.prune > 0 without student.init prunes a copy of the teacher, whose architecture "
                "is fixed: leave student.decoder / decoder_kwargs / overrides unset, or set student.init"
            )


@dataclass
class KDConfig:
    """Distillation terms: total = task_weight · task + Σ weights[k] · term_k.

    Self-training (Noisy Student, FixMatch): ``student_augment=strong`` gives the student a
    photometric strong view of the teacher's batch (``distill/augment.py``), and
    ``confidence_threshold`` drops the unlabelled pixels the teacher is unsure of from kd and dist.
    """

    task_weight: float = 0.7  # weight of the task (segmentation) loss on labelled pixels
    weights: dict[str, float] = field(
        default_factory=lambda: {"kd": 0.3}
    )  # term -> weight; terms: kd, cwd, dist, feature
    temperature: float = 3.0  # T of the pixel KD term (multiplied back as T²)
    cwd_tau: float = 4.0  # τ of channel-wise distillation (Shu et al. use 4)
    dist_tau: float = 1.0  # τ of DIST
    dist_beta: float = 1.0  # DIST inter-class weight (0 for binary models: the term is constant there)
    dist_gamma: float = 1.0  # DIST intra-class weight
    dist_tau_squared: bool = True  # multiply DIST by τ² as the paper's code does
    resize_to: Literal["label", "student", "teacher"] = "label"  # grid the logits are compared on
    feature_stages: list[int] = field(
        default_factory=lambda: [-1, -2]
    )  # student encoder stages distilled by `feature` (each paired with the teacher stage of nearest stride)
    feature_norm: Literal["channel", "none"] = "channel"  # per-channel standardisation before the MSE
    teacher_dtype: Literal["fp32", "bf16"] = "fp32"  # teacher forward precision (bf16: autocast)
    student_augment: Literal["none", "strong"] = "none"  # student input: the teacher's, or a strong view
    confidence_threshold: float = 0.0  # teacher confidence below which unlabelled pixels leave kd/dist

    def __post_init__(self) -> None:
        known = {"kd", "cwd", "dist", "feature"}
        unknown = sorted(set(self.weights) - known)
        if unknown:
            raise ConfigError(f"kd.weights: unknown term(s) {unknown}; valid terms: {sorted(known)}")
        if any(w < 0 for w in self.weights.values()) or self.task_weight < 0:
            raise ConfigError("kd.task_weight and kd.weights must be >= 0")
        for name in ("temperature", "cwd_tau", "dist_tau"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"kd.{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.confidence_threshold < 1.0:
            raise ConfigError(f"kd.confidence_threshold must be in [0, 1), got {self.confidence_threshold}")

    def active(self) -> dict[str, float]:
        """Terms with a positive weight."""
        return {k: float(w) for k, w in self.weights.items() if w > 0}


@dataclass
class ExportConfig:
    """Edge export of the student at the end of the run."""

    onnx: bool = True  # export at all: <output_dir>/student.onnx (dynamic sizes), every target's source
    # runtimes written and measured: onnx (onnxruntime) | openvino (student.xml + .bin, from student.onnx)
    # | executorch (student.pte + .pte.json, XNNPACK, with student.onnx's metadata)
    targets: list[Literal["onnx", "openvino", "executorch"]] = field(default_factory=lambda: ["onnx"])
    int8: bool = False  # also int8 per target, calibrated on training images: ORT static QDQ | NNCF | PT2E
    calibration_images: int = 32  # training images used to calibrate int8
    report: bool = True  # report.json / report.md / report.png: teacher vs student, PyTorch vs ONNX
    report_runs: int = 10  # timed runs per latency figure
    report_images: int = 0  # evaluation images scored per model in the report (0: the whole split)
    opset: int = 18  # ONNX opset (>= 17; TransUNet's antialiased resize needs 18)
    # largest input side of a dynamic student.pte (larger images: windows); memory is planned for it
    executorch_max_size: int = 1024

    def __post_init__(self) -> None:
        if self.opset < 17:
            raise ConfigError(f"export.opset must be >= 17, got {self.opset}")
        if self.int8 and not self.onnx:
            raise ConfigError("export.int8=true needs export.onnx=true (int8 quantizes the fp32 ONNX model)")
        if not self.targets or len(set(self.targets)) != len(self.targets):
            raise ConfigError(
                f"export.targets must list onnx, openvino and/or executorch once each, got {self.targets}"
            )
        if self.executorch_max_size < 1:
            raise ConfigError(f"export.executorch_max_size must be >= 1, got {self.executorch_max_size}")
        if self.calibration_images < 1 or self.report_runs < 1 or self.report_images < 0:
            raise ConfigError("export.calibration_images and export.report_runs must be >= 1")


@dataclass
class DistillConfig:
    """``distill/run.py``: distil a fine-tuned teacher into a small student, evaluate and export it."""

    teacher: str = DEFAULT_TEACHER  # from_pretrained directory or hub id of the fine-tuned teacher
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            output_dir="runs/distill",
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
    data: DistillDataConfig = field(
        default_factory=lambda: DistillDataConfig(image_size=(64, 64), synthetic_samples=1024)
    )
    student: StudentConfig = field(default_factory=StudentConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

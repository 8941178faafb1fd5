"""The frozen teacher, the student wrapper (student + feature adapters) and their bookkeeping."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from distill.config import FROM_TEACHER, DistillConfig, DistillDataConfig
from distill.losses import FeatureDistiller
from hybridvision.config import ConfigError
from hybridvision.models import Segmenter, from_pretrained
from hybridvision.models.hub import read_run_config
from hybridvision.models.profile import count_gmacs, count_params  # re-exported for the stage

__all__ = [
    "load_teacher",
    "teacher_data",
    "resolve_data",
    "forward_with_features",
    "DistillStudent",
    "count_params",
    "count_gmacs",
]


def load_teacher(path: str) -> Segmenter:
    """Load the teacher segmenter, frozen: ``eval()``, ``requires_grad_(False)``.

    Raises:
        ConfigError: when ``path`` holds no model (with how to make one) or holds an encoder.
    """
    local = Path(path).expanduser()
    looks_local = str(path).startswith((".", "/", "~")) or str(path).count("/") != 1
    if looks_local and not (local / "config.json").is_file():
        raise ConfigError(
            f"teacher={path}: no fine-tuned model there (expected {local / 'config.json'}). "
            "Train one with `python finetune/run.py` (writes runs/finetune/model) or pass teacher=DIR "
            "(any finetune model/ directory, a transformers SegFormer directory or a hub id)"
        )
    try:
        model = from_pretrained(path)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"teacher={path}: {exc}") from None
    if not isinstance(model, Segmenter):
        raise ConfigError(
            f"teacher={path} holds an encoder, not a segmentation model: fine-tune it first "
            f"(python finetune/run.py model.init={path})"
        )
    model.eval().requires_grad_(False)
    return model


def teacher_data(teacher: Segmenter) -> dict[str, Any]:
    """What the teacher was trained with: num_classes, in_chans, class_names, normalisation, scale."""
    config = getattr(teacher, "pretrained_config", {}) or {}
    info: dict[str, Any] = {
        "num_classes": teacher.num_classes,
        "in_chans": int(teacher.build_kwargs.get("in_chans", 3)),
        "class_names": [],
        "normalize": "imagenet",
        "mean": [],
        "std": [],
        "window": None,
        "resize": None,  # the teacher's resolved data.resize ([short, max_long] or "native"), if known
    }
    if "hybridvision" in config:  # ours: the fine-tuning run config is stored with the weights
        data = read_run_config(config, "data")
        for key in ("class_names", "normalize", "mean", "std", "window"):
            if data.get(key) is not None:
                info[key] = data[key]
        if isinstance(data.get("resize"), list) or data.get("resize") == "native":
            info["resize"] = data["resize"]
    elif config.get("id2label"):  # transformers: labels by index
        labels = config["id2label"]
        info["class_names"] = [labels[k] for k in sorted(labels, key=int)]
    return info


def resolve_data(cfg: DistillConfig, teacher: Segmenter) -> DistillDataConfig:
    """``cfg.data`` with the "from the teacher" values filled in; a mismatch is a ConfigError."""
    info = teacher_data(teacher)
    d = cfg.data
    if d.num_classes and d.num_classes != info["num_classes"]:
        raise ConfigError(
            f"data.num_classes={d.num_classes} but the teacher {cfg.teacher} predicts "
            f"{info['num_classes']} classes; drop data.num_classes (it defaults to the teacher's) or "
            "distil a teacher trained on these classes"
        )
    if d.in_chans and d.in_chans != info["in_chans"]:
        raise ConfigError(
            f"data.in_chans={d.in_chans} but the teacher {cfg.teacher} takes {info['in_chans']} channels"
        )
    changes: dict[str, Any] = {"num_classes": info["num_classes"], "in_chans": info["in_chans"]}
    if not d.class_names and info["class_names"]:
        changes["class_names"] = list(info["class_names"])
    if d.normalize == FROM_TEACHER:
        changes["normalize"] = info["normalize"]
        for key in ("mean", "std"):
            if hasattr(d, key) and not getattr(d, key) and info[key]:
                changes[key] = list(info[key])
        if d.window is None and info["window"] is not None:
            changes["window"] = tuple(info["window"])
    if d.resize == "auto" and info["resize"] is not None:  # the student sees the teacher's scale
        changes["resize"] = info["resize"]
    resolved = dataclasses.replace(d, **changes)
    return resolved


def forward_with_features(model: Segmenter, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Logits (B, K, H, W) and the encoder's feature list from one forward pass.

    The features are read from the decoder's input with a forward pre-hook, so the segmenter's own
    ``forward`` (padding, decoding, crop) runs unchanged, also inside DDP.
    """
    captured: list[list[Tensor]] = []
    handle = model.decoder.register_forward_pre_hook(lambda _m, args: captured.append(list(args[0])))
    try:
        logits = model(x)
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"{type(model.decoder).__name__} was not called with the encoder features")
    return logits, captured[0]


class DistillStudent(nn.Module):
    """The trained module: the student segmenter plus the feature adapters (when feature KD is on).

    ``forward(x) -> (logits, adapted)``; only ``student`` is exported.
    """

    def __init__(self, student: Segmenter, features: FeatureDistiller | None = None) -> None:
        super().__init__()
        self.student = student
        self.features = features

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        if self.features is None:
            return self.student(x), []
        logits, feats = forward_with_features(self.student, x)
        return logits, self.features.adapt(feats)

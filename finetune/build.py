"""What ``finetune/run.py`` builds: where the weights start, the segmenter, the progressive-resizing
schedule, and the line of final metrics."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from finetune.config import DEFAULT_PRETRAINED_ENCODER, FALLBACK_MODEL, FinetuneConfig

if TYPE_CHECKING:
    from torch import nn

# torch and the model zoo are imported inside the functions that use them, so `--help` and config
# errors answer at once


def resolve_init(cfg: FinetuneConfig) -> str:
    init = cfg.model.init
    if init == "auto":
        return (
            DEFAULT_PRETRAINED_ENCODER if (Path(DEFAULT_PRETRAINED_ENCODER) / "config.json").is_file() else ""
        )
    return init


def default_model_name(init: str) -> str:
    """``model.name`` when none is given: the default preset, also for an encoder of its kind in
    ``init`` (so it keeps the preset's decoder); '' where ``init`` names another architecture."""
    from hybridvision.models.hub import read_model_config
    from hybridvision.models.registry import segmenter_spec
    from hybridvision.models.transfer import _encoder_name_of

    if not init:
        return FALLBACK_MODEL
    if not (Path(init) / "config.json").is_file():
        return ""  # weights files, hub ids, missing paths: build_segmenter decides or names the problem
    try:
        encoder = _encoder_name_of(read_model_config(init))
    except (OSError, ValueError, KeyError):
        return ""  # build_segmenter names the unreadable file
    return FALLBACK_MODEL if encoder == segmenter_spec(FALLBACK_MODEL).encoder else ""


def build_model(cfg: FinetuneConfig, init: str, engine) -> nn.Module:
    """The segmenter ``cfg.model`` describes, its weights from ``init``; prints where it started
    (unless resuming: then the weights come from the checkpoint)."""
    from hybridvision.models.transfer import build_segmenter

    d = cfg.data
    model, report = build_segmenter(
        cfg.model.name or default_model_name(init),
        d.num_classes,
        d.in_chans,
        init=init,
        strict=cfg.model.init_strict,
        decoder=cfg.model.decoder or None,
        decoder_kwargs=cfg.model.decoder_kwargs or None,
        overrides=cfg.model.overrides,
        input_size=tuple(d.image_size),
    )
    if engine.resume_checkpoint is None:
        engine.print(report.summary())
    return model


def scheduled_size(cfg: FinetuneConfig, step: int) -> int | None:
    """Side length of the progressive-resizing schedule at ``step`` (None: no schedule)."""
    side = None
    for start, value in cfg.augment.size_schedule:
        if step >= start:
            side = value
    return side


def metrics_line(m: dict) -> str:
    """mIoU, mean Dice, pixel accuracy and the per-class IoU of the final evaluation."""
    per_class = ", ".join(f"{n}={v:.3f}" for n, v in zip(m["class_names"], m["iou"]) if v is not None)
    return (
        f"mIoU={m['miou']:.4f} mean Dice={m['mean_dice']:.4f} pixel acc={m['pixel_accuracy']:.4f} "
        f"(per class IoU: {per_class})"
    )

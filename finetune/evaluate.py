"""Evaluation of a segmenter: exact confusion-matrix metrics under DDP, and an image grid."""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.utils.data import DataLoader

from hybridvision.data.from_config import class_names
from hybridvision.inference import Predictor
from hybridvision.metrics import ConfusionMatrix
from hybridvision.visualize import colorize, image_grid, to_display

__all__ = ["evaluate_segmenter", "build_predictor"]


def build_predictor(model: nn.Module, eval_cfg: Any, num_classes: int) -> Predictor:
    """A :class:`Predictor` from the ``eval.*`` config section (logits out, for the metrics)."""
    return Predictor(
        model,
        mode=eval_cfg.mode,
        num_classes=num_classes,
        window=tuple(eval_cfg.window) if eval_cfg.mode == "slide" else None,
        overlap=eval_cfg.overlap,
        blend=eval_cfg.blend,
        batch_size=max(1, eval_cfg.batch_size),
        tta_flips=tuple(eval_cfg.tta_flips),
        output="logits",
    )


@torch.no_grad()
def evaluate_segmenter(
    model: nn.Module, loader: DataLoader, cfg: Any, accelerator: Accelerator
) -> tuple[dict[str, Any], Tensor | None]:
    """Metrics over ``loader`` (prepared; every sample counted once across processes) and a grid.

    Args:
        model: the (unwrapped) segmenter; set to eval mode here and restored afterwards.
        loader: a DataLoader prepared by ``accelerator`` yielding ``{"image", "mask"}``.
        cfg: the fine-tuning config (``data`` and ``eval`` sections).

    Returns:
        (metrics dict with ``class_names`` and per-class lists, grid (3, H, W) or None).
    """
    d = cfg.data
    was_training = model.training
    model.eval()
    predictor = build_predictor(model, cfg.eval, d.num_classes)
    cm = ConfusionMatrix(d.num_classes, d.ignore_index)
    rows: list[list[Tensor]] = []
    for batch in loader:
        with accelerator.autocast():
            logits = predictor(batch["image"])
        cm.gather_update(logits.float(), batch["mask"], accelerator)
        if len(rows) < cfg.eval.grid_images and accelerator.is_main_process:
            preds = logits.argmax(1) if logits.shape[1] > 1 else (logits[:, 0] > 0).long()
            for img, gt, pr in zip(batch["image"], batch["mask"], preds):
                if len(rows) < cfg.eval.grid_images:
                    rows.append([to_display(img), colorize(gt, d.ignore_index), colorize(pr, d.ignore_index)])
    model.train(was_training)
    metrics = cm.compute()
    metrics["class_names"] = class_names(d)
    for key in ("iou", "dice", "class_accuracy"):
        metrics[key] = [None if v != v else v for v in metrics[key]]  # NaN (class absent) -> None for JSON
    return metrics, (image_grid(rows) if rows else None)

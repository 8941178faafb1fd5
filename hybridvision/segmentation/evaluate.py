"""Evaluation of a segmenter: exact confusion-matrix metrics under DDP, and an image grid.

Validation images may differ in size: the loader's :func:`~hybridvision.data.loader.collate_mixed_sizes`
keeps each batch's samples of one size together, each group is predicted at its own size, and the
per-sample confusion matrices are put back in loader order before ``gather_for_metrics``, so the
metrics stay exact under DDP (Accelerate's padding samples are dropped by position).

Heavy modules (accelerate, torchvision) are imported where they are used, so ``finetune/run.py
--help`` and config errors answer quickly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from hybridvision.inference import Predictor

__all__ = ["evaluate_segmenter", "build_predictor"]


def build_predictor(
    model: nn.Module, eval_cfg: Any, num_classes: int, resize: list[int] | None = None
) -> Predictor:
    """A :class:`Predictor` from the ``eval.*`` config section (logits out, for the metrics).

    It runs at the scale ``resize`` (``data.resize_scale``); predictions are mapped back to each
    image's size.
    """
    from hybridvision.inference import Predictor

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
        resize=resize,
    )


@torch.no_grad()
def evaluate_segmenter(
    model: nn.Module, loader: DataLoader, cfg: Any, accelerator: Accelerator
) -> tuple[dict[str, Any], Tensor | None]:
    """Metrics over ``loader`` (prepared; every sample counted once across processes) and a grid.

    Args:
        model: the (unwrapped) segmenter; set to eval mode here and restored afterwards.
        loader: a DataLoader prepared by ``accelerator`` yielding ``{"image": (B, C, H, W), "mask":
            (B, H, W)}`` batches, or mixed-size batches from ``collate_mixed_sizes``.
        cfg: the fine-tuning config (``data`` and ``eval`` sections).
        accelerator: autocast for the forward passes; gathers the per-sample counts across processes.

    Returns:
        (metrics dict with ``class_names`` and per-class lists, grid (3, H, W) or None).
    """
    from hybridvision.data.from_config import class_names
    from hybridvision.data.loader import iter_size_groups
    from hybridvision.metrics import ConfusionMatrix, per_sample_confusion
    from hybridvision.visualize import colorize, image_grid, to_display

    d = cfg.data
    was_training = model.training
    model.eval()
    predictor = build_predictor(model, cfg.eval, d.num_classes, d.resize_scale)
    cm = ConfusionMatrix(d.num_classes, d.ignore_index)
    rows: list[list[Tensor]] = []
    for batch in loader:
        groups = iter_size_groups(batch)
        per_sample: Tensor | None = None  # (B, C, C) in loader order
        for sub, positions in groups:
            with accelerator.autocast():
                logits = predictor(sub["image"])
            counts = per_sample_confusion(logits.float(), sub["mask"], d.num_classes, d.ignore_index)
            if positions is None:
                per_sample = counts
            else:
                if per_sample is None:
                    total = sum(len(p) for _, p in groups if p is not None)  # all set here
                    per_sample = counts.new_zeros((total, *counts.shape[1:]))
                per_sample[positions.to(counts.device)] = counts
            if len(rows) < cfg.eval.grid_images and accelerator.is_main_process:
                preds = logits.argmax(1) if logits.shape[1] > 1 else (logits[:, 0] > 0).long()
                for img, gt, pr in zip(sub["image"], sub["mask"], preds):
                    if len(rows) < cfg.eval.grid_images:
                        rows.append(
                            [to_display(img), colorize(gt, d.ignore_index), colorize(pr, d.ignore_index)]
                        )
        # one gather per loader batch, in loader order: Accelerate drops its padding samples exactly
        gathered = accelerator.gather_for_metrics(per_sample)
        cm.matrix += gathered.sum(0).to(cm.matrix.device)
    model.train(was_training)
    metrics = cm.compute()
    metrics["class_names"] = class_names(d)
    for key in ("iou", "dice", "class_accuracy"):
        metrics[key] = [None if v != v else v for v in metrics[key]]  # NaN (class absent) -> None for JSON
    return metrics, (image_grid(rows) if rows else None)

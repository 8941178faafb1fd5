"""The task loss and the evaluation loader that fine-tuning and distillation both build."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..data.loader import collate_mixed_sizes
from ..losses import build_segmentation_loss

if TYPE_CHECKING:
    from accelerate import Accelerator
    from torch.utils.data import DataLoader, Dataset

    from ..losses.combined import CombinedLoss


def build_task_loss(cfg: Any) -> CombinedLoss:
    """The segmentation loss of a stage config's ``loss`` section, over ``data.num_classes``.

    Args:
        cfg: a stage config with ``data`` and ``loss`` sections.

    Returns:
        The loss of logits ``(B, K, H, W)`` against masks ``(B, H, W)``.
    """
    d = cfg.data
    return build_segmentation_loss(
        d.num_classes,
        d.ignore_index,
        cfg.loss.weights,
        cfg.loss.class_weights or None,
        cfg.loss.label_smoothing,
    )


def build_eval_loader(val_set: Dataset | None, cfg: Any, accelerator: Accelerator) -> DataLoader | None:
    """The prepared evaluation loader of ``val_set``, ``eval.batch_size`` images a batch.

    Images of different sizes are evaluated at their own size.

    Args:
        val_set: the validation samples (``image`` ``(C, H, W)``, ``mask`` ``(H, W)``), or None.
        cfg: a stage config with an ``eval`` section.
        accelerator: prepares the loader (device placement, sharding across processes).

    Returns:
        The loader, or None without a validation set.
    """
    if val_set is None:
        return None
    loader = torch.utils.data.DataLoader(
        val_set, batch_size=cfg.eval.batch_size, collate_fn=collate_mixed_sizes
    )
    return accelerator.prepare_data_loader(loader)

"""Input checks shared by the segmentation losses."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["at_least_float32", "prepare_target", "safe_normalizer"]


def prepare_target(logits: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Check shapes and return ``(target, valid)`` ready for a loss.

    Args:
        logits: (B, K, H, W) raw scores.
        target: (B, H, W) or (B, 1, H, W) integer class indices; ``ignore_index`` marks unlabeled pixels.
        ignore_index: label value excluded from the loss.

    Returns:
        ``target`` as int64 (B, H, W) with ignored pixels replaced by 0 (a valid index, so it can be
        used with ``gather`` / ``one_hot``), and ``valid`` (B, H, W) bool, False at ignored pixels.
    """
    if logits.ndim != 4:
        raise ValueError(f"logits must be (B, K, H, W), got shape {tuple(logits.shape)}")
    if target.ndim == 4 and target.shape[1] == 1:
        target = target[:, 0]
    if target.ndim != 3:
        raise ValueError(f"target must be (B, H, W), got shape {tuple(target.shape)}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}")
    b, _, h, w = logits.shape
    if tuple(target.shape) != (b, h, w):
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}; "
            "resize the logits to the mask size first"
        )
    target = target.long()
    valid = target != ignore_index
    return torch.where(valid, target, 0), valid


def safe_normalizer(denominator: Tensor) -> Tensor:
    """Replace a zero normaliser by 1 so that a batch with no valid pixel gives a loss of 0, not NaN.

    Done with ``torch.where`` rather than a Python branch so that no device synchronisation happens.
    """
    return torch.where(denominator > 0, denominator, torch.ones_like(denominator))


def at_least_float32(x: Tensor) -> Tensor:
    """Upcast half / bfloat16 logits to float32 (exp, log and pow are done there); keep float64."""
    return x if x.dtype == torch.float64 else x.float()

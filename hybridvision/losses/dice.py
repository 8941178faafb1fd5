"""Soft Dice loss."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybridvision.losses._common import at_least_float32, prepare_target

__all__ = ["DiceLoss"]


class DiceLoss(nn.Module):
    """Soft Dice loss ``1 - (2 |P ∩ G| + smooth) / (|P| + |G| + smooth)``, averaged over classes.

    Milletari et al., "V-Net: Fully Convolutional Neural Networks for Volumetric Medical Image
    Segmentation", 3DV 2016. Sums run over the whole batch and all pixels (the "batch Dice" of
    nnU-Net), per class, then the per-class losses are averaged.

    * ``mode="multiclass"``: K >= 2 channels, softmax probabilities against the one-hot target;
      every class is averaged (absent classes are pushed towards zero probability), or, with
      ``classes_present_only=True``, only classes that occur in the batch's valid target pixels.
    * ``mode="binary"``: K = 1 channel, sigmoid probability of the foreground against ``target == 1``;
      only the foreground Dice is used. With ``classes_present_only=True`` a batch without foreground
      gives 0.

    Ignored pixels are removed from both ``P`` and ``G``. The denominator is clamped at ``eps`` so
    ``smooth=0`` with an empty class gives 0 rather than NaN.

    Args:
        smooth: additive smoothing of numerator and denominator.
        ignore_index: target value excluded from the loss.
        from_logits: if False the input is already probabilities (B, K, H, W).
        mode: ``"multiclass"`` or ``"binary"``.
        classes_present_only: average only over classes present in the target.
        eps: lower bound of the denominator.
    """

    def __init__(
        self,
        smooth: float = 1.0,
        ignore_index: int = 255,
        from_logits: bool = True,
        mode: Literal["multiclass", "binary"] = "multiclass",
        classes_present_only: bool = False,
        eps: float = 1e-7,
    ) -> None:
        super().__init__()
        if mode not in ("multiclass", "binary"):
            raise ValueError(f"mode must be 'multiclass' or 'binary', got {mode!r}")
        self.smooth = smooth
        self.ignore_index = ignore_index
        self.from_logits = from_logits
        self.mode = mode
        self.classes_present_only = classes_present_only
        self.eps = eps

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Compute the loss.

        Args:
            logits: (B, K, H, W) logits (or probabilities if ``from_logits=False``);
                K = 1 for ``mode="binary"``, K >= 2 for ``"multiclass"``.
            target: (B, H, W) int class indices or ``ignore_index``.

        Returns:
            Scalar loss.
        """
        safe_target, valid = prepare_target(logits, target, self.ignore_index)
        num_classes = logits.shape[1]
        logits = at_least_float32(logits)
        if self.mode == "binary":
            if num_classes != 1:
                raise ValueError(f"mode='binary' expects K = 1 channel, got {num_classes}")
            probs = logits.sigmoid() if self.from_logits else logits  # (B, 1, H, W)
            one_hot = (safe_target == 1)[:, None]  # (B, 1, H, W)
        else:
            if num_classes < 2:
                raise ValueError("mode='multiclass' expects K >= 2 channels; use mode='binary' for K = 1")
            probs = logits.softmax(dim=1) if self.from_logits else logits
            one_hot = F.one_hot(safe_target, num_classes).permute(0, 3, 1, 2)  # (B, K, H, W)
        valid = valid[:, None]  # (B, 1, H, W)
        probs = torch.where(valid, probs, 0.0)
        one_hot = (one_hot & valid).to(probs.dtype)

        dims = (0, 2, 3)
        intersection = (probs * one_hot).sum(dims)  # (K,)
        target_sum = one_hot.sum(dims)  # (K,)
        cardinality = probs.sum(dims) + target_sum  # (K,)
        dice = (2.0 * intersection + self.smooth) / (cardinality + self.smooth).clamp_min(self.eps)
        loss = 1.0 - dice  # (K,)
        if not self.classes_present_only:
            return loss.mean()
        present = (target_sum > 0).to(loss.dtype)
        return (loss * present).sum() / present.sum().clamp_min(1.0)

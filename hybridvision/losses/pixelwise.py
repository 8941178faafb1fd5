"""Per-pixel segmentation losses: cross-entropy, binary cross-entropy and focal loss.

All take logits (B, K, H, W) and an int64 target (B, H, W). Pixels whose target equals
``ignore_index`` contribute nothing: not to the loss, not to its normaliser, and their logits
receive an exactly-zero gradient. A batch with no valid pixel gives a loss of 0 (not NaN).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybridvision.losses._common import at_least_float32, prepare_target, safe_normalizer

__all__ = ["BCEWithLogitsLoss", "CrossEntropyLoss", "FocalLoss"]


def _optional_tensor(values: Sequence[float] | Tensor | float | None) -> Tensor | None:
    if values is None:
        return None
    return torch.as_tensor(values, dtype=torch.float64).reshape(-1)  # cast to the logits dtype at use


class CrossEntropyLoss(nn.Module):
    """Softmax cross-entropy over K >= 2 classes, equal to ``F.cross_entropy(reduction="mean")``.

    With ``class_weights`` the mean is normalised by the sum of the weights of the valid pixels'
    target classes, exactly as PyTorch does; label smoothing follows PyTorch's definition too.

    Args:
        ignore_index: target value excluded from the loss and from the normaliser.
        class_weights: optional (K,) per-class weights.
        label_smoothing: amount of smoothing in [0, 1) (Szegedy et al., 2016).
    """

    class_weights: Tensor | None

    def __init__(
        self,
        ignore_index: int = 255,
        class_weights: Sequence[float] | Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.register_buffer("class_weights", _optional_tensor(class_weights), persistent=False)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Compute the loss.

        Args:
            logits: (B, K, H, W) raw class scores, K >= 2.
            target: (B, H, W) int class indices in [0, K) or ``ignore_index``.

        Returns:
            Scalar loss.
        """
        safe_target, valid = prepare_target(logits, target, self.ignore_index)
        num_classes = logits.shape[1]
        if num_classes < 2:
            raise ValueError("CrossEntropyLoss needs K >= 2 channels; use BCEWithLogitsLoss for K = 1")
        weight = self.class_weights
        if weight is not None:
            if weight.numel() != num_classes:
                raise ValueError(
                    f"class_weights has {weight.numel()} entries but logits have {num_classes} classes"
                )
            weight = weight.to(logits.dtype)
        # Sum, then divide ourselves: identical to reduction="mean" but 0 instead of NaN with no valid pixel.
        loss_sum = F.cross_entropy(
            logits,
            torch.where(valid, safe_target, self.ignore_index),
            weight=weight,
            ignore_index=self.ignore_index,
            reduction="sum",
            label_smoothing=self.label_smoothing,
        )
        if weight is None:
            denominator = valid.sum().to(loss_sum.dtype)
        else:
            denominator = (weight[safe_target] * valid).sum().to(loss_sum.dtype)
        return loss_sum / safe_normalizer(denominator)


class BCEWithLogitsLoss(nn.Module):
    """Binary cross-entropy on a single foreground logit (K = 1), mean over valid pixels.

    Matches ``F.binary_cross_entropy_with_logits(reduction="mean")`` on the valid pixels, including
    ``pos_weight`` (which, as in PyTorch, does not change the normaliser).

    Args:
        ignore_index: target value excluded from the loss and from the normaliser.
        pos_weight: optional weight of the positive (foreground) term.
        label_smoothing: targets become ``t * (1 - s) + s / 2``.
    """

    pos_weight: Tensor | None

    def __init__(
        self,
        ignore_index: int = 255,
        pos_weight: float | Sequence[float] | Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        pos = _optional_tensor(pos_weight)
        if pos is not None and pos.numel() != 1:
            raise ValueError(f"pos_weight must be a single number for K = 1, got {pos.numel()} values")
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.register_buffer("pos_weight", pos, persistent=False)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Compute the loss.

        Args:
            logits: (B, 1, H, W) foreground logits.
            target: (B, H, W) int labels in {0, 1} or ``ignore_index``.

        Returns:
            Scalar loss.
        """
        safe_target, valid = prepare_target(logits, target, self.ignore_index)
        if logits.shape[1] != 1:
            raise ValueError(f"BCEWithLogitsLoss expects K = 1 channel, got {logits.shape[1]}")
        t = safe_target.to(logits.dtype)
        if self.label_smoothing:
            t = t * (1.0 - self.label_smoothing) + 0.5 * self.label_smoothing
        per_pixel = F.binary_cross_entropy_with_logits(
            logits[:, 0],
            t,
            pos_weight=None if self.pos_weight is None else self.pos_weight.to(logits.dtype),
            reduction="none",
        )  # (B, H, W)
        per_pixel = torch.where(valid, per_pixel, 0.0)
        return per_pixel.sum() / safe_normalizer(valid.sum().to(per_pixel.dtype))


class FocalLoss(nn.Module):
    """Focal loss ``-alpha_t (1 - p_t)^gamma log p_t``, mean over valid pixels.

    Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017. K >= 2: softmax over classes;
    K = 1: sigmoid of the foreground logit (target in {0, 1}). With ``gamma=0`` and ``alpha=None`` it
    equals (binary) cross-entropy. The mean is over valid pixels and is not re-normalised by
    ``alpha`` (unlike weighted cross-entropy).

    Args:
        gamma: focusing parameter (>= 0).
        alpha: K = 1: a float, the weight of positives (negatives get ``1 - alpha``, as in the paper);
            K >= 2: a sequence of K per-class weights. None: no weighting.
        ignore_index: target value excluded from the loss and from the normaliser.
    """

    alpha: Tensor | None

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: float | Sequence[float] | Tensor | None = None,
        ignore_index: int = 255,
    ) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        self.ignore_index = ignore_index
        self._scalar_alpha = alpha is not None and not isinstance(alpha, (Sequence, Tensor))
        self.register_buffer("alpha", _optional_tensor(alpha), persistent=False)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Compute the loss.

        Args:
            logits: (B, K, H, W) raw scores; K = 1 means binary (sigmoid).
            target: (B, H, W) int class indices or ``ignore_index``.

        Returns:
            Scalar loss.
        """
        safe_target, valid = prepare_target(logits, target, self.ignore_index)
        logits = at_least_float32(logits)
        num_classes = logits.shape[1]
        if num_classes == 1:
            positive = safe_target == 1
            log_pt = -F.binary_cross_entropy_with_logits(
                logits[:, 0], positive.to(logits.dtype), reduction="none"
            )  # (B, H, W)
        else:
            log_pt = F.log_softmax(logits, dim=1).gather(1, safe_target[:, None])[:, 0]  # (B, H, W)
        loss = -log_pt
        if self.gamma != 0:
            # 1 - p_t via expm1 (accurate for confident pixels); the floor keeps the gradient of
            # (1 - p_t)^gamma finite for gamma < 1 where p_t rounds to 1
            loss = (-torch.expm1(log_pt)).clamp_min(1e-12).pow(self.gamma) * loss
        if self.alpha is not None:
            loss = loss * self._alpha_t(safe_target, num_classes).to(loss.dtype)
        loss = torch.where(valid, loss, 0.0)
        return loss.sum() / safe_normalizer(valid.sum().to(loss.dtype))

    def _alpha_t(self, safe_target: Tensor, num_classes: int) -> Tensor:
        alpha = self.alpha
        assert alpha is not None  # only called when alpha is set
        if num_classes == 1:
            if alpha.numel() != 1:
                raise ValueError("binary focal loss takes a single float alpha (weight of positives)")
            return torch.where(safe_target == 1, alpha, 1.0 - alpha)
        if self._scalar_alpha or alpha.numel() != num_classes:
            raise ValueError(
                f"multiclass focal loss takes alpha as {num_classes} per-class weights, got {alpha.tolist()}"
            )
        return alpha[safe_target]

"""Weighted sum of segmentation losses, with every term returned for logging."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

from torch import Tensor, nn

from hybridvision.losses.boundary import BoundaryLoss
from hybridvision.losses.dice import DiceLoss
from hybridvision.losses.pixelwise import BCEWithLogitsLoss, CrossEntropyLoss, FocalLoss

__all__ = ["DEFAULT_LOSS_WEIGHTS", "CombinedLoss", "LossOutput", "build_segmentation_loss", "loss_term_names"]

DEFAULT_LOSS_WEIGHTS: dict[str, float] = {"ce": 1.0, "dice": 1.0, "focal": 0.5, "boundary": 0.1}


class LossOutput(NamedTuple):
    """Result of :class:`CombinedLoss`.

    Attributes:
        total: scalar ``sum_i weight_i * term_i``; call ``backward()`` on it.
        terms: unweighted scalar value of each term, by name (for logging).
    """

    total: Tensor
    terms: dict[str, Tensor]


class CombinedLoss(nn.Module):
    """Weighted sum of losses that all take ``(logits (B, K, H, W), target (B, H, W))``.

    Args:
        terms: ``{name: (loss_module, weight)}``; the order is kept in :attr:`LossOutput.terms`.
    """

    def __init__(self, terms: Mapping[str, tuple[nn.Module, float]]) -> None:
        super().__init__()
        if not terms:
            raise ValueError("CombinedLoss needs at least one term")
        self.losses = nn.ModuleDict({name: loss for name, (loss, _) in terms.items()})
        self.weights = {name: float(weight) for name, (_, weight) in terms.items()}

    def forward(self, logits: Tensor, target: Tensor) -> LossOutput:
        """Compute every term and their weighted sum.

        Args:
            logits: (B, K, H, W) raw scores.
            target: (B, H, W) int class indices or ``ignore_index``.

        Returns:
            :class:`LossOutput` with the total and the unweighted terms.
        """
        terms = {name: loss(logits, target) for name, loss in self.losses.items()}
        total = sum(self.weights[name] * value for name, value in terms.items())
        return LossOutput(total=total, terms=terms)

    def extra_repr(self) -> str:
        """The term weights, for ``repr``."""
        return ", ".join(f"{name}={weight:g}" for name, weight in self.weights.items())


def _ce(
    num_classes: int, ignore_index: int, class_weights: Sequence[float] | None, smoothing: float
) -> nn.Module:
    if num_classes == 1:
        if class_weights is not None and len(class_weights) != 1:
            raise ValueError(
                f"num_classes=1 (binary): class_weights must hold one value, the positive weight; got {class_weights}"
            )
        return BCEWithLogitsLoss(ignore_index, pos_weight=class_weights, label_smoothing=smoothing)
    return CrossEntropyLoss(ignore_index, class_weights=class_weights, label_smoothing=smoothing)


_BUILDERS: dict[str, Callable[[int, int, Sequence[float] | None, float], nn.Module]] = {
    "ce": _ce,
    "dice": lambda k, ignore, _w, _s: DiceLoss(
        ignore_index=ignore, mode="binary" if k == 1 else "multiclass"
    ),
    "focal": lambda _k, ignore, _w, _s: FocalLoss(gamma=2.0, ignore_index=ignore),
    "boundary": lambda _k, ignore, _w, _s: BoundaryLoss(ignore_index=ignore),
}


def loss_term_names() -> list[str]:
    """Names accepted by :func:`build_segmentation_loss`."""
    return list(_BUILDERS)


def build_segmentation_loss(
    num_classes: int,
    ignore_index: int = 255,
    weights: Mapping[str, float] | None = None,
    class_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
) -> CombinedLoss:
    """Build the fine-tuning loss from term weights.

    Terms: ``"ce"`` (cross-entropy for ``num_classes >= 2``, binary cross-entropy for
    ``num_classes == 1``; takes ``class_weights`` — for binary a single positive weight — and
    ``label_smoothing``), ``"dice"`` (soft Dice, multiclass or binary), ``"focal"`` (gamma 2) and
    ``"boundary"`` (Kervadec et al., normalised distance maps). Terms with weight 0 are left out.

    Args:
        num_classes: K; 1 means binary segmentation with a single logit.
        ignore_index: target value excluded from every term.
        weights: ``{term: weight}``; default :data:`DEFAULT_LOSS_WEIGHTS`.
        class_weights: optional per-class weights of the cross-entropy term.
        label_smoothing: label smoothing of the cross-entropy term.

    Returns:
        A :class:`CombinedLoss`.

    Raises:
        ValueError: on an unknown term name (the message lists the valid ones) or if no term is left.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    weights = dict(DEFAULT_LOSS_WEIGHTS if weights is None else weights)
    unknown = sorted(set(weights) - set(_BUILDERS))
    if unknown:
        raise ValueError(f"unknown loss term(s) {unknown}; valid terms: {loss_term_names()}")
    if class_weights is not None and num_classes > 1 and len(class_weights) != num_classes:
        raise ValueError(
            f"class_weights has {len(class_weights)} entries, expected num_classes={num_classes}"
        )
    if class_weights is not None and weights.get("ce", 0.0) == 0.0:
        raise ValueError("class_weights only apply to the 'ce' term, which has weight 0 or is missing")
    terms = {
        name: (_BUILDERS[name](num_classes, ignore_index, class_weights, label_smoothing), weight)
        for name, weight in weights.items()
        if weight != 0.0
    }
    if not terms:
        raise ValueError(f"every loss weight is 0: {weights}")
    return CombinedLoss(terms)

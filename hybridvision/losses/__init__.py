"""Segmentation losses: cross-entropy / BCE, Dice, Focal, Boundary, and their weighted combination.

Every loss takes logits ``(B, K, H, W)`` (K = 1: binary, sigmoid) and an integer target
``(B, H, W)``, and excludes pixels equal to ``ignore_index`` from the value, the normaliser and the
gradient.
"""

from hybridvision.losses.boundary import BoundaryLoss, euclidean_distance_transform, signed_distance_maps
from hybridvision.losses.combined import (
    DEFAULT_LOSS_WEIGHTS,
    CombinedLoss,
    LossOutput,
    build_segmentation_loss,
    loss_term_names,
)
from hybridvision.losses.dice import DiceLoss
from hybridvision.losses.pixelwise import BCEWithLogitsLoss, CrossEntropyLoss, FocalLoss

__all__ = [
    "DEFAULT_LOSS_WEIGHTS",
    "BCEWithLogitsLoss",
    "BoundaryLoss",
    "CombinedLoss",
    "CrossEntropyLoss",
    "DiceLoss",
    "FocalLoss",
    "LossOutput",
    "build_segmentation_loss",
    "euclidean_distance_transform",
    "loss_term_names",
    "signed_distance_maps",
]

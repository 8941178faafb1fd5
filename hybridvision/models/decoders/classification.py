"""Image-level classification on top of any encoder: a pooled-feature head and a full classifier.

Not a registered decoder: decoders return dense logits (B, K, h, w), this head returns (B, K).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..base import Encoder
from ..layers.common import trunc_normal_init

__all__ = ["ClassificationHead", "Classifier"]


class ClassificationHead(nn.Module):
    """Global average pool -> LayerNorm -> dropout -> Linear.

    The head of ConvNeXt (Liu et al., 2022) and of the hybrid Transformer-CNN classifiers such as
    CoAtNet (Dai et al., 2021).

    No BatchNorm, so it behaves the same for any batch size (linear probes with batch 1 included).

    Args:
        in_channels: channels C of the pooled feature map.
        num_classes: number of classes K.
        dropout: dropout before the linear layer.
    """

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.norm = nn.LayerNorm(in_channels)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels, num_classes)
        self.apply(trunc_normal_init)

    def forward(self, features: Tensor | Sequence[Tensor]) -> Tensor:
        """Args: features (B, C, H, W), or an encoder's feature list (its last map is used). Returns (B, K)."""
        x = features if isinstance(features, Tensor) else features[-1]
        return self.fc(self.dropout(self.norm(x.mean(dim=(2, 3)))))  # (B, K)


class Classifier(nn.Module):
    """Encoder + :class:`ClassificationHead` on its last feature, for image classification and linear probes.

    Args:
        encoder: any :class:`~hybridvision.models.base.Encoder`.
        num_classes: number of classes K.
        dropout: dropout of the head.
        freeze_encoder: linear probe: the encoder gets no gradients and stays in eval mode (frozen
            BatchNorm statistics, no stochastic depth) even when the classifier is in train mode.
    """

    def __init__(
        self, encoder: Encoder, num_classes: int, dropout: float = 0.0, freeze_encoder: bool = False
    ):
        super().__init__()
        self.encoder = encoder
        self.head = ClassificationHead(encoder.out_channels[-1], num_classes, dropout)
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    def train(self, mode: bool = True) -> Classifier:
        """Set training mode; a frozen encoder stays in eval mode (its norm statistics are not updated)."""
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        """Args: x (B, in_chans, H, W). Returns logits (B, K)."""
        if self.freeze_encoder:
            with torch.no_grad():
                feature = self.encoder.forward_features(x)[-1]
        else:
            feature = self.encoder.forward_features(x)[-1]
        return self.head(feature)

    def no_weight_decay(self) -> set[str]:
        """The encoder's parameter names excluded from weight decay, prefixed with ``encoder.``."""
        return {f"encoder.{name}" for name in self.encoder.no_weight_decay()}

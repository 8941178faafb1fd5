"""Small building blocks shared by every model family."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DropPath", "drop_path", "Mlp", "LayerNorm2d", "ConvNormAct", "trunc_normal_init"]


def drop_path(x: Tensor, drop_prob: float, training: bool) -> Tensor:
    """Stochastic depth: drop whole residual branches per sample (Huang et al., 2016)."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    return x * x.new_empty(shape).bernoulli_(keep).div_(keep)


class DropPath(nn.Module):
    """Module form of :func:`drop_path`."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        """Drop whole samples' residual branches with probability ``drop_prob`` (training only)."""
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        """The drop probability, for ``repr``."""
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    """Token MLP: Linear -> act -> dropout -> Linear -> dropout. Input (B, N, C)."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
    ):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        """Apply fc1, activation, dropout, fc2, dropout over the last dimension."""
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dim of an NCHW map."""

    def forward(self, x: Tensor) -> Tensor:
        """Layer-normalise ``(B, C, H, W)`` maps over the channel dimension."""
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNormAct(nn.Sequential):
    """Conv2d (no bias) -> norm -> activation."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        act_layer: type[nn.Module] | None = nn.ReLU,
    ):
        super().__init__(
            nn.Conv2d(
                in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False
            ),
            norm_layer(out_channels),
            act_layer() if act_layer is not None else nn.Identity(),
        )


def trunc_normal_init(module: nn.Module, std: float = 0.02) -> None:
    """ViT-style init: truncated normal for Linear weights, zeros for biases, ones/zeros for norms."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)

"""Sequential CNN -> Transformer hybrid encoder (TransUNet / BoTNet style).

A ResNet-style CNN extracts four stages of features; the last (stride 32) map is refined by global
self-attention layers with a fixed 2-D sin-cos position embedding computed for the actual grid, so
any input size works without resampling.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, cast

from torch import Tensor, nn

from ..base import Encoder, apply_token_mask
from ..layers.common import ConvNormAct, trunc_normal_init
from ..layers.pos_embed import sincos_2d_pos_embed
from ..layers.visible_tokens import VisibleTokens, visible_token_blocks
from ..registry import register_presets
from .hybrid import AttentionBlock, drop_path_rates

__all__ = ["SequentialConfig", "SequentialHybridEncoder", "BasicBlock", "PRESETS"]


@dataclass(frozen=True)
class SequentialConfig:
    """Architecture of a :class:`SequentialHybridEncoder`."""

    dims: tuple[int, ...]  #: channels of the CNN stages (reductions 4, 8, 16, 32, ...)
    depths: tuple[int, ...]  #: residual blocks per CNN stage
    transformer_depth: int  #: global-attention layers refining the last stage
    num_heads: int  #: attention heads of the refinement
    mlp_ratio: float = 4.0  #: hidden / dim of the refinement MLPs
    attention: Literal["softmax", "linear"] = "softmax"  #: attention of the refinement
    drop_path_rate: float = 0.0  #: stochastic depth over the refinement layers

    def __post_init__(self) -> None:
        object.__setattr__(self, "dims", tuple(self.dims))
        object.__setattr__(self, "depths", tuple(self.depths))
        if not self.dims or len(self.dims) != len(self.depths) or min(self.depths) < 1:
            raise ValueError(
                f"dims {self.dims} and depths {self.depths} must be non-empty, equally long, depths >= 1"
            )
        if self.transformer_depth < 1:
            raise ValueError(f"transformer_depth must be >= 1, got {self.transformer_depth}")
        if self.num_heads < 1 or self.dims[-1] % self.num_heads:
            raise ValueError(
                f"num_heads {self.num_heads} must be >= 1 and divide the last dim {self.dims[-1]}"
            )
        if self.dims[-1] % 4:
            raise ValueError(
                f"the last dim must be a multiple of 4 for the sin-cos embedding, got {self.dims[-1]}"
            )
        if self.attention not in ("softmax", "linear"):
            raise ValueError(f"attention must be 'softmax' or 'linear', got {self.attention!r}")


class BasicBlock(nn.Module):
    """ResNet basic block (He et al., 2016): two 3x3 conv-BN, identity or 1x1 projection shortcut.

    Args:
        in_dim: input channels.
        out_dim: output channels.
        stride: stride of the first conv and the shortcut.
    """

    def __init__(self, in_dim: int, out_dim: int, stride: int = 1):
        super().__init__()
        self.conv1 = ConvNormAct(in_dim, out_dim, 3, stride)
        self.conv2 = ConvNormAct(out_dim, out_dim, 3, act_layer=None)
        self.shortcut = (
            ConvNormAct(in_dim, out_dim, 1, stride, act_layer=None)
            if stride != 1 or in_dim != out_dim
            else nn.Identity()
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        """Args: x (B, C_in, H, W). Returns (B, C_out, H / stride, W / stride)."""
        return self.act(self.shortcut(x) + self.conv2(self.conv1(x)))


class SequentialHybridEncoder(Encoder):
    """CNN backbone followed by a Transformer refinement of its last stage.

    TransUNet (Chen et al., 2021, arXiv:2102.04306); BoTNet (Srinivas et al., 2021).

    Features are the CNN stages' outputs, the last one replaced by its refinement: tokens of the
    stride-32 map + fixed 2-D sin-cos position embedding (MAE's, for the actual grid) -> pre-norm
    global-attention layers -> LayerNorm. Masking: the mask token replaces masked positions after
    the stem and every residual block's output is zeroed at masked positions; the refinement is not
    re-masked, except by :meth:`forward_visible`, whose refinement sees the visible tokens only.

    Args:
        config: the architecture.
        in_chans: input channels.
    """

    def __init__(self, config: SequentialConfig, in_chans: int = 3):
        super().__init__()
        self.config = config
        dims = config.dims
        self.stem = nn.Sequential(
            ConvNormAct(in_chans, dims[0] // 2, 3, 2), ConvNormAct(dims[0] // 2, dims[0], 3, 2)
        )  # stride 4
        self.stages = nn.ModuleList()
        prev_dim = dims[0]
        for i, (dim, depth) in enumerate(zip(dims, config.depths)):
            self.stages.append(
                nn.ModuleList(
                    BasicBlock(prev_dim if j == 0 else dim, dim, 2 if i > 0 and j == 0 else 1)
                    for j in range(depth)
                )
            )
            prev_dim = dim
        rates = drop_path_rates(config.drop_path_rate, [config.transformer_depth])[0]
        self.refinement = nn.ModuleList(
            AttentionBlock(dims[-1], config.num_heads, config.mlp_ratio, config.attention, drop_path=rate)
            for rate in rates
        )
        self.refinement_norm = nn.LayerNorm(dims[-1])
        self.out_channels = tuple(dims)
        self.reductions = tuple(4 * 2**i for i in range(len(dims)))
        self.size_divisor = self.reductions[-1]
        self.mask_token_dim = dims[0]
        for module in (self.refinement, self.refinement_norm):
            module.apply(trunc_normal_init)

    def refine(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Global-attention refinement, of the visible tokens only under a ``mask`` (B, 1, h, w).

        Args: x (B, C, H, W). Returns (B, C, H, W), with a mask zero at masked positions.
        """
        b, c, h, w = x.shape
        pos = sincos_2d_pos_embed(c, h, w).to(device=x.device, dtype=x.dtype)  # (1, H*W, C)
        tokens = x.flatten(2).transpose(1, 2).contiguous() + pos  # (B, H*W, C), token-major
        if mask is not None:
            visible = VisibleTokens.from_mask(mask, (h, w))
            out = visible_token_blocks(self._refine_tokens, visible.gather(tokens), visible)  # (M, C)
            return visible.scatter(out).permute(0, 3, 1, 2)
        return self._refine_tokens(tokens).transpose(1, 2).reshape(b, c, h, w)

    def _refine_tokens(self, tokens: Tensor) -> Tensor:
        """The refinement layers and norm. Args: tokens (B, N, C). Returns (B, N, C)."""
        for block in self.refinement:
            tokens = block(tokens)
        return self.refinement_norm(tokens)

    def _cnn_features(self, x: Tensor, mask: Tensor | None, mask_token: Tensor | None) -> list[Tensor]:
        """The CNN stages' outputs, masked SparK-style under a mask (before the refinement)."""
        x = apply_token_mask(self.stem(x), mask, mask_token)  # (B, C1, H/4, W/4)
        features = []
        for stage in cast("Iterable[nn.Sequential]", self.stages):
            for block in stage:
                x = apply_token_mask(block(x), mask, None)
            features.append(x)
        return features

    def _forward_features(self, x: Tensor, mask: Tensor | None, mask_token: Tensor | None) -> list[Tensor]:
        features = self._cnn_features(x, mask, mask_token)
        features[-1] = self.refine(features[-1])
        return features

    encodes_visible_only = True
    visible_only_mask_token = True

    def _forward_visible(self, x: Tensor, mask: Tensor, mask_token: Tensor | None) -> list[Tensor]:
        features = self._cnn_features(x, mask, mask_token)
        features[-1] = self.refine(features[-1], mask)
        return features


#: preset name -> architecture
PRESETS: dict[str, SequentialConfig] = {
    "sequential_nano": SequentialConfig((24, 48, 96, 192), (1, 1, 1, 1), transformer_depth=2, num_heads=6),
    "sequential_tiny": SequentialConfig(
        (32, 64, 128, 256), (2, 2, 2, 2), transformer_depth=4, num_heads=8, drop_path_rate=0.05
    ),
    "sequential_small": SequentialConfig(
        (64, 128, 256, 512), (2, 2, 2, 2), transformer_depth=4, num_heads=8, drop_path_rate=0.1
    ),
}


register_presets(PRESETS, SequentialHybridEncoder)

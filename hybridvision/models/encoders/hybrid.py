"""Hierarchical CNN + Transformer hybrid encoder described as data.

A :class:`HybridEncoder` stacks stages given by :class:`StageConfig` rows:

* ``conv`` — ConvNeXt blocks (Liu et al., 2022), local and cheap at high resolution;
* ``conv_window_attn`` — a conv path and a Swin window-attention path (Liu et al., 2021) run in
  parallel on the stage input and are merged by a fusion module (``layers.fusion``), as in
  MixFormer (Chen et al., 2022) / ACmix (Pan et al., 2022);
* ``global_attn`` — pre-norm Transformer blocks with global softmax attention (SDPA) or linear
  attention (Katharopoulos et al., 2020) for high resolutions, with a conditional position
  encoding (depthwise conv, Chu et al., 2021) so any input size works.

The blocks defined here (:class:`ConvBlock`, :class:`AttentionBlock`, :class:`ConvStage`,
:class:`TransformerStage`) are reused by the parallel and sequential hybrid families.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

import torch
from torch import Tensor, nn

from ..base import Encoder, apply_token_mask
from ..layers.attention import Attention
from ..layers.common import ConvNormAct, DropPath, LayerNorm2d, Mlp, trunc_normal_init
from ..layers.fusion import FUSIONS, create_fusion
from ..layers.linear_attention import LinearAttention
from ..layers.visible_tokens import VisibleTokens, visible_swin_stack, visible_token_blocks
from ..layers.window_attention import SwinBlockStack
from ..registry import register_presets, replace_preset

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = [
    "StageConfig",
    "HybridConfig",
    "HybridEncoder",
    "ConvBlock",
    "AttentionBlock",
    "ConvStage",
    "TransformerStage",
    "ConvWindowAttnStage",
    "conv_stem",
    "downsample",
    "drop_path_rates",
    "PRESETS",
    "replace_config",
]

StageKind = Literal["conv", "conv_window_attn", "global_attn"]
AttentionKind = Literal["softmax", "linear", "window"]
_ATTENTION_KINDS = ("softmax", "linear", "window")
ConfigT = TypeVar("ConfigT", bound="DataclassInstance")


def replace_config(config: ConfigT, overrides: Mapping[str, Any]) -> ConfigT:
    """``dataclasses.replace`` that names the valid fields when an override key is unknown."""
    return replace_preset(type(config).__name__, config, overrides)


@dataclass(frozen=True)
class StageConfig:
    """One stage of a :class:`HybridEncoder`."""

    kind: StageKind  #: block type of the stage
    depth: int  #: blocks (in each path of a ``conv_window_attn`` stage)
    dim: int  #: channels of the stage
    stride: int  #: reduction applied before the stage: 4 or 2 for the first (the stem), else 2 or 1
    num_heads: int = 0  #: attention heads (attention stages only)
    window_size: int = 8  #: window side of ``conv_window_attn`` stages
    mlp_ratio: float = 4.0  #: hidden / dim of the block MLPs
    fusion: str = "gating"  #: ``layers.fusion.FUSIONS`` name merging conv and window-attention paths
    attention: Literal["softmax", "linear"] = "softmax"  #: attention of ``global_attn`` stages

    def __post_init__(self) -> None:
        kinds = ("conv", "conv_window_attn", "global_attn")
        if self.kind not in kinds:
            raise ValueError(f"stage kind must be one of {kinds}, got {self.kind!r}")
        if self.depth < 1 or self.dim < 1:
            raise ValueError(f"stage depth and dim must be >= 1, got depth={self.depth}, dim={self.dim}")
        if self.stride not in (1, 2, 4):
            raise ValueError(f"stage stride must be 1, 2 or 4, got {self.stride}")
        if self.kind != "conv" and (self.num_heads < 1 or self.dim % self.num_heads):
            raise ValueError(
                f"{self.kind} stage needs num_heads >= 1 dividing dim {self.dim}, got {self.num_heads}"
            )
        if self.fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {self.fusion!r}; valid fusions: {', '.join(sorted(FUSIONS))}")
        if self.attention not in ("softmax", "linear"):
            raise ValueError(f"attention must be 'softmax' or 'linear', got {self.attention!r}")
        if self.window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {self.window_size}")


@dataclass(frozen=True)
class HybridConfig:
    """Architecture of a :class:`HybridEncoder`."""

    stages: tuple[StageConfig, ...]  #: stages from high to low resolution (dicts are converted)
    drop_path_rate: float = 0.0  #: stochastic depth, increased linearly over all blocks
    layer_scale_init: float = 1e-6  #: initial layer-scale value; 0 disables layer scale
    conv_kernel_size: int = 7  #: depthwise kernel of the ConvNeXt blocks

    def __post_init__(self) -> None:
        stages = tuple(s if isinstance(s, StageConfig) else StageConfig(**s) for s in self.stages)
        object.__setattr__(self, "stages", stages)
        if not stages:
            raise ValueError("HybridConfig needs at least one stage")
        if stages[0].stride not in (2, 4):
            raise ValueError(f"the first stage's stride (the stem) must be 2 or 4, got {stages[0].stride}")
        if any(s.stride == 4 for s in stages[1:]):
            raise ValueError("only the first stage may have stride 4")


def drop_path_rates(rate: float, depths: Sequence[int]) -> list[list[float]]:
    """Linearly increasing stochastic-depth rates, split per stage."""
    total = sum(depths)
    rates = [rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]  # linspace(0, rate, total)
    out, start = [], 0
    for depth in depths:
        out.append(rates[start : start + depth])
        start += depth
    return out


class ConvBlock(nn.Module):
    """ConvNeXt block (Liu et al., 2022, "A ConvNet for the 2020s").

    Depthwise conv, LayerNorm, pointwise MLP, layer scale, stochastic depth, residual.

    Args:
        dim: channels C.
        mlp_ratio: MLP hidden / C.
        kernel_size: depthwise kernel.
        drop_path: stochastic-depth rate.
        layer_scale_init: initial layer scale (0 disables it).
    """

    def __init__(
        self,
        dim: int,
        mlp_ratio: float = 4.0,
        kernel_size: int = 7,
        drop_path: float = 0.0,
        layer_scale_init: float = 1e-6,
    ):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale_init)) if layer_scale_init > 0 else None
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        """Args: x (B, C, H, W). Returns (B, C, H, W)."""
        y = self.mlp(self.norm(self.dwconv(x).permute(0, 2, 3, 1)))  # (B, H, W, C)
        if self.gamma is not None:
            y = y * self.gamma
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class AttentionBlock(nn.Module):
    """Pre-norm Transformer block (Vaswani et al., 2017; ViT, Dosovitskiy et al., 2021) on tokens.

    ``x + attn(norm(x))`` then ``x + mlp(norm(x))``, with optional layer scale and stochastic depth.

    Args:
        dim: token dim C.
        num_heads: heads.
        mlp_ratio: MLP hidden / C.
        attention: ``softmax`` (global, SDPA) or ``linear`` (global, O(N), Katharopoulos et al., 2020).
        drop_path: stochastic-depth rate.
        layer_scale_init: initial layer scale (0 disables it).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        attention: Literal["softmax", "linear"] = "softmax",
        drop_path: float = 0.0,
        layer_scale_init: float = 0.0,
    ):
        super().__init__()
        if attention not in ("softmax", "linear"):
            raise ValueError(f"attention must be 'softmax' or 'linear', got {attention!r}")
        self.norm1 = nn.LayerNorm(dim)
        self.attn = LinearAttention(dim, num_heads) if attention == "linear" else Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.gamma1 = nn.Parameter(torch.full((dim,), layer_scale_init)) if layer_scale_init > 0 else None
        self.gamma2 = nn.Parameter(torch.full((dim,), layer_scale_init)) if layer_scale_init > 0 else None
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        """Args: x (B, N, C). Returns (B, N, C)."""
        y = self.attn(self.norm1(x))
        x = x + self.drop_path(y if self.gamma1 is None else y * self.gamma1)
        y = self.mlp(self.norm2(x))
        return x + self.drop_path(y if self.gamma2 is None else y * self.gamma2)


class ConvStage(nn.Module):
    """``depth`` ConvNeXt blocks; under a mask, masked positions are zeroed after every block."""

    def __init__(
        self,
        dim: int,
        depth: int,
        mlp_ratio: float,
        kernel_size: int,
        drop_paths: Sequence[float],
        layer_scale_init: float,
    ):
        super().__init__()
        self.blocks = nn.ModuleList(
            ConvBlock(dim, mlp_ratio, kernel_size, drop_paths[i], layer_scale_init) for i in range(depth)
        )

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Args: x (B, C, H, W); mask (B, 1, h, w) patch mask or None. Returns (B, C, H, W)."""
        for block in self.blocks:
            x = apply_token_mask(block(x), mask, None)
        return x


class TransformerStage(nn.Module):
    """``depth`` Transformer blocks on an NCHW map.

    ``softmax`` / ``linear``: a depthwise-conv conditional position encoding (CPVT, Chu et al.,
    2021), then :class:`AttentionBlock` s on all tokens. ``window``: Swin blocks alternating W-MSA
    and SW-MSA (``layers.window_attention.SwinBlockStack``, relative position bias, no layer scale).

    Args:
        dim: channels C.
        depth: blocks.
        num_heads: heads.
        mlp_ratio: MLP hidden / C.
        attention: ``softmax``, ``linear`` or ``window``.
        window_size: window side for ``window``.
        drop_paths: per-block stochastic-depth rates.
        layer_scale_init: initial layer scale of the global blocks (0 disables it).
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        attention: AttentionKind,
        window_size: int,
        drop_paths: Sequence[float],
        layer_scale_init: float,
    ):
        super().__init__()
        if attention not in _ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {_ATTENTION_KINDS}, got {attention!r}")
        self.windowed = attention == "window"
        if self.windowed:
            self.blocks: nn.Module = SwinBlockStack(
                dim, depth, num_heads, window_size, mlp_ratio, drop_path=list(drop_paths[:depth])
            )
        else:
            self.position_conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
            self.blocks = nn.Sequential(
                *(
                    AttentionBlock(
                        dim,
                        num_heads,
                        mlp_ratio,
                        cast('Literal["softmax", "linear"]', attention),  # not "window" here
                        drop_paths[i],
                        layer_scale_init,
                    )
                    for i in range(depth)
                )
            )

    def forward_visible(self, x: Tensor, mask: Tensor) -> Tensor:
        """The blocks on the visible tokens only (``layers.visible_tokens``).

        The position encoding still reads the whole map. Args: x (B, C, H, W); mask (B, 1, h, w).
        Returns (B, C, H, W), zero at masked positions.
        """
        tokens = VisibleTokens.from_mask(mask, (x.shape[-2], x.shape[-1]))
        if self.windowed:
            y = tokens.gather(x.permute(0, 2, 3, 1))  # (M, C)
            y = visible_swin_stack(cast(SwinBlockStack, self.blocks), y, tokens)
        else:
            y = tokens.gather((x + self.position_conv(x)).permute(0, 2, 3, 1))  # (M, C)
            y = visible_token_blocks(self.blocks, y, tokens)
        return tokens.scatter(y).permute(0, 3, 1, 2)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Args: x (B, C, H, W); mask unused (Transformer stages are not re-masked). Returns (B, C, H, W)."""
        if self.windowed:
            return self.blocks(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # via (B, H, W, C)
        x = x + self.position_conv(x)
        b, c, h, w = x.shape
        tokens = self.blocks(x.flatten(2).transpose(1, 2).contiguous())  # (B, H*W, C), token-major
        return tokens.transpose(1, 2).reshape(b, c, h, w)


class ConvWindowAttnStage(nn.Module):
    """A conv path and a (shifted) window-attention path on the same input, merged by a fusion module.

    Under a mask the conv path is zeroed after every block and the fused output is zeroed too
    (fusion modules mix neighbouring positions).
    """

    def __init__(
        self, config: StageConfig, drop_paths: Sequence[float], layer_scale_init: float, kernel_size: int
    ):
        super().__init__()
        dim = config.dim
        self.conv_path = ConvStage(
            dim, config.depth, config.mlp_ratio, kernel_size, drop_paths, layer_scale_init
        )
        self.attn_path = TransformerStage(
            dim, config.depth, config.num_heads, config.mlp_ratio, "window", config.window_size, drop_paths,
            layer_scale_init,
        )  # fmt: skip
        self.fusion = create_fusion(config.fusion, dim, dim, dim, norm_layer=LayerNorm2d)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Args: x (B, C, H, W); mask (B, 1, h, w) or None. Returns (B, C, H, W)."""
        fused = self.fusion(self.conv_path(x, mask), self.attn_path(x))
        return apply_token_mask(fused, mask, None)

    def forward_visible(self, x: Tensor, mask: Tensor) -> Tensor:
        """As :meth:`forward`, the attention path on visible tokens only. Returns (B, C, H, W)."""
        fused = self.fusion(self.conv_path(x, mask), self.attn_path.forward_visible(x, mask))
        return apply_token_mask(fused, mask, None)


def conv_stem(in_chans: int, dim: int, stride: int) -> nn.Sequential:
    """Overlapping conv stem: 3x3/2 conv-BN-GELU, 3x3/(stride/2) conv, LayerNorm. (B, in, H, W) -> (B, dim, H/s, W/s)."""
    return nn.Sequential(
        ConvNormAct(in_chans, dim // 2, 3, 2, act_layer=nn.GELU),
        nn.Conv2d(dim // 2, dim, 3, stride // 2, 1),
        LayerNorm2d(dim),
    )


def downsample(in_dim: int, out_dim: int, stride: int) -> nn.Module:
    """LayerNorm + non-overlapping ``stride x stride`` conv (ConvNeXt / Swin patch merging)."""
    if stride == 1 and in_dim == out_dim:
        return nn.Identity()
    return nn.Sequential(LayerNorm2d(in_dim), nn.Conv2d(in_dim, out_dim, stride, stride))


class HybridEncoder(Encoder):
    """Hierarchical hybrid encoder stacked from :class:`StageConfig` rows.

    Conv stages, fused conv + window-attention stages and global-attention stages (ConvNeXt, Liu et
    al., 2022; Swin, Liu et al., 2021; MixFormer, Chen et al., 2022; CoAtNet, Dai et al., 2021).

    Each stage output goes through a LayerNorm and is returned. Masking: the mask token replaces
    masked positions after the stem; every conv block and every fused conv + window-attention stage
    output is zeroed at masked positions; global-attention stages are not re-masked. With
    :meth:`forward_visible` the attention blocks (window and global) run on the visible tokens only,
    the conv paths stay masked as above, and every returned map is zero at masked positions.

    Args:
        config: the architecture.
        in_chans: input channels.
    """

    def __init__(self, config: HybridConfig, in_chans: int = 3):
        super().__init__()
        self.config = config
        stages = config.stages
        self.stem = conv_stem(in_chans, stages[0].dim, stages[0].stride)
        rates = drop_path_rates(config.drop_path_rate, [s.depth for s in stages])
        self.downsamples, self.stages, self.norms = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        self.convolutional: list[bool] = []
        reductions, reduction, prev_dim = [], stages[0].stride, stages[0].dim
        for i, stage in enumerate(stages):
            if i > 0:
                reduction *= stage.stride
            self.downsamples.append(downsample(prev_dim, stage.dim, 1 if i == 0 else stage.stride))
            if stage.kind == "conv":
                module: nn.Module = ConvStage(
                    stage.dim,
                    stage.depth,
                    stage.mlp_ratio,
                    config.conv_kernel_size,
                    rates[i],
                    config.layer_scale_init,
                )
            elif stage.kind == "conv_window_attn":
                module = ConvWindowAttnStage(
                    stage, rates[i], config.layer_scale_init, config.conv_kernel_size
                )
            else:
                module = TransformerStage(
                    stage.dim, stage.depth, stage.num_heads, stage.mlp_ratio, stage.attention, stage.window_size,
                    rates[i], config.layer_scale_init,
                )  # fmt: skip
            self.stages.append(module)
            self.norms.append(LayerNorm2d(stage.dim))
            self.convolutional.append(stage.kind != "global_attn")
            reductions.append(reduction)
            prev_dim = stage.dim
        self.out_channels = tuple(s.dim for s in stages)
        self.reductions = tuple(reductions)
        self.size_divisor = reductions[-1]
        self.mask_token_dim = stages[0].dim
        self.apply(trunc_normal_init)

    def _forward_features(self, x: Tensor, mask: Tensor | None, mask_token: Tensor | None) -> list[Tensor]:
        x = apply_token_mask(self.stem(x), mask, mask_token)  # (B, C1, H/s, W/s)
        features = []
        for down, stage, norm, convolutional in zip(
            self.downsamples, self.stages, self.norms, self.convolutional
        ):
            x = stage(down(x), mask)
            feature = norm(x)
            features.append(apply_token_mask(feature, mask, None) if convolutional else feature)
        return features

    encodes_visible_only = True
    visible_only_mask_token = True

    def _forward_visible(self, x: Tensor, mask: Tensor, mask_token: Tensor | None) -> list[Tensor]:
        x = apply_token_mask(self.stem(x), mask, mask_token)  # (B, C1, H/s, W/s)
        features = []
        for down, stage, norm in zip(self.downsamples, self.stages, self.norms):
            if isinstance(stage, (ConvWindowAttnStage, TransformerStage)):
                x = stage.forward_visible(down(x), mask)
            else:
                x = stage(down(x), mask)  # a ConvStage: masked positions zeroed after every block
            features.append(apply_token_mask(norm(x), mask, None))
        return features

    def no_weight_decay(self) -> set[str]:
        """Names of the relative position bias tables, excluded from weight decay."""
        return {name for name, _ in self.named_parameters() if name.endswith("relative_position_bias_table")}


def _four_stages(
    depths: tuple[int, int, int, int],
    dims: tuple[int, int, int, int],
    heads: tuple[int, int, int],
    fusion: str = "gating",
    window_size: int = 8,
) -> tuple[StageConfig, ...]:
    """Conv / conv_window_attn / global_attn / global_attn at reductions 4, 8, 16, 32."""
    return (
        StageConfig("conv", depths[0], dims[0], 4),
        StageConfig("conv_window_attn", depths[1], dims[1], 2, heads[0], window_size, fusion=fusion),
        StageConfig("global_attn", depths[2], dims[2], 2, heads[1]),
        StageConfig("global_attn", depths[3], dims[3], 2, heads[2]),
    )


#: preset name -> architecture
PRESETS: dict[str, HybridConfig] = {
    "hybrid_nano": HybridConfig(_four_stages((1, 1, 2, 1), (32, 64, 128, 256), (2, 4, 8))),
    "hybrid_tiny": HybridConfig(
        _four_stages((2, 2, 6, 2), (48, 96, 192, 384), (3, 6, 12)), drop_path_rate=0.05
    ),
    "hybrid_small": HybridConfig(
        _four_stages((2, 3, 10, 3), (64, 128, 320, 512), (4, 10, 16)), drop_path_rate=0.1
    ),
    "hybrid_base": HybridConfig(
        _four_stages((2, 2, 12, 2), (128, 256, 512, 1024), (8, 16, 32)), drop_path_rate=0.2
    ),
}


register_presets(PRESETS, HybridEncoder)

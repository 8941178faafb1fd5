"""Swin-Unet symmetric decoder.

Cao et al., "Swin-Unet: Unet-like Pure Transformer for Medical Image Segmentation", ECCV Workshops
2022.

From the deepest feature (the bottleneck), each decoder level upsamples 2x with a patch expanding
layer, concatenates the encoder feature of that level (skip connection), projects back to its
channels with a linear layer and runs Swin blocks; a final patch expanding layer restores the
input resolution and a 1x1 convolution gives the logits. Module names mirror the official code
(``layers_up``, ``concat_back_dim``, ``norm_up``, ``up``, ``output``).

Differences from the official model, forced by the encoder contract: the skips are the encoder's
stage *outputs* (after that stage's blocks) rather than the stage inputs, and the decoder works on
any encoder whose strides double from level to level (``reductions`` like (4, 8, 16, 32)) and on
any input size. Decoder depths default to the official ones (the encoder depths, mirrored; the
``DECODER_DEPTHS`` entry of the official config is unused by its code).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..layers.common import trunc_normal_init
from ..layers.window_attention import SwinBlockStack, drop_path_rates
from ..registry import SegmenterSpec, register_decoder, register_segmenter

__all__ = ["PatchExpand", "SwinUnetStage", "SwinUnetDecoder"]


class PatchExpand(nn.Module):
    """Patch expanding: Linear C_in -> s^2 * C_out, spread over an s x s larger grid, then LayerNorm.

    With ``out_dim = in_dim / 2`` and ``scale = 2`` this is Swin-Unet's ``PatchExpand``; with
    ``out_dim = in_dim`` and ``scale = 4`` its ``FinalPatchExpand_X4``.

    Args:
        in_dim: input channels C_in.
        out_dim: output channels C_out.
        scale: upsampling factor s.
        norm_layer: norm over C_out.
    """

    def __init__(self, in_dim: int, out_dim: int, scale: int = 2, norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.scale = scale
        self.expand = nn.Linear(in_dim, scale * scale * out_dim, bias=False)
        self.norm = norm_layer(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """Args: x (B, H, W, C_in). Returns (B, s*H, s*W, C_out)."""
        b, h, w, _ = x.shape
        s = self.scale
        x = self.expand(x).view(b, h, w, s, s, -1)  # channels ordered (p1, p2, c) as in the paper's code
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, h * s, w * s, -1)  # (B, sH, sW, C_out)
        return self.norm(x)


class SwinUnetStage(nn.Module):
    """Decoder level: Swin blocks (``blocks``), then optionally a 2x :class:`PatchExpand` (``upsample``)."""

    def __init__(self, dim: int, out_dim: int | None, depth: int, num_heads: int, **block_kwargs: Any):
        super().__init__()
        norm_layer = block_kwargs.get("norm_layer", nn.LayerNorm)
        self.blocks = SwinBlockStack(dim, depth, num_heads, **block_kwargs)
        self.upsample = PatchExpand(dim, out_dim, 2, norm_layer) if out_dim is not None else None

    def forward(self, x: Tensor) -> Tensor:
        """Args: x (B, H, W, C). Returns (B, 2H, 2W, C_out) with an upsample, else (B, H, W, C)."""
        x = self.blocks(x)
        return self.upsample(x) if self.upsample is not None else x


def _default_heads(dim: int) -> int:
    """Heads of 32 channels, as Swin (96 -> 3, 192 -> 6, ...), reduced to a divisor of ``dim``."""
    return math.gcd(dim, max(1, dim // 32))


class SwinUnetDecoder(nn.Module):
    """Symmetric Swin decoder with skip connections (Cao et al., 2022).

    Args:
        in_channels: channels of the encoder features, shallow to deep (C_0, ..., C_{n-1}).
        reductions: their strides; each must be twice the previous one.
        num_classes: output channels K.
        depths: Swin blocks per decoder level for levels 0..n-2 (shallow to deep); default 2 each.
        num_heads: attention heads per level 0..n-2; default C_i / 32.
        window_size: attention window side.
        mlp_ratio: MLP hidden dim / token dim.
        qkv_bias: bias on the qkv projections.
        drop_rate: dropout after projections and in the MLPs.
        attn_drop_rate: attention dropout.
        drop_path_rate: stochastic depth, linearly increasing from the shallowest to the deepest block.
        norm_layer: token norm.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        reductions: Sequence[int],
        num_classes: int,
        depths: Sequence[int] | None = None,
        num_heads: Sequence[int] | None = None,
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        norm_layer: type[nn.Module] = nn.LayerNorm,
    ):
        super().__init__()
        dims, reductions = tuple(in_channels), tuple(reductions)
        n = len(dims)
        if n < 2 or len(reductions) != n:
            raise ValueError(f"need >= 2 features with one reduction each, got {dims} at {reductions}")
        if any(r2 != 2 * r1 for r1, r2 in zip(reductions, reductions[1:])):
            raise ValueError(f"swin_unet needs strides that double per level, got reductions {reductions}")
        depths = tuple(depths) if depths is not None else (2,) * (n - 1)
        num_heads = tuple(num_heads) if num_heads is not None else tuple(_default_heads(d) for d in dims[:-1])
        if len(depths) != n - 1 or len(num_heads) != n - 1:
            raise ValueError(
                f"depths {depths} and num_heads {num_heads} need {n - 1} entries (levels 0..{n - 2})"
            )
        rates = drop_path_rates(drop_path_rate, sum(depths))
        block_kwargs = dict(
            window_size=window_size,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            proj_drop=drop_rate,
            attn_drop=attn_drop_rate,
            norm_layer=norm_layer,
        )

        # layers_up[0] upsamples the bottleneck; layers_up[k] (k >= 1) works at level n-1-k
        self.layers_up = nn.ModuleList([PatchExpand(dims[-1], dims[-2], 2, norm_layer)])
        self.concat_back_dim = nn.ModuleList([nn.Identity()])
        for level in range(n - 2, -1, -1):
            start = sum(depths[:level])
            self.concat_back_dim.append(nn.Linear(2 * dims[level], dims[level]))
            self.layers_up.append(
                SwinUnetStage(
                    dims[level],
                    dims[level - 1] if level > 0 else None,
                    depths[level],
                    num_heads[level],
                    drop_path=rates[start : start + depths[level]],
                    **block_kwargs,
                )
            )
        self.norm_up = norm_layer(dims[0])
        self.up = PatchExpand(dims[0], dims[0], reductions[0], norm_layer)
        self.output = nn.Conv2d(dims[0], num_classes, kernel_size=1, bias=False)
        self.apply(trunc_normal_init)

    def forward(self, features: list[Tensor]) -> Tensor:
        """Args: features, list of (B, C_i, H / r_i, W / r_i). Returns logits (B, K, H, W)."""
        skips = [f.permute(0, 2, 3, 1) for f in features]  # (B, h_i, w_i, C_i)
        x = self.layers_up[0](skips[-1])
        for k in range(1, len(self.layers_up)):
            skip = skips[-1 - k]
            x = self.concat_back_dim[k](torch.cat([x, skip], dim=-1))  # (B, h, w, C_level)
            x = self.layers_up[k](x)
        x = self.up(self.norm_up(x))  # (B, H, W, C_0)
        return self.output(x.permute(0, 3, 1, 2))  # (B, K, H, W)

    def no_weight_decay(self) -> set[str]:
        """Names of the relative position bias tables, excluded from weight decay."""
        return {n for n, _ in self.named_parameters() if n.endswith("relative_position_bias_table")}


@register_decoder("swin_unet")
def swin_unet(
    in_channels: tuple[int, ...], reductions: tuple[int, ...], num_classes: int, **kwargs: Any
) -> SwinUnetDecoder:
    """Swin-Unet decoder for any encoder with doubling strides."""
    return SwinUnetDecoder(in_channels, reductions, num_classes, **kwargs)


# Official Swin-Unet (configs/swin_tiny_patch4_window7_224_lite.yaml): encoder depths (2, 2, 2, 2), the
# bottleneck normalised, the skips not; decoder depths mirror the encoder's.
register_segmenter(
    "swin_unet_tiny",
    SegmenterSpec(
        encoder="swin_tiny",
        decoder="swin_unet",
        encoder_kwargs={"depths": (2, 2, 2, 2), "stage_norms": False, "drop_path_rate": 0.2},
        # linspace(0, 0.2 * 5/7, 6) = the official decoder rates (the encoder's first six of linspace(0, 0.2, 8))
        decoder_kwargs={"depths": (2, 2, 2), "drop_path_rate": 0.2 * 5 / 7},
    ),
)
register_segmenter(
    "swin_unet_nano",
    SegmenterSpec(
        encoder="swin_nano",
        decoder="swin_unet",
        encoder_kwargs={"stage_norms": False},
        decoder_kwargs={"depths": (2, 2, 2), "num_heads": (1, 2, 4), "drop_path_rate": 0.0},
    ),
)

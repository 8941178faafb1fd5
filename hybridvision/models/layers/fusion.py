"""Fusion modules that merge a CNN feature map with a Transformer feature map of the same size.

Every module is built as ``Fusion(cnn_channels, transformer_channels, out_channels, **kwargs)`` and
called as ``fusion(cnn, transformer)`` with ``cnn`` (B, C_cnn, H, W) and ``transformer``
(B, C_tr, H, W); it returns (B, out_channels, H, W). :data:`FUSIONS` maps config names to the
classes and :func:`create_fusion` builds one by name.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..base import is_tracing
from .common import ConvNormAct

__all__ = [
    "CrossAttentionFusion",
    "ChannelSpatialAttentionFusion",
    "DynamicFeatureSelector",
    "MultiScaleFeatureAggregation",
    "FUSIONS",
    "create_fusion",
]


def _adaptive_avg_pool2d_traced(x: Tensor, out_h: Tensor, out_w: Tensor) -> Tensor:
    """``F.adaptive_avg_pool2d`` with traced (0-d tensor) output sizes, for ONNX export.

    ONNX has no adaptive pooling; the same bins (``floor(i L / P)`` to ``ceil((i + 1) L / P)``) are
    applied as two averaging matrices. Args: x (B, C, H, W). Returns (B, C, out_h, out_w).
    """

    def bins(length: int | Tensor, out: Tensor) -> Tensor:  # (out, length) averaging matrix
        i = torch.arange(out, device=x.device)[:, None]  # type: ignore[call-overload]  # traced 0-d size; stubs take numbers
        j = torch.arange(length, device=x.device)[None, :]  # type: ignore[arg-type]  # traced 0-d size; stubs take numbers
        start, end = i * length // out, ((i + 1) * length + out - 1) // out
        inside = ((j >= start) & (j < end)).to(x.dtype)
        return inside / inside.sum(dim=1, keepdim=True)

    rows, cols = bins(x.shape[-2], out_h), bins(x.shape[-1], out_w)
    return rows @ x @ cols.transpose(0, 1)  # (B, C, out_h, out_w)


def _check_same_size(cnn: Tensor, transformer: Tensor) -> None:
    if cnn.shape[0] != transformer.shape[0] or cnn.shape[-2:] != transformer.shape[-2:]:
        raise ValueError(
            f"fusion needs maps of the same batch and spatial size, got {tuple(cnn.shape)} and "
            f"{tuple(transformer.shape)}"
        )


class CrossAttentionFusion(nn.Module):
    """Bidirectional cross-attention fusion.

    Cf. CrossViT (Chen et al., 2021); TransFuse BiFusion (Zhang et al., 2021).

    CNN tokens query the Transformer tokens and Transformer tokens query the CNN tokens
    (pre-norm, multi-head, ``F.scaled_dot_product_attention``, residual); the two results are
    concatenated and projected to ``out_channels``. Keys/values can be average-pooled to at most
    ``kv_pool_size`` x ``kv_pool_size`` tokens so the cost stays O(N * kv_pool_size^2) at high
    resolution.

    Args:
        cnn_channels: C_cnn.
        transformer_channels: C_tr.
        out_channels: C_out, also the attention width.
        num_heads: attention heads; default ``max(1, out_channels // 32)``.
        kv_pool_size: pool keys/values to at most this many tokens per side; None keeps all.
        norm_layer: norm of the output projection (takes the channel count).
    """

    def __init__(
        self,
        cnn_channels: int,
        transformer_channels: int,
        out_channels: int,
        num_heads: int | None = None,
        kv_pool_size: int | None = 16,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
    ):
        super().__init__()
        num_heads = num_heads or max(1, out_channels // 32)
        if out_channels % num_heads:
            raise ValueError(f"out_channels {out_channels} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.kv_pool_size = kv_pool_size
        dim = out_channels
        self.cnn_in = nn.Conv2d(cnn_channels, dim, 1)
        self.transformer_in = nn.Conv2d(transformer_channels, dim, 1)
        self.cnn_norm = nn.LayerNorm(dim)
        self.transformer_norm = nn.LayerNorm(dim)
        self.cnn_query = nn.Linear(dim, dim)
        self.transformer_query = nn.Linear(dim, dim)
        self.cnn_key_value = nn.Linear(dim, 2 * dim)
        self.transformer_key_value = nn.Linear(dim, 2 * dim)
        self.cnn_proj = nn.Linear(dim, dim)
        self.transformer_proj = nn.Linear(dim, dim)
        self.out = ConvNormAct(2 * dim, out_channels, 1, norm_layer=norm_layer, act_layer=nn.GELU)

    def _key_value(self, tokens: Tensor, size: tuple[int, int], linear: nn.Linear) -> tuple[Tensor, Tensor]:
        """(B, N, C) normed tokens on an (H, W) grid -> keys, values (B, heads, M, C/heads)."""
        b, _, c = tokens.shape
        h, w = size
        if self.kv_pool_size is not None and is_tracing():  # sizes are traced: pool unconditionally
            grid = tokens.transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)
            pooled = _adaptive_avg_pool2d_traced(
                grid,
                torch.as_tensor(h).clamp(max=self.kv_pool_size),
                torch.as_tensor(w).clamp(max=self.kv_pool_size),
            )
            tokens = pooled.flatten(2).transpose(1, 2)  # (B, M, C)
        elif self.kv_pool_size is not None and (h > self.kv_pool_size or w > self.kv_pool_size):
            grid = tokens.transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)
            out_size = (min(h, self.kv_pool_size), min(w, self.kv_pool_size))
            tokens = F.adaptive_avg_pool2d(grid, out_size).flatten(2).transpose(1, 2)  # (B, M, C)
        kv = linear(tokens).reshape(b, -1, 2, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        return kv[0], kv[1]  # each (B, heads, M, C/heads)

    def _query(self, tokens: Tensor, linear: nn.Linear) -> Tensor:
        b, n, c = tokens.shape
        return linear(tokens).reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, cnn: Tensor, transformer: Tensor) -> Tensor:
        """Args: cnn (B, C_cnn, H, W), transformer (B, C_tr, H, W). Returns (B, C_out, H, W)."""
        _check_same_size(cnn, transformer)
        b, _, h, w = cnn.shape
        c_tokens = self.cnn_in(cnn).flatten(2).transpose(1, 2)  # (B, N, C)
        t_tokens = self.transformer_in(transformer).flatten(2).transpose(1, 2)  # (B, N, C)
        c_normed, t_normed = self.cnn_norm(c_tokens), self.transformer_norm(t_tokens)
        c_key, c_value = self._key_value(c_normed, (h, w), self.cnn_key_value)
        t_key, t_value = self._key_value(t_normed, (h, w), self.transformer_key_value)
        c_att = F.scaled_dot_product_attention(self._query(c_normed, self.cnn_query), t_key, t_value)
        t_att = F.scaled_dot_product_attention(self._query(t_normed, self.transformer_query), c_key, c_value)
        dim = c_tokens.shape[-1]
        c_tokens = c_tokens + self.cnn_proj(c_att.transpose(1, 2).reshape(b, h * w, dim))  # (B, N, C)
        t_tokens = t_tokens + self.transformer_proj(t_att.transpose(1, 2).reshape(b, h * w, dim))
        fused = torch.cat([c_tokens, t_tokens], dim=-1).transpose(1, 2).reshape(b, 2 * dim, h, w)
        return self.out(fused)


class ChannelSpatialAttentionFusion(nn.Module):
    """CBAM fusion (Woo et al., 2018, "CBAM: Convolutional Block Attention Module") on the concatenation.

    The concatenated map is reweighted by channel attention (a shared MLP over its average- and
    max-pooled descriptors), then by spatial attention (a ``spatial_kernel`` conv over its
    channel-wise mean and max), and projected to ``out_channels`` by a 1x1 conv.

    Args:
        cnn_channels: C_cnn.
        transformer_channels: C_tr.
        out_channels: C_out.
        reduction: channel-attention MLP reduction ratio.
        spatial_kernel: kernel size of the spatial-attention conv.
        norm_layer: norm of the output projection.
    """

    def __init__(
        self,
        cnn_channels: int,
        transformer_channels: int,
        out_channels: int,
        reduction: int = 16,
        spatial_kernel: int = 7,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
    ):
        super().__init__()
        channels = cnn_channels + transformer_channels
        hidden = max(8, channels // reduction)
        self.channel_mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1)
        )
        self.spatial = nn.Conv2d(2, 1, spatial_kernel, padding=spatial_kernel // 2)
        self.out = ConvNormAct(channels, out_channels, 1, norm_layer=norm_layer, act_layer=nn.GELU)

    def forward(self, cnn: Tensor, transformer: Tensor) -> Tensor:
        """Args: cnn (B, C_cnn, H, W), transformer (B, C_tr, H, W). Returns (B, C_out, H, W)."""
        _check_same_size(cnn, transformer)
        x = torch.cat([cnn, transformer], dim=1)  # (B, C_cnn + C_tr, H, W)
        avg = self.channel_mlp(x.mean(dim=(2, 3), keepdim=True))  # (B, C, 1, 1)
        mx = self.channel_mlp(x.amax(dim=(2, 3), keepdim=True))
        x = x * torch.sigmoid(avg + mx)
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)  # (B, 2, H, W)
        x = x * torch.sigmoid(self.spatial(pooled))
        return self.out(x)


class DynamicFeatureSelector(nn.Module):
    """Dynamic gated selection between the two paths.

    Cf. gated fusion of Arevalo et al., 2017, "Gated Multimodal Units"; selective kernels of Li et
    al., 2019, "SKNet".

    Both inputs are projected to ``out_channels`` (``cnn'``, ``tr'``, 1x1 conv + norm). A gate
    ``g = sigmoid(per-pixel 1x1 conv + per-channel MLP of the pooled context)`` of shape
    (B, C_out, H, W) picks, per pixel and channel, ``out = g * cnn' + (1 - g) * tr'``.

    Args:
        cnn_channels: C_cnn.
        transformer_channels: C_tr.
        out_channels: C_out.
        reduction: reduction ratio of the channel-context MLP.
        norm_layer: norm of the input projections.
    """

    def __init__(
        self,
        cnn_channels: int,
        transformer_channels: int,
        out_channels: int,
        reduction: int = 4,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
    ):
        super().__init__()
        self.cnn_in = ConvNormAct(cnn_channels, out_channels, 1, norm_layer=norm_layer, act_layer=None)
        self.transformer_in = ConvNormAct(
            transformer_channels, out_channels, 1, norm_layer=norm_layer, act_layer=None
        )
        self.pixel_gate = nn.Conv2d(2 * out_channels, out_channels, 1)
        hidden = max(8, out_channels // reduction)
        self.channel_gate = nn.Sequential(
            nn.Conv2d(2 * out_channels, hidden, 1), nn.GELU(), nn.Conv2d(hidden, out_channels, 1)
        )

    def gate(self, cnn: Tensor, transformer: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Projected inputs and the gate, each (B, C_out, H, W)."""
        cnn, transformer = self.cnn_in(cnn), self.transformer_in(transformer)
        both = torch.cat([cnn, transformer], dim=1)  # (B, 2 C_out, H, W)
        logits = self.pixel_gate(both) + self.channel_gate(both.mean(dim=(2, 3), keepdim=True))
        return cnn, transformer, torch.sigmoid(logits)

    def forward(self, cnn: Tensor, transformer: Tensor) -> Tensor:
        """Args: cnn (B, C_cnn, H, W), transformer (B, C_tr, H, W). Returns (B, C_out, H, W)."""
        _check_same_size(cnn, transformer)
        cnn, transformer, g = self.gate(cnn, transformer)
        return g * cnn + (1.0 - g) * transformer


class MultiScaleFeatureAggregation(nn.Module):
    """Multi-scale aggregation with parallel depthwise branches of several kernels and dilations.

    Cf. ASPP, Chen et al., 2017, "Rethinking Atrous Convolution"; Inception-style multi-kernel
    branches of SegNeXt's MSCA, Guo et al., 2022).

    The concatenation is projected to ``out_channels`` (1x1 conv), run through one depthwise
    ``k x k`` conv with dilation ``d`` per ``(k, d)`` in ``branches``, and the branch outputs are
    concatenated, mixed by a 1x1 conv and added back to the projection.

    Args:
        cnn_channels: C_cnn.
        transformer_channels: C_tr.
        out_channels: C_out.
        branches: ``(kernel_size, dilation)`` of each depthwise branch.
        norm_layer: norm after projections and branches.
    """

    def __init__(
        self,
        cnn_channels: int,
        transformer_channels: int,
        out_channels: int,
        branches: tuple[tuple[int, int], ...] = ((3, 1), (3, 2), (3, 3), (5, 1)),
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
    ):
        super().__init__()
        if not branches:
            raise ValueError("MultiScaleFeatureAggregation needs at least one branch")
        self.proj = ConvNormAct(
            cnn_channels + transformer_channels, out_channels, 1, norm_layer=norm_layer, act_layer=nn.GELU
        )
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(
                    out_channels,
                    out_channels,
                    k,
                    padding=d * (k - 1) // 2,
                    dilation=d,
                    groups=out_channels,
                    bias=False,
                ),
                norm_layer(out_channels),
            )
            for k, d in branches
        )
        self.aggregate = ConvNormAct(
            len(branches) * out_channels, out_channels, 1, norm_layer=norm_layer, act_layer=None
        )
        self.act = nn.GELU()

    def forward(self, cnn: Tensor, transformer: Tensor) -> Tensor:
        """Args: cnn (B, C_cnn, H, W), transformer (B, C_tr, H, W). Returns (B, C_out, H, W)."""
        _check_same_size(cnn, transformer)
        x = self.proj(torch.cat([cnn, transformer], dim=1))  # (B, C_out, H, W)
        multi = torch.cat([branch(x) for branch in self.branches], dim=1)  # (B, n * C_out, H, W)
        return self.act(x + self.aggregate(multi))


#: fusion name (as written in configs) -> class
FUSIONS: dict[str, type[nn.Module]] = {
    "cross_attention": CrossAttentionFusion,
    "channel_spatial": ChannelSpatialAttentionFusion,
    "gating": DynamicFeatureSelector,
    "multiscale": MultiScaleFeatureAggregation,
}


def create_fusion(
    name: str, cnn_channels: int, transformer_channels: int, out_channels: int, **kwargs: Any
) -> nn.Module:
    """Build the fusion module registered as ``name`` in :data:`FUSIONS`.

    Raises:
        ValueError: for an unknown name; the message lists the valid ones.
    """
    if name not in FUSIONS:
        raise ValueError(f"unknown fusion {name!r}; valid fusions: {', '.join(sorted(FUSIONS))}")
    return FUSIONS[name](cnn_channels, transformer_channels, out_channels, **kwargs)

"""Efficient self-attention with spatial (sequence) reduction of keys and values.

PVT (Wang et al., 2021, "Pyramid Vision Transformer", arXiv:2102.12122) and SegFormer
(Xie et al., 2021, "SegFormer: Simple and Efficient Design for Semantic Segmentation with
Transformers", arXiv:2105.15203) shorten the key/value sequence by a ratio ``R`` per side with a
strided ``R x R`` convolution followed by LayerNorm, cutting attention cost from ``O(N^2)`` to
``O(N^2 / R^2)``. Queries keep full resolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SpatialReductionAttention"]


class SpatialReductionAttention(nn.Module):
    """Multi-head attention whose keys/values come from a spatially reduced copy of the input.

    The layout follows the official SegFormer ``Attention``: ``q`` and a fused ``kv`` projection,
    ``sr`` (Conv2d, kernel = stride = ``sr_ratio``) + ``norm`` (LayerNorm) on the key/value path
    when ``sr_ratio > 1``, then ``proj``. Attention runs in
    ``F.scaled_dot_product_attention`` (scale ``head_dim ** -0.5``).

    Tokens are (B, N, C) with ``N = H * W`` in row-major order, which is an NHWC map; the
    reduction conv reads them through a channels-last NCHW *view*, so no transpose is copied.

    Args:
        dim: token channels C.
        num_heads: attention heads; ``dim`` must be divisible by it.
        sr_ratio: spatial reduction ratio R (1 = plain global attention).
        qkv_bias: bias on the q/kv projections.
        attn_drop: dropout on the attention weights (training only).
        proj_drop: dropout after the output projection.
        norm_layer: norm applied to the reduced tokens (built as ``norm_layer(dim)``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        sr_ratio: int = 1,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if sr_ratio < 1:
            raise ValueError(f"sr_ratio must be >= 1, got {sr_ratio}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.sr_ratio = sr_ratio
        self.attn_drop = attn_drop
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = norm_layer(dim)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        """Attend from every token to the reduced token set.

        Args:
            x: (B, N, C) tokens of an H x W map, ``N = H * W``.
            size: (H, W).

        Returns:
            (B, N, C).
        """
        b, n, c = x.shape
        h, w = size
        q = self.q(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, N, d)
        if self.sr_ratio > 1:
            kv = x.transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W), a channels-last view
            kv = self.sr(kv).flatten(2).transpose(1, 2)  # (B, M, C), M = (H // R) * (W // R)
            kv = self.norm(kv)
        else:
            kv = x
        m = kv.shape[1]
        kv = self.kv(kv).view(b, m, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # each (B, heads, M, d)
        dropout_p = self.attn_drop if self.training else 0.0
        if q.device.type == "cpu" and q.dtype == torch.bfloat16:
            # PyTorch's CPU SDPA kernels (2.x) run these short key sets about 2x faster in fp32 than
            # in bf16, forward + backward, casts included; the result is cast back (same maths).
            x = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), dropout_p=dropout_p).to(
                q.dtype
            )
        else:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        x = x.transpose(1, 2).reshape(b, n, c)  # (B, N, C)
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        """The head count and spatial-reduction ratio, for ``repr``."""
        return f"num_heads={self.num_heads}, sr_ratio={self.sr_ratio}"

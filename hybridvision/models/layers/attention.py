"""Multi-head self-attention on top of ``F.scaled_dot_product_attention``."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Attention"]


class Attention(nn.Module):
    """Global multi-head self-attention (Vaswani et al., 2017) with fused SDPA.

    Args:
        dim: token dim C.
        num_heads: heads; ``dim`` must be divisible by it. Head pruning (``distill/prune.py``) removes
            whole heads: ``num_heads`` and the qkv / proj widths shrink, the head width and ``dim`` stay.
        qkv_bias: bias on the qkv projection.
        attn_drop: dropout on attention weights (training only).
        proj_drop: dropout after the output projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """Args: x (B, N, C); attn_mask broadcastable to (B, heads, N, N). Returns (B, N, C)."""
        b, n, _ = x.shape
        inner = self.qkv.out_features // 3  # heads x head width: C, fewer after head pruning
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, inner // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head width)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop if self.training else 0.0
        )
        x = x.transpose(1, 2).reshape(b, n, inner)
        return self.proj_drop(self.proj(x))

"""Linear attention (Katharopoulos et al., 2020, "Transformers are RNNs", arXiv:2006.16236).

Softmax attention ``softmax(Q K^T) V`` costs O(N^2) in the number of tokens. Replacing the
similarity ``exp(q . k)`` by a kernel ``phi(q) . phi(k)`` with the positive feature map
``phi(x) = elu(x) + 1`` lets the key/value product be computed first::

    out_i = phi(q_i) (sum_j phi(k_j)^T v_j) / (phi(q_i) . sum_j phi(k_j))

which is O(N d^2): linear in the number of tokens, for high-resolution feature maps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LinearAttention", "elu_feature_map", "linear_attention"]


def elu_feature_map(x: Tensor) -> Tensor:
    """The positive feature map ``phi(x) = elu(x) + 1`` of Katharopoulos et al. (2020)."""
    return F.elu(x) + 1.0


def linear_attention(q: Tensor, k: Tensor, v: Tensor, eps: float = 1e-6) -> Tensor:
    """Kernelised (non-causal) linear attention with the ``elu + 1`` feature map.

    Computed in at least float32 (the normaliser is a sum over all tokens) and returned in ``q``'s
    dtype.

    Args:
        q: (B, heads, N, D) queries.
        k: (B, heads, M, D) keys.
        v: (B, heads, M, E) values.
        eps: added to the normaliser.

    Returns:
        (B, heads, N, E) attended values.
    """
    dtype = q.dtype
    compute = torch.promote_types(dtype, torch.float32)
    q, k, v = elu_feature_map(q.to(compute)), elu_feature_map(k.to(compute)), v.to(compute)
    kv = torch.einsum("bhmd,bhme->bhde", k, v)  # (B, heads, D, E)
    k_sum = k.sum(dim=2)  # (B, heads, D)
    normaliser = torch.einsum("bhnd,bhd->bhn", q, k_sum).unsqueeze(-1) + eps  # (B, heads, N, 1)
    out = torch.einsum("bhnd,bhde->bhne", q, kv) / normaliser  # (B, heads, N, E)
    return out.to(dtype)


class LinearAttention(nn.Module):
    """Multi-head linear self-attention (Katharopoulos et al., 2020); drop-in for ``Attention``.

    Same layout as :class:`~hybridvision.models.layers.attention.Attention` (``qkv`` then
    ``proj``), so the two can be swapped per stage; cost is O(N) in tokens instead of O(N^2).

    Args:
        dim: token dim C.
        num_heads: heads; ``dim`` must be divisible by it.
        qkv_bias: bias on the qkv projection.
        proj_drop: dropout after the output projection.
        eps: added to the attention normaliser.
    """

    def __init__(
        self, dim: int, num_heads: int = 8, qkv_bias: bool = True, proj_drop: float = 0.0, eps: float = 1e-6
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.eps = eps
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        """Args: x (B, N, C). Returns (B, N, C)."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, C/heads)
        x = linear_attention(q, k, v, self.eps)
        x = x.transpose(1, 2).reshape(b, n, c)  # (B, N, C)
        return self.proj_drop(self.proj(x))

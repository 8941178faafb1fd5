"""Positional-embedding utilities: resampling learned embeddings, fixed 2-D sin-cos embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..base import is_tracing

__all__ = ["interpolate_pos_embed", "sincos_2d_pos_embed"]


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = size
    if is_tracing():  # traced sizes (ONNX export) must stay tensors, not become constants
        return height, width
    return int(height), int(width)


def interpolate_pos_embed(
    pos_embed: Tensor,
    old_grid: int | tuple[int, int],
    new_grid: int | tuple[int, int],
    num_prefix_tokens: int = 0,
    mode: str = "bicubic",
    antialias: bool = True,
) -> Tensor:
    """Resample a learned absolute position embedding to another token grid.

    Same maths as timm's ``resample_abs_pos_embed`` (bicubic, ``align_corners=False``, antialiased
    when shrinking), so a ViT trained at one resolution accepts another. Prefix tokens (class,
    distillation) are kept as they are. Differentiable: it can run in the forward pass.

    Args:
        pos_embed: (1, num_prefix_tokens + old_h * old_w, C) embedding, row-major over the grid.
        old_grid: (old_h, old_w) grid the embedding was made for (an int means square).
        new_grid: (new_h, new_w) target grid.
        num_prefix_tokens: leading tokens that are not on the grid.
        mode: ``F.interpolate`` mode.
        antialias: antialias when downsampling (timm's default).

    Returns:
        (1, num_prefix_tokens + new_h * new_w, C) embedding; ``pos_embed`` itself if the grids match.
    """
    old_h, old_w = _pair(old_grid)
    new_h, new_w = _pair(new_grid)
    tracing = is_tracing()
    if not tracing and (pos_embed.ndim != 3 or pos_embed.shape[1] != num_prefix_tokens + old_h * old_w):
        raise ValueError(
            f"pos_embed of shape {tuple(pos_embed.shape)} does not hold {num_prefix_tokens} prefix tokens "
            f"plus a {old_h}x{old_w} grid"
        )
    if not tracing and (old_h, old_w) == (new_h, new_w):
        return pos_embed  # traced: always resample (an exact identity at the same size)
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    grid = grid.float().reshape(-1, old_h, old_w, dim).permute(0, 3, 1, 2)  # (1, C, old_h, old_w)
    grid = F.interpolate(grid, size=(new_h, new_w), mode=mode, align_corners=False, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(-1, new_h * new_w, dim).to(pos_embed.dtype)  # (1, N', C)
    return torch.cat([prefix, grid], dim=1) if num_prefix_tokens else grid


def _sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """(N,) positions -> (N, dim) embedding: ``[sin(p * w_k), cos(p * w_k)]``, ``w_k = 10000^(-2k/dim)``."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # (dim/2,)
    angles = positions.to(torch.float64)[:, None] * omega[None, :]  # (N, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d_pos_embed(dim: int, grid_h: int, grid_w: int, cls_token: bool = False) -> Tensor:
    """Fixed 2-D sin-cos position embedding as in MAE (He et al., 2022, ``get_2d_sincos_pos_embed``).

    The first half of the channels encodes the column index, the second half the row index (MAE's
    ``meshgrid(w, h)`` order), each as a 1-D sin-cos embedding of the integer coordinate.

    Args:
        dim: embedding dim C, a multiple of 4.
        grid_h: grid rows.
        grid_w: grid columns.
        cls_token: prepend an all-zero embedding for a class token.

    Returns:
        (1, [1 +] grid_h * grid_w, C) float32 embedding, row-major over the grid.
    """
    if dim % 4:
        raise ValueError(f"sin-cos 2-D position embedding needs dim divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")  # (h, w) each
    emb = torch.cat([_sincos_1d(dim // 2, cols.reshape(-1)), _sincos_1d(dim // 2, rows.reshape(-1))], dim=1)
    if cls_token:
        emb = torch.cat([emb.new_zeros(1, dim), emb], dim=0)
    return emb.float().unsqueeze(0)  # (1, N, C)

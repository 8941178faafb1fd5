"""Shifted-window self-attention with relative position bias (Swin Transformer).

Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", ICCV 2021.

Attention is computed explicitly (``softmax(q k^T * scale + bias [+ mask]) v``, timm's default
Swin path): on CPU, ``F.scaled_dot_product_attention`` with a float mask that needs a gradient
takes its math fallback, which adds a masked-row guard and scales q and k separately, and was
measurably slower for 36-49-token windows. The relative position bias and the shift mask (cached
per padded size) are combined once per block into a (windows, heads, N, N) term that broadcasts
over the batch and is added in place. Window partition plus head split is one ``permute`` copy,
its inverse another (timm makes two each way).

Inputs of any size are handled as in the official Swin detection/segmentation backbones: each
block pads its (normalised) input at the bottom/right to a multiple of the window, shifts the padded
map, and crops afterwards; the shift mask is built for the padded grid and cached per size.
Where a map is no larger than the window along a dimension, the window shrinks to the map there and
that dimension is not shifted (as the official classification models do at 7x7); the smaller
window reads its biases from the centre of the same relative-position table, so no resizing is
needed.

Under ONNX tracing (``base.is_tracing()``) the window, shift, padding and mask are computed from
the traced map size with tensor ops (``min``, ``where``, a gather instead of ``torch.roll``, the
mask rebuilt in the graph), so one exported graph handles every input size, including sizes where
a window shrinks or a shift switches off; the values are those of the eager path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..base import is_tracing
from .common import DropPath, Mlp

__all__ = [
    "window_partition",
    "window_reverse",
    "relative_position_index",
    "shifted_window_mask",
    "WindowAttention",
    "SwinTransformerBlock",
    "SwinBlockStack",
    "drop_path_rates",
]

#: additive mask value between tokens from different regions of a shifted window (as published)
MASK_VALUE = -100.0


def drop_path_rates(max_rate: float, num_blocks: int) -> list[float]:
    """Stochastic depth rates rising linearly from 0 to ``max_rate`` over ``num_blocks`` blocks."""
    if num_blocks == 1:
        return [0.0]
    return [max_rate * i / (num_blocks - 1) for i in range(num_blocks)]


def window_partition(x: Tensor, window: tuple[int, int]) -> Tensor:
    """Split a map into non-overlapping windows.

    Args:
        x: (B, H, W, C) map; H and W must be multiples of the window.
        window: (wh, ww) window size.

    Returns:
        (B * nW, wh, ww, C) windows, row-major over the window grid within each image.
    """
    b, h, w, c = x.shape
    wh, ww = window
    x = x.view(b, h // wh, wh, w // ww, ww, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, wh, ww, c)  # (B * nW, wh, ww, C)


def window_reverse(windows: Tensor, window: tuple[int, int], height: int, width: int) -> Tensor:
    """Inverse of :func:`window_partition`.

    Args:
        windows: (B * nW, wh, ww, C) windows.
        window: (wh, ww) window size.
        height: H of the map (a multiple of wh).
        width: W of the map (a multiple of ww).

    Returns:
        (B, H, W, C) map.
    """
    wh, ww = window
    c = windows.shape[-1]
    x = windows.view(-1, height // wh, width // ww, wh, ww, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, c)  # (B, H, W, C)


def relative_position_index(window: tuple[int, int], device: torch.device | None = None) -> Tensor:
    """Index into a ((2wh-1) * (2ww-1), heads) bias table for every query/key pair of a window.

    Returns:
        (N, N) long tensor, N = wh * ww; entry (i, j) = (dy + wh - 1) * (2ww - 1) + (dx + ww - 1)
        with (dy, dx) = position(i) - position(j).
    """
    wh, ww = window
    coords = torch.stack(
        torch.meshgrid(torch.arange(wh, device=device), torch.arange(ww, device=device), indexing="ij")
    ).flatten(1)  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N)
    return (rel[0] + wh - 1) * (2 * ww - 1) + (rel[1] + ww - 1)


def _roll(x: Tensor, shifts: tuple, dims: tuple[int, int]) -> Tensor:
    """``torch.roll`` whose shifts may be traced 0-d tensors (ONNX export): a gather per dim."""
    if not is_tracing():
        return torch.roll(x, shifts=shifts, dims=dims)
    for shift, dim in zip(shifts, dims):
        length = x.shape[dim]
        # roll by s: out[i] = x[(i - s) mod L]; the shift lies in (-L, L), so i - s + L >= 0
        index = (torch.arange(length, device=x.device) - shift + length) % length
        x = x.index_select(dim, index)
    return x


def _region_ids(length: int, window: int, shift: int, device: torch.device | None) -> Tensor:
    """Region of each position along one padded dim after a cyclic shift by ``shift``: 0, 1 or 2."""
    pos = torch.arange(length, device=device)
    return (pos >= length - window).long() + (pos >= length - shift).long()  # shift 0: never 2


def shifted_window_mask(
    height: int,
    width: int,
    window: tuple[int, int],
    shift: tuple[int, int],
    device: torch.device | None = None,
) -> Tensor:
    """Additive attention mask of shifted windows (SW-MSA) for a padded map.

    After the cyclic shift, the last window row/column holds tokens from non-adjacent image regions;
    tokens may only attend to tokens of their own region.

    Args:
        height: padded map height (a multiple of ``window[0]``).
        width: padded map width (a multiple of ``window[1]``).
        window: (wh, ww) window size.
        shift: (sh, sw) cyclic shift; 0 along a dimension that is not shifted.
        device: device of the result.

    Returns:
        (nW, N, N) float mask with 0 within a region and ``MASK_VALUE`` across regions.
    """
    ids_h = _region_ids(height, window[0], shift[0], device)  # (H,)
    ids_w = _region_ids(width, window[1], shift[1], device)  # (W,)
    regions = (ids_h[:, None] * 3 + ids_w[None, :]).to(torch.float32)  # (H, W)
    regions = window_partition(regions[None, :, :, None], window).flatten(1)  # (nW, N)
    diff = regions[:, :, None] - regions[:, None, :]  # (nW, N, N)
    return torch.zeros_like(diff).masked_fill_(diff != 0, MASK_VALUE)


class WindowAttention(nn.Module):
    """Window multi-head self-attention with a learned relative position bias (Liu et al., 2021).

    Parameter names follow timm / the official code (``qkv``, ``proj``,
    ``relative_position_bias_table``) so checkpoints load without renaming.

    Args:
        dim: token dim C.
        num_heads: attention heads; ``dim`` must be divisible by it.
        window_size: largest window (wh, ww) (or one int); the bias table covers its offsets.
        qkv_bias: bias on the qkv projection.
        attn_drop: dropout on attention weights (training only).
        proj_drop: dropout after the output projection.
    """

    relative_position_index: Tensor  # (N_max, N_max) buffer, registered in __init__

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int | tuple[int, int] = 7,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.window_size: tuple[int, int] = (
            (window_size, window_size)
            if isinstance(window_size, int)
            else cast("tuple[int, int]", tuple(window_size))
        )
        wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer(
            "relative_position_index", relative_position_index(self.window_size), persistent=False
        )
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def relative_position_bias(self, window: tuple[int, int]) -> Tensor:
        """Bias for a window no larger than ``window_size``: (heads, N, N), N = wh * ww."""
        index = self.relative_position_index  # (N_max, N_max)
        # a smaller window uses the centre of the same table (traced: always, the window is dynamic)
        if is_tracing() or tuple(window) != self.window_size:
            rows = torch.arange(window[0], device=index.device)
            cols = torch.arange(window[1], device=index.device)
            tokens = (rows[:, None] * self.window_size[1] + cols).flatten()  # sub-window ids in the full one
            index = index[tokens][:, tokens]  # (N, N)
        n = index.shape[0]
        bias = self.relative_position_bias_table[index.view(-1)].view(n, n, self.num_heads)
        return bias.permute(2, 0, 1).contiguous()  # (heads, N, N)

    def forward(
        self, x: Tensor, window: tuple[int, int] | None = None, shift_mask: Tensor | None = None
    ) -> Tensor:
        """Attend within windows.

        Args:
            x: (B, H, W, C) map, H and W multiples of ``window``.
            window: (wh, ww) window, at most ``window_size``; defaults to ``window_size``.
            shift_mask: optional (nW, N, N) additive mask of shifted windows (see
                :func:`shifted_window_mask`), windows in row-major order.

        Returns:
            (B, H, W, C) map.
        """
        wh, ww = window or self.window_size
        b, h, w, c = x.shape
        nh, nw, heads = h // wh, w // ww, self.num_heads
        n, d = wh * ww, c // heads
        qkv = self.qkv(x).view(b, nh, wh, nw, ww, 3, heads, d)
        qkv = qkv.permute(5, 0, 1, 3, 6, 2, 4, 7)  # (3, B, nh, nw, heads, wh, ww, d)
        # one copy partitions the windows and splits the heads; the scale rides on that copy
        q, k, v = qkv.reshape(3, b * nh * nw, heads, n, d).unbind(0)  # each (B * nW, heads, N, d)
        bias = self.relative_position_bias((wh, ww))  # (heads, N, N)
        # explicit attention, as timm's default Swin path: on CPU, SDPA with a float mask that needs a
        # gradient takes its math fallback, which adds a masked-row guard (isneginf / all / where) and
        # scales q and k separately; this is the same arithmetic without them
        attn = torch.matmul(q * self.scale, k.transpose(-2, -1))  # (B * nW, heads, N, N)
        # (nW, heads, N, N) with the shift mask, else (heads, N, N): broadcasts over batch and windows
        term = bias if shift_mask is None else shift_mask.unsqueeze(1) + bias
        if is_tracing():  # out of place: an in-place add on a view is not kept by the ONNX graph
            attn = (attn.view(b, -1, heads, n, n) + term).view(b * nh * nw, heads, n, n)
        else:  # in place: the matmul's backward does not need its output
            attn.view(b, -1, heads, n, n).add_(term)
        attn = attn.softmax(dim=-1)
        if self.training and self.attn_drop > 0:
            attn = F.dropout(attn, self.attn_drop)
        out = torch.matmul(attn, v)  # (B * nW, heads, N, d)
        out = out.view(b, nh, nw, heads, wh, ww, d).permute(0, 1, 4, 2, 5, 3, 6).reshape(b, h, w, c)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        """The window size and head count, for ``repr``."""
        return f"window_size={self.window_size}, num_heads={self.num_heads}"


class SwinTransformerBlock(nn.Module):
    """Pre-norm Swin block: (shifted) window attention and an MLP, each residual (Liu et al., 2021).

    Args:
        dim: token dim C.
        num_heads: attention heads.
        window_size: largest window (the bias table size).
        mlp_ratio: MLP hidden dim / C.
        qkv_bias: bias on the qkv projection.
        proj_drop: dropout after the attention projection and in the MLP.
        attn_drop: dropout on attention weights.
        drop_path: stochastic depth rate of both residual branches.
        act_layer: MLP activation.
        norm_layer: token norm.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int | tuple[int, int] = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] = nn.LayerNorm,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, qkv_bias, attn_drop, proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self,
        x: Tensor,
        window: tuple[int, int],
        shift: tuple[int, int] = (0, 0),
        shift_mask: Tensor | None = None,
    ) -> Tensor:
        """Window attention over ``x``, shifted by ``shift``.

        Args:
            x: (B, H, W, C) map.
            window: (wh, ww) window for this map size.
            shift: (sh, sw) cyclic shift; (0, 0) for W-MSA.
            shift_mask: (nW, N, N) mask for the padded, shifted grid when ``shift`` is non-zero.

        Returns:
            (B, H, W, C) map.
        """
        _, h, w, _ = x.shape
        y = self.norm1(x)
        tracing = is_tracing()  # sizes are traced tensors: pad, shift and crop unconditionally
        pad_h, pad_w = (window[0] - h % window[0]) % window[0], (window[1] - w % window[1]) % window[1]
        if tracing or pad_h or pad_w:
            y = F.pad(y, (0, 0, 0, pad_w, 0, pad_h))  # (B, Hp, Wp, C)
        if shift_mask is not None if tracing else (shift[0] or shift[1]):
            y = _roll(y, (-shift[0], -shift[1]), (1, 2))
            y = self.attn(y, window, shift_mask)
            y = _roll(y, (shift[0], shift[1]), (1, 2))
        else:
            y = self.attn(y, window)
        if tracing or pad_h or pad_w:
            y = y[:, :h, :w]
        x = x + self.drop_path1(y)
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class SwinBlockStack(nn.ModuleList):
    """``depth`` Swin blocks at one resolution, alternating W-MSA and SW-MSA (shift = window // 2).

    A ``ModuleList`` so block parameters are named ``<stack>.{j}.*`` as in timm's ``blocks``. The
    window geometry is worked out once per forward and the shift mask is cached per padded size
    and device.

    Args:
        dim: token dim C.
        depth: number of blocks.
        num_heads: attention heads.
        window_size: window side.
        mlp_ratio: MLP hidden dim / C.
        qkv_bias: bias on the qkv projections.
        proj_drop: dropout after projections and in the MLPs.
        attn_drop: dropout on attention weights.
        drop_path: stochastic depth rate, one for all blocks or one per block.
        act_layer: MLP activation.
        norm_layer: token norm.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float | Sequence[float] = 0.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] = nn.LayerNorm,
    ):
        rates = [drop_path] * depth if isinstance(drop_path, (int, float)) else list(drop_path)
        if len(rates) != depth:
            raise ValueError(f"got {len(rates)} drop_path rates for {depth} blocks")
        super().__init__(
            SwinTransformerBlock(
                dim,
                num_heads,
                window_size,
                mlp_ratio,
                qkv_bias,
                proj_drop,
                attn_drop,
                rate,
                act_layer,
                norm_layer,
            )
            for rate in rates
        )
        self.window_size = window_size
        self.grad_checkpointing = False
        self._mask_cache: dict[tuple, Tensor] = {}

    def geometry(
        self, height: int, width: int, device: torch.device
    ) -> tuple[tuple[int, int], tuple[int, int], Tensor | None]:
        """Window, shift of the SW-MSA blocks and their (nW, N, N) mask for an H x W map.

        Under tracing ``height`` and ``width`` are 0-d tensors; window and shift are then computed
        as tensors and the mask is always built (all zeros where nothing is shifted), never cached.
        """
        ws = self.window_size
        if is_tracing():  # 0-d tensors stand in for the ints of the annotations (see above)
            sizes = (torch.as_tensor(height), torch.as_tensor(width))
            traced_window = tuple(s.clamp(max=ws) for s in sizes)
            traced_shift = tuple((s > ws).long() * (ws // 2) for s in sizes)
            traced_hp, traced_wp = ((s + win - 1) // win * win for s, win in zip(sizes, traced_window))
            traced_mask = shifted_window_mask(traced_hp, traced_wp, traced_window, traced_shift, device)  # type: ignore[arg-type]  # traced: tensors as ints
            return traced_window, traced_shift, traced_mask  # type: ignore[return-value]  # traced: tensors as ints
        window = (min(ws, height), min(ws, width))
        shift = (ws // 2 if height > ws else 0, ws // 2 if width > ws else 0)
        if shift == (0, 0):
            return window, shift, None
        hp, wp = -(-height // window[0]) * window[0], -(-width // window[1]) * window[1]
        key = (hp, wp, window, shift, device)
        mask = self._mask_cache.get(key)
        if mask is None:
            mask = shifted_window_mask(hp, wp, window, shift, device)
            self._mask_cache[key] = mask
        return window, shift, mask

    def forward(self, x: Tensor) -> Tensor:
        """Args: x (B, H, W, C). Returns (B, H, W, C)."""
        window, shift, mask = self.geometry(x.shape[1], x.shape[2], x.device)
        for j, block in enumerate(self):
            args = (window, shift, mask) if j % 2 else (window, (0, 0), None)
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, *args, use_reentrant=False)
            else:
                x = block(x, *args)
        return x

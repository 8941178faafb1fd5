"""Encoding only the visible tokens of a masked image (masked image modelling without mask tokens).

He et al., "Masked Autoencoders Are Scalable Vision Learners" (MAE), CVPR 2022: the encoder sees
the visible patches only; mask tokens enter in the decoder. Huang et al., "Green Hierarchical Vision
Transformer for Masked Image Modeling" (GreenMIM), NeurIPS 2022, and Liu et al., "MixMAE", CVPR
2023, carry this over to hierarchical Swin Transformers.

The visible tokens of a ``(B, H, W)`` grid live in one compact ``(M, C)`` tensor (all images
together, image-major then row-major; :class:`VisibleTokens` keeps their positions). Token-wise
layers (linears, MLPs, LayerNorms) run on it directly, so they cost ``M / (B H W)`` of the full map.
Only attention needs neighbourhoods:

* Swin window attention (:func:`visible_swin_stack`): every visible token is placed at its true
  slot of its (shifted) window in a ``(G, N, C)`` stack holding only the ``G`` windows with a
  visible token; empty slots are zero and excluded as keys by the additive mask, on top of the
  usual shift-region mask, so the relative position bias of the window is exactly the full
  model's. The stacks and their masks are built once per stage and shared by its blocks.
* Global attention (:func:`visible_token_blocks`): the visible tokens of each image form one
  sequence (a ``(B, M / B, C)`` batch when every image has as many, as block masks give).

Patch merging stays a token-wise operation when every 2x2 merge is all visible or all masked,
which holds at every stage when the mask cells span whole tokens of the deepest stage (SimMIM's
32 px blocks for strides up to 32): :meth:`VisibleTokens.merged` gives the children of each
visible token of the coarser grid. Masked tokens therefore never enter any computation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..base import mask_to
from .common import DropPath
from .window_attention import MASK_VALUE, SwinBlockStack, SwinTransformerBlock, WindowAttention

__all__ = [
    "VisibleTokens",
    "WindowGroups",
    "window_groups",
    "visible_window_attention",
    "visible_swin_block",
    "visible_swin_stack",
    "visible_token_blocks",
]


@dataclass(frozen=True)
class VisibleTokens:
    """Positions of the visible tokens of a ``(B, H, W)`` token grid.

    Attributes:
        shape: ``(B, H, W)`` of the full grid.
        index: (M,) flat positions ``b * H * W + y * W + x`` of the visible tokens, ascending: the
            row of each token in the compact ``(M, C)`` layout.
    """

    shape: tuple[int, int, int]
    index: Tensor

    @classmethod
    def from_mask(cls, mask: Tensor, size: tuple[int, int]) -> VisibleTokens:
        """The visible tokens of a grid of ``size`` (H, W) under ``mask`` (B, 1, h, w), 1 = masked."""
        visible = mask_to(mask, size)[:, 0] == 0  # (B, H, W)
        b, h, w = visible.shape
        return cls((b, h, w), visible.flatten().nonzero().squeeze(1))

    @property
    def batch(self) -> Tensor:
        """(M,) image of each visible token."""
        return self.index // (self.shape[1] * self.shape[2])

    @property
    def rows(self) -> Tensor:
        """(M,) row of each visible token."""
        return self.index % (self.shape[1] * self.shape[2]) // self.shape[2]

    @property
    def cols(self) -> Tensor:
        """(M,) column of each visible token."""
        return self.index % self.shape[2]

    def counts(self) -> list[int]:
        """Visible tokens of each image."""
        return torch.bincount(self.batch, minlength=self.shape[0]).tolist()

    def gather(self, x: Tensor) -> Tensor:
        """Args: x (B, H, W, C) map. Returns (M, C) its visible tokens."""
        return x.reshape(-1, x.shape[-1]).index_select(0, self.index)

    def scatter(self, tokens: Tensor) -> Tensor:
        """Args: tokens (M, C). Returns (B, H, W, C), the tokens at their positions, zeros elsewhere."""
        b, h, w = self.shape
        full = tokens.new_zeros(b * h * w, tokens.shape[-1]).index_copy(0, self.index, tokens)
        return full.view(b, h, w, -1)

    def merged(self) -> tuple[VisibleTokens, Tensor]:
        """The visible tokens of the 2x2-merged grid and, for each, its four children.

        A merged token is visible when its 2x2 children are (the mask cells must not split a merge).

        Returns:
            ``(parent, children)``: the ``(B, H/2, W/2)`` visible tokens and a (M' * 4,) index into
            this compact layout, children of each parent in patch-merging order (row, col) = (0, 0),
            (1, 0), (0, 1), (1, 1).
        """
        b, h, w = self.shape
        if h % 2 or w % 2:
            raise ValueError(f"patch merging needs an even grid, got {h}x{w}")
        visible = torch.zeros(b * h * w, dtype=torch.bool, device=self.index.device)
        visible[self.index] = True
        quads = visible.view(b, h // 2, 2, w // 2, 2)
        parent = VisibleTokens((b, h // 2, w // 2), quads.all(4).all(2).flatten().nonzero().squeeze(1))
        compact = torch.full((b * h * w,), -1, dtype=torch.long, device=self.index.device)
        compact[self.index] = torch.arange(self.index.numel(), device=self.index.device)
        top_left = parent.batch * (h * w) + 2 * parent.rows * w + 2 * parent.cols  # (M',)
        offsets = torch.tensor([0, w, 1, w + 1], device=self.index.device)  # (0,0), (1,0), (0,1), (1,1)
        return parent, compact[(top_left[:, None] + offsets).flatten()]


@dataclass(frozen=True)
class WindowGroups:
    """Visible tokens placed at their slots of the attention windows they belong to.

    Attributes:
        window: (wh, ww) window size; ``N = wh * ww`` slots per window.
        count: ``G``, the windows holding at least one visible token.
        slots: (M,) row of each visible token in the ``(G * N)`` stack, ``window * N + slot``.
        mask: (G, 1 or N, N) additive mask: ``MASK_VALUE`` at empty slots (as keys) and between
            shift regions of a shifted window, 0 elsewhere.
    """

    window: tuple[int, int]
    count: int
    slots: Tensor
    mask: Tensor


def window_groups(
    tokens: VisibleTokens,
    window: tuple[int, int],
    shift: tuple[int, int] = (0, 0),
    shift_mask: Tensor | None = None,
) -> WindowGroups:
    """Group the visible tokens by (shifted) window, as :class:`SwinTransformerBlock` partitions a map.

    The map is padded at the bottom/right to window multiples and rolled by ``-shift``, as in the
    full block; padded positions are not tokens, so they are never attended to.

    Args:
        tokens: the visible tokens of a ``(B, H, W)`` grid.
        window: (wh, ww) window for this grid (see ``SwinBlockStack.geometry``).
        shift: (sh, sw) cyclic shift, (0, 0) for W-MSA.
        shift_mask: (nW, N, N) region mask of the padded, shifted grid when ``shift`` is non-zero.
    """
    _, h, w = tokens.shape
    wh, ww = window
    hp, wp = -(-h // wh) * wh, -(-w // ww) * ww
    rows = (tokens.rows - shift[0]) % hp  # position after the roll by -shift
    cols = (tokens.cols - shift[1]) % wp
    per_row, per_image = wp // ww, (hp // wh) * (wp // ww)
    window_id = tokens.batch * per_image + rows // wh * per_row + cols // ww  # (M,)
    ids, group = torch.unique(window_id, return_inverse=True)  # ids (G,) ascending
    n = wh * ww
    slots = group * n + rows % wh * ww + cols % ww  # (M,)
    filled = torch.zeros(ids.numel() * n, dtype=torch.bool, device=slots.device).index_fill_(0, slots, True)
    mask = torch.zeros(ids.numel(), 1, n, device=slots.device)
    mask.masked_fill_(~filled.view(-1, 1, n), MASK_VALUE)  # empty slots are no keys
    if shift_mask is not None:
        mask = mask + shift_mask.index_select(0, ids % per_image)  # (G, N, N)
    return WindowGroups(window, ids.numel(), slots, mask)


def visible_window_attention(attn: WindowAttention, x: Tensor, groups: WindowGroups) -> Tensor:
    """``attn`` over the visible tokens of each window only.

    Args:
        attn: the block's window attention (its weights and bias table).
        x: (M, C) normalised visible tokens.
        groups: where the tokens sit in their windows (:func:`window_groups`).

    Returns:
        (M, C) attention outputs after the projection.
    """
    c = x.shape[-1]
    heads, g = attn.num_heads, groups.count
    n, d = groups.window[0] * groups.window[1], c // heads
    qkv = attn.qkv(x)  # (M, 3C)
    stacked = qkv.new_zeros(g * n, 3 * c).index_copy(0, groups.slots, qkv)  # (G * N, 3C)
    q, k, v = stacked.view(g, n, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)  # each (G, heads, N, d)
    logits = torch.matmul(q * attn.scale, k.transpose(-2, -1))  # (G, heads, N, N)
    logits.add_(groups.mask.unsqueeze(1) + attn.relative_position_bias(groups.window))
    weights = logits.softmax(dim=-1)
    if attn.training and attn.attn_drop > 0:
        weights = F.dropout(weights, attn.attn_drop)
    out = torch.matmul(weights, v).transpose(1, 2).reshape(g * n, c)  # (G * N, C)
    return attn.proj_drop(attn.proj(out.index_select(0, groups.slots)))


def _drop_path(y: Tensor, module: nn.Module, batch: Tensor, batch_size: int) -> Tensor:
    """Stochastic depth per image for compact tokens ``y`` (M, C) of images ``batch`` (M,)."""
    if not isinstance(module, DropPath) or not module.training or module.drop_prob == 0.0:
        return y
    keep = 1.0 - module.drop_prob
    return y * y.new_empty(batch_size).bernoulli_(keep).div_(keep)[batch, None]


def visible_swin_block(
    block: SwinTransformerBlock, x: Tensor, groups: WindowGroups, batch: Tensor, batch_size: int
) -> Tensor:
    """``block`` on visible tokens: (shifted) window attention among them, then the MLP.

    Args:
        block: a Swin block.
        x: (M, C) visible tokens.
        groups: the tokens' windows for this block's shift.
        batch: (M,) image of each token (per-image stochastic depth).
        batch_size: images ``B``.

    Returns:
        (M, C) tokens.
    """
    y = visible_window_attention(block.attn, block.norm1(x), groups)
    x = x + _drop_path(y, block.drop_path1, batch, batch_size)
    return x + _drop_path(block.mlp(block.norm2(x)), block.drop_path2, batch, batch_size)


def visible_swin_stack(stack: SwinBlockStack, x: Tensor, tokens: VisibleTokens) -> Tensor:
    """The blocks of ``stack`` (W-MSA, SW-MSA alternating) on the visible tokens of one grid.

    Args:
        stack: the stage's blocks (window, shift and region mask from its ``geometry``).
        x: (M, C) visible tokens.
        tokens: their positions.

    Returns:
        (M, C) tokens.
    """
    b, h, w = tokens.shape
    window, shift, shift_mask = stack.geometry(h, w, x.device)
    plain = window_groups(tokens, window)
    shifted = window_groups(tokens, window, shift, shift_mask) if shift_mask is not None else plain
    batch = tokens.batch
    for j, module in enumerate(stack):
        block, groups = cast(SwinTransformerBlock, module), shifted if j % 2 else plain
        if stack.grad_checkpointing and stack.training and torch.is_grad_enabled():
            x = checkpoint(visible_swin_block, block, x, groups, batch, b, use_reentrant=False)
        else:
            x = visible_swin_block(block, x, groups, batch, b)
    return x


def visible_token_blocks(blocks: Callable[[Tensor], Tensor], x: Tensor, tokens: VisibleTokens) -> Tensor:
    """Global-attention blocks over each image's visible tokens.

    Args:
        blocks: maps (B', N', C) token sequences to (B', N', C), e.g. an ``nn.Sequential`` of
            ``AttentionBlock`` s.
        x: (M, C) visible tokens, image-major.
        tokens: their positions.

    Returns:
        (M, C) tokens.
    """
    counts = tokens.counts()
    if len(set(counts)) == 1:  # block masks: one (B, M / B, C) batch
        return blocks(x.view(len(counts), counts[0], -1)).reshape(x.shape)
    parts = [blocks(part[None])[0] if part.shape[0] else part for part in x.split(counts)]
    return torch.cat(parts)

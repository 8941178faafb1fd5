"""Tiny encoders following the ``hybridvision.models.base.Encoder`` contract, for pretrain tests.

``ToyCNN`` has a convolutional stem and convolutional stages (zeroed under the mask after every
stage, so its deepest features are empty at masked positions); ``ToyViT`` has a token stem and
global-attention stages (not re-masked). Both use batch-independent norms unless asked, so DDP
runs match single-process runs exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hybridvision.models.base import Encoder, apply_token_mask
from hybridvision.models.layers import Attention, Mlp


class ToyCNN(Encoder):
    """Conv stem (stride 4) + three stride-2 conv stages; reductions (4, 8, 16, 32)."""

    def __init__(self, in_chans: int = 3, dims: tuple[int, ...] = (8, 12, 16, 24), batch_norm: bool = False):
        super().__init__()
        self.out_channels = tuple(dims)
        self.reductions = (4, 8, 16, 32)
        self.size_divisor = 32
        self.mask_token_dim = dims[0]

        def norm(c: int) -> nn.Module:
            return nn.BatchNorm2d(c) if batch_norm else nn.GroupNorm(2, c)

        self.stem = nn.Conv2d(in_chans, dims[0], 4, stride=4)
        self.stages = nn.ModuleList()
        for i, d in enumerate(dims):
            down = nn.Identity() if i == 0 else nn.Conv2d(dims[i - 1], d, 2, stride=2)
            self.stages.append(nn.Sequential(down, nn.Conv2d(d, d, 3, padding=1), norm(d), nn.GELU()))

    def _forward_features(self, x: Tensor, mask: Tensor | None, mask_token: Tensor | None) -> list[Tensor]:
        x = self.stem(x)  # (B, C0, H/4, W/4)
        if mask is not None:
            x = apply_token_mask(x, mask, mask_token)
        feats = []
        for stage in self.stages:
            x = stage(x)
            if mask is not None:
                x = apply_token_mask(x, mask, None)
            feats.append(x)
        return feats


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 2 * dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ToyViT(Encoder):
    """Patch-embedding stem (stride 4) + global-attention stages with 2x2 patch merging."""

    def __init__(self, in_chans: int = 3, dims: tuple[int, ...] = (16, 16, 32, 32)):
        super().__init__()
        self.out_channels = tuple(dims)
        self.reductions = (4, 8, 16, 32)
        self.size_divisor = 32
        self.mask_token_dim = dims[0]
        self.patch_embed = nn.Conv2d(in_chans, dims[0], 4, stride=4)
        self.pos_embed = nn.Parameter(torch.randn(1, dims[0], 1, 1) * 0.02)
        self.merges = nn.ModuleList(
            [nn.Identity()] + [nn.Conv2d(dims[i - 1], dims[i], 2, stride=2) for i in range(1, len(dims))]
        )
        self.blocks = nn.ModuleList([_Block(d, 2) for d in dims])

    def _forward_features(self, x: Tensor, mask: Tensor | None, mask_token: Tensor | None) -> list[Tensor]:
        x = self.patch_embed(x)  # (B, C0, H/4, W/4)
        if mask is not None:
            x = apply_token_mask(x, mask, mask_token)
        x = x + self.pos_embed
        feats = []
        for merge, block in zip(self.merges, self.blocks):
            x = merge(x)  # (B, C, h, w)
            b, c, h, w = x.shape
            tokens = block(x.flatten(2).transpose(1, 2))  # (B, h*w, C)
            x = tokens.transpose(1, 2).reshape(b, c, h, w)
            feats.append(x)
        return feats

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}


TOY_ENCODERS = {"toy_cnn": ToyCNN, "toy_vit": ToyViT}


def make_toy(name: str, in_chans: int = 3, seed: int = 0, **kwargs) -> Encoder:
    """Build a toy encoder with deterministic weights."""
    torch.manual_seed(seed)
    return TOY_ENCODERS[name](in_chans=in_chans, **kwargs)

"""The All-MLP decoder of SegFormer (Xie et al., 2021, arXiv:2105.15203) and the SegFormer presets.

``segformer_mlp`` is also the default decoder of ``create_segmenter(<any encoder name>)``: it
takes any number of feature maps with any channels, as long as the first one has the highest
resolution (the maps are upsampled to it).
"""

from __future__ import annotations

from typing import cast

import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import SegmenterSpec, register_decoder, register_segmenter

__all__ = ["SegFormerHead", "segformer_mlp"]


class SegFormerHead(nn.Module):
    """All-MLP decoder (SegFormer, Xie et al., 2021).

    Per scale ``i``: ``Linear(C_i -> E)`` on every pixel, bilinear upsampling to the first map's
    size; the maps are concatenated in reverse order (coarsest first, as the official head),
    fused by a 1x1 conv (no bias) + BatchNorm + ReLU, dropped out and classified by a 1x1 conv.
    Parameter names and shapes follow transformers' on-disk layout (``linear_c.i.proj``,
    ``linear_fuse``, ``batch_norm``, ``classifier``); the official head is the same up to names.

    Computation (same function, same parameters, fewer FLOPs): the projection, the bilinear
    upsampling and the fuse conv are all linear, and bilinear weights sum to one, so
    ``fuse(cat_i(up(P_i f_i + p_i))) = sum_i up(F_i P_i f_i) + sum_i F_i p_i`` where ``F_i`` is
    the fuse conv's block for scale ``i``. The head evaluates the right-hand side: each scale is
    mapped straight to ``E`` channels at its own resolution with the composed ``(E, C_i)`` matrix
    and the ``len(in_channels) * E``-channel concatenation at stride 4 is never formed
    (SegFormer-B0 at 224 x 224: 0.66 instead of 1.44 GMACs in all; B2: 4.5 instead of 11.3).
    Gradients are those of the published form up to rounding (checked in tests/models/test_mit.py).

    Args:
        in_channels: channels of each input map, finest first.
        num_classes: output classes K.
        embed_dim: decoder width E (256 for B0/B1, 768 for B2-B5).
        dropout: dropout probability before the classifier (``nn.Dropout2d`` as mmseg).
    """

    def __init__(
        self, in_channels: tuple[int, ...], num_classes: int, embed_dim: int = 256, dropout: float = 0.1
    ):
        super().__init__()
        if not in_channels:
            raise ValueError("SegFormerHead needs at least one feature map")
        self.embed_dim = embed_dim
        self.linear_c = nn.ModuleList(_LinearProj(c, embed_dim) for c in in_channels)
        self.linear_fuse = nn.Conv2d(embed_dim * len(in_channels), embed_dim, 1, bias=False)
        self.batch_norm = nn.BatchNorm2d(embed_dim)
        self.activation = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(embed_dim, num_classes, 1)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, feats: list[Tensor]) -> Tensor:
        """Args: feats, list of (B, C_i, H_i, W_i), finest first. Returns logits (B, K, H_0, W_0)."""
        if len(feats) != len(self.linear_c):
            raise ValueError(f"SegFormerHead built for {len(self.linear_c)} feature maps, got {len(feats)}")
        size = feats[0].shape[-2:]
        n, e = len(feats), self.embed_dim
        fuse = self.linear_fuse.weight.view(e, n, e)  # (E, n, E): block j multiplies concat slot j
        blocks = [fuse[:, n - 1 - i] for i in range(n)]  # scale i sits in slot n-1-i (reversed concat)
        projs = [cast(nn.Linear, lin.proj) for lin in self.linear_c]
        bias = cast(Tensor, sum(block @ proj.bias for block, proj in zip(blocks, projs)))  # (E,)
        x = None
        for feat, proj, block in zip(feats, projs, blocks):
            # (E, C_i) composed matrix as a 1x1 conv; all biases enter once, at the finest scale
            weight = (block @ proj.weight)[:, :, None, None]  # (E, C_i, 1, 1)
            y = F.conv2d(feat, weight, bias if x is None else None)  # (B, E, H_i, W_i)
            if y.shape[-2:] != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            # in place: conv and upsampling save no outputs, and y is never a view (a view would
            # send the backward through CopySlices and layout copies)
            x = y if x is None else x.add_(y)
        x = self.dropout(self.activation(self.batch_norm(x)))
        # logits leave in the default layout: upsampling + cross-entropy over a channels-last
        # (B, K, H, W) map measured slower on CPU than over a contiguous one
        return self.classifier(x).contiguous()


class _LinearProj(nn.Module):
    """Holds one scale's ``proj`` Linear (the official ``MLP`` module, kept for its weight names)."""

    def __init__(self, in_dim: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, embed_dim)


@register_decoder("segformer_mlp")
def segformer_mlp(
    in_channels: tuple[int, ...],
    reductions: tuple[int, ...],
    num_classes: int,
    embed_dim: int = 256,
    dropout: float = 0.1,
) -> SegFormerHead:
    """All-MLP decoder for any encoder; features must be ordered finest first."""
    if list(reductions) != sorted(reductions):
        raise ValueError(f"segformer_mlp expects features finest first, got reductions {reductions}")
    return SegFormerHead(tuple(in_channels), num_classes, embed_dim=embed_dim, dropout=dropout)


#: SegFormer presets: encoder and decoder width as the official configs
_SEGFORMER = {"nano": 64, "b0": 256, "b1": 256, "b2": 768, "b3": 768, "b4": 768, "b5": 768}
for _size, _width in _SEGFORMER.items():
    register_segmenter(
        f"segformer_{_size}",
        SegmenterSpec(encoder=f"mit_{_size}", decoder="segformer_mlp", decoder_kwargs={"embed_dim": _width}),
    )

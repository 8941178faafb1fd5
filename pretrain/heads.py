"""Heads used only during self-supervised pretraining.

* :func:`build_projection_head` — SimCLR's MLP projection head (lightly ``SimCLRProjectionHead``).
* :class:`PixelShuffleDecoder` — SimMIM's one-layer prediction head on the deepest stage.
* :class:`MultiScaleDecoder` — a SparK-style light U-Net over every stage, with per-scale
  learnable mask embeddings, for encoders whose masked positions are empty after a
  convolutional stage.
* :class:`SegmentationDecoderHead` — the fine-tuning model's own segmentation decoder (U-Net,
  All-MLP, ...) with ``in_chans`` outputs, so pretraining trains the whole segmenter and
  fine-tuning starts with a trained decoder, not a random one (``objective.mim_decoder=segmenter``).

Every MIM decoder takes the encoder's feature list and the patch mask and returns a
reconstruction ``(B, out_chans, H, W)`` at the (padded) input resolution
``reductions[0] * feats[0].shape[-2:]``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightly.models.modules import SimCLRProjectionHead
from torch import Tensor, nn

from hybridvision.models.base import mask_to
from hybridvision.models.layers import ConvNormAct, LayerNorm2d

__all__ = [
    "MIM_DECODERS",
    "MultiScaleDecoder",
    "PixelShuffleDecoder",
    "SegmentationDecoderHead",
    "build_mim_decoder",
    "build_projection_head",
    "classifier_prefix",
    "resolve_mim_decoder",
]


def build_projection_head(
    input_dim: int,
    hidden_dim: int | None = None,
    output_dim: int = 128,
    num_layers: int = 2,
    batch_norm: bool = True,
) -> SimCLRProjectionHead:
    """SimCLR projection head ``g(h) = W_2 relu(BN(W_1 h))`` (Chen et al., 2020).

    Args:
        input_dim: channels of the pooled encoder feature (``encoder.out_channels[-1]``).
        hidden_dim: hidden width; ``None`` = ``input_dim`` (SimCLR: 2048 for a ResNet-50).
        output_dim: projection size (SimCLR: 128).
        num_layers: linear layers (2 for SimCLR v1, 3 for v2).
        batch_norm: BatchNorm1d after each linear layer. Convert it with
            ``nn.SyncBatchNorm.convert_sync_batchnorm`` under DDP (the engine's ``sync_batchnorm``).

    Returns:
        A module mapping (B, input_dim) to (B, output_dim).
    """
    if num_layers < 2:
        raise ValueError(f"num_layers must be >= 2, got {num_layers}")
    return SimCLRProjectionHead(
        input_dim=input_dim,
        hidden_dim=hidden_dim or input_dim,
        output_dim=output_dim,
        num_layers=num_layers,
        batch_norm=batch_norm,
    )


class PixelShuffleDecoder(nn.Module):
    """SimMIM prediction head: a 1x1 conv to ``r * r * out_chans`` channels + ``PixelShuffle(r)``.

    Xie et al., 2022, "SimMIM: a Simple Framework for Masked Image Modeling". It reads only the
    deepest feature map, so it needs an encoder whose last stage carries information at masked
    positions (a Transformer); a CNN whose last stage is zeroed under the mask can only predict
    a constant there — use :class:`MultiScaleDecoder` for those.

    Args:
        in_channels: channels of every encoder stage; the last is used.
        reductions: stride of every stage; the last is ``r``.
        out_chans: channels to reconstruct (the image's ``in_chans``).
    """

    def __init__(self, in_channels: tuple[int, ...], reductions: tuple[int, ...], out_chans: int):
        super().__init__()
        self.reduction = int(reductions[-1])
        self.proj = nn.Conv2d(in_channels[-1], self.reduction**2 * out_chans, kernel_size=1)
        self.shuffle = nn.PixelShuffle(self.reduction)

    def forward(self, feats: list[Tensor], mask: Tensor | None = None) -> Tensor:
        """Predict pixels from the deepest feature map.

        Args:
            feats: encoder features; ``feats[-1]`` is (B, C, H / r, W / r).
            mask: unused (kept for a common decoder signature).

        Returns:
            (B, out_chans, H, W) reconstruction.
        """
        return self.shuffle(self.proj(feats[-1]))  # (B, r*r*out, H/r, W/r) -> (B, out, H, W)


class MultiScaleDecoder(nn.Module):
    """SparK-style light U-Net decoder over all encoder stages.

    Tian et al., 2023, "Designing BERT for Convolutional Networks: Sparse and Hierarchical Masked
    Modeling" (SparK). A masked CNN stage outputs zeros at masked positions; SparK *densifies*
    each scale by filling those positions with a learnable per-scale mask embedding before the
    top-down fusion. Here the embedding is **added** at masked positions
    (``f + m * e``): on a zeroed (convolutional) map this is exactly SparK's fill, and on a
    Transformer stage it keeps the contextual prediction the encoder made for the masked token
    instead of discarding it. So one decoder serves CNN, Transformer and hybrid encoders.

    Top-down path: ``x = block_L(lat_L(f_L))``, then for each shallower stage
    ``x = block_i(up_i(x) + lat_i(f_i))`` with a stride-``s`` transposed conv as ``up_i``;
    finally a 1x1 conv + ``PixelShuffle(reductions[0])`` to pixels. As in SparK the width halves
    at every finer scale (``dim`` at the deepest, never below ``min(32, dim)``), so the
    high-resolution levels stay cheap.

    Args:
        in_channels: channels of every encoder stage.
        reductions: stride of every stage, non-decreasing, each an integer multiple of the previous.
        out_chans: channels to reconstruct.
        dim: width of the decoder at the deepest scale.
        norm_layer: normalisation type, built as ``norm_layer(dim)``. The default ``LayerNorm2d``
            is batch-independent, so per-process and single-process runs match exactly under DDP.
        act_layer: activation type.
    """

    def __init__(
        self,
        in_channels: tuple[int, ...],
        reductions: tuple[int, ...],
        out_chans: int,
        dim: int = 256,
        norm_layer: type[nn.Module] = LayerNorm2d,
        act_layer: type[nn.Module] = nn.GELU,
    ):
        super().__init__()
        if len(in_channels) != len(reductions) or not in_channels:
            raise ValueError(
                f"in_channels {in_channels} and reductions {reductions} must have the same length"
            )
        ratios = [reductions[i + 1] / reductions[i] for i in range(len(reductions) - 1)]
        if any(r < 1 or r != int(r) for r in ratios):
            raise ValueError(
                f"reductions {reductions} must be non-decreasing integer multiples of each other"
            )
        self.reductions = tuple(int(r) for r in reductions)
        depth = len(in_channels)
        self.widths = tuple(max(dim >> (depth - 1 - i), min(32, dim)) for i in range(depth))
        self.mask_embeddings = nn.ParameterList([nn.Parameter(torch.zeros(c)) for c in in_channels])
        self.lateral = nn.ModuleList(
            [nn.Conv2d(c, w, kernel_size=1) for c, w in zip(in_channels, self.widths)]
        )
        self.up = nn.ModuleList(
            [
                nn.ConvTranspose2d(self.widths[i + 1], self.widths[i], int(r), stride=int(r))
                for i, r in enumerate(ratios)
            ]
        )
        self.blocks = nn.ModuleList(
            [
                nn.Sequential(
                    ConvNormAct(w, w, 3, norm_layer=norm_layer, act_layer=act_layer),
                    ConvNormAct(w, w, 3, norm_layer=norm_layer, act_layer=act_layer),
                )
                for w in self.widths
            ]
        )
        r0 = self.reductions[0]
        self.head = nn.Sequential(
            nn.Conv2d(self.widths[0], r0 * r0 * out_chans, kernel_size=1), nn.PixelShuffle(r0)
        )
        for emb in self.mask_embeddings:
            nn.init.trunc_normal_(emb, std=0.02)

    def forward(self, feats: list[Tensor], mask: Tensor | None = None) -> Tensor:
        """Densify every scale, fuse top-down, predict pixels.

        Args:
            feats: encoder features, ``feats[i]`` (B, in_channels[i], H / reductions[i], W / reductions[i]).
            mask: (B, 1, h, w) patch mask, 1 = masked, or None (no densification).

        Returns:
            (B, out_chans, H, W) reconstruction.
        """
        dense = []
        for feat, emb in zip(feats, self.mask_embeddings):
            if mask is not None:
                m = mask_to(mask, feat.shape[-2:]).to(feat.dtype)  # (B, 1, h_i, w_i)
                feat = feat + m * emb.to(feat.dtype).view(1, -1, 1, 1)
            dense.append(feat)
        x = self.blocks[-1](self.lateral[-1](dense[-1]))  # (B, dim, H/r_L, W/r_L)
        for i in range(len(dense) - 2, -1, -1):
            x = self.up[i](x)  # (B, dim, H/r_i, W/r_i)
            x = self.blocks[i](x + self.lateral[i](dense[i]))
        return self.head(x)  # (B, out_chans, H, W)

    def no_weight_decay(self) -> set[str]:
        return {f"mask_embeddings.{i}" for i in range(len(self.mask_embeddings))}


class SegmentationDecoderHead(nn.Module):
    """A segmentation decoder used as the MIM decoder: its ``num_classes`` outputs are the
    reconstructed image channels.

    Models Genesis (Zhou et al., 2019) and SparK pretrain an encoder-decoder by restoring the
    image; here the decoder is exactly the one the segmenter is fine-tuned with, so every decoder
    weight except its last (classifier) layer carries over to fine-tuning. The output is resized
    bilinearly to the padded input size when the decoder stops above stride 1 (the All-MLP head
    predicts at stride 4), as ``Segmenter.forward`` does for logits.

    Args:
        decoder: a decoder built by ``create_segmenter`` (``num_classes`` = image channels).
        reduction: the encoder's shallowest stride (``encoder.reductions[0]``).
    """

    def __init__(self, decoder: nn.Module, reduction: int):
        super().__init__()
        self.decoder = decoder
        self.reduction = int(reduction)

    @property
    def uses_image(self) -> bool:
        """Whether the wrapped decoder reads the input image (U-Net image skips)."""
        return bool(getattr(self.decoder, "uses_image", False))

    def forward(self, feats: list[Tensor], mask: Tensor | None = None, image: Tensor | None = None) -> Tensor:
        """Decode the masked features to pixels.

        Args:
            feats: encoder features of the masked image.
            mask: unused (the decoder is the fine-tuning one and never sees a mask).
            image: (B, C, H, W) the masked, padded input, for decoders with image skips.

        Returns:
            (B, out_chans, H, W) reconstruction, ``H = reduction * feats[0].shape[-2]``.
        """
        size = (feats[0].shape[-2] * self.reduction, feats[0].shape[-1] * self.reduction)
        out = self.decoder(feats, image) if self.uses_image else self.decoder(feats)
        if tuple(out.shape[-2:]) != size:
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
        return out

    def no_weight_decay(self) -> set[str]:
        inner = getattr(self.decoder, "no_weight_decay", lambda: set())()
        return {f"decoder.{n}" for n in inner}


def classifier_prefix(decoder: nn.Module, out_chans: int) -> str:
    """Name of the decoder's output layer: its last registered Conv2d / Linear with ``out_chans``
    outputs (``segmentation_head``, ``classifier``, ``output`` in the zoo's decoders)."""
    found = ""
    for name, module in decoder.named_modules():
        if isinstance(module, nn.Conv2d) and module.out_channels == out_chans:
            found = name
        elif isinstance(module, nn.Linear) and module.out_features == out_chans:
            found = name
    if not found:
        raise ValueError(f"{type(decoder).__name__} has no Conv2d/Linear layer with {out_chans} outputs")
    return found


#: MIM decoders by config name
MIM_DECODERS: dict[str, type[nn.Module]] = {
    "pixel_shuffle": PixelShuffleDecoder,
    "multiscale": MultiScaleDecoder,
}


def resolve_mim_decoder(name: str) -> str:
    """Map ``"auto"`` to a concrete decoder name; validate the others.

    ``"auto"`` is always ``"multiscale"``: it is correct for every encoder of the zoo, whereas the
    pixel-shuffle head silently degenerates (a constant prediction on masked regions) for any
    encoder whose last stage is convolutional and therefore zeroed under the mask — and the
    encoder contract exposes no reliable flag that tells the two apart. On a Transformer encoder
    the multiscale decoder keeps the encoder's contextual features (the mask embedding is added,
    not substituted) and costs a few light convolutions. Pick ``"pixel_shuffle"`` explicitly for
    the original SimMIM setup on a pure Transformer.
    """
    if name == "auto":
        return "multiscale"
    if name not in MIM_DECODERS:
        raise ValueError(f"unknown MIM decoder {name!r}; valid: auto, {', '.join(sorted(MIM_DECODERS))}")
    return name


def build_mim_decoder(
    name: str, in_channels: tuple[int, ...], reductions: tuple[int, ...], out_chans: int, **kwargs: Any
) -> nn.Module:
    """Build a MIM decoder by name (``"auto"``, ``"pixel_shuffle"`` or ``"multiscale"``).

    Args:
        name: decoder name.
        in_channels: ``encoder.out_channels``.
        reductions: ``encoder.reductions``.
        out_chans: channels to reconstruct.
        **kwargs: decoder options (``dim``, ``norm_layer``, ``act_layer`` for the multiscale one).
    """
    cls = MIM_DECODERS[resolve_mim_decoder(name)]
    return cls(tuple(in_channels), tuple(reductions), out_chans, **kwargs)

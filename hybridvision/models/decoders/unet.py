"""U-Net style decoders: TransUNet's cascaded upsampler and a generic U-Net decoder.

* ``transunet_cup`` — the CUP of TransUNet (Chen et al., 2021, official ``DecoderCup`` +
  ``SegmentationHead``): a 3x3 conv-BN-ReLU lifts the deepest map to ``head_channels``, then blocks
  each upsample x2 (bilinear, ``align_corners=True`` as ``nn.UpsamplingBilinear2d``), concatenate
  the next shallower skip (the first ``n_skip`` blocks) and apply two 3x3 conv-BN-ReLU; a 3x3
  conv gives the logits.
* ``unet`` — a U-Net decoder (Ronneberger et al., 2015; layout of segmentation_models_pytorch's
  ``UnetDecoder``) for any encoder feature list: from the deepest map, upsample to the next skip,
  concatenate, two 3x3 conv-BN-ReLU, ..., then a 3x3 conv to the classes. The logits come at the
  shallowest skip's stride; the Segmenter resizes them to the input. Hybrid and transformer
  encoders start at stride 4, so thin structures (1-3 px EM membranes) are lost there;
  ``image_skip_channels=(16, 32)`` adds a small convolutional path on the image itself (stride 1
  and 2, as U-Net's first levels / UNETR's input branch) whose maps serve as the last skips, so the
  logits come at full resolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.common import ConvNormAct
from ..registry import SegmenterSpec, register_decoder, register_segmenter

__all__ = ["UNetBlock", "CascadedUpsampler", "UNetDecoder"]


class UNetBlock(nn.Module):
    """Upsample, concatenate an optional skip, then two 3x3 conv-norm-ReLU.

    Args:
        in_channels: channels of the incoming (deeper) map.
        skip_channels: channels of the skip (0 for none).
        out_channels: output channels.
        mode: interpolation mode of the upsampling.
        align_corners: passed to ``F.interpolate`` for (bi)linear modes.
        norm_layer: normalisation after each convolution.
    """

    def __init__(
        self,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        mode: str = "nearest",
        align_corners: bool | None = None,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
    ):
        super().__init__()
        self.mode = mode
        self.align_corners = align_corners
        self.conv1 = ConvNormAct(in_channels + skip_channels, out_channels, 3, norm_layer=norm_layer)
        self.conv2 = ConvNormAct(out_channels, out_channels, 3, norm_layer=norm_layer)

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        """Args: x (B, C_in, h, w); skip (B, C_skip, H_s, W_s) or None. Returns (B, C_out, H_s, W_s).

        Without a skip the output is (B, C_out, 2h, 2w).
        """
        size = tuple(skip.shape[-2:]) if skip is not None else (2 * x.shape[-2], 2 * x.shape[-1])
        x = F.interpolate(x, size=size, mode=self.mode, align_corners=self.align_corners)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)  # (B, C_in + C_skip, H_s, W_s)
        return self.conv2(self.conv1(x))


def _check_features(in_channels: Sequence[int], reductions: Sequence[int]) -> None:
    if len(in_channels) != len(reductions) or not in_channels:
        raise ValueError(
            f"in_channels {tuple(in_channels)} and reductions {tuple(reductions)} must match in length"
        )
    if list(reductions) != sorted(reductions):  # equal strides (plain ViTs: 14, 14, 14, 14) are fine
        raise ValueError(f"reductions must not decrease from shallow to deep, got {tuple(reductions)}")


class CascadedUpsampler(nn.Module):
    """TransUNet's cascaded upsampler (CUP) with its segmentation head (Chen et al., 2021).

    Args:
        in_channels: encoder channels, shallow to deep; the last map is the Transformer output.
        reductions: encoder strides, shallow to deep.
        num_classes: output channels.
        head_channels: channels of the first 3x3 conv on the deepest map (``conv_more``).
        decoder_channels: output channels of each upsampling block.
        n_skip: the first ``n_skip`` blocks concatenate the encoder skips, deepest first.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        reductions: Sequence[int],
        num_classes: int,
        head_channels: int = 512,
        decoder_channels: Sequence[int] = (256, 128, 64, 16),
        n_skip: int = 3,
    ):
        super().__init__()
        _check_features(in_channels, reductions)
        skip_channels = list(in_channels[:-1])[::-1]  # deepest skip first
        if not 0 <= n_skip <= min(len(skip_channels), len(decoder_channels)):
            raise ValueError(
                f"n_skip={n_skip} must lie in [0, {min(len(skip_channels), len(decoder_channels))}] "
                f"for {len(skip_channels)} skips and {len(decoder_channels)} decoder blocks"
            )
        self.n_skip = n_skip
        self.conv_more = ConvNormAct(in_channels[-1], head_channels, 3)
        ins = [head_channels, *decoder_channels[:-1]]
        skips = skip_channels[:n_skip] + [0] * (len(decoder_channels) - n_skip)
        self.blocks = nn.ModuleList(
            UNetBlock(i, s, o, mode="bilinear", align_corners=True)
            for i, s, o in zip(ins, skips, decoder_channels)
        )
        self.segmentation_head = nn.Conv2d(decoder_channels[-1], num_classes, kernel_size=3, padding=1)

    def forward(self, features: list[Tensor]) -> Tensor:
        """Args: features, shallow to deep, (B, C_i, H / r_i, W / r_i). Returns (B, K, h, w) logits.

        With the default four blocks on strides (2, 4, 8, 16) the logits are at stride 1.
        """
        x = self.conv_more(features[-1])
        skips = features[-2::-1]  # deepest skip first
        for i, block in enumerate(self.blocks):
            x = block(x, skips[i] if i < self.n_skip else None)
        return self.segmentation_head(x)


class UNetDecoder(nn.Module):
    """U-Net decoder for any encoder feature list (Ronneberger et al., 2015; smp ``UnetDecoder``).

    Block ``i`` upsamples to the ``i``-th skip (deepest first) and fuses it; blocks beyond the
    available skips upsample x2 without a skip. A 3x3 conv maps the last block to logits.

    Args:
        in_channels: encoder channels, shallow to deep.
        reductions: encoder strides, shallow to deep.
        num_classes: output channels.
        decoder_channels: output channels of each block; default ``(256, 128, 64, 32, 16)`` cut to
            one block per skip.
        upsample_mode: ``"nearest"`` (smp) or ``"bilinear"``.
        norm_layer: normalisation after each convolution.
        image_skip_channels: channels of extra skips computed from the image at strides
            ``1, 2, 4, ...`` (shallowest first), below the encoder's shallowest stride; e.g.
            ``(16, 32)`` for strides 1 and 2. Empty: encoder skips only. ``forward`` then needs
            ``image``.
        in_chans: image channels (the segmenter factory passes its own).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        reductions: Sequence[int],
        num_classes: int,
        decoder_channels: Sequence[int] | None = None,
        upsample_mode: str = "nearest",
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        image_skip_channels: Sequence[int] = (),
        in_chans: int = 3,
    ):
        super().__init__()
        _check_features(in_channels, reductions)
        image_skip_channels = tuple(int(c) for c in image_skip_channels)
        if image_skip_channels and 2 ** (len(image_skip_channels) - 1) >= reductions[0]:
            raise ValueError(
                f"image_skip_channels={image_skip_channels} asks for image skips down to stride "
                f"{2 ** (len(image_skip_channels) - 1)}, but the encoder's shallowest feature is at stride "
                f"{reductions[0]}: give at most {max(reductions[0].bit_length() - 1, 0)} entries"
            )
        self.image_stem = nn.ModuleList()
        prev = in_chans
        for i, ch in enumerate(image_skip_channels):  # stride 1, 2, 4, ...
            self.image_stem.append(ConvNormAct(prev, ch, 3, stride=1 if i == 0 else 2, norm_layer=norm_layer))
            prev = ch
        # deepest skip first: encoder skips, then the image skips from coarse to fine
        skip_channels = list(in_channels[:-1])[::-1] + list(image_skip_channels)[::-1]
        if decoder_channels is None:
            decoder_channels = (256, 128, 64, 32, 16)[: max(len(skip_channels), 1)]
        if len(decoder_channels) < 1:
            raise ValueError("decoder_channels needs at least one entry")
        self.num_skips = min(len(skip_channels), len(decoder_channels))
        if image_skip_channels and self.num_skips < len(skip_channels):
            raise ValueError(
                f"image_skip_channels={image_skip_channels} would never be used: decoder_channels="
                f"{tuple(decoder_channels)} has {len(decoder_channels)} blocks but the skips need "
                f"{len(skip_channels)} (give decoder_channels {len(skip_channels)} entries)"
            )
        ins = [in_channels[-1], *decoder_channels[:-1]]
        skips = skip_channels[: self.num_skips] + [0] * (len(decoder_channels) - self.num_skips)
        align = False if upsample_mode in ("bilinear", "bicubic") else None
        self.blocks = nn.ModuleList(
            UNetBlock(i, s, o, mode=upsample_mode, align_corners=align, norm_layer=norm_layer)
            for i, s, o in zip(ins, skips, decoder_channels)
        )
        self.segmentation_head = nn.Conv2d(decoder_channels[-1], num_classes, kernel_size=3, padding=1)

    @property
    def uses_image(self) -> bool:
        """Whether ``forward`` needs the (padded) input image for its image skips."""
        return len(self.image_stem) > 0

    def forward(self, features: list[Tensor], image: Tensor | None = None) -> Tensor:
        """Decode the encoder features to logits.

        Args:
            features: shallow to deep, (B, C_i, H / r_i, W / r_i).
            image: (B, in_chans, H, W), needed with image skips.

        Returns:
            (B, K, h, w) logits (h = H with image skips).
        """
        x = features[-1]
        skips = features[-2::-1]  # deepest skip first
        if self.uses_image:
            if image is None:
                raise ValueError("this U-Net decoder has image skips: call it as decoder(features, image)")
            image_feats = []
            for conv in self.image_stem:
                image = conv(image)  # (B, C, H / 2^i, W / 2^i)
                image_feats.append(image)
            skips = [*skips, *image_feats[::-1]]
        for i, block in enumerate(self.blocks):
            x = block(x, skips[i] if i < self.num_skips else None)
        return self.segmentation_head(x)


@register_decoder("transunet_cup")
def transunet_cup(
    in_channels: Sequence[int], reductions: Sequence[int], num_classes: int, **kwargs
) -> CascadedUpsampler:
    """TransUNet cascaded upsampler; kwargs: ``head_channels``, ``decoder_channels``, ``n_skip``."""
    return CascadedUpsampler(in_channels, reductions, num_classes, **kwargs)


@register_decoder("unet")
def unet(
    in_channels: Sequence[int], reductions: Sequence[int], num_classes: int, in_chans: int = 3, **kwargs
) -> UNetDecoder:
    """Generic U-Net decoder; kwargs: ``decoder_channels``, ``upsample_mode``, ``image_skip_channels``."""
    return UNetDecoder(in_channels, reductions, num_classes, in_chans=in_chans, **kwargs)


SEGMENTER_PRESETS: dict[str, SegmenterSpec] = {
    "transunet_r50_vit_b16": SegmenterSpec(encoder="transunet_r50_vit_b16", decoder="transunet_cup"),
    "transunet_small": SegmenterSpec(
        encoder="transunet_small",
        decoder="transunet_cup",
        decoder_kwargs={"head_channels": 256, "decoder_channels": (128, 64, 32, 16)},
    ),
    "transunet_nano": SegmenterSpec(
        encoder="transunet_nano",
        decoder="transunet_cup",
        decoder_kwargs={"head_channels": 32, "decoder_channels": (32, 16, 16, 8)},
    ),
    "unet_resnet18": SegmenterSpec(encoder="resnet18", decoder="unet"),
    "unet_resnet34": SegmenterSpec(encoder="resnet34", decoder="unet"),
    # the fine-tuning default: ResNet basic blocks at strides 4-32, global attention refining the
    # stride-32 map (TransUNet / BoTNet style), the U-Net decoder up to stride 1 (benchmarks/realdata.sh)
    "sequential_unet_tiny": SegmenterSpec(encoder="sequential_tiny", decoder="unet"),
    "unet_resnet_nano": SegmenterSpec(
        encoder="resnet_nano", decoder="unet", decoder_kwargs={"decoder_channels": (64, 32, 16, 16)}
    ),
}

for _name, _spec in SEGMENTER_PRESETS.items():
    register_segmenter(_name, _spec)

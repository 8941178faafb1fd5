"""The encoder contract and the generic segmenter.

Every encoder in the zoo subclasses :class:`Encoder` and so exposes

* ``out_channels: tuple[int, ...]`` — channels of each returned feature map,
* ``reductions: tuple[int, ...]`` — stride of each map w.r.t. the input, e.g. ``(4, 8, 16, 32)``,
* ``forward_features(x, mask=None, mask_token=None) -> list[Tensor]`` — NCHW maps,

which is all decoders, SSL heads and distillation hooks rely on (cf. smp ``EncoderMixin``,
timm ``forward_intermediates``). Encoders with ``encodes_visible_only`` also implement
``forward_visible(x, mask, mask_token)``: masked image modelling whose attention stages encode the
visible tokens only (MAE-style).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Encoder",
    "Segmenter",
    "pad_to_multiple",
    "pad_to_size",
    "padded_size",
    "mask_to",
    "apply_token_mask",
    "is_tracing",
]


def is_tracing() -> bool:
    """True while ``torch.jit.trace`` (the TorchScript ONNX exporter) or ``torch.export`` runs the model.

    Shape logic then computes sizes from tensor shapes instead of Python ints and never branches on
    them, so the exported graph accepts any input size; eager runs keep their fast paths.
    """
    return torch.jit.is_tracing() or torch.compiler.is_exporting()


def pad_to_multiple(x: Tensor, multiple: int, value: float = 0.0) -> Tensor:
    """Pad ``x`` (B, C, H, W) at the bottom/right so H and W are multiples of ``multiple``."""
    h, w = x.shape[-2:]
    ph = (multiple - h % multiple) % multiple
    pw = (multiple - w % multiple) % multiple
    # Under ONNX tracing, h and w are traced 0-d tensors: always emit the (possibly empty) pad so the
    # graph keeps padding sizes that are not multiples of ``multiple``.
    if not is_tracing() and ph == 0 and pw == 0:
        return x
    return F.pad(x, (0, pw, 0, ph), value=value)


def pad_to_size(x: Tensor, size: tuple[int, int], owner: str = "model") -> Tensor:
    """Pad ``x`` (B, C, H, W) at the bottom/right to exactly ``size``; larger inputs are an error."""
    h, w = x.shape[-2:]
    if not is_tracing() and (h > size[0] or w > size[1]):
        raise ValueError(
            f"{owner} takes inputs of at most {size[0]}x{size[1]} (its input size is fixed at creation), got "
            f"{h}x{w}: use a sliding window of that size (eval.mode=slide, eval.window={list(size)}) or "
            "build it with a larger img_size"
        )
    if not is_tracing() and (h, w) == tuple(size):
        return x
    return F.pad(x, (0, size[1] - w, 0, size[0] - h))


def padded_size(encoder: Encoder, h: Any, w: Any) -> tuple[Any, Any]:
    """The size an encoder pads an (h, w) input to (ints, or traced tensors under export)."""
    if encoder.input_size is not None:
        return encoder.input_size
    d = encoder.size_divisor
    # integer ceil: under ONNX tracing h, w are traced tensors and stay so (no baked-in sizes)
    return (h + d - 1) // d * d, (w + d - 1) // d * d


def mask_to(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize a patch mask (B, 1, h, w) to ``size`` with nearest neighbour; returns a float mask.

    1 marks a masked position. ``size`` must be a multiple or a divisor of the mask grid so that
    every output position belongs to exactly one patch.
    """
    mask = mask.to(torch.float32)
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask, size=size, mode="nearest")


def apply_token_mask(feat: Tensor, mask: Tensor | None, mask_token: Tensor | None) -> Tensor:
    """Replace masked positions of an NCHW map with ``mask_token`` (C,), or zero them if it is None.

    Args:
        feat: (B, C, H, W) feature map.
        mask: (B, 1, h, w) patch mask, 1 = masked, or None (then ``feat`` is returned unchanged).
        mask_token: (C,) learnable token, or None.
    """
    if mask is None:
        return feat
    m = mask_to(mask, (feat.shape[-2], feat.shape[-1])).to(feat.dtype)
    out = feat * (1.0 - m)
    if mask_token is not None:
        out = out + m * mask_token.to(feat.dtype).view(1, -1, 1, 1)
    return out


class Encoder(nn.Module):
    """Base class of every encoder.

    Subclasses set ``out_channels``, ``reductions``, ``size_divisor`` and ``mask_token_dim`` and
    implement :meth:`_forward_features`. The base class pads inputs whose size is not a multiple
    of ``size_divisor`` (bottom/right, zeros), so feature ``i`` has spatial size
    ``ceil(H / size_divisor) * size_divisor / reductions[i]``.

    Masked image modelling: ``forward_features(x, mask, mask_token)`` zeroes the masked input
    pixels, then the subclass replaces masked positions after its first embedding by
    ``mask_token`` (``apply_token_mask``) and zeroes them again after every convolutional stage
    (SparK / ConvNeXt-V2 style), so masked pixels can reach a loss only as targets.
    Encoders with ``encodes_visible_only`` also implement :meth:`forward_visible`, where
    attention stages never compute masked tokens at all.
    """

    out_channels: tuple[int, ...]
    reductions: tuple[int, ...]
    size_divisor: int = 32
    #: (H, W) for encoders built at a fixed input size (some timm models): smaller inputs are padded
    #: up to it, larger ones are an error (predict them with a sliding window of this size)
    input_size: tuple[int, int] | None = None
    mask_token_dim: int
    #: kwargs that rebuild this encoder with ``create_encoder(name, **build_kwargs)``
    build_kwargs: dict[str, Any]
    #: :meth:`forward_visible` is implemented (attention stages encode the visible tokens only)
    encodes_visible_only: ClassVar[bool] = False
    #: :meth:`forward_visible` fills masked positions after a convolutional stem with the mask token
    visible_only_mask_token: ClassVar[bool] = False

    def forward_features(
        self, x: Tensor, mask: Tensor | None = None, mask_token: Tensor | None = None
    ) -> list[Tensor]:
        """Multi-scale features.

        Args:
            x: (B, in_chans, H, W) images.
            mask: optional (B, 1, h, w) patch mask, 1 = masked; ``H`` and ``W`` (after padding)
                must be multiples of ``h`` and ``w``.
            mask_token: optional (mask_token_dim,) token for masked positions after the stem.

        Returns:
            list of (B, out_channels[i], H_pad / reductions[i], W_pad / reductions[i]).
        """
        return self._forward_features(self._padded_input(x, mask), mask, mask_token)

    def forward_visible(self, x: Tensor, mask: Tensor, mask_token: Tensor | None = None) -> list[Tensor]:
        """Multi-scale features of a masked image whose attention stages see the visible tokens only.

        MAE (He et al., 2022) / GreenMIM (Huang et al., 2022) style: a masked token is never a
        query, key or value of an attention stage, and token-wise layers skip it, which is where
        the saving comes from; convolutional stages compute SparK-style (masked positions zeroed
        after every block). Every returned map is zero at masked positions: the MIM decoder fills
        them (its mask embeddings), as MAE's decoder adds mask tokens.

        Args:
            x: (B, in_chans, H, W) images.
            mask: (B, 1, h, w) patch mask, 1 = masked; every cell (after padding) spans whole
                tokens of the deepest stage, so that no patch merge mixes visible and masked tokens.
            mask_token: (mask_token_dim,) token for masked positions after a convolutional stem
                (read only where ``visible_only_mask_token``).

        Returns:
            list of (B, out_channels[i], H_pad / reductions[i], W_pad / reductions[i]).

        Raises:
            NotImplementedError: if this encoder does not encode visible tokens only.
            ValueError: if the mask cells do not span whole deepest-stage tokens.
        """
        if not self.encodes_visible_only:
            raise NotImplementedError(f"{type(self).__name__} does not encode visible tokens only")
        x = self._padded_input(x, mask)
        stride = max(self.reductions)
        cell = (x.shape[-2] // mask.shape[-2], x.shape[-1] // mask.shape[-1])
        if cell[0] % stride or cell[1] % stride:
            raise ValueError(
                f"visible-only encoding needs mask cells that span whole stride-{stride} tokens; "
                f"the mask {tuple(mask.shape[-2:])} cuts the (padded) input {tuple(x.shape[-2:])} into "
                f"{cell[0]}x{cell[1]} px cells (use a mask patch size that is a multiple of {stride})"
            )
        return self._forward_visible(x, mask, mask_token)

    def _padded_input(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """``x`` padded to the encoder's size, its masked pixels zeroed; checks the shapes."""
        if x.ndim != 4:
            raise ValueError(f"{type(self).__name__} expects (B, C, H, W) input, got shape {tuple(x.shape)}")
        x = (
            pad_to_size(x, self.input_size, type(self).__name__)
            if self.input_size
            else pad_to_multiple(x, self.size_divisor)
        )
        if mask is not None:
            h, w = mask.shape[-2:]
            if mask.ndim != 4 or x.shape[-2] % h or x.shape[-1] % w:
                raise ValueError(
                    f"mask of shape {tuple(mask.shape)} does not tile the (padded) input of size "
                    f"{tuple(x.shape[-2:])}: expected (B, 1, h, w) with h | H and w | W"
                )
            x = apply_token_mask(x, mask, None)
        return x

    def _forward_features(self, x: Tensor, mask: Tensor | None, mask_token: Tensor | None) -> list[Tensor]:
        raise NotImplementedError

    def _forward_visible(self, x: Tensor, mask: Tensor, mask_token: Tensor | None) -> list[Tensor]:
        raise NotImplementedError

    def forward(self, x: Tensor) -> list[Tensor]:
        """Same as :meth:`forward_features`: the feature maps, one per stage."""
        return self.forward_features(x)

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to this module) that take no weight decay (tokens, pos-embeds)."""
        return set()


def encoder_layer_groups(encoder: Encoder, in_chans: int = 3) -> list[str]:
    """Parameter-name prefixes of ``encoder``'s depth groups, in execution order (layer-wise LR decay).

    Groups are the encoder's children, with ModuleList / Sequential / ModuleDict children split per
    item and a single wrapping child (a timm feature extractor, a transformers backbone) entered
    first; the order is the order in which a forward pass first calls them (definition order can
    interleave stages, e.g. separate lists of patch embeddings and blocks).
    """
    root: nn.Module = encoder
    base = ""
    children = [(n, c) for n, c in root.named_children() if any(True for _ in c.parameters())]
    while len(children) == 1 and not isinstance(
        children[0][1], (nn.ModuleList, nn.Sequential, nn.ModuleDict)
    ):
        name, root = children[0]
        base += name + "."
        children = [(n, c) for n, c in root.named_children() if any(True for _ in c.parameters())]
    candidates: list[tuple[str, nn.Module]] = []
    for name, child in root.named_children():
        if isinstance(child, (nn.ModuleList, nn.Sequential, nn.ModuleDict)):
            candidates += [(f"{base}{name}.{sub}", c) for sub, c in child.named_children()]
        else:
            candidates.append((base + name, child))
    order: list[str] = []
    hooks = [
        module.register_forward_pre_hook(lambda _m, _a, n=name: order.append(n) if n not in order else None)
        for name, module in candidates
    ]
    size = encoder.input_size or (64, 64)
    was_training = encoder.training
    try:
        encoder.eval()
        with torch.no_grad():
            encoder.forward_features(torch.zeros(1, in_chans, *size))
    finally:
        encoder.train(was_training)
        for h in hooks:
            h.remove()
    order += [n for n, _ in candidates if n not in order]  # never called: earliest LR
    with_params = {n for n, m in candidates if any(True for _ in m.parameters())}
    return [n for n in order if n in with_params]


class Segmenter(nn.Module):
    """Encoder + decoder returning logits (B, num_classes, H, W) at the input resolution.

    The input is padded to a multiple of ``encoder.size_divisor``; the decoder output is resized
    bilinearly (``align_corners=False``) to the padded size and cropped back to (H, W).
    """

    def __init__(self, encoder: Encoder, decoder: nn.Module, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.num_classes = num_classes
        self.build_kwargs: dict[str, Any] = {}

    def forward(self, x: Tensor) -> Tensor:
        """Args: x (B, in_chans, H, W). Returns logits (B, num_classes, H, W)."""
        h, w = x.shape[-2:]
        feats = self.encoder.forward_features(x)
        hp, wp = padded_size(self.encoder, h, w)
        if getattr(self.decoder, "uses_image", False):  # decoders with image-level skips (U-Net)
            pad = self.encoder.input_size
            image = pad_to_size(x, pad) if pad else pad_to_multiple(x, self.encoder.size_divisor)
            logits = self.decoder(feats, image)
        else:
            logits = self.decoder(feats)
        if tuple(logits.shape[-2:]) != (hp, wp):
            logits = F.interpolate(logits, size=(hp, wp), mode="bilinear", align_corners=False)
        return logits[..., :h, :w]

    # ---------------------------------------------------------------- layer-wise LR decay

    def _layer_groups(self) -> list[str]:
        """Encoder parameter-name prefixes in execution order (see :func:`encoder_layer_groups`)."""
        if getattr(self, "_layer_order", None) is None:
            in_chans = self.build_kwargs.get("in_chans", 3)
            self._layer_order = [f"encoder.{n}" for n in encoder_layer_groups(self.encoder, in_chans)]
        return self._layer_order

    @property
    def num_layers(self) -> int:
        """Depth groups for layer-wise LR decay: encoder groups, then the decoder."""
        return len(self._layer_groups())

    def layer_id(self, name: str) -> int:
        """Depth group of parameter ``name``: 0 = first encoder group ... ``num_layers`` = decoder.

        Parameters directly on the encoder (tokens, position embeddings) share group 0.
        """
        if not name.startswith("encoder."):
            return self.num_layers
        for i, prefix in enumerate(self._layer_groups()):
            if name.startswith(prefix + "."):
                return i
        return 0

    def no_weight_decay(self) -> set[str]:
        """Encoder and decoder parameter names excluded from weight decay, prefixed with their module."""
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()} | {
            f"decoder.{n}" for n in getattr(self.decoder, "no_weight_decay", lambda: set())()
        }

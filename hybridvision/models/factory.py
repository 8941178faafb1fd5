"""Build encoders, decoders and segmenters from registered names."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from .base import Encoder, Segmenter
from .registry import (
    SegmenterSpec,
    UnknownModelError,
    decoder_entrypoint,
    encoder_entrypoint,
    fixed_input_size,
    is_encoder,
    list_decoders,
    list_encoders,
    list_namespaces,
    list_segmenters,
    segmenter_spec,
)

__all__ = [
    "create_encoder",
    "create_decoder",
    "create_segmenter",
    "list_models",
    "encoder_name",
    "with_input_size",
    "DEFAULT_DECODER",
]

#: decoder used by ``create_segmenter(<encoder name>)`` when no preset names one
DEFAULT_DECODER = "segformer_mlp"


def _check_count(arg: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``, or a TypeError/ValueError naming ``arg`` and the value."""
    if isinstance(value, bool) or not isinstance(value, int):
        # numpy / torch integer scalars are fine; strings, floats and None are not
        if hasattr(value, "__index__") and not isinstance(value, bool):
            value = int(value.__index__())
        else:
            raise TypeError(f"{arg} must be an int >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{arg} must be an int >= {minimum}, got {value}")
    return value


def _check_name(arg: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"{arg} must be a registered name (non-empty str), got {value!r}")
    return value


def create_encoder(name: str, in_chans: int = 3, weights: str | None = None, **overrides: Any) -> Encoder:
    """Build a registered encoder.

    Args:
        name: registered encoder name (see ``list_models("encoder")``), or ``timm/<architecture>``
            / ``transformers/<model_type>`` for any timm model / transformers backbone.
        in_chans: input channels (1 for EM/CT, 3 for RGB, 4 for RGB+NIR, ...).
        weights: optional external weights converted by the family's ``load_pretrained_weights``:
            a timm/torchvision checkpoint file (Swin, ResNet, timm families), a directory in timm's
            or transformers' hub layout, or a hub id (timm and transformers families; read from
            the local Hugging Face cache first).
        **overrides: preset fields to override (e.g. ``drop_path_rate=0.1``).
    """
    name = _check_name("name", name)
    in_chans = _check_count("in_chans", in_chans)
    encoder = encoder_entrypoint(name)(in_chans=in_chans, **overrides)
    encoder.build_kwargs = {"name": name, "in_chans": in_chans, **overrides}
    if weights is not None:
        loader = getattr(encoder, "load_pretrained_weights", None)
        if loader is None:
            raise ValueError(
                f"encoder {name!r} cannot load external weights with weights=; "
                "use hybridvision.models.from_pretrained for hybridvision checkpoints"
            )
        loader(weights)
    return encoder


def create_decoder(
    name: str, in_channels: tuple[int, ...], reductions: tuple[int, ...], num_classes: int, **kwargs: Any
) -> nn.Module:
    """Build a registered decoder for features with ``in_channels`` at ``reductions``."""
    name = _check_name("decoder", name)
    num_classes = _check_count("num_classes", num_classes)
    if len(tuple(in_channels)) != len(tuple(reductions)):
        raise ValueError(
            f"decoder {name!r}: in_channels {tuple(in_channels)} and reductions {tuple(reductions)} "
            "must have one entry per feature stage"
        )
    return decoder_entrypoint(name)(
        in_channels=tuple(in_channels), reductions=tuple(reductions), num_classes=num_classes, **kwargs
    )


def create_segmenter(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    decoder: str | None = None,
    decoder_kwargs: dict[str, Any] | None = None,
    **overrides: Any,
) -> Segmenter:
    """Build a segmenter: a registered preset (``segformer_b0``) or any encoder name + a decoder.

    Args:
        name: segmenter preset or encoder name.
        num_classes: output channels (1 for binary with BCE).
        in_chans: input channels.
        decoder: decoder name; defaults to the preset's, or ``segformer_mlp`` for a bare encoder.
        decoder_kwargs: decoder overrides (e.g. ``{"embed_dim": 128}``).
        **overrides: encoder overrides (e.g. ``img_size=512``).

    Raises:
        TypeError: ``num_classes`` / ``in_chans`` not an int, ``name`` / ``decoder`` not a string,
            ``decoder_kwargs`` not a dict.
        ValueError: ``num_classes`` or ``in_chans`` below 1.
        UnknownModelError: An unregistered name (the message lists the valid ones).
    """
    name = _check_name("name", name)
    num_classes = _check_count("num_classes", num_classes)
    in_chans = _check_count("in_chans", in_chans)
    if decoder is not None:
        decoder = _check_name("decoder", decoder)
    if decoder_kwargs is not None and not isinstance(decoder_kwargs, dict):
        raise TypeError(f"decoder_kwargs must be a dict, got {type(decoder_kwargs).__name__}")
    if name in list_segmenters():
        spec = segmenter_spec(name)
    elif is_encoder(name):
        spec = SegmenterSpec(encoder=name, decoder=DEFAULT_DECODER)
    else:
        namespaced = [f"{ns}/<architecture>" for ns in list_namespaces()]
        raise UnknownModelError(
            "segmenter or encoder", name, list_segmenters() + list_encoders() + namespaced
        )
    enc_kwargs = {**spec.encoder_kwargs, **overrides}
    dec_kwargs = {**spec.decoder_kwargs, **(decoder_kwargs or {})}
    dec_name = decoder or spec.decoder
    encoder = create_encoder(spec.encoder, in_chans=in_chans, **enc_kwargs)
    if "in_chans" in inspect.signature(decoder_entrypoint(dec_name)).parameters:
        dec_kwargs.setdefault("in_chans", in_chans)  # decoders that read the image itself
    dec = create_decoder(dec_name, encoder.out_channels, encoder.reductions, num_classes, **dec_kwargs)
    model = Segmenter(encoder, dec, num_classes)
    model.build_kwargs = {
        "name": name,
        "num_classes": num_classes,
        "in_chans": in_chans,
        "decoder": decoder,
        "decoder_kwargs": decoder_kwargs or {},
        **overrides,
    }
    return model


def encoder_name(name: str) -> str:
    """The encoder a segmenter preset or encoder name builds (``segformer_b0`` -> ``mit_b0``)."""
    return segmenter_spec(name).encoder if name in list_segmenters() else name


def with_input_size(
    name: str, image_size: tuple[int, int] | None, overrides: dict[str, Any]
) -> dict[str, Any]:
    """``overrides`` plus ``img_size=image_size`` when ``name``'s encoder is built at a fixed input size.

    Stages call this with the data crop, so a fixed-size model (LeViT, MaxViT, ... from timm) is
    built at the size it is trained at; an ``img_size`` the user set wins.
    """
    if image_size is None or "img_size" in overrides or not name:
        return dict(overrides)
    if fixed_input_size(encoder_name(name)) is None:
        return dict(overrides)
    return {**overrides, "img_size": [int(v) for v in image_size]}


def list_models(kind: str = "all") -> list[str]:
    """Registered names: ``kind`` is ``encoder``, ``decoder``, ``segmenter`` or ``all``."""
    tables = {"encoder": list_encoders, "decoder": list_decoders, "segmenter": list_segmenters}
    if kind == "all":
        return sorted(set(list_encoders()) | set(list_segmenters()))
    if kind not in tables:
        raise ValueError(f"kind must be one of all, {', '.join(tables)}; got {kind!r}")
    return tables[kind]()

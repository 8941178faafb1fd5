"""Explicit model registries.

Three registries: encoders, decoders and segmenters. Each maps a name to a factory.
Entries are registered once, at import time of the family module, and never mutated.
An unknown name raises :class:`UnknownModelError` listing the valid names and the
closest matches.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = [
    "UnknownModelError",
    "SegmenterSpec",
    "register_encoder",
    "register_decoder",
    "register_segmenter",
    "register_presets",
    "replace_preset",
    "encoder_entrypoint",
    "decoder_entrypoint",
    "segmenter_spec",
    "list_encoders",
    "list_decoders",
    "list_segmenters",
]


class UnknownModelError(KeyError):
    """Raised for a model, decoder or segmenter name that is not registered."""

    def __init__(self, kind: str, name: str, valid: list[str]):
        close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5) if isinstance(name, str) else []
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        self.message = f"unknown {kind} {name!r}.{hint} Valid names: {', '.join(sorted(valid))}"
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return self.message


@dataclass(frozen=True)
class SegmenterSpec:
    """A named segmenter: which encoder, which decoder, and fixed keyword arguments.

    Attributes:
        encoder: registered encoder name.
        decoder: registered decoder name.
        encoder_kwargs: keyword arguments fixed by the preset for the encoder.
        decoder_kwargs: keyword arguments fixed by the preset for the decoder.
    """

    encoder: str
    decoder: str
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    decoder_kwargs: dict[str, Any] = field(default_factory=dict)


_ENCODERS: dict[str, Callable[..., Any]] = {}
_DECODERS: dict[str, Callable[..., Any]] = {}
_SEGMENTERS: dict[str, SegmenterSpec] = {}


def _register(table: dict, kind: str, name: str, value: Any) -> None:
    if name in table:
        raise ValueError(f"{kind} {name!r} is already registered")
    table[name] = value


def register_encoder(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register ``fn(in_chans: int = 3, **overrides) -> encoder`` under ``name``."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _register(_ENCODERS, "encoder", name, fn)
        return fn

    return deco


def register_decoder(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register ``fn(in_channels, reductions, num_classes, **kwargs) -> nn.Module``."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _register(_DECODERS, "decoder", name, fn)
        return fn

    return deco


def register_segmenter(name: str, spec: SegmenterSpec) -> None:
    """Register a named encoder + decoder combination."""
    _register(_SEGMENTERS, "segmenter", name, spec)


def encoder_entrypoint(name: str) -> Callable[..., Any]:
    if name not in _ENCODERS:
        raise UnknownModelError("encoder", name, list(_ENCODERS))
    return _ENCODERS[name]


def decoder_entrypoint(name: str) -> Callable[..., Any]:
    if name not in _DECODERS:
        raise UnknownModelError("decoder", name, list(_DECODERS))
    return _DECODERS[name]


def segmenter_spec(name: str) -> SegmenterSpec:
    if name not in _SEGMENTERS:
        raise UnknownModelError("segmenter", name, list(_SEGMENTERS) + list(_ENCODERS))
    return _SEGMENTERS[name]


def list_encoders() -> list[str]:
    return sorted(_ENCODERS)


def list_decoders() -> list[str]:
    return sorted(_DECODERS)


def list_segmenters() -> list[str]:
    return sorted(_SEGMENTERS)


ConfigT = TypeVar("ConfigT")


def replace_preset(name: str, config: ConfigT, overrides: Mapping[str, Any]) -> ConfigT:
    """``dataclasses.replace`` for preset overrides, with an error naming the valid fields.

    Lists (from YAML/JSON) become tuples where the preset field holds a tuple.
    """
    valid = [f.name for f in dataclasses.fields(config)]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"{name}: unknown override(s) {unknown}; valid fields: {', '.join(valid)}")
    fixed = {
        k: tuple(v) if isinstance(v, list) and isinstance(getattr(config, k), tuple) else v
        for k, v in overrides.items()
    }
    return dataclasses.replace(config, **fixed)


def register_presets(presets: Mapping[str, Any], encoder_cls: Callable[..., Any]) -> None:
    """Register one encoder per row of a preset table: ``encoder_cls(config, in_chans=...)``.

    Each registered factory takes ``(in_chans=3, **overrides)``; overrides replace fields of the
    preset's frozen config dataclass (see :func:`replace_preset`).
    """
    for name, config in presets.items():

        def factory(in_chans: int = 3, _name: str = name, _config: Any = config, **overrides: Any) -> Any:
            return encoder_cls(replace_preset(_name, _config, overrides), in_chans=in_chans)

        factory.__name__ = name
        factory.__doc__ = f"{name} encoder: {config}."
        register_encoder(name)(factory)

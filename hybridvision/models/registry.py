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
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = [
    "UnknownModelError",
    "SegmenterSpec",
    "register_encoder",
    "register_decoder",
    "register_segmenter",
    "register_presets",
    "register_namespace",
    "list_namespaces",
    "replace_preset",
    "encoder_entrypoint",
    "decoder_entrypoint",
    "segmenter_spec",
    "list_encoders",
    "list_decoders",
    "list_segmenters",
    "preset_class",
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
_PRESET_CLASSES: dict[str, Any] = {}  # encoder name -> the class its preset builds (register_presets)
#: ``<namespace>/<architecture>`` names built by a family that takes the architecture as its first
#: argument (``timm/fastvit_t8``, ``transformers/dinov2``); the slash keeps them apart from zoo names
_NAMESPACES: dict[str, tuple[Callable[..., Any], str, Callable[[str], Any] | None]] = {}


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


def register_namespace(
    namespace: str,
    factory: Callable[..., Any],
    description: str,
    fixed_input_size: Callable[[str], Any] | None = None,
) -> None:
    """Register ``factory(architecture, in_chans=3, **overrides)`` for names ``<namespace>/<architecture>``.

    Args:
        namespace: the part before the slash (``timm``).
        factory: builds the encoder of one architecture.
        description: one line for error messages and listings.
        fixed_input_size: ``fn(architecture) -> (H, W) | None``: the input size an architecture is
            fixed to at creation (it then takes ``img_size``), None for any size.
    """
    if "/" in namespace or not namespace:
        raise ValueError(f"namespace must be a non-empty name without '/', got {namespace!r}")
    _register(_NAMESPACES, "namespace", namespace, (factory, description, fixed_input_size))


def fixed_input_size(name: str) -> Any:
    """The default fixed input size of encoder ``name`` (None: any size; zoo encoders take any)."""
    split = split_namespace(name) if isinstance(name, str) else None
    fixed = _NAMESPACES[split[0]][2] if split is not None else None
    if split is None or fixed is None:
        return None
    return fixed(split[1])


def list_namespaces() -> dict[str, str]:
    """Registered namespaces and what they build (``{"timm": "any timm architecture, ..."}``)."""
    return {k: v[1] for k, v in sorted(_NAMESPACES.items())}


def split_namespace(name: str) -> tuple[str, str] | None:
    """``("timm", "fastvit_t8")`` for a namespaced name, None for a zoo name."""
    namespace, sep, architecture = name.partition("/")
    if not sep or namespace not in _NAMESPACES:
        return None
    if not architecture:
        raise ValueError(f"{name!r} names no architecture after '{namespace}/' (e.g. {namespace}/<name>)")
    return namespace, architecture


def encoder_entrypoint(name: str) -> Callable[..., Any]:
    """The factory of ``name``: ``fn(in_chans=3, **overrides) -> encoder``."""
    split = split_namespace(name) if isinstance(name, str) else None
    if split is not None:
        factory = _NAMESPACES[split[0]][0]

        def build(in_chans: int = 3, **overrides: Any) -> Any:
            return factory(split[1], in_chans=in_chans, **overrides)

        return build
    if name not in _ENCODERS:
        valid = list(_ENCODERS) + [f"{ns}/<architecture>" for ns in _NAMESPACES]
        raise UnknownModelError("encoder", name, valid)
    return _ENCODERS[name]


def is_encoder(name: str) -> bool:
    """True for a registered encoder or a name in a registered namespace."""
    return name in _ENCODERS or split_namespace(name) is not None


def decoder_entrypoint(name: str) -> Callable[..., Any]:
    """The registered decoder builder ``name``; raises UnknownModelError listing the valid names."""
    if name not in _DECODERS:
        raise UnknownModelError("decoder", name, list(_DECODERS))
    return _DECODERS[name]


def segmenter_spec(name: str) -> SegmenterSpec:
    """The registered segmenter spec ``name``; raises UnknownModelError listing the valid names."""
    if name not in _SEGMENTERS:
        raise UnknownModelError("segmenter", name, list(_SEGMENTERS) + list(_ENCODERS))
    return _SEGMENTERS[name]


def list_encoders() -> list[str]:
    """The registered encoder names, sorted."""
    return sorted(_ENCODERS)


def list_decoders() -> list[str]:
    """The registered decoder names, sorted."""
    return sorted(_DECODERS)


def list_segmenters() -> list[str]:
    """The registered segmenter names, sorted."""
    return sorted(_SEGMENTERS)


ConfigT = TypeVar("ConfigT", bound="DataclassInstance")


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
        _PRESET_CLASSES[name] = encoder_cls


def preset_class(name: str) -> Any:
    """The class a preset registered by :func:`register_presets` builds; None for other encoders."""
    return _PRESET_CLASSES.get(name)

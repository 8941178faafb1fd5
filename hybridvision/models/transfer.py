"""Build a segmenter and initialise it from a pretrained source (``model.init``).

Sources:

* an encoder directory written by ``pretrain/`` (or any ``save_pretrained`` encoder): its
  ``config.json`` names the architecture, so the user need not repeat it;
* a segmenter directory (ours, or a transformers SegFormer checkpoint directory); one written by
  ``pretrain/`` with ``objective.mim_decoder=segmenter`` names its pixel-reconstruction output layer
  in ``extra.reconstruction_head``, which is left at random init (it predicted pixels, not classes);
* a Hugging Face hub id of either;
* a timm / torchvision weights file (``.safetensors``, ``.pth``, ``.bin``) for encoders that can
  convert one (``load_pretrained_weights``);
* a released timm or transformers backbone: a directory in their hub layout (``config.json`` with
  ``architecture`` for timm, ``model_type`` for transformers, + weights) or its hub id
  (``timm/fastvit_t8.apple_in1k``, ``facebook/dinov2-small``; the local cache is used first), which
  builds ``timm/<architecture>`` / ``transformers/<model_type>`` and loads the encoder;
* nothing (scratch).

The result reports loaded / missing / unexpected / skipped keys. A tensor whose shape differs is
an error naming it and both shapes, unless ``strict=False`` (then it is skipped and listed).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .base import Encoder, Segmenter
from .factory import create_encoder, create_segmenter, encoder_name, with_input_size
from .hub import external_encoder_name, from_pretrained, read_model_config

__all__ = ["InitReport", "build_encoder", "build_segmenter", "load_matching"]


@dataclass
class InitReport:
    """What initialisation did, for one readable summary line per item."""

    source: str = ""
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # shape mismatches skipped with strict=False

    def summary(self) -> str:
        """One line per item: the source and counts, then missing, unexpected and skipped names."""
        if not self.source:
            return "model initialised from scratch (random weights)"

        def few(names: list[str]) -> str:
            return ", ".join(names[:6]) + (f", ... (+{len(names) - 6})" if len(names) > 6 else "")

        lines = [f"initialised from {self.source}: {len(self.loaded)} tensors loaded"]
        if self.missing:
            lines.append(f"  missing (kept random init): {len(self.missing)}: {few(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected (ignored): {len(self.unexpected)}: {few(self.unexpected)}")
        if self.skipped:
            lines.append(f"  skipped for shape mismatch: {len(self.skipped)}: {few(self.skipped)}")
        return "\n".join(lines)


def load_matching(
    target: nn.Module, state: dict[str, Any], strict: bool, report: InitReport, prefix: str = ""
) -> None:
    """Copy tensors of ``state`` into ``target`` by name; shape mismatches error unless not strict."""
    own = target.state_dict()
    to_load = {}
    for name, tensor in state.items():
        if name not in own:
            report.unexpected.append(prefix + name)
            continue
        if tuple(own[name].shape) != tuple(tensor.shape):
            if strict:
                raise ValueError(
                    f"shape mismatch for parameter {prefix + name}: checkpoint {tuple(tensor.shape)} vs "
                    f"model {tuple(own[name].shape)} (set model.init_strict=false to skip mismatched tensors)"
                )
            report.skipped.append(f"{prefix + name} {tuple(tensor.shape)}->{tuple(own[name].shape)}")
            continue
        to_load[name] = tensor
        report.loaded.append(prefix + name)
    report.missing.extend(prefix + n for n in own if n not in state)
    target.load_state_dict(to_load, strict=False)


def _encoder_name_of(config: dict[str, Any]) -> str | None:
    meta = config.get("hybridvision")
    if not meta:
        return None
    build = meta["build"]
    if meta["kind"] == "encoder":
        return build["name"]
    return None


def build_segmenter(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    init: str = "",
    strict: bool = True,
    decoder: str | None = None,
    decoder_kwargs: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
    input_size: tuple[int, int] | None = None,
) -> tuple[Segmenter, InitReport]:
    """Build a segmenter named ``name`` (or the one ``init`` implies) and initialise it from ``init``.

    Args:
        name: segmenter preset or encoder name; may be empty when ``init`` names the architecture.
        num_classes: classes of the new task.
        in_chans: input channels.
        init: source of weights (see module docstring); ``""`` for scratch.
        strict: shape mismatches are errors (True) or skipped and listed (False).
        decoder: decoder name, passed to :func:`create_segmenter`.
        decoder_kwargs: decoder options, passed to :func:`create_segmenter`.
        overrides: encoder options, passed to :func:`create_segmenter`.
        input_size: the training crop (H, W): encoders built at a fixed input size get it as
            ``img_size`` unless ``overrides`` set one.

    Returns:
        The segmenter and what its initialisation loaded.
    """
    spec = _SegmenterSpec(
        name, num_classes, in_chans, strict, decoder, decoder_kwargs, dict(overrides or {}), input_size
    )
    if not init:
        return _segmenter_from_scratch(spec), InitReport()
    if Path(init).is_file():  # timm / torchvision weights for the encoder
        return _segmenter_from_weights_file(spec, init)
    config = read_model_config(init)
    external = external_encoder_name(config)
    if external is not None:  # a released timm / transformers backbone (directory or hub id)
        return _segmenter_from_release(spec, init, *external)
    src_encoder = _encoder_name_of(config)
    if src_encoder is not None:  # an encoder directory: it carries the architecture
        return _segmenter_from_encoder_dir(spec, init, config, src_encoder)
    return _segmenter_from_model_dir(spec, init, config)


@dataclass(frozen=True)
class _SegmenterSpec:
    """The arguments of :func:`build_segmenter` that say what to build (``overrides`` copied)."""

    name: str  #: segmenter preset or encoder name; may be empty
    num_classes: int  #: classes of the new task
    in_chans: int  #: input channels
    strict: bool  #: shape mismatches are errors (True) or skipped and listed (False)
    decoder: str | None  #: passed to :func:`create_segmenter`
    decoder_kwargs: dict[str, Any] | None  #: passed to :func:`create_segmenter`
    overrides: dict[str, Any]  #: passed to :func:`create_segmenter`
    input_size: tuple[int, int] | None  #: the training crop (H, W)

    def create(self, name: str, **overrides: Any) -> Segmenter:
        """:func:`create_segmenter` ``name`` for this task with ``overrides``."""
        return create_segmenter(
            name, self.num_classes, self.in_chans, self.decoder, self.decoder_kwargs, **overrides
        )


def _segmenter_from_scratch(spec: _SegmenterSpec) -> Segmenter:
    """``model.init`` unset: ``spec.name`` with random weights."""
    if not spec.name:
        raise ValueError("model.name is empty and model.init is not set: nothing says which model to build")
    return spec.create(spec.name, **with_input_size(spec.name, spec.input_size, spec.overrides))


def _segmenter_from_weights_file(spec: _SegmenterSpec, init: str) -> tuple[Segmenter, InitReport]:
    """``model.init`` a timm / torchvision weights file, converted into the encoder of ``spec.name``."""
    name = spec.name
    if not name:
        raise ValueError(f"model.init={init} is a weights file: set model.name to the encoder it belongs to")
    model = spec.create(name, **with_input_size(name, spec.input_size, spec.overrides))
    loader = getattr(model.encoder, "load_pretrained_weights", None)
    if loader is None:
        raise ValueError(
            f"model.init={init} is a weights file, but the encoder of {name!r} cannot convert external "
            "weight files (only the timm/torchvision families can); for hybridvision models set "
            "model.init to a directory written by save_pretrained (model.safetensors + config.json)"
        )
    report = InitReport()
    result = _load_external(model.encoder, str(Path(init)), spec.strict)
    if result is None:
        report.source = f"{init} (external weights converted into the encoder)"
        report.loaded = [f"encoder.{n}" for n in model.encoder.state_dict()]
    else:
        _fill_report(report, result, f"{init} (external weights converted into the encoder)")
    return model, report


def _segmenter_from_release(
    spec: _SegmenterSpec, init: str, src_encoder: str, build: dict[str, Any]
) -> tuple[Segmenter, InitReport]:
    """``model.init`` a released timm / transformers backbone: its encoder loaded, a fresh decoder."""
    name = spec.name
    if name and encoder_name(name) != src_encoder:
        raise ValueError(
            f"model.name={name!r} (encoder {encoder_name(name)!r}) conflicts with model.init={init}, "
            f"which holds {src_encoder!r}; drop model.name or make them agree"
        )
    overrides = with_input_size(name or src_encoder, spec.input_size, {**build, **spec.overrides})
    model = spec.create(name or src_encoder, **overrides)
    result = model.encoder.load_pretrained_weights(init, strict=spec.strict)  # type: ignore[operator]  # nn.Module.__getattr__ is typed Tensor | Module
    report = InitReport()
    _fill_report(report, result, f"{init} ({src_encoder} weights)")
    report.missing.extend(f"decoder.{n}" for n in model.decoder.state_dict())
    return model, report


def _segmenter_from_encoder_dir(
    spec: _SegmenterSpec, init: str, config: dict[str, Any], src_encoder: str
) -> tuple[Segmenter, InitReport]:
    """``model.init`` one of our encoder directories (``pretrain/``): its encoder, a fresh decoder."""
    name, in_chans = spec.name, spec.in_chans
    build = dict(config["hybridvision"]["build"])
    src_in = build.pop("in_chans", in_chans)
    build.pop("name")
    if src_in != in_chans:
        raise ValueError(f"{init} was pretrained with in_chans={src_in} but data.in_chans={in_chans}")
    if name and name != src_encoder:
        preset_encoder = _preset_encoder(name)
        if preset_encoder != src_encoder:
            raise ValueError(
                f"model.name={name!r} (encoder {preset_encoder!r}) conflicts with model.init={init}, "
                f"which holds a {src_encoder!r} encoder; drop model.name or make them agree"
            )
    model = spec.create(name or src_encoder, **{**build, **spec.overrides})
    encoder = from_pretrained(init)
    report = InitReport()
    load_matching(model.encoder, encoder.state_dict(), spec.strict, report, prefix="encoder.")
    report.source = f"{init} (encoder {src_encoder})"
    report.missing = [m for m in report.missing if not m.startswith("decoder.")]
    report.missing.extend(f"decoder.{n}" for n in model.decoder.state_dict())
    return model, report


def _segmenter_from_model_dir(
    spec: _SegmenterSpec, init: str, config: dict[str, Any]
) -> tuple[Segmenter, InitReport]:
    """``model.init`` a full model directory (ours or transformers SegFormer) or hub id."""
    loaded = from_pretrained(init)
    report = InitReport(source=init)
    if isinstance(loaded, Segmenter):
        model, state = _segmenter_like(spec, init, loaded)
        head = config.get("extra", {}).get("reconstruction_head")
        if head:  # a pretraining reconstruction layer: the new task's classifier starts fresh
            state = {k: v for k, v in state.items() if not k.startswith(head + ".")}
            report.source = f"{init} (pretrained encoder + decoder; {head} re-initialised for the task)"
        load_matching(model, state, spec.strict, report)
    elif isinstance(loaded, Encoder):
        build = dict(loaded.build_kwargs)
        src_name = build.pop("name")
        build.pop("in_chans", None)
        model = spec.create(spec.name or src_name, **build, **spec.overrides)
        load_matching(model.encoder, loaded.state_dict(), spec.strict, report, prefix="encoder.")
    else:  # pragma: no cover - from_pretrained only returns the two kinds
        raise TypeError(type(loaded))
    return model, report


def _segmenter_like(spec: _SegmenterSpec, init: str, loaded: Segmenter) -> tuple[Segmenter, dict[str, Any]]:
    """A new segmenter built as ``loaded`` (for ``spec``'s task, with its overrides) and ``loaded``'s state."""
    build = dict(loaded.build_kwargs)
    src_name = build.pop("name")
    for key in ("num_classes", "in_chans"):
        build.pop(key, None)
    name = spec.name
    if name and name != src_name and _preset_encoder(name) != _preset_encoder(src_name):
        raise ValueError(f"model.name={name!r} conflicts with model.init={init}, which holds {src_name!r}")
    build.update(spec.overrides)
    dec = build.pop("decoder", None) if spec.decoder is None else spec.decoder
    dkw = build.pop("decoder_kwargs", None) if spec.decoder_kwargs is None else spec.decoder_kwargs
    build.pop("decoder", None)
    build.pop("decoder_kwargs", None)
    model = create_segmenter(src_name, spec.num_classes, spec.in_chans, dec, dkw, **build)
    return model, loaded.state_dict()


def build_encoder(
    name: str,
    in_chans: int = 3,
    init: str = "",
    strict: bool = True,
    overrides: dict[str, Any] | None = None,
    input_size: tuple[int, int] | None = None,
) -> tuple[Encoder, InitReport]:
    """Build an encoder (pretraining's model) and initialise it from ``init``.

    Sources are those of :func:`build_segmenter`; from a segmenter (ours, or SegFormer) only the
    encoder is taken. ``name`` (an encoder or a segmenter preset, whose encoder is used) may be
    empty when ``init`` names the architecture; if both are given they must agree.

    Raises:
        ValueError: a conflict between ``name`` and ``init``, another ``in_chans``, or (strict)
            tensors that do not fit, each naming the source.
    """
    overrides = dict(overrides or {})
    report = InitReport()
    wanted = encoder_name(name) if name else ""

    def fresh(arch: str, build: dict[str, Any]) -> Encoder:
        return create_encoder(arch, in_chans, **with_input_size(arch, input_size, {**build, **overrides}))

    if not init:
        if not wanted:
            raise ValueError(
                "model.name is empty and model.init is not set: nothing says which encoder to build"
            )
        return fresh(wanted, {}), report
    if Path(init).is_file():
        if not wanted:
            raise ValueError(
                f"model.init={init} is a weights file: set model.name to the encoder it belongs to"
            )
        encoder = fresh(wanted, {})
        if getattr(encoder, "load_pretrained_weights", None) is None:
            raise ValueError(
                f"model.init={init} is a weights file, but encoder {wanted!r} cannot convert one"
            )
        result = _load_external(encoder, init, strict)
        if result is None:
            report.source, report.loaded = init, list(encoder.state_dict())
        else:
            _fill_report(report, result, init)
            report.loaded = [n.removeprefix("encoder.") for n in report.loaded]
            report.missing = [n.removeprefix("encoder.") for n in report.missing]
        return encoder, report
    config = read_model_config(init)
    external = external_encoder_name(config)
    if external is not None:
        src, build = external
        if wanted and wanted != src:
            raise ValueError(f"model.name={name!r} conflicts with model.init={init}, which holds {src!r}")
        encoder = fresh(src, build)
        result = encoder.load_pretrained_weights(init, strict=strict)  # type: ignore[operator]  # nn.Module.__getattr__ is typed Tensor | Module
        _fill_report(report, result, f"{init} ({src} weights)")
        report.loaded = [n.removeprefix("encoder.") for n in report.loaded]
        report.missing = [n.removeprefix("encoder.") for n in report.missing]
        return encoder, report
    loaded = from_pretrained(init)
    source_encoder = loaded.encoder if isinstance(loaded, Segmenter) else loaded
    build = dict(source_encoder.build_kwargs)  # type: ignore[arg-type]  # nn.Module.__getattr__ is typed Tensor | Module
    src = build.pop("name")
    src_in = build.pop("in_chans", in_chans)
    if src_in != in_chans:
        raise ValueError(f"{init} holds an encoder for in_chans={src_in} but data.in_chans={in_chans}")
    if wanted and wanted != src:
        raise ValueError(
            f"model.name={name!r} conflicts with model.init={init}, which holds a {src!r} encoder"
        )
    encoder = create_encoder(src, in_chans, **{**build, **overrides})
    load_matching(encoder, source_encoder.state_dict(), strict, report)
    report.source = f"{init} (encoder {src})"
    return encoder, report


def _preset_encoder(name: str) -> str:
    return encoder_name(name)


def _load_external(encoder: nn.Module, path: str, strict: bool) -> Any:
    """Call the encoder's ``load_pretrained_weights``; its result (a ``LoadResult``) or None."""
    loader: Any = encoder.load_pretrained_weights  # a method of the encoder families that convert weights
    if "strict" in inspect.signature(loader).parameters:
        return loader(path, strict=strict)
    loader(path)  # zoo families convert one checkpoint layout, always strictly
    return None


def _fill_report(report: InitReport, result: Any, source: str) -> None:
    report.source = source
    report.loaded = [f"encoder.{n}" for n in result.loaded]
    report.missing = [f"encoder.{n}" for n in result.missing]
    report.unexpected = list(result.unexpected)
    report.skipped = list(result.skipped)

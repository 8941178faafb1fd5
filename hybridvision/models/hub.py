"""``save_pretrained`` / ``from_pretrained``: safetensors weights + ``config.json``.

A model directory holds ``model.safetensors`` and ``config.json``::

    {"hybridvision": {"kind": "encoder" | "segmenter", "build": {...create_* kwargs...},
                      "pruned": {...layer shapes structured pruning changed (pruned models only)...}},
     "extra": {...anything the caller adds: objective, run config...}}

``from_pretrained`` also accepts a directory written by transformers'
``SegformerForSemanticSegmentation.save_pretrained`` / ``SegformerModel.save_pretrained``
(``"model_type": "segformer"``) and converts its weights. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from ..io import atomic_dir
from .base import Encoder, Segmenter
from .prune import PRUNED_ATTRIBUTE, apply_pruned_shapes
from .weights import load_safetensors, load_state_dict_file, resolve_model_dir

__all__ = [
    "save_pretrained",
    "from_pretrained",
    "read_model_config",
    "external_encoder_name",
    "read_run_config",
    "load_state_dict_file",
    "WEIGHTS_NAME",
    "CONFIG_NAME",
]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
FORMAT_KEY = "hybridvision"


def save_pretrained(
    model: nn.Module, directory: str | os.PathLike, extra: dict[str, Any] | None = None
) -> Path:
    """Write ``model`` (an :class:`Encoder` or :class:`Segmenter` built by the factory) atomically.

    Args:
        model: model whose ``build_kwargs`` were set by ``create_encoder`` / ``create_segmenter``.
        directory: output directory; replaced atomically if it exists.
        extra: JSON-serialisable metadata stored under ``"extra"`` (e.g. the resolved run config).
    """
    model = getattr(model, "module", model)  # unwrap DDP
    if isinstance(model, Segmenter):
        kind = "segmenter"
    elif isinstance(model, Encoder):
        kind = "encoder"
    else:
        raise TypeError(f"save_pretrained expects an Encoder or Segmenter, got {type(model).__name__}")
    if not getattr(model, "build_kwargs", None):
        raise ValueError("model has no build_kwargs: build it with create_encoder/create_segmenter")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    config = {FORMAT_KEY: {"kind": kind, "build": model.build_kwargs}, "extra": extra or {}}
    if getattr(model, PRUNED_ATTRIBUTE, None):  # structurally pruned: the factory's shapes no longer hold
        config[FORMAT_KEY]["pruned"] = getattr(model, PRUNED_ATTRIBUTE)
    with atomic_dir(directory) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        with open(tmp / CONFIG_NAME, "w") as fh:
            json.dump(config, fh, indent=2, default=str)
        (tmp / CARD_NAME).write_text(model_card(model, kind, extra or {}))
    return Path(directory)


def model_card(model: nn.Module, kind: str, extra: dict[str, Any]) -> str:
    """The ``README.md`` of a saved model: what it is, what it was trained on, metrics, usage.

    Hugging Face's hub shows it as the model page (the YAML header gives library and tags); the
    full run config stays in ``config.json`` under ``extra.run_config``.
    """
    build: dict[str, Any] = model.build_kwargs  # type: ignore[assignment]  # nn.Module.__getattr__ is typed Tensor | Module
    name = build["name"]
    params = sum(p.numel() for p in model.parameters())
    run = extra.get("run_config") or {}
    data, train = run.get("data") or {}, run.get("train") or {}
    stage = extra.get("stage", "")
    tags = ", ".join(["hybridvision", "image-segmentation"] + ([stage] if stage else []))
    lines = [
        "---",
        "library_name: hybridvision",
        f"tags: [{tags}]",
        "---",
        "",
        f"# {name} ({kind})",
        "",
    ]
    what = f"A hybridvision {kind} `{name}`"
    if kind == "segmenter":
        encoder = model.encoder.build_kwargs.get("name", name)  # type: ignore[union-attr, operator]  # nn.Module.__getattr__ typing
        what += f" (encoder `{encoder}`, {build.get('num_classes')} output channels)"
    lines.append(f"{what}: {params / 1e6:.2f} M parameters, {build.get('in_chans', 3)} input channels.")
    if stage:
        trained = f"Written by the `{stage}` stage"
        if extra.get("objective"):
            trained += f" (objective `{extra['objective']}`)"
        if data:
            trained += f" on `{data.get('source', '?')}` (split `{data.get('split', '?')}`, crop {data.get('image_size')})"
        if train.get("max_steps"):
            trained += f", {train['max_steps']} steps of batch {train.get('batch_size')}"
        init = extra.get("init") or (run.get("model") or {}).get("init")
        trained += f", starting from `{init}`." if init else ", starting from random weights."
        lines += ["", trained]
    metrics = extra.get("metrics") or {}
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if scalars:
        lines += ["", "| metric | value |", "|---|---:|"] + [f"| {k} | {v:.4f} |" for k, v in scalars.items()]
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "from hybridvision.models import from_pretrained",
        'model = from_pretrained("<this folder or owner/name on the Hugging Face hub>")',
        "```",
        "",
        "Fine-tune or distil from it with `model.init=<folder or owner/name>` (`finetune/run.py`,",
        "`pretrain/run.py`) or `teacher=` (`distill/run.py`). Upload this folder with",
        "`hf upload <owner>/<name> <folder>`. The resolved run config is in `config.json`",
        "(`extra.run_config`).",
        "",
    ]
    return "\n".join(lines)


def read_model_config(path_or_id: str | os.PathLike) -> dict[str, Any]:
    """Return the parsed ``config.json`` of a model directory (or hub id)."""
    directory = resolve_model_dir(path_or_id)
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.is_file():
        inner = [d for d in ("model", "encoder", "export") if (directory / d / CONFIG_NAME).is_file()]
        hint = f"; did you mean {directory / inner[0]}?" if inner else ""
        raise FileNotFoundError(f"{cfg_path} not found: {directory} is not a model directory{hint}")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{cfg_path} is not valid JSON: {exc}") from exc


def read_run_config(model: nn.Module | dict[str, Any], section: str | None = None) -> dict[str, Any]:
    """The run config a saved model was trained with (``extra.run_config``), or one of its sections.

    The one reader of recorded configs: ``predict.py``, the exporter and distillation's teacher
    all read the training scale, normalisation and classes through it. Models with no recorded
    run (transformers SegFormer, released backbones) give ``{}``.

    Args:
        model: a model returned by :func:`from_pretrained` (or its ``config.json`` as a dict).
        section: ``"data"``, ``"train"``, ... (None: the whole run config).
    """
    config = model if isinstance(model, dict) else (getattr(model, "pretrained_config", None) or {})
    run = (config.get("extra") or {}).get("run_config") or {}
    return dict(run.get(section) or {}) if section else dict(run)


def external_encoder_name(config: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """(encoder name, build overrides) of a released timm / transformers backbone's ``config.json``.

    timm's hub layout names the ``architecture`` (``timm/<architecture>``, its ``model_args`` as
    overrides); a transformers config names its ``model_type`` (``transformers/<model_type>``, the
    config's architecture fields as ``config``). None for our own format and SegFormer.
    """
    if FORMAT_KEY in config:
        return None
    if isinstance(config.get("architecture"), str):
        args = {
            k: v for k, v in (config.get("model_args") or {}).items() if k not in ("in_chans", "num_classes")
        }
        return f"timm/{config['architecture']}", args
    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type != "segformer":
        from .encoders.hf_backbone import clean_hf_config

        return f"transformers/{model_type}", {"config": clean_hf_config(config)}
    return None


def from_pretrained(path_or_id: str | os.PathLike, map_location: str = "cpu") -> nn.Module:
    """Rebuild a model from a saved directory, a SegFormer or a released backbone.

    Sources: a directory written by :func:`save_pretrained`, a transformers SegFormer, or a released
    timm / transformers backbone (returned as an encoder).

    Args:
        path_or_id: local directory or Hugging Face hub id.
        map_location: device for the loaded tensors.
    """
    from .factory import create_encoder, create_segmenter

    directory = resolve_model_dir(path_or_id)
    config = read_model_config(directory)
    external = external_encoder_name(config)
    if external is not None:  # a released timm / transformers backbone: its encoder, weights loaded
        name, build = external
        return create_encoder(name, weights=str(directory), **build)
    if FORMAT_KEY not in config:
        if config.get("model_type") == "segformer":
            from .convert_hf import load_transformers_segformer

            return load_transformers_segformer(directory)
        raise ValueError(
            f"{directory / CONFIG_NAME} is neither a hybridvision model config (no {FORMAT_KEY!r} key) "
            f"nor a transformers SegFormer config (model_type={config.get('model_type')!r})"
        )
    meta = config[FORMAT_KEY]
    if not isinstance(meta, dict) or not isinstance(meta.get("build"), dict) or "name" not in meta["build"]:
        raise ValueError(
            f"{directory / CONFIG_NAME}: the {FORMAT_KEY!r} entry lacks 'kind'/'build.name'; "
            "the file is damaged or was not written by save_pretrained"
        )
    build = dict(meta["build"])
    name = build.pop("name")
    if meta["kind"] == "segmenter":
        model: Segmenter | Encoder = create_segmenter(name, **build)
    elif meta["kind"] == "encoder":
        model = create_encoder(name, **build)
    else:
        raise ValueError(f"{directory / CONFIG_NAME}: unknown kind {meta['kind']!r}")
    if meta.get("pruned"):  # structurally pruned: re-shape the pruned layers before loading
        apply_pruned_shapes(model, meta["pruned"])
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found")
    state = load_safetensors(weights, device=map_location)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{weights} does not match {name!r}: missing keys {missing[:8]}, unexpected keys {unexpected[:8]}"
        )
    model.pretrained_config = config  # type: ignore[assignment]  # a plain attribute; nn.Module.__setattr__ typing
    return model

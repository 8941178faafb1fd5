"""``save_pretrained`` / ``from_pretrained``: safetensors weights + ``config.json``.

A model directory holds ``model.safetensors`` and ``config.json``::

    {"hybridvision": {"kind": "encoder" | "segmenter", "build": {...create_* kwargs...}},
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

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..io import atomic_dir
from .base import Encoder, Segmenter

__all__ = [
    "save_pretrained",
    "from_pretrained",
    "read_model_config",
    "load_state_dict_file",
    "WEIGHTS_NAME",
    "CONFIG_NAME",
]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
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
    with atomic_dir(directory) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        with open(tmp / CONFIG_NAME, "w") as fh:
            json.dump(config, fh, indent=2, default=str)
    return Path(directory)


def _resolve(path_or_id: str | os.PathLike) -> Path:
    path = Path(path_or_id)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; from_pretrained expects a model directory or a hub id")
    text = str(path_or_id)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise FileNotFoundError(
            f"model directory {text!r} does not exist (and it is not a hub id 'owner/name')"
        )
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(text, allow_patterns=["*.json", "*.safetensors"]))


def read_model_config(path_or_id: str | os.PathLike) -> dict[str, Any]:
    """Return the parsed ``config.json`` of a model directory (or hub id)."""
    directory = _resolve(path_or_id)
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: not a model directory")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{cfg_path} is not valid JSON: {exc}") from exc


def from_pretrained(path_or_id: str | os.PathLike, map_location: str = "cpu") -> nn.Module:
    """Rebuild a model from a directory written by :func:`save_pretrained` (or transformers SegFormer).

    Args:
        path_or_id: local directory or Hugging Face hub id.
        map_location: device for the loaded tensors.
    """
    from .factory import create_encoder, create_segmenter

    directory = _resolve(path_or_id)
    config = read_model_config(directory)
    if FORMAT_KEY not in config:
        if config.get("model_type") == "segformer":
            from .convert_hf import load_transformers_segformer

            return load_transformers_segformer(directory)
        raise ValueError(
            f"{directory / CONFIG_NAME} is neither a hybridvision model config (no {FORMAT_KEY!r} key) "
            f"nor a transformers SegFormer config (model_type={config.get('model_type')!r})"
        )
    meta = config[FORMAT_KEY]
    build = dict(meta["build"])
    name = build.pop("name")
    if meta["kind"] == "segmenter":
        model = create_segmenter(name, **build)
    elif meta["kind"] == "encoder":
        model = create_encoder(name, **build)
    else:
        raise ValueError(f"{directory / CONFIG_NAME}: unknown kind {meta['kind']!r}")
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found")
    state = load_file(str(weights), device=map_location)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{weights} does not match {name!r}: missing keys {missing[:8]}, unexpected keys {unexpected[:8]}"
        )
    model.pretrained_config = config
    return model


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a state dict from ``.safetensors`` or a torch file, without unpickling objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state

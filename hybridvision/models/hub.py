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
    """A local model directory, or a hub id ``owner/name`` downloaded (or taken from the cache).

    A missing path that cannot be a hub id (starts with ``.``, ``/`` or ``~``, not exactly one
    ``/``, or whose ``owner`` is a local folder) is a ``FileNotFoundError`` at once; a hub id while
    offline is a one-line ``ValueError`` instead of the hub client's retries.
    """
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; from_pretrained expects a model directory or a hub id")
    text = str(path_or_id)
    owner = text.split("/")[0]
    if text.startswith((".", "/", "~")) or "\\" in text or text.count("/") != 1 or Path(owner).is_dir():
        raise FileNotFoundError(
            f"model directory {text!r} does not exist (and it is not a hub id 'owner/name')"
        )
    from huggingface_hub import snapshot_download

    from ..data.hf import hub_offline_reason

    offline = hub_offline_reason()
    try:
        return Path(snapshot_download(text, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as err:  # huggingface_hub raises several types (HTTP, offline, not found)
        if offline:
            raise ValueError(
                f"{text!r} is not a local model directory, and as a hub id it is not in the local cache "
                f"and cannot be downloaded ({offline}); check the path"
            ) from err
        raise ValueError(
            f"{text!r} is not a local model directory and the hub download failed: {err}"
        ) from err


def _load_safetensors(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` with a one-line error naming a truncated or corrupt file."""
    from safetensors import SafetensorError

    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError) as err:
        size = path.stat().st_size if path.exists() else 0
        raise ValueError(
            f"{path} ({size} bytes) is not a readable safetensors file ({err}): it is truncated or "
            "corrupt, e.g. an interrupted copy, download or save; copy it again or re-export the model"
        ) from err


def read_model_config(path_or_id: str | os.PathLike) -> dict[str, Any]:
    """Return the parsed ``config.json`` of a model directory (or hub id)."""
    directory = _resolve(path_or_id)
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.is_file():
        inner = [d for d in ("model", "encoder", "export") if (directory / d / CONFIG_NAME).is_file()]
        hint = f"; did you mean {directory / inner[0]}?" if inner else ""
        raise FileNotFoundError(f"{cfg_path} not found: {directory} is not a model directory{hint}")
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
    if not isinstance(meta, dict) or not isinstance(meta.get("build"), dict) or "name" not in meta["build"]:
        raise ValueError(
            f"{directory / CONFIG_NAME}: the {FORMAT_KEY!r} entry lacks 'kind'/'build.name'; "
            "the file is damaged or was not written by save_pretrained"
        )
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
    state = _load_safetensors(weights, device=map_location)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{weights} does not match {name!r}: missing keys {missing[:8]}, unexpected keys {unexpected[:8]}"
        )
    model.pretrained_config = config
    return model


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a state dict from ``.safetensors`` or a torch file, without unpickling objects.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: One line naming the file: truncated/corrupt, or a pickle holding Python objects
            (never loaded; the message says how to convert a trusted one to safetensors).
    """
    import pickle

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        out = path.with_suffix(".safetensors")
        raise ValueError(
            f"{path} is a pickle holding Python objects, not only tensors; hybridvision does not unpickle "
            'files (that can run arbitrary code). If you trust it, convert it once: python -c "import '
            "torch; from safetensors.torch import save_file; s = torch.load('"
            f"{path}', weights_only=False); s = s.get('state_dict', s) if isinstance(s, dict) else "
            f"s.state_dict(); save_file({{k: v.contiguous() for k, v in s.items()}}, '{out}')\" and use {out}"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(
            f"{path} ({path.stat().st_size} bytes) cannot be read as a torch weights file ({err}); "
            "it is truncated or corrupt: copy it again"
        ) from err
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict (name -> tensor)")
    return state

"""Reading weights: model directories and hub ids, safetensors and torch files, never unpickling.

One home for what every family's ``load_pretrained_weights`` and :mod:`.hub` need, so that model
families import weights I/O without importing the hub module (and the hub module no family).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

__all__ = ["resolve_model_dir", "load_safetensors", "load_state_dict_file", "read_weights", "fit_tensors"]

#: weight files looked for in a model directory, in order of preference
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")


def resolve_model_dir(path_or_id: str | os.PathLike) -> Path:
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

    from ..hub_access import hub_offline_reason

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


def load_safetensors(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
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
        return load_safetensors(path)
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


def read_weights(source: str | os.PathLike) -> tuple[Path, dict[str, torch.Tensor]]:
    """The state dict held by a weights file, a model directory or a hub id, and the file read.

    Args:
        source: a ``.safetensors`` / ``.pth`` / ``.bin`` file; a directory holding one of
            ``model.safetensors``, ``pytorch_model.bin``, ... (timm's and transformers' hub layouts);
            or a hub id ``owner/name`` (taken from the local cache when offline).

    Raises:
        FileNotFoundError / ValueError: one line naming the source and what is wrong.
    """
    path = Path(source).expanduser()
    if path.is_file():
        return path, load_state_dict_file(path)
    directory = resolve_model_dir(source)
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name, load_state_dict_file(directory / name)
    raise FileNotFoundError(f"{directory} holds no weights file (looked for {', '.join(WEIGHT_FILES)})")


def fit_tensors(
    own: dict[str, torch.Tensor],
    state: dict[str, torch.Tensor],
    strict: bool,
    source: str,
    model_name: str,
    adapt_input: Callable[[str, torch.Tensor, torch.Size], torch.Tensor | None],
    hint: str = "",
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Match a checkpoint's tensors (already renamed to ``own``'s keys) to a model's state dict.

    Args:
        own: the model's state dict.
        state: checkpoint tensors under ``own``'s names (names ``own`` lacks must be removed first).
        strict: a shape mismatch is an error (True) or is skipped and listed (False).
        source: the checkpoint, for messages.
        model_name: the model, for messages.
        adapt_input: ``(key, tensor, wanted_shape) -> tensor | None``: the tensor adapted to the
            model's input channels when it is an input convolution, else None.
        hint: appended to the shape-mismatch message.

    Returns:
        (tensors to load, skipped ``"key (shape)->(shape)"`` entries, missing model keys).

    Raises:
        ValueError: one line naming the tensor and both shapes (strict), or no tensor fits at all.
    """
    mapped: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for key, tensor in state.items():
        want = own[key].shape
        if tensor.ndim == 4 and len(want) == 4 and tensor.shape[1] != want[1] and tensor.shape[0] == want[0]:
            adapted = adapt_input(key, tensor, want)
            tensor = tensor if adapted is None else adapted
        if tuple(tensor.shape) != tuple(want):
            if strict:
                raise ValueError(
                    f"{source}: tensor {key} has shape {tuple(tensor.shape)} but {model_name} expects "
                    f"{tuple(want)}{hint}; set model.init_strict=false to keep such tensors at random init"
                )
            skipped.append(f"{key} {tuple(tensor.shape)}->{tuple(want)}")
            continue
        mapped[key] = tensor
    if not mapped:
        raise ValueError(
            f"{source}: no tensor fits {model_name} (first keys: {list(state)[:4]}); is it another architecture?"
        )
    return mapped, skipped, [k for k in own if k not in mapped]

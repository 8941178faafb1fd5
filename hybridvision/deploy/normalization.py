"""Input normalisation of the deployed models: what a run used, as data, and applying it in NumPy.

:func:`normalization_spec` turns a run config's ``data`` section into the plain-data record the
exported model's metadata holds; :func:`normalize_image` applies that record to one image, as
``build_seg_transforms`` did in training. NumPy only (no ``torch``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import UserError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "normalization_spec", "normalize_image"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalization_spec(data_cfg: dict[str, Any] | None, in_chans: int) -> dict[str, Any]:
    """The input normalisation a run used, as plain data (what the ONNX metadata records).

    Mirrors ``build_seg_transforms``: ``data.window`` first, then explicit ``data.mean``/``data.std``
    when set, else ``data.normalize`` (``imagenet`` for 1 or 3 channels, ``per_image``, ``none``).

    Args:
        data_cfg: the run config's ``data`` section as a dict (None: ImageNet defaults).
        in_chans: model input channels.

    Returns:
        ``{"kind": "mean_std" | "per_image" | "none", "mean": [...], "std": [...], "window": [c, w] | None}``.
    """
    data = data_cfg or {}
    window = data.get("window")
    spec: dict[str, Any] = {"window": [float(v) for v in window] if window else None}
    mean, std = data.get("mean") or [], data.get("std") or []
    kind = data.get("normalize", "imagenet")
    if not isinstance(kind, str):  # an explicit (mean, std) pair, as build_seg_transforms accepts
        mean, std = kind
        kind = "mean_std"
    if mean or std:
        if len(mean) != in_chans or len(std) != in_chans:
            raise UserError(
                f"data.mean/data.std have {len(mean)}/{len(std)} values but in_chans={in_chans}; give one per channel"
            )
        return {**spec, "kind": "mean_std", "mean": [float(v) for v in mean], "std": [float(v) for v in std]}
    if kind == "imagenet":
        if in_chans == 3:
            return {**spec, "kind": "mean_std", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
        if in_chans == 1:  # channel average, as build_seg_transforms
            return {
                **spec,
                "kind": "mean_std",
                "mean": [sum(IMAGENET_MEAN) / 3],
                "std": [sum(IMAGENET_STD) / 3],
            }
        raise UserError(
            f"data.normalize='imagenet' needs in_chans 1 or 3, got {in_chans}; set data.mean/data.std"
        )
    if kind in ("per_image", "none"):
        return {**spec, "kind": kind}
    raise UserError(f"data.normalize must be imagenet, per_image or none, got {kind!r}")


def normalize_image(image: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """Apply a :func:`normalization_spec` to one image (C, H, W) float32; returns (C, H, W) float32."""
    x = image.astype(np.float32, copy=False)
    if spec.get("window"):
        center, width = spec["window"]
        low = np.float32(center - width / 2.0)
        x = np.clip((x - low) / np.float32(width), 0.0, 1.0)
    kind = spec["kind"]
    if kind == "mean_std":
        mean = np.asarray(spec["mean"], dtype=np.float32)[:, None, None]
        std = np.asarray(spec["std"], dtype=np.float32)[:, None, None]
        x = (x - mean) / std
    elif kind == "per_image":
        mean = x.mean(axis=(-2, -1), keepdims=True, dtype=np.float64).astype(np.float32)
        std = x.std(axis=(-2, -1), keepdims=True, dtype=np.float64).astype(np.float32)
        x = (x - mean) / (std + np.float32(1e-6))
    elif kind != "none":
        raise UserError(f"unknown normalisation kind {kind!r} in the model metadata")
    return np.ascontiguousarray(x, dtype=np.float32)

"""Predicting a set of files: which inputs, what each output is called, and the loop that writes them.

Shared by :class:`hybridvision.deploy.runtime.OnnxPredictor` and the PyTorch path of
``finetune/predict.py`` (through :mod:`hybridvision.deploy.cli`): each input image gives
``<id>_mask.png`` and ``<id>_overlay.png``; an unreadable image is reported and skipped.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import UserError
from .reader import IMAGE_EXTENSIONS, list_images
from .visual import overlay, save_mask

__all__ = ["PredictResult", "output_stems", "resolve_inputs", "run_over_files"]


def output_stems(files: Sequence[Path], root: Path | None) -> dict[Path, Path]:
    """Output name (without ``_mask.png``) of each input; distinct inputs never share one.

    The name is the path relative to ``root`` (a folder input) without its suffix; where two inputs
    would get the same name (``x.png`` and ``x.jpg``; case-insensitively, for case-insensitive
    filesystems) both keep their extension (``x_png``, ``x_jpg``).

    Raises:
        UserError: if names still clash after that (e.g. ``x.png``, ``x.jpg`` and ``x_jpg.png``).
    """
    rel = {f: (f.relative_to(root) if root is not None else Path(f.name)) for f in files}
    plain = {f: r.with_suffix("") for f, r in rel.items()}
    counts: dict[str, int] = {}
    for stem in plain.values():
        counts[str(stem).lower()] = counts.get(str(stem).lower(), 0) + 1
    stems = {
        f: (
            stem.with_name(f"{stem.name}_{rel[f].suffix.lstrip('.')}")
            if counts[str(stem).lower()] > 1
            else stem
        )
        for f, stem in plain.items()
    }
    seen: dict[str, Path] = {}
    for f, stem in stems.items():
        key = str(stem).lower()
        if key in seen:
            raise UserError(
                f"inputs {seen[key]} and {f} would both write {stem}_mask.png; rename one of them"
            )
        seen[key] = f
    return stems


@dataclass
class PredictResult:
    """What a prediction run did: files written and files that failed (with the reason)."""

    written: list[Path]
    failed: list[tuple[Path, str]]


def resolve_inputs(src: Path) -> tuple[list[Path], Path | None]:
    """Files to predict and the root their output names are relative to (None for one file)."""
    if src.is_dir():
        files = list_images(src)
        if not files:
            raise UserError(f"no image ({', '.join(IMAGE_EXTENSIONS)}) found under --input {src}")
        return files, src
    if src.is_file():
        return [src], None
    raise UserError(f"--input {src} does not exist")


def run_over_files(
    files: Sequence[Path],
    root: Path | None,
    output: Path,
    read: Callable[[Path], np.ndarray],
    predict: Callable[[np.ndarray], np.ndarray],
    num_classes: int,
    ignore_index: int,
    progress: Callable[[Sequence[Path]], Iterable[Path]] = lambda it: it,
) -> PredictResult:
    """The loop shared by both predictors: an unreadable image is reported and skipped, never fatal.

    Args:
        files: the input images.
        root: the folder ``files`` were found in (outputs keep their relative paths), or None.
        output: folder the ``<name>_mask.png`` and ``<name>_overlay.png`` files are written to.
        read: path -> raw image (C, H, W) float32; raises ``OSError``/``ValueError`` if unreadable.
        predict: raw image -> labels (H, W).
        num_classes: K, for the mask palette.
        ignore_index: label left uncoloured in the overlay.
        progress: wraps the file iterator (e.g. a progress bar).

    Returns:
        The written masks and the skipped files with their reasons.
    """
    stems = output_stems(files, root)  # raises before anything is written
    output.mkdir(parents=True, exist_ok=True)
    result = PredictResult([], [])
    for path in progress(files):
        try:
            image = read(path)
        except (OSError, ValueError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            sys.stderr.write(f"warning: skipped {path}: {reason}\n")
            result.failed.append((path, reason))
            continue
        labels = np.asarray(predict(image))
        target = output / stems[path]
        target.parent.mkdir(parents=True, exist_ok=True)
        save_mask(labels, f"{target}_mask.png", num_classes)
        Image.fromarray(overlay(np.asarray(image), labels, ignore_index=ignore_index)).save(
            f"{target}_overlay.png"
        )
        result.written.append(Path(f"{target}_mask.png"))
    return result

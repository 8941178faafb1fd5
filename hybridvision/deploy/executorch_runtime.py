"""Segmentation with an ExecuTorch program (``model.pte``, XNNPACK), behind the predictor's interface.

:class:`ExecuTorchSegmenter` is the ExecuTorch counterpart of
:class:`~hybridvision.deploy.runtime.OnnxSegmenter`: the same ``__call__(images) -> logits`` and
metadata attributes, so :class:`~hybridvision.deploy.runtime.OnnxPredictor` (scale, windows,
blending, TTA, files) runs it. A ``.pte`` file holds no free-form metadata, so the ONNX file's
metadata lies beside it as JSON (:func:`metadata_path`: ``model.pte.json``), written by
:func:`hybridvision.export.export_executorch` with an ``executorch`` entry describing the inputs
the program takes (:func:`program_input_size`).

The program takes one image at a time, sized a multiple of the size divisor up to a largest size
(XNNPACK plans its memory for that bound), or exactly the fixed ``input_size``; the segmenter pads
each image with zeros at the bottom/right to that size, as the model pads its input itself, runs
it and crops the logits back, so the logits equal the model's at the image's own size.

PyTorch: nothing here imports ``torch`` at import time, but running a ``.pte`` from Python does.
ExecuTorch's Python runtime (the ``executorch`` wheel's extension) links libtorch and takes and
returns ``torch.Tensor`` only (numpy arrays are refused), so :func:`import_executorch` imports
``torch`` as the tensor container; no PyTorch operator runs. The extension is imported directly
rather than through ``executorch.runtime``, which also imports the ExecuTorch compiler
(``executorch.exir``, torchao: ~3 s and ~200 MiB more per process). On a device without Python,
the same ``.pte`` and its JSON run in ExecuTorch's C++ runtime.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError

__all__ = [
    "EXECUTORCH_EXTRA",
    "ExecuTorchSegmenter",
    "import_executorch",
    "metadata_path",
    "program_input_size",
    "read_pte_metadata",
]

#: what to install for ExecuTorch models (also in the error when it is missing)
EXECUTORCH_EXTRA = 'pip install -e ".[executorch]"'


def import_executorch() -> tuple[Any, Any]:
    """``(torch, extension)``: ExecuTorch's runtime extension and the tensor type it takes.

    Raises:
        UserError: executorch or torch is missing (one line naming what to install), or the
            extension does not load.
    """
    try:
        import executorch  # noqa: F401  (a namespace package: present iff the wheel is installed)
    except ImportError as exc:
        raise UserError(f"ExecuTorch models (.pte) need executorch: {EXECUTORCH_EXTRA}") from exc
    try:
        import torch
    except ImportError as exc:
        raise UserError(
            "ExecuTorch models (.pte) run from Python on PyTorch tensors (the executorch wheel links "
            "libtorch): install torch, or run the .pte in ExecuTorch's C++ runtime"
        ) from exc
    try:
        from executorch.extension.pybindings import _C as extension
    except ImportError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load ExecuTorch's runtime ({first[:200]}); {EXECUTORCH_EXTRA}") from exc
    return torch, extension


def metadata_path(path: str | os.PathLike) -> Path:
    """``model.pte`` -> ``model.pte.json``: the deployment metadata beside an ExecuTorch program."""
    return Path(f"{os.fspath(path)}.json")


def read_pte_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The deployment metadata of an ExecuTorch program (its ``.pte.json``).

    Raises:
        UserError: the ``.pte`` or its JSON is missing or unreadable.
    """
    pte, meta = Path(path), metadata_path(path)
    if not pte.is_file():
        raise UserError(f"ExecuTorch model {pte} not found")
    if not meta.is_file():
        raise UserError(
            f"ExecuTorch model {pte} has no metadata file {meta.name} beside it: export it with distill/export.py"
        )
    try:
        metadata = json.loads(meta.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {meta} ({exc}); export the model again") from exc
    if not isinstance(metadata, dict) or "executorch" not in metadata:
        raise UserError(f"{meta} is no hybridvision ExecuTorch metadata: export the model again")
    return metadata


def program_input_size(metadata: dict[str, Any], height: int, width: int) -> tuple[int, int]:
    """The (H, W) the program is run at for an image of ``height`` x ``width``.

    The fixed ``input_size`` if the metadata has one, else the image's size rounded up to the
    ``executorch.size_multiple``.

    Raises:
        UserError: the image is larger than the program takes (the fixed size, or
            ``executorch.max_input_size``).
    """
    fixed = metadata.get("input_size")
    if fixed:
        size = (int(fixed[0]), int(fixed[1]))
        largest = size
    else:
        spec = metadata["executorch"]
        step = int(spec["size_multiple"])
        size = (math.ceil(height / step) * step, math.ceil(width / step) * step)
        largest = (int(spec["max_input_size"][0]), int(spec["max_input_size"][1]))
    if height > largest[0] or width > largest[1]:
        raise UserError(
            f"the ExecuTorch model takes inputs of at most {largest[0]}x{largest[1]}, got {height}x{width}: "
            "predict with sliding windows (--mode slide) or export with a larger max size"
        )
    return size


class ExecuTorchSegmenter:
    """An ExecuTorch program as a callable ``(N, C, H, W) float32 -> logits (N, K, H, W)`` on the CPU.

    Args:
        path: ``model.pte`` written by :func:`hybridvision.export.export_executorch` (its
            ``model.pte.json`` beside it).
        threads: XNNPACK threads (None: ExecuTorch's default, every core). ExecuTorch has one
            thread pool per process: this sets it for every program in the process.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        self._torch, extension = import_executorch()  # first: a missing runtime whatever the file
        self.path = Path(path)
        self.metadata = read_pte_metadata(self.path)
        self.in_chans = int(self.metadata["in_chans"])
        self.num_classes = int(self.metadata["num_classes"])
        if threads:
            extension._unsafe_reset_threadpool(int(threads))  # "unsafe": while no program runs
        try:
            self.method = extension._load_program(str(self.path)).load_method("forward")
        except RuntimeError as exc:  # a corrupt file, or a backend that rejects the program
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(
                f"cannot load ExecuTorch model {self.path} ({first[:200]}); export it again"
            ) from exc

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Logits ``(N, num_classes, H, W)`` of normalised images ``(N, in_chans, H, W)``, as float32.

        Each image is padded (zeros, bottom/right) to :func:`program_input_size`, run alone, and its
        logits cropped back to (H, W).
        """
        if images.ndim != 4 or images.shape[1] != self.in_chans:
            raise ValueError(f"expected (N, {self.in_chans}, H, W) images, got shape {images.shape}")
        height, width = images.shape[-2:]
        size = program_input_size(self.metadata, height, width)
        pad = ((0, 0), (0, size[0] - height), (0, size[1] - width))
        out = []
        for image in np.asarray(images, dtype=np.float32):
            x = np.pad(image, pad)[None]  # (1, C, h, w), zeros: as the Segmenter pads its input
            logits = self.method([self._torch.from_numpy(x)])[0]  # (1, K, h, w) torch.Tensor
            out.append(logits.numpy()[0, :, :height, :width])
        return np.stack(out)

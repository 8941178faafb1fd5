"""PyTorch-free segmentation with an OpenVINO IR (``model.xml`` + ``model.bin``).

:class:`OpenVinoSegmenter` is the OpenVINO counterpart of
:class:`~hybridvision.deploy.runtime.OnnxSegmenter`: the same ``__call__(images) -> logits`` and
metadata attributes, so :class:`~hybridvision.deploy.runtime.OnnxPredictor` (scale, windows,
blending, TTA, files) runs either. The IR carries the ONNX file's metadata as JSON in its
``rt_info`` under :data:`~hybridvision.deploy.runtime.METADATA_KEY` (written by
:func:`hybridvision.export.export_openvino`).

OpenVINO runs bf16 on CPUs with bf16 support (AMX, AVX-512 BF16) unless told otherwise; the
segmenter asks for ``INFERENCE_PRECISION_HINT=f32`` unless ``bf16=True``.

Nothing here imports ``torch``; a missing ``openvino`` is a one-line :class:`UserError` naming the
extra to install.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError
from .runtime import METADATA_KEY

__all__ = [
    "OPENVINO_EXTRA",
    "OpenVinoSegmenter",
    "bf16_supported",
    "import_openvino",
    "ir_files",
    "read_ir",
    "read_ir_metadata",
]

#: what to install for OpenVINO models (also in the error when it is missing)
OPENVINO_EXTRA = 'pip install -e ".[openvino]"'


def import_openvino() -> Any:
    """The ``openvino`` module, or a one-line :class:`UserError` naming the extra to install."""
    try:
        import openvino
    except ImportError as exc:
        raise UserError(f"OpenVINO models (.xml) need openvino: {OPENVINO_EXTRA}") from exc
    return openvino


def bf16_supported() -> bool:
    """Whether OpenVINO can run bf16 on this CPU (AVX-512 BF16 or AMX); False without openvino."""
    try:
        import openvino as ov
    except ImportError:
        return False
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def ir_files(path: str | os.PathLike) -> tuple[Path, Path]:
    """``model.xml`` -> (``model.xml``, ``model.bin``): the two files of an IR."""
    xml = Path(path)
    return xml, xml.with_suffix(".bin")


def read_ir(path: Path) -> Any:
    """The ``openvino.Model`` of ``model.xml`` (weights from ``model.bin``); one-line UserErrors."""
    ov = import_openvino()
    xml, weights = ir_files(path)
    if not xml.is_file():
        raise UserError(f"OpenVINO model {xml} not found")
    if not weights.is_file():
        raise UserError(f"OpenVINO model {xml} has no weights file {weights.name} beside it")
    try:
        return ov.Core().read_model(str(xml), str(weights))
    except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own for corrupt files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load OpenVINO model {xml} ({first[:200]}); export it again") from exc


def read_ir_metadata(model: str | os.PathLike | Any) -> dict[str, Any]:
    """The deployment metadata of an OpenVINO IR (path of the ``.xml`` or ``openvino.Model``)."""
    if isinstance(model, (str, os.PathLike)):
        model = read_ir(Path(model))
    if not model.has_rt_info(METADATA_KEY):
        raise UserError("the OpenVINO model has no hybridvision metadata: export it with distill/export.py")
    return json.loads(model.get_rt_info(METADATA_KEY).astype(str))


class OpenVinoSegmenter:
    """An OpenVINO IR as a callable ``(N, C, H, W) float32 -> logits (N, K, H, W)`` on the CPU.

    Args:
        path: ``model.xml`` written by :func:`hybridvision.export.export_openvino` (``model.bin``
            beside it).
        threads: inference threads (None: OpenVINO's default, every core).
        bf16: run in bf16 where the CPU supports it (``INFERENCE_PRECISION_HINT=bf16``); False
            pins fp32, which OpenVINO otherwise silently drops on AMX / AVX-512 BF16 CPUs.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None, bf16: bool = False) -> None:
        ov = import_openvino()
        self.path = Path(path)
        model = read_ir(self.path)
        self.metadata = read_ir_metadata(model)
        self.in_chans = int(self.metadata["in_chans"])
        self.num_classes = int(self.metadata["num_classes"])
        self.bf16 = bf16
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32",
            "PERFORMANCE_HINT": "LATENCY",
        }
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        if bf16 and not bf16_supported():
            raise UserError(f"this CPU has no bf16 support for OpenVINO; run {self.path.name} without --bf16")
        self.compiled = ov.Core().compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Logits ``(N, num_classes, H, W)`` of normalised images ``(N, in_chans, H, W)``, as float32."""
        if images.ndim != 4 or images.shape[1] != self.in_chans:
            raise ValueError(f"expected (N, {self.in_chans}, H, W) images, got shape {images.shape}")
        self.request.infer([np.ascontiguousarray(images, dtype=np.float32)])
        return np.array(self.request.get_output_tensor(0).data)  # a copy: the request reuses its buffer

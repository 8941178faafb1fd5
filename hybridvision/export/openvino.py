"""OpenVINO export: an IR converted from the exported ONNX file, and int8 with NNCF.

* :func:`export_openvino`: ``openvino.convert_model`` of ``model.onnx`` saved with
  ``openvino.save_model`` as ``model.xml`` + ``model.bin`` (fp32 weights: no fp16 compression),
  carrying the ONNX file's metadata (classes, normalisation, scale, training crop, fixed input
  size) as JSON in the IR's ``rt_info``; checked against onnxruntime on the ONNX file at the
  training crop and at a size that is not a multiple of the size divisor.
* :func:`quantize_openvino_int8`: NNCF post-training quantization (``nncf.quantize``) calibrated on
  what the deployed model sees (:func:`~hybridvision.export.quantize.deployment_inputs`, the
  same inputs as the onnxruntime int8 model); the classifier and what follows it to the output
  stay in float (:func:`ir_head_nodes` as NNCF's ``ignored_scope``), attention models use
  ``ModelType.TRANSFORMER`` (LayerNorm, Softmax and the activation MatMuls' inputs in float).

Both write to ``rt_info`` what :func:`hybridvision.deploy.openvino_runtime.read_ir_metadata`
reads; :class:`~hybridvision.deploy.openvino_runtime.OpenVinoSegmenter` runs them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..deploy.openvino_runtime import OPENVINO_EXTRA, OpenVinoSegmenter, import_openvino, ir_files, read_ir
from ..deploy.runtime import METADATA_KEY, OnnxSegmenter, read_metadata
from .onnx import ExportError, check_size

__all__ = [
    "export_openvino",
    "ir_has_attention",
    "ir_head_nodes",
    "openvino_path",
    "quantize_openvino_int8",
]

#: OpenVINO op types with weights: where :func:`ir_head_nodes` stops walking back from the output
_WEIGHTED_TYPES = ("Convolution", "GroupConvolution", "ConvolutionBackpropData", "MatMul")
#: op types that make a graph an attention model for NNCF (``MVN``: LayerNorm as converted from ONNX)
_ATTENTION_TYPES = ("Softmax", "MVN")


def openvino_path(onnx_path: str | os.PathLike) -> Path:
    """``model.onnx`` -> ``model.xml``, ``model.int8.onnx`` -> ``model.int8.xml``."""
    return Path(onnx_path).with_suffix(".xml")


def _save(model: Any, xml: Path, metadata: dict[str, Any]) -> Path:
    """Write ``model`` with ``metadata`` in its rt_info, atomically (both files of the IR)."""
    ov = import_openvino()
    model.set_rt_info(json.dumps(metadata), METADATA_KEY)
    xml.parent.mkdir(parents=True, exist_ok=True)
    tmp = xml.with_name(f".{xml.stem}.tmp-{os.getpid()}.xml")
    tmp_xml, tmp_bin = ir_files(tmp)
    try:
        ov.save_model(model, str(tmp_xml), compress_to_fp16=False)
        os.replace(tmp_bin, ir_files(xml)[1])  # weights first: the .xml names a complete model
        os.replace(tmp_xml, xml)
    finally:
        for f in (tmp_xml, tmp_bin):
            if f.exists():
                f.unlink()
    return xml


def export_openvino(
    onnx_path: str | os.PathLike,
    out_path: str | os.PathLike | None = None,
    *,
    verify: bool = True,
    atol: float = 1e-3,
) -> Path:
    """Convert an exported ONNX model to an OpenVINO IR with the same metadata.

    Args:
        onnx_path: ``model.onnx`` written by :func:`~hybridvision.export.export_onnx` (fp32).
        out_path: the ``.xml`` (``.bin`` beside it); default: ``onnx_path`` with ``.xml``.
        verify: compare the IR (fp32 inference precision) with onnxruntime on the ONNX file, batch
            2, at the training crop and at a size that is not a multiple of the size divisor (the
            fixed input size only, for a model that has one).
        atol: largest accepted max abs difference of logits for ``verify``.

    Returns:
        The ``.xml`` path.

    Raises:
        UserError: OpenVINO is not installed (the message names the extra).
        ExportError: the conversion failed or the IR disagrees with onnxruntime.
    """
    ov = import_openvino()
    onnx_path = Path(onnx_path)
    xml = Path(out_path) if out_path is not None else openvino_path(onnx_path)
    if xml.suffix.lower() != ".xml":
        raise ValueError(f"an OpenVINO model is a .xml file, got {xml}")
    metadata = read_metadata(onnx_path)
    try:
        model = ov.convert_model(str(onnx_path))
    except Exception as exc:  # OpenVINO's frontends raise their own types
        raise ExportError(f"{onnx_path}: openvino.convert_model failed: {str(exc).strip()[:300]}") from exc
    _save(model, xml, metadata)
    if verify:
        fixed = metadata.get("input_size")
        crop = tuple(fixed or metadata["train_crop"])
        sizes = [crop] if fixed else [crop, check_size(crop, int(metadata["size_divisor"]))]
        reference, ir = OnnxSegmenter(onnx_path, threads=1), OpenVinoSegmenter(xml, threads=1)
        rng = np.random.default_rng(0)
        for size in sizes:
            x = rng.standard_normal((2, reference.in_chans, *size)).astype(np.float32)
            want, got = reference(x), ir(x)
            diff = float(np.abs(got - want).max()) if got.shape == want.shape else float("inf")
            if not diff <= atol:
                raise ExportError(
                    f"{xml}: OpenVINO disagrees with onnxruntime at {size[0]}x{size[1]}: output "
                    f"{got.shape} vs {want.shape}, max abs logit diff {diff:.3g} > {atol}"
                )
    return xml


def _nodes_behind(node: Any) -> list[Any]:
    return [i.get_source_output().get_node() for i in node.inputs()]


def ir_head_nodes(model: Any) -> list[str]:
    """Friendly names of the classifier and what follows it up to the outputs: kept in float.

    Walks back from every ``Result`` and stops, on each branch, at the first layer with weights
    (convolutions, MatMul: included) and at ``ShapeOf`` (size arithmetic); the OpenVINO
    counterpart of :func:`~hybridvision.export.quantize.head_nodes`.
    """
    names: dict[str, None] = {}  # ordered set
    pending = [n for r in model.get_results() for n in _nodes_behind(r)]
    while pending:
        node = pending.pop()
        name = node.get_friendly_name()
        kind = node.get_type_name()
        if name in names or kind in ("Parameter", "Constant"):
            continue
        names[name] = None
        if kind not in (*_WEIGHTED_TYPES, "ShapeOf"):
            pending.extend(_nodes_behind(node))
    return list(names)


def ir_has_attention(model: Any) -> bool:
    """True if the IR has a Softmax, an MVN (LayerNorm) or a MatMul of two activations."""
    for node in model.get_ordered_ops():
        kind = node.get_type_name()
        if kind in _ATTENTION_TYPES:
            return True
        if kind == "MatMul" and all(_activation(n) for n in _nodes_behind(node)):
            return True
    return False


def _activation(node: Any) -> bool:
    """Whether ``node``'s output is computed from the input (not a constant, possibly converted)."""
    while node.get_type_name() in ("Convert", "Reshape", "Transpose", "Unsqueeze") and node.inputs():
        node = _nodes_behind(node)[0]
    return node.get_type_name() != "Constant"


def quantize_openvino_int8(
    fp32_path: str | os.PathLike,
    out_path: str | os.PathLike,
    calibration_inputs: Sequence[np.ndarray],
    *,
    model_type: str = "auto",
    calibration_info: dict[str, Any] | None = None,
) -> Path:
    """int8 IR of an fp32 IR with NNCF post-training quantization, classifier and logits in float.

    Args:
        fp32_path: ``model.xml`` written by :func:`export_openvino`.
        out_path: the int8 ``.xml`` (metadata copied, ``precision: int8`` and the ``quantization``).
        calibration_inputs: model inputs (C, H, W), normalised and sized as the deployed model sees
            them (:func:`~hybridvision.export.quantize.deployment_inputs`); sizes may differ.
        model_type: ``"auto"`` (``transformer`` if :func:`ir_has_attention`, else ``cnn``),
            ``"transformer"`` or ``"cnn"``.
        calibration_info: recorded in the metadata's ``quantization.calibration``.

    Returns:
        ``out_path``.

    Raises:
        UserError: OpenVINO or NNCF is not installed (the message names the extra).
        ValueError: no calibration input, an input that is not (C, H, W), or an unknown model type.
    """
    from ..deploy.errors import UserError

    try:
        import nncf
    except ImportError as exc:
        raise UserError(f"OpenVINO int8 needs nncf: {OPENVINO_EXTRA}") from exc
    if not calibration_inputs:
        raise ValueError("quantize_openvino_int8 needs at least one calibration input")
    if model_type not in ("auto", "transformer", "cnn"):
        raise ValueError(f"model_type must be auto, transformer or cnn, got {model_type!r}")
    arrays = [np.asarray(a, dtype=np.float32) for a in calibration_inputs]
    for i, a in enumerate(arrays):
        if a.ndim != 3:
            raise ValueError(f"calibration input {i} has shape {a.shape}; expected (C, H, W)")
    model = read_ir(Path(fp32_path))
    metadata = json.loads(model.get_rt_info(METADATA_KEY).astype(str))
    head = ir_head_nodes(model)
    chosen = model_type if model_type != "auto" else ("transformer" if ir_has_attention(model) else "cnn")
    previous = logging.getLogger("nncf").level
    nncf.set_log_level(logging.WARNING)  # not a line per node left in float (the head, on purpose)
    try:
        quantized = nncf.quantize(
            model,
            nncf.Dataset(arrays, lambda a: a[None]),  # (1, C, H, W) per call
            subset_size=len(arrays),
            model_type=nncf.ModelType.TRANSFORMER if chosen == "transformer" else None,
            ignored_scope=nncf.IgnoredScope(names=head, validate=False),
        )
    finally:
        nncf.set_log_level(previous)
    metadata.update(
        precision="int8",
        quantization={
            "tool": f"nncf {nncf.__version__} post-training quantization",
            "model_type": chosen,
            "preset": "mixed" if chosen == "transformer" else "performance",
            # TRANSFORMER: NNCF's patterns leave LayerNorm (MVN), Softmax and softmax @ v in float
            "float": ["classifier head"]
            + (["LayerNorm", "Softmax", "softmax @ v"] if chosen == "transformer" else []),
            "calibration": {"inputs": len(arrays), **(calibration_info or {})},
        },
    )
    return _save(quantized, Path(out_path), metadata)

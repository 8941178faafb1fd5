"""Edge export: ONNX with dynamic batch/height/width, OpenVINO IR, ExecuTorch, int8 quantization, report.

* :func:`export_onnx` traces a :class:`~hybridvision.models.Segmenter` with the TorchScript exporter
  (``dynamo=False``; no ``onnxscript`` needed), opset 18 by default (TransUNet's antialiased
  bicubic resampling of its position embedding needs ``Resize``-18), dynamic batch, height and
  width. The zoo computes its shape logic from tensor shapes while tracing (padding to the size
  divisor, crop, Swin windows / shifts / masks, position-embedding grids), so one graph serves
  every input size. The file is checked with ``onnx.checker`` and against PyTorch at a size that is
  not a multiple of the size divisor, and carries metadata (class names, normalisation, channels,
  size divisor, training crop, training scale `resize`) that :mod:`hybridvision.deploy.runtime` reads.
* :func:`quantize_int8`: onnxruntime int8 (``quant_pre_process`` first; static QDQ for CNNs,
  QDQ convolutions + dynamic MatMuls for attention models; classifier head, logits, LayerNorm and
  Softmax in float), calibrated on what the deployed model sees (:func:`deployment_inputs`: the
  runtime predictor's own scale and windows); :func:`int8_agreement` compares it with fp32 the
  same way.
* :func:`export_openvino`: the ONNX file as an OpenVINO IR (``.xml`` + ``.bin``, fp32, same
  metadata in its ``rt_info``), checked against onnxruntime; :func:`quantize_openvino_int8`: NNCF
  post-training int8 calibrated on the same deployment inputs, classifier head in float
  (``pip install -e ".[openvino]"``).
* :func:`export_executorch`: an ExecuTorch program (``.pte``, lowered to XNNPACK; the ONNX metadata in
  ``.pte.json`` beside it), checked against PyTorch; :func:`quantize_executorch_int8`: PT2E int8
  (``XNNPACKQuantizer``) calibrated on the same deployment inputs, classifier head in float
  (``pip install -e ".[executorch]"``).
* :func:`deployment_report`: params, GMACs, file size, latency (PyTorch eager, onnxruntime CPU,
  OpenVINO CPU and ExecuTorch XNNPACK, batch 1, median and spread), peak memory (measured in a fresh process per model)
  and mIoU per model, with the CPU's int8 / bf16 features, to ``report.json`` / ``.md`` / ``.png``.
"""

from __future__ import annotations

from .executorch import executorch_path, export_executorch, quantize_executorch_int8
from .onnx import DEFAULT_OPSET, ExportError, check_size, export_onnx, verify_onnx
from .openvino import export_openvino, openvino_path, quantize_openvino_int8
from .quantize import (
    attention_nodes,
    deployment_inputs,
    exact_ties,
    float_sources,
    has_attention,
    head_nodes,
    int8_agreement,
    quantize_int8,
)
from .report import cpu_features, cpu_name, deployment_report, peak_memory

__all__ = [
    "DEFAULT_OPSET",
    "cpu_features",
    "cpu_name",
    "ExportError",
    "export_onnx",
    "verify_onnx",
    "export_openvino",
    "openvino_path",
    "quantize_openvino_int8",
    "export_executorch",
    "executorch_path",
    "quantize_executorch_int8",
    "quantize_int8",
    "float_sources",
    "head_nodes",
    "attention_nodes",
    "has_attention",
    "exact_ties",
    "deployment_inputs",
    "int8_agreement",
    "deployment_report",
    "peak_memory",
    "check_size",
]

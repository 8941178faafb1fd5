"""int8 quantization with onnxruntime, calibrated through the deployment path, and its agreement with fp32."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from ..deploy.runtime import (
    METADATA_KEY,
    OnnxPredictor,
    OnnxSegmenter,
)

_logger = logging.getLogger(__name__)


#: Op types that stay in float whatever the scheme: a normalisation's statistics and a softmax's
#: exponentials lose too much in 8 bits (onnxruntime's guidance for transformers), and onnxruntime
#: has no per-channel kernel for LayerNormalization (it warns and falls back to per-tensor scales).
FLOAT_OP_TYPES = ("LayerNormalization", "Softmax")
#: Layers with weights: where :func:`float_sources` stops walking back (the classifier, a projection).
_WEIGHTED_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: ``quantize_int8(scheme=...)``; ``auto`` picks ``attention`` for graphs with attention, else ``static``.
INT8_SCHEMES = ("auto", "static", "attention")
#: (logger, message start) of onnxruntime lines that say nothing to act on, silenced while
#: quantizing. Symbolic shape inference cannot compare a padded size with the input size
#: (``height <= 32*floor(height/32 + 31/32)``) and treats them as equal: harmless here, the shapes
#: it infers only guide the quantizer and the graph runs at any size. The dynamic pass of the
#: ``attention`` scheme runs on a graph whose convolutions are already quantized, by design.
_ONNXRUNTIME_NOISE = (
    ("onnxruntime.tools.symbolic_shape_infer", "Unable to determine if"),
    ("root", "Please check if the model is already quantized"),
)


class _DropMessage(logging.Filter):
    """Drop the log records whose message starts with ``prefix``; keep every other record."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        """False for the records to drop."""
        return not record.getMessage().startswith(self.prefix)


@contextlib.contextmanager
def _quiet_onnxruntime() -> Iterator[None]:
    """Silence the :data:`_ONNXRUNTIME_NOISE` lines, and only those, for the duration."""
    filters = [(logging.getLogger(name), _DropMessage(prefix)) for name, prefix in _ONNXRUNTIME_NOISE]
    for logger, noise in filters:
        logger.addFilter(noise)
    try:
        yield
    finally:
        for logger, noise in filters:
            logger.removeFilter(noise)


def _copy_metadata(src: Any, dst_path: Path, **updates: Any) -> None:
    import onnx

    meta = json.loads({p.key: p.value for p in src.metadata_props}[METADATA_KEY])
    meta.update(updates)
    dst = onnx.load(str(dst_path))
    del dst.metadata_props[:]
    onnx.helper.set_model_props(dst, {METADATA_KEY: json.dumps(meta)})
    onnx.save(dst, str(dst_path))


@contextlib.contextmanager
def _chdir(path: str | os.PathLike) -> Iterator[None]:
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def _weights(graph: Any) -> set[str]:
    return {init.name for init in graph.initializer} | {
        o for n in graph.node if n.op_type == "Constant" for o in n.output
    }


def float_sources(graph: Any, tensors: Iterable[str]) -> list[str]:
    """Names of the nodes whose outputs flow into ``tensors`` with no layer with weights between.

    Walks back from ``tensors`` through every node and stops, on each branch, at the first layer
    with weights (Conv, ConvTranspose, Gemm, MatMul: included) and at ``Shape`` nodes (size
    arithmetic, included). If none of these nodes rounds its output to 8 bits, ``tensors`` carry
    the full precision of the layers that computed them.

    Args:
        graph: an ``onnx.GraphProto`` whose nodes all have names.
        tensors: tensor names.

    Returns:
        Node names, nearest first.
    """
    producer = {out: node for node in graph.node for out in node.output}
    names: dict[str, None] = {}  # ordered set
    pending = list(tensors)
    while pending:
        node = producer.get(pending.pop())
        if node is None or node.name in names:
            continue
        names[node.name] = None
        if node.op_type not in (*_WEIGHTED_OP_TYPES, "Shape"):
            pending.extend(i for i in node.input if i)
    return list(names)


def head_nodes(graph: Any) -> list[str]:
    """The classifier and what follows it up to the graph outputs (resize, crop): kept in float.

    :func:`float_sources` of the graph outputs: the logits are computed in float from the last
    feature map.
    """
    return float_sources(graph, [o.name for o in graph.output])


def attention_nodes(graph: Any) -> list[Any]:
    """``LayerNormalization`` / ``Softmax`` nodes and MatMuls of two activations (``q @ k``)."""
    weights = _weights(graph)
    return [
        n
        for n in graph.node
        if n.op_type in FLOAT_OP_TYPES or (n.op_type == "MatMul" and not weights.intersection(n.input))
    ]


def has_attention(graph: Any) -> bool:
    """True if the graph has a Softmax, a LayerNormalization or a MatMul of two activations."""
    return bool(attention_nodes(graph))


def quantize_int8(
    fp32_path: str | os.PathLike,
    out_path: str | os.PathLike,
    calibration_images: Sequence[np.ndarray | Tensor],
    *,
    per_channel: bool = True,
    calibrate_method: str = "minmax",
    scheme: str = "auto",
    calibration_info: dict[str, Any] | None = None,
) -> Path:
    """int8 quantization of an exported model (onnxruntime), logits and classifier kept in float.

    ``quant_pre_process`` (symbolic shape inference + graph optimisation) runs first. Every scheme
    keeps in float the classifier and what follows it up to the output (:func:`head_nodes`: the
    logits keep their resolution, so rounding makes no two classes tie) and the attention nodes
    (:func:`attention_nodes`: LayerNormalization, Softmax, MatMuls of two activations), and no
    node that computes their inputs rounds its output to 8 bits (:func:`float_sources`).

    * ``static`` (CNNs): QDQ, int8 weights (per output channel), uint8 activations (U8S8, the fast
      path of VNNI CPUs) with ranges calibrated on ``calibration_images``, for every other op
      onnxruntime quantizes.
    * ``attention``: convolutions as in ``static``; MatMuls with a weight dynamically quantized
      (int8 weights, activations quantized per call from their own range, float outputs); the rest
      in float. On ISBI-trained nano models (1 thread, 256 x 256, fp32 -> int8 ms): SegFormer 6.6
      -> 6.9, Swin-UNet 22.1 -> 19.5, TransUNet 18.5 -> 15.7, hierarchical hybrid 20.5 -> 16.8,
      agreeing with fp32 on 99.8-99.9 % of pixels; static QDQ of the attention blocks was slower
      than fp32 for SegFormer and Swin-UNet (8.3 and 30.0 ms) and agreed less (99.5-99.8 %).
    * ``auto``: ``attention`` if the graph has attention nodes, else ``static`` (UNet-ResNet
      7.8 -> 5.1 ms, 99.9 %).

    Args:
        fp32_path: model written by :func:`export_onnx`.
        out_path: the int8 model (metadata copied, ``precision: int8`` and the ``quantization``).
        calibration_images: model inputs (C, H, W), normalised and sized as the deployed model sees
            them (:func:`deployment_inputs`); sizes may differ.
        per_channel: per-output-channel weight scales (static part).
        calibrate_method: ``minmax``, ``entropy`` or ``percentile``.
        scheme: one of :data:`INT8_SCHEMES`.
        calibration_info: recorded in the metadata's ``quantization.calibration`` (e.g. images and
            the deployment path); default ``{"images": len(calibration_images)}``.

    Returns:
        ``out_path``.

    Raises:
        ValueError: no calibration image, an image that is not (C, H, W), or an unknown method/scheme.
    """
    if not calibration_images:
        raise ValueError("quantize_int8 needs at least one calibration image")
    if scheme not in INT8_SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(INT8_SCHEMES)}, got {scheme!r}")
    import onnx

    # absolute before the chdir into the temporary directory below (relative paths broke there)
    fp32_path, out_path = Path(fp32_path).resolve(), Path(out_path).resolve()
    source = onnx.load(str(fp32_path))
    arrays = _calibration_arrays(calibration_images)
    method = _calibration_method(calibrate_method)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp_dir, _quiet_onnxruntime():
        pre, symbolic = _pre_process(fp32_path, Path(tmp_dir))
        graph = onnx.load(str(pre)).graph
        head, attention = head_nodes(graph), [n.name for n in attention_nodes(graph)]
        chosen = scheme if scheme != "auto" else ("attention" if attention else "static")
        reader = _calibration_reader(arrays, source.graph.input[0].name)
        tmp_out = Path(tmp_dir) / "static.onnx"
        _quantize_static(pre, tmp_out, reader, chosen, per_channel, method, _keep_float(graph, head))
        if chosen == "attention":
            static_out, tmp_out = tmp_out, Path(tmp_dir) / "dynamic.onnx"
            _quantize_dynamic(static_out, tmp_out, head + attention)
        calibration = {
            "method": calibrate_method,
            "inputs": len(arrays),
            **(calibration_info or {"images": len(arrays)}),
        }
        record = _quantization_record(chosen, per_channel, symbolic, calibration)
        _copy_metadata(source, tmp_out, precision="int8", quantization=record)
        os.replace(tmp_out, out_path)
    return out_path


def _calibration_arrays(images: Sequence[np.ndarray | Tensor]) -> list[np.ndarray]:
    """``images`` as float32 arrays, each checked to be (C, H, W)."""
    arrays = [as_array(img).astype(np.float32, copy=False) for img in images]
    for i, a in enumerate(arrays):
        if a.ndim != 3:
            raise ValueError(f"calibration image {i} has shape {a.shape}; expected (C, H, W)")
    return arrays


def _calibration_method(name: str) -> Any:
    """The onnxruntime ``CalibrationMethod`` named ``name`` (``minmax``, ``entropy``, ``percentile``)."""
    from onnxruntime.quantization import CalibrationMethod

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    if name not in methods:
        raise ValueError(f"calibrate_method must be one of {', '.join(methods)}, got {name!r}")
    return methods[name]


def _calibration_reader(arrays: list[np.ndarray], input_name: str) -> Any:
    """A ``CalibrationDataReader`` that feeds ``arrays`` one image (1, C, H, W) per call."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        """One image per call; ``set_range`` lets onnxruntime calibrate a few images at a time."""

        def __init__(self) -> None:
            self.set_range(0, len(arrays))

        def __len__(self) -> int:
            return len(arrays)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._it = iter(arrays[start_index:end_index])

        def get_next(self) -> dict[str, np.ndarray] | None:
            a = next(self._it, None)
            return None if a is None else {input_name: a[None]}

    return _Reader()


def _calibration_stride(count: int) -> int:
    """The largest divisor of ``count`` up to 8: how many images onnxruntime calibrates at once.

    onnxruntime keeps every intermediate tensor of the images it calibrates on at once (its
    CalibMaxIntermediateOutputs drops them instead): strides of at most 8 images bound the memory.
    """
    return next(s for s in range(min(8, count), 0, -1) if count % s == 0)


def _pre_process(fp32_path: Path, tmp_dir: Path) -> tuple[Path, bool]:
    """Run ``quant_pre_process`` into ``tmp_dir`` and name every node (exclusions go by name).

    Returns:
        The pre-processed model's path and whether symbolic shape inference succeeded.
    """
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = tmp_dir / "preprocessed.onnx"
    symbolic = True
    # ORT's symbolic shape inference dumps sym_shape_infer_temp.onnx (+ data) into the working
    # directory when it gives up: run it inside the temporary directory
    with _chdir(tmp_dir):
        try:
            quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=False)
        except Exception:  # it gives up on some dynamic graphs (Swin shift masks)
            symbolic = False  # ONNX shape inference + ORT graph optimisation still run
            quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
    graph = onnx.load(str(pre))
    for i, node in enumerate(graph.graph.node):
        node.name = node.name or f"{node.op_type}_{i}"
    onnx.save(graph, str(pre))
    return pre, symbolic


def _keep_float(graph: Any, head: list[str]) -> list[str]:
    """Nodes the static pass leaves in float: ``head``, the attention nodes and their sources.

    Attention nodes run in float, and nothing that computes their inputs may round them to 8 bits
    (a QDQ node's output is 8-bit; a dynamically quantized MatMul's is float).
    """
    attention = attention_nodes(graph)
    weights = _weights(graph)
    inputs = [i for n in attention for i in n.input if i and i not in weights]
    return head + [n.name for n in attention] + float_sources(graph, inputs)


def _quantize_static(
    pre: Path, out: Path, reader: Any, chosen: str, per_channel: bool, method: Any, keep_float: list[str]
) -> None:
    """QDQ pass: every op onnxruntime quantizes (``static``) or only convolutions (``attention``)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    if chosen == "static":
        static_ops = set(QLinearOpsRegistry) | set(QDQRegistry)
    else:
        static_ops = {"Conv", "ConvTranspose"}
    quantize_static(
        str(pre),
        str(out),
        reader,
        quant_format=QuantFormat.QDQ,
        per_channel=per_channel,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=method,
        op_types_to_quantize=sorted(static_ops - set(FLOAT_OP_TYPES)),
        nodes_to_exclude=keep_float,
        extra_options={"MatMulConstBOnly": True, "CalibStridedMinMax": _calibration_stride(len(reader))},
    )


def _quantize_dynamic(static_out: Path, out: Path, exclude: list[str]) -> None:
    """Dynamic pass of the ``attention`` scheme: MatMuls and Gemms with a weight, not ``exclude``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(static_out),
        str(out),
        op_types_to_quantize=["MatMul", "Gemm"],
        nodes_to_exclude=exclude,
        weight_type=QuantType.QInt8,
        extra_options={"MatMulConstBOnly": True},
    )


def _quantization_record(
    chosen: str, per_channel: bool, symbolic: bool, calibration: dict[str, Any]
) -> dict[str, Any]:
    """The metadata's ``quantization`` entry: scheme, formats, what stays float, calibration."""
    mixed = chosen != "static"
    return {
        "scheme": chosen,
        "format": "QDQ convolutions + dynamic MatMul" if mixed else "QDQ",
        "weights": ("int8 per-channel" if per_channel else "int8 per-tensor")
        + (" (convolutions), int8 per-tensor (MatMul)" if mixed else ""),
        "activations": "uint8 calibrated" + (" (convolutions), uint8 per call (MatMul)" if mixed else ""),
        "float": ["classifier head", *FLOAT_OP_TYPES, "MatMul of two activations"],
        "calibration": calibration,
        "pre_process": "quant_pre_process" + ("" if symbolic else " (skip_symbolic_shape)"),
    }


#: :class:`~hybridvision.deploy.runtime.OnnxPredictor` normalisation for images already normalised
#: (e.g. by the evaluation transform of the training pipeline)
_ALREADY_NORMALIZED = {"kind": "none", "window": None}


def exact_ties(logits: np.ndarray) -> int:
    """Pixels of ``logits`` (N, K, H, W) whose label is a coin toss: top-2 equal, or logit 0 for K = 1."""
    if logits.shape[1] == 1:
        return int((logits[:, 0] == 0).sum())
    top2 = np.partition(logits, -2, axis=1)[:, -2:]  # (N, 2, H, W): runner-up, best
    return int((top2[:, 0] == top2[:, 1]).sum())


class _Recorder:
    """Stands in for a predictor's model: runs it, keeps each input (C, h, w) and counts ties."""

    def __init__(self, segmenter: OnnxSegmenter, keep_inputs: bool) -> None:
        self.segmenter, self.keep_inputs = segmenter, keep_inputs
        self.inputs: list[np.ndarray] = []
        self.ties = self.pixels = 0

    def __call__(self, images: np.ndarray) -> np.ndarray:
        if self.keep_inputs:
            self.inputs.extend(np.array(x) for x in images)  # copies: the predictor reuses buffers
        logits = self.segmenter(images)
        self.ties += exact_ties(logits)
        self.pixels += logits.shape[0] * logits.shape[2] * logits.shape[3]
        return logits


def _deployment_predictor(
    model_path: str | os.PathLike, normalized: bool, keep_inputs: bool, options: dict[str, Any]
) -> tuple[OnnxPredictor, _Recorder]:
    predictor = OnnxPredictor(model_path, threads=options.pop("threads", 1), **options)
    if normalized:
        predictor.normalization = _ALREADY_NORMALIZED
    recorder = _Recorder(predictor.segmenter, keep_inputs)
    predictor.segmenter = recorder
    return predictor, recorder


def deployment_inputs(
    fp32_path: str | os.PathLike,
    images: Iterable[np.ndarray | Tensor],
    *,
    normalized: bool = False,
    **predictor_options: Any,
) -> list[np.ndarray]:
    """What the deployed model is called with on ``images``: the int8 calibration set.

    Each image goes through :class:`~hybridvision.deploy.runtime.OnnxPredictor` itself
    (normalisation, the recorded ``resize`` scale, windows of the recorded training crop or
    whole images, padding, TTA flips), with the fp32 model, and every input it passes to the
    model is kept.

    Args:
        fp32_path: model written by :func:`export_onnx` (its metadata gives scale and window).
        images: raw images (C, H, W) as :func:`~hybridvision.deploy.runtime.read_image` reads them,
            or, with ``normalized=True``, images already normalised (the evaluation transform).
        normalized: skip the predictor's normalisation.
        **predictor_options: ``OnnxPredictor`` options (``mode``, ``window``, ``overlap``,
            ``blend``, ``batch_size``, ``tta_flips``, ``resize``), as deployment sets them.

    Returns:
        Model inputs (C, h, w) float32, one per window (or whole image) and flip.
    """
    predictor, recorder = _deployment_predictor(fp32_path, normalized, True, dict(predictor_options))
    for image in images:
        predictor.predict_labels(as_array(image).astype(np.float32, copy=False))
    return recorder.inputs


def int8_agreement(
    fp32_path: str | os.PathLike,
    int8_path: str | os.PathLike,
    images: Iterable[np.ndarray | Tensor],
    *,
    normalized: bool = False,
    **predictor_options: Any,
) -> dict[str, Any]:
    """How often the int8 model's labels equal the fp32 model's, both predicting as deployed.

    Args:
        fp32_path: the fp32 model.
        int8_path: its int8 version.
        images: evaluation images (C, H, W): raw, or normalised with ``normalized=True``.
        normalized: skip the predictor's normalisation.
        **predictor_options: ``OnnxPredictor`` options, as in :func:`deployment_inputs`.

    Returns:
        ``images``, ``pixels``, ``pixel_agreement`` (fraction of image pixels with equal labels) and
        ``ties_fp32`` / ``ties_int8``: the fraction of model output pixels whose top-2 logits are
        exactly equal (logit exactly 0 for K = 1).
    """
    fp32, fp32_rec = _deployment_predictor(fp32_path, normalized, False, dict(predictor_options))
    int8, int8_rec = _deployment_predictor(int8_path, normalized, False, dict(predictor_options))
    same = pixels = count = 0
    for image in images:
        x = as_array(image).astype(np.float32, copy=False)
        a, b = fp32.predict_labels(x), int8.predict_labels(x)
        same += int((a == b).sum())
        pixels += a.size
        count += 1
    if not count:
        raise ValueError("int8_agreement needs at least one image")
    return {
        "images": count,
        "pixels": pixels,
        "pixel_agreement": same / pixels,
        "ties_fp32": fp32_rec.ties / max(fp32_rec.pixels, 1),
        "ties_int8": int8_rec.ties / max(int8_rec.pixels, 1),
    }


# --------------------------------------------------------------------------- report


def as_array(x: Any) -> np.ndarray:
    """``x`` (an array or a tensor, on any device) as a NumPy array."""
    return np.asarray(x.detach().cpu() if isinstance(x, Tensor) else x)

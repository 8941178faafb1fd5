"""Edge export: ONNX with dynamic batch/height/width, int8 quantization, deployment report.

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
* :func:`deployment_report`: params, GMACs, file size, latency (PyTorch eager and onnxruntime CPU,
  batch 1, median and spread), peak memory (measured in a fresh process per model) and mIoU per
  model, to ``report.json`` / ``.md`` / ``.png``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .deploy.runtime import (
    METADATA_KEY,
    OnnxPredictor,
    OnnxSegmenter,
    labels_from_scores,
    normalization_spec,
    scores_at_scale,
)
from .deploy.runtime import predict_sliding_window as np_predict_sliding_window
from .deploy.runtime import predict_whole as np_predict_whole
from .models.base import Segmenter
from .models.profile import count_gmacs

__all__ = [
    "ExportError",
    "export_onnx",
    "verify_onnx",
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

DEFAULT_OPSET = 18
INPUT_NAME, OUTPUT_NAME = "image", "logits"
_logger = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """The exported graph is invalid or disagrees with PyTorch; the message names size and error."""


# --------------------------------------------------------------------------- ONNX export


def _bicubic_aa_symbolic(g: Any, x: Any, output_size: Any, align_corners: Any, scale_factors: Any) -> Any:
    """``aten::_upsample_bicubic2d_aa`` -> ``Resize``-18 (antialias, a = -0.5, outside taps excluded).

    PyTorch's antialiased bicubic is PIL's kernel (a = -0.5) with weights renormalised at borders:
    ``exclude_outside=1``. Matches PyTorch to ~1e-6; exact at scale 1.
    """
    from torch.onnx import symbolic_helper

    sizes = symbolic_helper._unpack_list(output_size)
    axes = g.op("Constant", value_t=torch.tensor([0], dtype=torch.long))
    hw = [g.op("Unsqueeze", g.op("Cast", s, to_i=7), axes) for s in sizes]  # 7 = INT64
    start = g.op("Constant", value_t=torch.tensor([0], dtype=torch.long))
    stop = g.op("Constant", value_t=torch.tensor([2], dtype=torch.long))
    batch_channels = g.op("Slice", g.op("Shape", x), start, stop)
    full = g.op("Concat", batch_channels, *hw, axis_i=0)
    empty = g.op("Constant", value_t=torch.tensor([], dtype=torch.float32))
    return g.op(
        "Resize",
        x,
        empty,
        empty,
        full,
        mode_s="cubic",
        cubic_coeff_a_f=-0.5,
        antialias_i=1,
        exclude_outside_i=1,
        coordinate_transformation_mode_s="half_pixel",
    )


@contextlib.contextmanager
def _export_symbolics(opset: int) -> Iterator[None]:
    from torch.onnx import register_custom_op_symbolic, unregister_custom_op_symbolic

    if opset < 18:
        yield  # TransUNet then fails with a clear "needs opset 18" from _export_graph
        return
    register_custom_op_symbolic("aten::_upsample_bicubic2d_aa", _bicubic_aa_symbolic, opset)
    try:
        yield
    finally:
        unregister_custom_op_symbolic("aten::_upsample_bicubic2d_aa", opset)


def check_size(size: Sequence[int], divisor: int) -> tuple[int, int]:
    """A (H, W) near ``size`` that is NOT a multiple of ``divisor`` along either side."""
    out = []
    for side in size:
        s = int(side) + divisor // 2 + 1
        out.append(s + 1 if s % divisor == 0 else s)
    return out[0], out[1]


def _fused_copy(seg: Segmenter) -> Segmenter:
    """``seg`` itself, or a copy whose encoder fused its re-parameterisable branches for inference.

    FastViT / RepViT / MobileOne train with parallel branches that fold into one convolution
    (timm's ``reparameterize_model``); the exported graph is the folded one, and ``verify`` checks
    it against the unfolded model.
    """
    fuse = getattr(seg.encoder, "reparameterize", None)
    if fuse is None:
        return seg
    fused = copy.deepcopy(seg)
    return fused if fused.encoder.reparameterize() else seg


def _unwrap(model: nn.Module) -> Segmenter:
    model = getattr(model, "module", model)  # DDP
    model = getattr(model, "_orig_mod", model)  # torch.compile
    if not isinstance(model, Segmenter):
        raise TypeError(f"export_onnx expects a hybridvision Segmenter, got {type(model).__name__}")
    return model


def _recorded_resize(value: Any) -> list[int] | None:
    """``data.resize`` of the run as the metadata's ``resize``: ``[short, max_long]`` or None (native).

    ``auto`` is resolved by the stage before training; an unresolved one (a config written by hand)
    cannot be known here and is recorded as native.
    """
    return [int(v) for v in value] if isinstance(value, (list, tuple)) and value else None


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    train_crop: Sequence[int] = (256, 256),
    data_cfg: dict[str, Any] | None = None,
    class_names: Sequence[str] | None = None,
    opset: int = DEFAULT_OPSET,
    ignore_index: int | None = None,
    verify: bool = True,
    atol: float = 1e-4,
) -> Path:
    """Export a segmenter to ONNX (dynamic batch, height, width) with deployment metadata.

    Args:
        model: a :class:`Segmenter` (DDP/compiled wrappers are unwrapped); exported on CPU in eval
            mode, its mode and device are restored afterwards.
        path: output ``.onnx`` file (written atomically).
        train_crop: (H, W) training crop: the tracing size and the runtime's default window.
        data_cfg: the run config's ``data`` section as a dict (``normalize``, ``mean``/``std``,
            ``window``, ``in_chans``, ``ignore_index``, ``class_names``); None: ImageNet statistics.
        class_names: class names; default ``data_cfg["class_names"]`` or ``class_0..``.
        opset: ONNX opset, >= 17 (18 needed by TransUNet).
        ignore_index: label of ignored pixels (overlay colour); default ``data_cfg`` or 255.
        verify: compare onnxruntime with PyTorch at a size that is not a multiple of the size divisor.
        atol: largest accepted max abs difference of logits for ``verify``.

    Returns:
        ``path``.

    Raises:
        ExportError: if ``onnx.checker`` rejects the graph or onnxruntime disagrees with PyTorch.
    """

    if opset < 17:
        raise ValueError(f"opset must be >= 17, got {opset}")
    seg = _unwrap(model)
    traced = _fused_copy(seg)  # re-parameterisable branches (FastViT, RepViT, MobileOne) fused
    data = dict(data_cfg or {})
    in_chans = int(seg.build_kwargs.get("in_chans", data.get("in_chans", 3)))
    num_classes = int(seg.num_classes)
    crop = (int(train_crop[0]), int(train_crop[1]))
    names = list(class_names or data.get("class_names") or [f"class_{i}" for i in range(max(num_classes, 2))])
    metadata = {
        "format_version": 1,
        "in_chans": in_chans,
        "num_classes": num_classes,
        "class_names": names,
        "normalization": normalization_spec(data, in_chans),
        "size_divisor": int(seg.encoder.size_divisor),
        # an encoder built at a fixed size: inputs up to it are padded, larger images need windows of it
        "input_size": list(seg.encoder.input_size) if seg.encoder.input_size else None,
        "train_crop": list(crop),
        "resize": _recorded_resize(data.get("resize")),
        "ignore_index": int(ignore_index if ignore_index is not None else data.get("ignore_index", 255)),
        "model": seg.build_kwargs,
        "input": {"name": INPUT_NAME, "layout": "NCHW", "dtype": "float32"},
        "output": {
            "name": OUTPUT_NAME,
            "layout": "NCHW",
            "kind": "logits" if num_classes > 1 else "binary logit",
        },
        "opset": opset,
        "precision": "fp32",
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = seg.training
    device = next(seg.parameters()).device
    seg.eval().cpu()
    traced.eval().cpu()
    dummy = torch.randn(2, in_chans, *crop, generator=torch.Generator().manual_seed(0))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    name = seg.build_kwargs.get("name")
    try:
        _write_graph(traced, dummy, tmp, metadata, opset, dynamic=True)
        if verify:
            size = check_size(crop, metadata["size_divisor"])
            if seg.encoder.input_size:  # at most the fixed size, and not a multiple of the divisor
                size = tuple(max(1, s - metadata["size_divisor"] // 2 - 1) for s in seg.encoder.input_size)
            diff = _max_diff(seg, tmp, size)
            if not diff <= atol and not seg.encoder.input_size:
                # the traced graph kept sizes of the trace (e.g. MobileViT's unfold): export it at the
                # crop size, recorded in the metadata; the predictors slide windows of that size
                _logger.warning(
                    "%s: the ONNX graph does not generalise beyond %dx%d (max abs logit diff %s at %dx%d): "
                    "exported at the fixed input size %dx%d; predictors slide windows of that size",
                    name,
                    *crop,
                    f"{diff:.3g}",
                    *size,
                    *crop,
                )
                metadata["input_size"] = list(crop)
                _write_graph(traced, dummy, tmp, metadata, opset, dynamic=False)
                size = crop
                diff = _max_diff(seg, tmp, size)
            if not diff <= atol:
                raise ExportError(
                    f"{path}: onnxruntime disagrees with PyTorch at {size[0]}x{size[1]}: max abs logit diff "
                    f"{diff:.3g} > {atol}"
                )
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
        seg.to(device).train(was_training)
    return path


def _write_graph(
    model: nn.Module, dummy: Tensor, path: Path, metadata: dict[str, Any], opset: int, dynamic: bool
) -> None:
    """Trace ``model`` to ``path`` (dynamic batch; dynamic height/width if ``dynamic``), add the metadata
    and check the graph."""
    import onnx

    axes = {0: "batch", 2: "height", 3: "width"} if dynamic else {0: "batch"}
    with _export_symbolics(opset), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings on structural (size-independent) checks
        try:
            torch.onnx.export(
                model,
                (dummy,),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes},
                do_constant_folding=True,
            )
        except torch.onnx.errors.UnsupportedOperatorError as exc:
            name = metadata["model"].get("name")
            raise ExportError(f"{name}: {str(exc).splitlines()[0]} (try opset=18)") from exc
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(metadata)})
    proto.producer_name = "hybridvision"
    proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value = metadata["num_classes"]  # K is static
    proto.doc_string = f"hybridvision {metadata['model'].get('name')} segmenter, logits (B, K, H, W)"
    onnx.save(proto, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{path}: onnx.checker rejected the graph: {str(exc).splitlines()[0]}") from exc


def _max_diff(seg: nn.Module, path: Path, size: Sequence[int]) -> float:
    """Max abs logit difference of onnxruntime vs PyTorch at ``size`` (inf if onnxruntime fails)."""
    try:
        return float(verify_onnx(seg, path, sizes=[tuple(size)], batch_sizes=[1])[0]["max_abs_diff"])
    except Exception as err:  # onnxruntime raises its own types for shape errors in the graph
        _logger.debug("onnxruntime failed at %s: %s", tuple(size), err)
        return float("inf")


@torch.no_grad()
def verify_onnx(
    model: nn.Module,
    onnx_path: str | os.PathLike,
    sizes: Sequence[Sequence[int]],
    batch_sizes: Sequence[int] = (1,),
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Run onnxruntime and PyTorch on the same random inputs.

    Args:
        model: the exported segmenter (eval mode is set and restored).
        onnx_path: its ONNX file.
        sizes: (H, W) input sizes.
        batch_sizes: batch sizes tried at every size.

    Returns:
        One dict per (size, batch): ``size``, ``batch``, ``max_abs_diff``, ``argmax_agreement``
        (fraction of pixels with the same label; logit > 0 for one class).
    """
    seg = _unwrap(model)
    was_training = seg.training
    seg.eval()
    runner = OnnxSegmenter(onnx_path, threads=1)
    gen = torch.Generator().manual_seed(seed)
    out = []
    try:
        for size in sizes:
            for batch in batch_sizes:
                x = torch.randn(batch, runner.in_chans, *size, generator=gen)
                ref = seg(x.to(next(seg.parameters()).device)).float().cpu().numpy()
                try:
                    got = runner(x.numpy())
                except Exception as exc:  # onnxruntime's own error types: a broken graph, not a user error
                    first = str(exc).strip().splitlines()[0][:300]
                    raise ExportError(
                        f"{onnx_path}: onnxruntime failed on input {tuple(x.shape)}: {first}"
                    ) from exc
                if got.shape != ref.shape:
                    raise ExportError(
                        f"{onnx_path}: output shape {got.shape} != PyTorch's {ref.shape} for {tuple(x.shape)}"
                    )
                agree = float((labels_from_scores(got) == labels_from_scores(ref)).mean())
                out.append(
                    {
                        "size": list(size),
                        "batch": batch,
                        "max_abs_diff": float(np.abs(got - ref).max()),
                        "argmax_agreement": agree,
                    }
                )
    finally:
        seg.train(was_training)
    return out


# --------------------------------------------------------------------------- int8

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
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not calibration_images:
        raise ValueError("quantize_int8 needs at least one calibration image")
    if scheme not in INT8_SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(INT8_SCHEMES)}, got {scheme!r}")
    # absolute before the chdir into the temporary directory below (relative paths broke there)
    fp32_path, out_path = Path(fp32_path).resolve(), Path(out_path).resolve()
    source = onnx.load(str(fp32_path))
    input_name = source.graph.input[0].name
    arrays = [
        np.asarray(img.detach().cpu() if isinstance(img, Tensor) else img, dtype=np.float32)
        for img in calibration_images
    ]
    for i, a in enumerate(arrays):
        if a.ndim != 3:
            raise ValueError(f"calibration image {i} has shape {a.shape}; expected (C, H, W)")

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

    # onnxruntime keeps every intermediate tensor of the images it calibrates on at once (its
    # CalibMaxIntermediateOutputs drops them instead): strides of at most 8 images bound the memory
    stride = next(s for s in range(min(8, len(arrays)), 0, -1) if len(arrays) % s == 0)

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    if calibrate_method not in methods:
        raise ValueError(f"calibrate_method must be one of {', '.join(methods)}, got {calibrate_method!r}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp_dir, _quiet_onnxruntime():
        pre = Path(tmp_dir) / "preprocessed.onnx"
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
        for i, node in enumerate(graph.graph.node):  # exclusions go by name
            node.name = node.name or f"{node.op_type}_{i}"
        onnx.save(graph, str(pre))
        head = head_nodes(graph.graph)
        # attention nodes run in float, and nothing that computes their inputs may round them to 8
        # bits (a QDQ node's output is 8-bit; a dynamically quantized MatMul's is float)
        attention = attention_nodes(graph.graph)
        weights = _weights(graph.graph)
        inputs = [i for n in attention for i in n.input if i and i not in weights]
        keep_float = head + [n.name for n in attention] + float_sources(graph.graph, inputs)
        chosen = scheme if scheme != "auto" else ("attention" if attention else "static")
        if chosen == "static":
            static_ops = set(QLinearOpsRegistry) | set(QDQRegistry)
        else:
            static_ops = {"Conv", "ConvTranspose"}
        static_out = Path(tmp_dir) / "static.onnx"
        quantize_static(
            str(pre),
            str(static_out),
            _Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=methods[calibrate_method],
            op_types_to_quantize=sorted(static_ops - set(FLOAT_OP_TYPES)),
            nodes_to_exclude=keep_float,
            extra_options={"MatMulConstBOnly": True, "CalibStridedMinMax": stride},
        )
        tmp_out = static_out
        if chosen == "attention":
            tmp_out = Path(tmp_dir) / "dynamic.onnx"
            quantize_dynamic(
                str(static_out),
                str(tmp_out),
                op_types_to_quantize=["MatMul", "Gemm"],
                nodes_to_exclude=head + [n.name for n in attention],
                weight_type=QuantType.QInt8,
                extra_options={"MatMulConstBOnly": True},
            )
        _copy_metadata(
            source,
            tmp_out,
            precision="int8",
            quantization={
                "scheme": chosen,
                "format": "QDQ" if chosen == "static" else "QDQ convolutions + dynamic MatMul",
                "weights": ("int8 per-channel" if per_channel else "int8 per-tensor")
                + ("" if chosen == "static" else " (convolutions), int8 per-tensor (MatMul)"),
                "activations": "uint8 calibrated"
                + ("" if chosen == "static" else " (convolutions), uint8 per call (MatMul)"),
                "float": ["classifier head", *FLOAT_OP_TYPES, "MatMul of two activations"],
                "calibration": {
                    "method": calibrate_method,
                    "inputs": len(arrays),
                    **(calibration_info or {"images": len(arrays)}),
                },
                "pre_process": "quant_pre_process" + ("" if symbolic else " (skip_symbolic_shape)"),
            },
        )
        os.replace(tmp_out, out_path)
    return out_path


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
        predictor.predict_labels(_as_array(image).astype(np.float32, copy=False))
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
        x = _as_array(image).astype(np.float32, copy=False)
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


def _onnx_params(path: Path) -> int:
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    total = 0
    for init in proto.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype.kind in "fiu" and arr.ndim >= 1 and arr.size > 1:
            total += arr.size
    return total


#: Run in a fresh interpreter by :func:`peak_memory`: load one model, make its input, reset the
#: resident-set high-water mark (``/proc/self/clear_refs``), run one forward, print the figures.
_PEAK_MEMORY_CHILD = r"""
import json, sys
import numpy as np

def status_mib(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB -> MiB
    raise OSError(f"no {field} in /proc/self/status")

args = json.loads(sys.argv[1])
x = np.random.default_rng(0).standard_normal(args["shape"]).astype(np.float32)
if args["kind"] == "onnx":
    from hybridvision.deploy.runtime import OnnxSegmenter

    runner = OnnxSegmenter(args["path"], threads=args["threads"])
    forward = lambda: runner(x)
else:
    import torch

    torch.set_num_threads(args["threads"])
    module = torch.load(args["path"], weights_only=False).eval()
    xt = torch.from_numpy(x)

    def forward():
        with torch.no_grad():
            module(xt)

with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # Linux >= 4.0: VmHWM := VmRSS
baseline = status_mib("VmRSS")
forward()
print(json.dumps({"baseline_mib": baseline, "peak_mib": status_mib("VmHWM")}))
"""


def peak_memory(
    model: nn.Module | str | os.PathLike, shape: Sequence[int], threads: int = 1, timeout: float = 600
) -> dict[str, float]:
    """Resident memory of one forward pass, measured in a fresh Python process (Linux).

    A fresh process, because in this one the allocators already hold the pages a forward needs
    (the latency runs touched them), so the high-water mark would not move.

    Args:
        model: a module (PyTorch eager, pickled to the child) or an ``.onnx`` path (onnxruntime CPU).
        shape: input (N, C, H, W); standard-normal values.
        threads: PyTorch / onnxruntime intra-op threads.
        timeout: seconds before the measurement is abandoned.

    Returns:
        ``peak_rss_mib`` (the process's resident high-water mark during the forward: runtime,
        weights and activations) and ``forward_mib`` (how far the forward raised it above the
        resident memory just before it).

    Raises:
        RuntimeError: the child failed (e.g. no ``/proc``); the message ends with its last error line.
    """
    root = str(Path(__file__).resolve().parents[1])  # the child imports this package from here
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(model, nn.Module):
            path, kind = Path(tmp) / "model.pt", "torch"
            torch.save(model, path)
        else:
            path, kind = Path(model).resolve(), "onnx"
        args = {"kind": kind, "path": str(path), "shape": [int(s) for s in shape], "threads": int(threads)}
        proc = subprocess.run(
            [sys.executable, "-c", _PEAK_MEMORY_CHILD, json.dumps(args)],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise RuntimeError(f"peak-memory measurement of {kind} model failed: {last}")
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "peak_rss_mib": figures["peak_mib"],
        "forward_mib": figures["peak_mib"] - figures["baseline_mib"],
    }


def _time(fn: Callable[[], Any], runs: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    q = np.percentile(times, [25, 75])
    return {
        "median_ms": statistics.median(times),
        "p25_ms": float(q[0]),
        "p75_ms": float(q[1]),
        "min_ms": min(times),
        "max_ms": max(times),
        "runs": runs,
    }


def _as_array(x: Any) -> np.ndarray:
    return np.asarray(x.detach().cpu() if isinstance(x, Tensor) else x)


def deployment_report(
    out_dir: str | os.PathLike,
    entries: Sequence[dict[str, Any]],
    eval_data: Sequence[dict[str, Any]],
    num_classes: int,
    ignore_index: int = 255,
    *,
    train_crop: Sequence[int] = (256, 256),
    full_size: Sequence[int] | None = None,
    eval_mode: str = "whole",
    window: Sequence[int] | None = None,
    runs: int = 20,
    warmup: int = 3,
    threads: int = 1,
    class_names: Sequence[str] | None = None,
    max_eval_images: int | None = None,
    resize: Sequence[int] | None = None,
    measure_memory: bool = True,
) -> dict[str, Any]:
    """Compare models for deployment and write ``report.json``, ``report.md`` and ``report.png``.

    Args:
        out_dir: where the three files go.
        entries: ``{"name": str, "model": nn.Module}`` (PyTorch eager) or ``{"name": str, "onnx":
            path}`` (onnxruntime CPU; an optional ``"model"`` next to it gives the GMACs of the graph's
            source model).
        eval_data: samples ``{"image": (C, H, W) normalised, "mask": (H, W)}`` (e.g. finetune's
            evaluation dataset built by ``build_labelled_datasets``).
        num_classes: K (1 = binary).
        ignore_index: mask value left out of the metrics.
        train_crop: (H, W) of the crop latency and the GMACs.
        full_size: (H, W) of the full-image latency; default: the first evaluation image's size.
        eval_mode: ``"whole"`` or ``"slide"`` (window ``window`` or ``train_crop``, Gaussian blend).
        runs: timed runs per latency figure (after ``warmup`` untimed ones).
        threads: CPU threads for both PyTorch and onnxruntime.
        class_names: for the per-class IoU in the JSON.
        max_eval_images: evaluate on the first N samples only.
        resize: evaluation scale ``[short_side, max_long_side]`` (``data.resize``): every model
            predicts each image rescaled to it, scores resized back to the mask; None: native.
        measure_memory: measure each model's peak memory of a full-image forward in a fresh process
            (:func:`peak_memory`, a few seconds per model); False: the figures are None.

    Returns:
        The report dict (also written to ``report.json``).
    """
    from .inference import predict_sliding_window, predict_whole
    from .metrics import ConfusionMatrix

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    count = len(eval_data) if max_eval_images is None else min(len(eval_data), max_eval_images)
    samples = [eval_data[i] for i in range(count)]  # by index: datasets need not stop iteration
    if not samples:
        raise ValueError("deployment_report needs at least one evaluation sample")
    crop = (int(train_crop[0]), int(train_crop[1]))
    first = _as_array(samples[0]["image"])
    full = tuple(int(s) for s in (full_size or first.shape[-2:]))
    in_chans = first.shape[0]
    win = tuple(window or crop)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    try:
        for entry in entries:
            name = entry["name"]
            module = entry.get("model")
            onnx_path = entry.get("onnx")
            row: dict[str, Any] = {
                "name": name,
                "runtime": "onnxruntime-cpu" if onnx_path else "pytorch-eager",
            }
            if onnx_path:
                runner = OnnxSegmenter(onnx_path, threads=threads)
                row["precision"] = runner.metadata.get("precision", "fp32")
                row["onnx_file_mb"] = Path(onnx_path).stat().st_size / 2**20
                # the source model's count when given; else weights in the graph (BN folded into convs)
                row["params"] = (
                    sum(p.numel() for p in _unwrap(module).parameters())
                    if module is not None
                    else _onnx_params(Path(onnx_path))
                )

                def forward(x: np.ndarray, runner: OnnxSegmenter = runner) -> np.ndarray:
                    return runner(x)

                def scores(x: np.ndarray, forward: Callable = forward) -> np.ndarray:
                    if eval_mode == "slide":
                        return np_predict_sliding_window(forward, x, win, blend="gaussian")
                    return np_predict_whole(forward, x)

            else:
                if module is None:
                    raise ValueError(f"report entry {name!r} needs 'model' or 'onnx'")
                module = _unwrap(module).eval().cpu()
                row["precision"] = "fp32"
                row["onnx_file_mb"] = None
                row["params"] = sum(p.numel() for p in module.parameters())

                def forward(x: np.ndarray, module: nn.Module = module) -> np.ndarray:
                    with torch.no_grad():
                        return module(torch.from_numpy(x)).numpy()

                def scores(x: np.ndarray, module: nn.Module = module) -> np.ndarray:
                    t = torch.from_numpy(x)
                    if eval_mode == "slide":
                        s = predict_sliding_window(module, t, win, blend="gaussian", output="logits")
                    else:
                        s = predict_whole(module, t, output="logits")
                    # the runtime's convention (what scores_at_scale expects): probabilities for
                    # K >= 2 (torch's "logits" are their log), logits for K = 1
                    return (s.exp() if s.shape[1] > 1 else s).numpy()

            source = module if module is not None else None
            row["gmacs_train_crop"] = (
                count_gmacs(_unwrap(source), in_chans, crop) if source is not None else None
            )
            # latency at batch 1: the training crop and a full image
            rng = np.random.default_rng(0)
            for label, size in (("train_crop", crop), ("full_image", full)):
                x = rng.standard_normal((1, in_chans, *size)).astype(np.float32)
                row[f"latency_{label}"] = {"size": list(size), **_time(lambda x=x: forward(x), runs, warmup)}
            # peak memory of one full-image forward, in a fresh process
            row["peak_rss_mib"] = row["peak_above_baseline_mib"] = None
            if measure_memory:
                try:
                    mem = peak_memory(onnx_path or module, (1, in_chans, *full), threads)
                    row["peak_rss_mib"] = mem["peak_rss_mib"]
                    row["peak_above_baseline_mib"] = mem["forward_mib"]
                except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
                    _logger.warning("%s: no peak-memory figure (%s)", name, exc)
            # accuracy
            cm = ConfusionMatrix(num_classes, ignore_index, class_names=class_names)
            for sample in samples:
                img = _as_array(sample["image"]).astype(np.float32)
                s = scores_at_scale(scores, img, resize)  # as the runtime's OnnxPredictor does
                cm.update(
                    torch.from_numpy(labels_from_scores(s)),
                    torch.as_tensor(np.array(_as_array(sample["mask"]), dtype=np.int64))[None],
                )
            metrics = cm.compute()
            row["miou"] = metrics["miou"]
            row["iou"] = [None if v != v else v for v in metrics["iou"]]
            rows.append(row)
    finally:
        torch.set_num_threads(previous_threads)
    report = {
        "eval": {
            "images": len(samples),
            "mode": eval_mode,
            "window": list(win) if eval_mode == "slide" else None,
            "resize": list(resize) if resize else None,
        },
        "threads": threads,
        "cpu": _cpu_name(),
        "entries": rows,
    }
    from .io import write_json_atomic

    write_json_atomic(out_dir / "report.json", report)
    (out_dir / "report.md").write_text(_report_markdown(report))
    _report_png(rows, out_dir / "report.png")
    return report


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            info = fh.read()
        name = next(
            (ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?"
        )
        flags = set(
            next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
        )
        isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
        return f"{name} ({', '.join(isa) or 'no avx2'}), {os.cpu_count()} logical CPUs"
    except OSError:
        return "unknown"


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "—" if v is None else format(v, spec)


def _report_markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Deployment report",
        "",
        f"CPU: {report['cpu']}; {report['threads']} thread(s); batch 1; mIoU on {report['eval']['images']} "
        f"evaluation images ({report['eval']['mode']}).",
        "",
        "| model | runtime | precision | params (M) | GMACs (crop) | file (MB) | crop latency ms (p25-p75) "
        "| full-image latency ms (p25-p75) | peak memory of a full-image forward, MiB (forward's own) | mIoU |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["entries"]:
        c, f = r["latency_train_crop"], r["latency_full_image"]
        lines.append(
            f"| {r['name']} | {r['runtime']} | {r['precision']} | {r['params'] / 1e6:.2f} | "
            f"{_fmt(r['gmacs_train_crop'])} | {_fmt(r['onnx_file_mb'], '.2f')} | "
            f"{c['median_ms']:.2f} ({c['p25_ms']:.2f}-{c['p75_ms']:.2f}) @ {c['size'][0]}x{c['size'][1]} | "
            f"{f['median_ms']:.2f} ({f['p25_ms']:.2f}-{f['p75_ms']:.2f}) @ {f['size'][0]}x{f['size'][1]} | "
            f"{_fmt(r['peak_rss_mib'], '.0f')} (+{_fmt(r['peak_above_baseline_mib'], '.1f')}) | {r['miou']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def _report_png(rows: Sequence[dict[str, Any]], path: Path, size: tuple[int, int] = (720, 480)) -> None:
    """mIoU against full-image latency, one labelled point per model (Pillow only)."""
    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 70, 30, 40, 60
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    xs = [r["latency_full_image"]["median_ms"] for r in rows]
    ys = [r["miou"] for r in rows]
    x0, x1 = 0.0, max(xs) * 1.15 if xs else 1.0
    y_lo, y_hi = min(ys), max(ys)
    pad = max((y_hi - y_lo) * 0.2, 0.02)
    y0, y1 = max(0.0, y_lo - pad), min(1.0, y_hi + pad)
    if y1 <= y0:
        y0, y1 = 0.0, 1.0

    def px(x: float, y: float) -> tuple[float, float]:
        return left + (x - x0) / (x1 - x0) * (w - left - right), h - bottom - (y - y0) / (y1 - y0) * (
            h - top - bottom
        )

    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    for i in range(6):
        xv, yv = x0 + (x1 - x0) * i / 5, y0 + (y1 - y0) * i / 5
        gx, _ = px(xv, y0)
        _, gy = px(x0, yv)
        draw.line([gx, h - bottom, gx, h - bottom + 5], fill="black")
        draw.text((gx - 12, h - bottom + 8), f"{xv:.1f}", fill="black")
        draw.line([left - 5, gy, left, gy], fill="black")
        draw.text((8, gy - 6), f"{yv:.3f}", fill="black")
    draw.text((w // 2 - 110, h - 22), "full-image latency, batch 1 (ms, median)", fill="black")
    draw.text((8, 10), "mIoU against latency (up and to the left is better)", fill="black")
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    for i, (r, xv, yv) in enumerate(zip(rows, xs, ys)):
        cx, cy = px(xv, yv)
        c = colours[i % len(colours)]
        draw.ellipse([cx - 5, cy - 5, cx + 5, cy + 5], fill=c, outline="black")
        draw.text((cx + 8, cy - 18 if i % 2 == 0 else cy + 6), r["name"], fill=c)  # alternate: no overlap
    img.save(path)

"""ExecuTorch export: a ``.pte`` program lowered to XNNPACK, fp32 and int8 (PT2E), with the ONNX metadata.

* :func:`export_executorch`: ``torch.export`` of the segmenter, lowered with
  ``to_edge_transform_and_lower`` onto XNNPACK and written as ``model.pte``, with the ONNX file's
  metadata (classes, normalisation, scale, training crop, fixed input size) in ``model.pte.json``
  (a ``.pte`` holds no free-form metadata) plus an ``executorch`` entry: which inputs the program
  takes. The program takes one image, its height and width any multiples of the size divisor up
  to ``max_size`` (XNNPACK plans memory for that bound); a model whose shape logic does not export
  or lower with symbolic sizes (window attention's shifted windows, for one) is exported at the
  training crop instead, recorded as ``input_size``: the predictors slide windows of it. Checked
  against PyTorch at the crop and at a size that is not a multiple of the size divisor.
* :func:`quantize_executorch_int8`: PT2E post-training quantization (torchao's ``prepare_pt2e`` /
  ``convert_pt2e`` with ExecuTorch's ``XNNPACKQuantizer``: int8 activations, per-channel int8
  weights) calibrated on what the deployed model sees
  (:func:`~hybridvision.export.quantize.deployment_inputs`, the same inputs as the onnxruntime and
  OpenVINO int8 models), the classifier and what follows it to the output in float
  (:func:`fx_head_nodes`).

:class:`~hybridvision.deploy.executorch_runtime.ExecuTorchSegmenter` runs both
(``pip install -e ".[executorch]"``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..deploy.errors import UserError
from ..deploy.executorch_runtime import (
    EXECUTORCH_EXTRA,
    ExecuTorchSegmenter,
    metadata_path,
    program_input_size,
    read_pte_metadata,
)
from ..deploy.runtime import read_metadata
from ..io import write_json_atomic
from ..models.base import Segmenter
from .onnx import ExportError, _fused_copy, check_size, unwrap_segmenter

__all__ = [
    "DEFAULT_MAX_SIZE",
    "executorch_path",
    "export_executorch",
    "fx_head_nodes",
    "quantize_executorch_int8",
]

_logger = logging.getLogger(__name__)

#: default largest input side of a dynamic program: memory for the tensors between XNNPACK's
#: partitions is planned for this bound (``unet_resnet_nano``'s first forward: +27 MiB at 512, +96 at 1024,
#: +372 at 2048)
DEFAULT_MAX_SIZE = 1024
#: most dimensions an XNNPACK tensor may have (``XNN_MAX_TENSOR_DIMS``)
XNNPACK_MAX_DIMS = 6
#: ATen ops with weights: where :func:`fx_head_nodes` stops walking back from the output
_WEIGHTED_OPS = ("aten.conv2d.", "aten.conv_transpose2d.", "aten.linear.")


def executorch_path(onnx_path: str | os.PathLike) -> Path:
    """``model.onnx`` -> ``model.pte``, ``model.int8.onnx`` -> ``model.int8.pte``."""
    return Path(onnx_path).with_suffix(".pte")


def _compiler() -> Any:
    """ExecuTorch's ``exir`` module, or a one-line :class:`UserError` naming the extra to install."""
    try:
        from executorch import exir
    except ImportError as exc:
        raise UserError(f"ExecuTorch export needs executorch: {EXECUTORCH_EXTRA}") from exc
    return exir


def _within_xnnpack_dims(node: torch.fx.Node) -> bool:
    values = [node.meta.get("val")] + [n.meta.get("val") for n in node.all_input_nodes]
    return all(v.dim() <= XNNPACK_MAX_DIMS for v in values if isinstance(v, torch.Tensor))


def _xnnpack_partitioner() -> Any:
    """ExecuTorch's XNNPACK partitioner, leaving tensors of more than 6 dimensions to the portable kernels.

    ExecuTorch 1.5.1's partitioner does not check XNNPACK's dimension limit: an 8-D permute (window
    attention's ``(3, B, nh, nw, heads, wh, ww, d)``) is delegated and the program then fails to
    load ("Failed to define tensor ... xnn_status_unsupported_parameter").
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    partitioner = XnnpackPartitioner()
    for config in partitioner.target_partitioner_configs.values():
        check = config.check_constraints
        config.check_constraints = lambda node, ep, check=check: (
            _within_xnnpack_dims(node) and check(node, ep)
        )
    return partitioner


@contextlib.contextmanager
def _exporting(module: nn.Module) -> Iterator[None]:
    """Eval mode on the CPU, no autograd, quiet, sizes reasoned about symbolically; mode and device restored.

    ``backed_size_oblivious``: without it ``torch.export`` specialises on the example's sizes not
    being 1 (the stride-32 map of a 32-pixel input is 1 x 1) and the program then guards against them.
    """
    from torch.fx.experimental import _config as fx_config

    was_training = module.training
    device = next(module.parameters()).device
    fake_tensor_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_tensor_log.level
    fake_tensor_log.setLevel(logging.CRITICAL)  # it logs each failed size check with its traceback
    module.eval().cpu()
    try:
        # config modules gain patch() when installed (torch.utils._config_module); mypy cannot see it
        oblivious = fx_config.patch(backed_size_oblivious=True)  # type: ignore[attr-defined]
        with torch.no_grad(), warnings.catch_warnings(), oblivious:
            warnings.simplefilter("ignore")  # export and lowering warn on every size-independent check
            yield
    finally:
        module.to(device).train(was_training)
        fake_tensor_log.setLevel(level)


def _program_inputs(metadata: dict[str, Any]) -> tuple[tuple[torch.Tensor], Any]:
    """An example input (1, C, H, W) and the ``dynamic_shapes`` the metadata's program takes (None: fixed)."""
    channels, fixed = int(metadata["in_chans"]), metadata.get("input_size")
    if fixed:
        return (torch.zeros(1, channels, *fixed),), None
    spec = metadata["executorch"]
    step = int(spec["size_multiple"])
    blocks = [max(2, math.ceil(s / step)) for s in metadata["train_crop"]]  # > 1: no size-1 maps
    example = torch.randn(1, channels, blocks[0] * step, blocks[1] * step + step)  # H != W
    dims = [
        torch.export.Dim(f"{side}_blocks", min=1, max=int(limit) // step)
        for side, limit in zip(("height", "width"), spec["max_input_size"])
    ]
    return (example,), ({2: step * dims[0], 3: step * dims[1]},)


def _folded_graph(module: nn.Module, metadata: dict[str, Any]) -> torch.fx.GraphModule:
    """``module`` exported for the inputs the metadata's program takes, its constants folded.

    Weights computed from parameters (SegFormer's head composes its projections into 1x1
    convolutions) become constants: XNNPACK takes only constant weights and biases (measured: 50 ->
    13 ms for ``segformer_nano`` at 256 x 256), and PT2E would otherwise quantize their arithmetic.
    """
    from torchao.quantization.pt2e.constant_fold import constant_fold

    example, shapes = _program_inputs(metadata)
    graph = torch.export.export(module, example, dynamic_shapes=shapes).module()
    constant_fold(graph)
    return graph


def _lower(graph: torch.fx.GraphModule, metadata: dict[str, Any]) -> bytes:
    """The ``.pte`` bytes of ``graph`` (:func:`_folded_graph`, or its quantized version) on XNNPACK."""
    exir = _compiler()
    example, shapes = _program_inputs(metadata)
    program = torch.export.export(graph, example, dynamic_shapes=shapes)
    lowered = exir.to_edge_transform_and_lower(program, partitioner=[_xnnpack_partitioner()])
    return bytes(lowered.to_executorch().buffer)


def _program_metadata(metadata: dict[str, Any], seg: Segmenter, max_size: int, fixed: bool) -> dict[str, Any]:
    """``metadata`` with the ``executorch`` entry: the inputs the program takes."""
    from executorch.version import __version__

    out = copy.deepcopy(metadata)
    if fixed and not out.get("input_size"):
        out["input_size"] = list(out["train_crop"])
    step = int(out["size_divisor"])
    largest = out.get("input_size") or [max(step, max_size // step * step)] * 2
    out["executorch"] = {
        "version": __version__,
        "backend": "XNNPACK",
        "batch": 1,
        # a dynamic program takes any multiple of this up to max_input_size; a fixed one only input_size
        "size_multiple": step,
        "max_input_size": list(largest),
        "params": sum(p.numel() for p in seg.parameters()),
    }
    return out


def _write(path: Path, program: bytes, metadata: dict[str, Any]) -> None:
    """Write the program and its metadata JSON beside it, each atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(program)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    write_json_atomic(metadata_path(path), metadata)


def _max_diff(seg: Segmenter, path: Path, metadata: dict[str, Any]) -> tuple[tuple[int, int], float]:
    """Largest max abs logit difference of the program vs PyTorch, batch 2, and the size it was at.

    Sizes: the crop and one that is not a multiple of the size divisor (padded by the segmenter);
    for a fixed program, a size below ``input_size`` that is not a multiple of the divisor.
    """
    crop = tuple(metadata["train_crop"])
    divisor = int(metadata["size_divisor"])
    if metadata.get("input_size"):
        sizes = [tuple(max(1, s - divisor // 2 - 1) for s in metadata["input_size"])]
    else:
        sizes = [crop, check_size(crop, divisor)]
    runner = ExecuTorchSegmenter(path)
    rng = np.random.default_rng(0)
    worst: tuple[tuple[int, int], float] = (sizes[0], 0.0)
    for size in sizes:
        x = rng.standard_normal((2, runner.in_chans, *size)).astype(np.float32)
        with torch.no_grad():
            want = seg(torch.from_numpy(x)).numpy()
        got = runner(x)
        diff = float(np.abs(got - want).max()) if got.shape == want.shape else float("inf")
        if not diff <= worst[1]:
            worst = (size, diff)
    return worst


def export_executorch(
    model: nn.Module,
    onnx_path: str | os.PathLike,
    out_path: str | os.PathLike | None = None,
    *,
    max_size: int = DEFAULT_MAX_SIZE,
    verify: bool = True,
    atol: float = 1e-4,
    fixed_size_fallback: bool = True,
) -> Path:
    """Export a segmenter to an ExecuTorch program on XNNPACK, with its ONNX file's metadata.

    Args:
        model: the :class:`Segmenter` ``onnx_path`` was exported from (DDP/compiled wrappers are
            unwrapped; exported on CPU in eval mode, its mode and device restored afterwards).
        onnx_path: ``model.onnx`` written by :func:`~hybridvision.export.export_onnx`: the
            metadata (a fixed ``input_size`` there makes a fixed program here).
        out_path: the ``.pte`` (``.pte.json`` beside it); default: ``onnx_path`` with ``.pte``.
        max_size: largest input height and width of a dynamic program, rounded down to the size
            divisor, at least the training crop; the memory ExecuTorch plans grows with it, and
            larger images need sliding windows (``--mode slide``).
        verify: compare the program with PyTorch (see :func:`_max_diff`).
        atol: largest accepted max abs difference of logits for ``verify``.
        fixed_size_fallback: a model that does not export, lower or verify with dynamic sizes is
            exported at the training crop, recorded as the metadata's ``input_size``; False: that
            is an :class:`ExportError`.

    Returns:
        The ``.pte`` path.

    Raises:
        UserError: executorch is not installed (the message names the extra).
        ExportError: ``onnx_path`` holds another model, or the program fails to lower, load or agree.
    """
    _compiler()
    seg = unwrap_segmenter(model)
    traced = _fused_copy(seg)  # re-parameterisable branches (FastViT, RepViT, MobileOne) fused
    out = Path(out_path) if out_path is not None else executorch_path(onnx_path)
    if out.suffix.lower() != ".pte":
        raise ValueError(f"an ExecuTorch model is a .pte file, got {out}")
    metadata = read_metadata(Path(onnx_path))
    if metadata["model"] != seg.build_kwargs:
        raise ExportError(f"{onnx_path} was exported from another model than the one given")
    if max_size < max(metadata["train_crop"]):
        raise ValueError(f"max_size {max_size} is below the training crop {metadata['train_crop']}")
    name = metadata["model"].get("name")
    # a fixed ONNX graph gives a fixed program; a dynamic one is tried first
    attempts = [True] if metadata.get("input_size") else [False, True] if fixed_size_fallback else [False]
    reason = ""
    tmp = out.with_name(f".{out.stem}.tmp-{os.getpid()}.pte")  # checked before it replaces ``out``
    try:
        with _exporting(seg), _exporting(traced):
            for fixed in attempts:
                program_meta = _program_metadata(metadata, traced, max_size, fixed)
                reason = _export_checked(seg, traced, tmp, program_meta, atol if verify else None)
                if not reason:
                    _write(out, tmp.read_bytes(), program_meta)
                    return out
                if not fixed and fixed_size_fallback:
                    _logger.warning(
                        "%s: no dynamic ExecuTorch program (%s): exported at the fixed input size %dx%d; "
                        "predictors slide windows of that size",
                        name,
                        reason,
                        *metadata["train_crop"],
                    )
    finally:
        for f in (tmp, metadata_path(tmp)):
            if f.exists():
                f.unlink()
    raise ExportError(f"{out}: {reason}")


def _export_checked(
    seg: Segmenter, traced: nn.Module, out: Path, metadata: dict[str, Any], atol: float | None
) -> str:
    """Lower ``traced`` as ``metadata`` says, write it, compare it with ``seg``; why it failed, or ``""``.

    ``atol`` None: no comparison.
    """
    try:
        _write(out, _lower(_folded_graph(traced, metadata), metadata), metadata)
    except Exception as exc:  # torch.export and ExecuTorch's passes raise many types
        _logger.debug("ExecuTorch lowering failed", exc_info=True)
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        return f"ExecuTorch cannot export or lower it: {first}"
    if atol is None:
        return ""
    size, diff = _max_diff(seg, out, metadata)
    if diff <= atol:
        return ""
    return f"ExecuTorch disagrees with PyTorch at {size[0]}x{size[1]}: max abs logit diff {diff:.3g} > {atol}"


def fx_head_nodes(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """The classifier and what follows it up to the output (resize, crop) in an exported FX graph.

    Walks back from the output and stops, on each branch, at the first convolution or linear
    layer (included) and at size queries (``sym_size``); the FX counterpart of
    :func:`~hybridvision.export.quantize.head_nodes`.
    """
    output = next(n for n in graph.nodes if n.op == "output")
    head: set[torch.fx.Node] = set()
    pending = list(output.all_input_nodes)
    while pending:
        node = pending.pop()
        if node in head or node.op != "call_function":
            continue
        head.add(node)
        target = str(node.target)
        if not target.startswith(_WEIGHTED_OPS) and not target.startswith("aten.sym_size"):
            pending.extend(node.all_input_nodes)
    return head


def _quantizer() -> Any:
    """ExecuTorch's XNNPACK quantizer (static int8, per-channel weights), the head left in float."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

    class Quantizer(XNNPACKQuantizer):
        def transform_for_annotation(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            """XNNPACK's transform, undone on integer arithmetic.

            ExecuTorch 1.5.1 turns the scalar of every ``add`` / ``mul`` into a float tensor, integer
            index arithmetic included (window attention's relative positions), which then fails
            ("Tensor dtype mismatch! Expected: Long, Got: float").
            """
            integer = {
                n: n.args
                for n in model.graph.nodes
                if n.target in (torch.ops.aten.add.Tensor, torch.ops.aten.mul.Tensor)
                and isinstance(n.meta.get("val"), torch.Tensor)
                and not n.meta["val"].is_floating_point()
            }
            model = super().transform_for_annotation(model)
            for node, args in integer.items():
                node.args = args
            model.graph.eliminate_dead_code()
            model.recompile()
            return model

        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            """XNNPACK's annotation; tensors XNNPACK cannot hold (> 6 dims) stay float.

            Marked as annotated with nothing before XNNPACK's pass, which otherwise shares its
            neighbours' quantization with views and permutes of any rank: their quantize /
            dequantize pairs would stay outside XNNPACK, where the runtime has no kernel for them.
            """
            for node in model.graph.nodes:
                if node.op == "call_function" and not _within_xnnpack_dims(node):
                    node.meta["quantization_annotation"] = QuantizationAnnotation(_annotated=True)
            return super().annotate(model)

    heads: dict[int, set[torch.fx.Node]] = {}  # per graph: the quantizer sees one

    def outside_head(node: torch.fx.Node) -> bool:
        if id(node.graph) not in heads:
            heads[id(node.graph)] = fx_head_nodes(node.graph)
        return node not in heads[id(node.graph)]

    config = get_symmetric_quantization_config(is_per_channel=True)
    return Quantizer().set_global(config).set_filter_function(outside_head)


def quantize_executorch_int8(
    model: nn.Module,
    fp32_path: str | os.PathLike,
    out_path: str | os.PathLike,
    calibration_inputs: Sequence[np.ndarray],
    *,
    calibration_info: dict[str, Any] | None = None,
) -> Path:
    """int8 ExecuTorch program of ``model`` with PT2E post-training quantization, classifier in float.

    The program takes the same inputs as the fp32 one (its ``executorch`` metadata).

    Args:
        model: the segmenter ``fp32_path`` was exported from.
        fp32_path: ``model.pte`` written by :func:`export_executorch`.
        out_path: the int8 ``.pte`` (metadata copied, ``precision: int8`` and the ``quantization``).
        calibration_inputs: model inputs (C, H, W), normalised and sized as the deployed model sees
            them (:func:`~hybridvision.export.quantize.deployment_inputs`); each is padded as
            :class:`~hybridvision.deploy.executorch_runtime.ExecuTorchSegmenter` pads it.
        calibration_info: recorded in the metadata's ``quantization.calibration``.

    Returns:
        ``out_path``.

    Raises:
        UserError: executorch is not installed (the message names the extra).
        ValueError: no calibration input, or one that is not (C, H, W).
        ExportError: the quantized program fails to lower.
    """
    from torchao import __version__ as torchao_version
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    _compiler()
    if not calibration_inputs:
        raise ValueError("quantize_executorch_int8 needs at least one calibration input")
    arrays = [np.asarray(a, dtype=np.float32) for a in calibration_inputs]
    for i, a in enumerate(arrays):
        if a.ndim != 3:
            raise ValueError(f"calibration input {i} has shape {a.shape}; expected (C, H, W)")
    metadata = read_pte_metadata(fp32_path)
    seg = unwrap_segmenter(model)
    traced = _fused_copy(seg)
    with _exporting(seg), _exporting(traced):
        prepared = prepare_pt2e(_folded_graph(traced, metadata), _quantizer())
        for a in arrays:
            size = program_input_size(metadata, *a.shape[-2:])
            padded = np.pad(a, ((0, 0), (0, size[0] - a.shape[1]), (0, size[1] - a.shape[2])))
            prepared(torch.from_numpy(padded[None]))
        quantized = convert_pt2e(prepared)
        try:
            program = _lower(quantized, metadata)
        except Exception as exc:  # torch.export and ExecuTorch's passes raise many types
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"{out_path}: the int8 program does not lower: {first}") from exc
    metadata.update(
        precision="int8",
        quantization={
            "tool": f"torchao {torchao_version} PT2E (prepare_pt2e / convert_pt2e), ExecuTorch XNNPACKQuantizer",
            "scheme": "static int8 activations (histogram), per-channel symmetric int8 weights",
            # XNNPACKQuantizer's patterns: conv, linear, add, mul, cat, pooling; the rest runs in float
            "float": ["classifier head", "normalisation, softmax, activation matmuls, resizes"],
            "calibration": {"inputs": len(arrays), **(calibration_info or {})},
        },
    )
    out = Path(out_path)
    _write(out, program, metadata)
    return out

"""ONNX export of a segmenter, checked with ``onnx.checker`` and against PyTorch.

Dynamic sizes where the graph allows them, else a fixed size recorded in the metadata.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..deploy.runtime import (
    METADATA_KEY,
    OnnxSegmenter,
    labels_from_scores,
    normalization_spec,
)
from ..geometry import Scale
from ..models.base import Segmenter

_logger = logging.getLogger(__name__)


DEFAULT_OPSET = 18
INPUT_NAME, OUTPUT_NAME = "image", "logits"


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
    return fused if fused.encoder.reparameterize() else seg  # type: ignore[operator]  # nn.Module.__getattr__ is typed Tensor | Module


def unwrap_segmenter(model: nn.Module) -> Segmenter:
    """The :class:`Segmenter` inside DDP / ``torch.compile`` wrappers.

    Raises:
        TypeError: ``model`` is no hybridvision Segmenter.
    """
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
    scale = Scale.parse(value) if isinstance(value, (list, tuple)) and value else None
    return list(scale) if scale else None


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
    fixed_size_fallback: bool = True,
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
        fixed_size_fallback: when the dynamic graph disagrees at another size (a model whose shape
            logic turns sizes into constants while tracing, e.g. timm's MobileViT), export it at
            ``train_crop`` and record that as the metadata's ``input_size`` (the predictors then
            slide windows of it); False: such a graph is an :class:`ExportError`.

    Returns:
        ``path``.

    Raises:
        ExportError: if ``onnx.checker`` rejects the graph or onnxruntime disagrees with PyTorch.
    """
    if opset < 17:
        raise ValueError(f"opset must be >= 17, got {opset}")
    seg = unwrap_segmenter(model)
    traced = _fused_copy(seg)  # re-parameterisable branches (FastViT, RepViT, MobileOne) fused
    crop = (int(train_crop[0]), int(train_crop[1]))
    metadata = _export_metadata(seg, dict(data_cfg or {}), class_names, crop, opset, ignore_index)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = seg.training
    device = next(seg.parameters()).device
    seg.eval().cpu()
    traced.eval().cpu()
    dummy = torch.randn(2, metadata["in_chans"], *crop, generator=torch.Generator().manual_seed(0))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        _write_graph(traced, dummy, tmp, metadata, opset, dynamic=True)
        if verify:
            size, diff = _verify_dynamic(seg, traced, dummy, tmp, metadata, atol, fixed_size_fallback)
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


def _export_metadata(
    seg: Segmenter,
    data: dict[str, Any],
    class_names: Sequence[str] | None,
    crop: tuple[int, int],
    opset: int,
    ignore_index: int | None,
) -> dict[str, Any]:
    """The deployment metadata stored in the graph (see :func:`export_onnx` for the arguments)."""
    in_chans = int(seg.build_kwargs.get("in_chans", data.get("in_chans", 3)))
    num_classes = int(seg.num_classes)
    names = list(class_names or data.get("class_names") or [f"class_{i}" for i in range(max(num_classes, 2))])
    return {
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


def _verify_dynamic(
    seg: Segmenter,
    traced: Segmenter,
    dummy: Tensor,
    tmp: Path,
    metadata: dict[str, Any],
    atol: float,
    fixed_size_fallback: bool,
) -> tuple[tuple[int, ...], float]:
    """Compare the graph at ``tmp`` with PyTorch at a size the trace did not see.

    A dynamic graph that disagrees (it kept sizes of the trace, e.g. MobileViT's unfold) is
    re-exported at the crop size, recorded as the metadata's ``input_size`` (the predictors slide
    windows of that size), when ``fixed_size_fallback``.

    Returns:
        The size compared at last and the max abs logit difference there.
    """
    divisor = metadata["size_divisor"]
    crop = tuple(metadata["train_crop"])
    size = check_size(crop, divisor)
    if seg.encoder.input_size:  # at most the fixed size, and not a multiple of the divisor
        size = tuple(max(1, s - divisor // 2 - 1) for s in seg.encoder.input_size)
    diff = _max_diff(seg, tmp, size)
    if diff <= atol or seg.encoder.input_size or not fixed_size_fallback:
        return size, diff
    _logger.warning(
        "%s: the ONNX graph does not generalise beyond %dx%d (max abs logit diff %s at %dx%d): "
        "exported at the fixed input size %dx%d; predictors slide windows of that size",
        seg.build_kwargs.get("name"),
        *crop,
        f"{diff:.3g}",
        *size,
        *crop,
    )
    metadata["input_size"] = list(crop)
    _write_graph(traced, dummy, tmp, metadata, metadata["opset"], dynamic=False)
    return crop, _max_diff(seg, tmp, crop)


def _write_graph(
    model: nn.Module, dummy: Tensor, path: Path, metadata: dict[str, Any], opset: int, dynamic: bool
) -> None:
    """Trace ``model`` to ``path``, add the metadata and check the graph.

    The batch is dynamic; height and width too if ``dynamic``.
    """
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
        seed: seed of the random inputs.

    Returns:
        One dict per (size, batch): ``size``, ``batch``, ``max_abs_diff``, ``argmax_agreement``
        (fraction of pixels with the same label; logit > 0 for one class).
    """
    seg = unwrap_segmenter(model)
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

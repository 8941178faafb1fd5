"""The deployment report: each model's size, speed and accuracy, side by side.

Params, GMACs, file size, latency, peak memory and mIoU, for PyTorch eager, onnxruntime, OpenVINO and
ExecuTorch (XNNPACK).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from ..deploy.runtime import (
    forward_any_size,
    labels_from_scores,
    load_segmenter,
    scores_at_scale,
)
from ..deploy.runtime import predict_sliding_window as np_predict_sliding_window
from ..deploy.runtime import predict_whole as np_predict_whole
from ..models.profile import count_gmacs
from .choice import choice_lines, choose_runtimes
from .memory import peak_memory
from .onnx import unwrap_segmenter
from .quantize import as_array

_logger = logging.getLogger(__name__)


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
        entries: ``{"name": str, "model": nn.Module}`` (PyTorch eager), ``{"name": str, "onnx":
            path}`` (onnxruntime CPU), ``{"name": str, "openvino": path of the .xml}`` (OpenVINO
            CPU, fp32 inference precision; ``"bf16": True`` runs it in bf16) or ``{"name": str,
            "executorch": path of the .pte}`` (ExecuTorch, XNNPACK on the CPU). An optional
            ``"model"`` beside a file gives the params and GMACs of the graph's source model.
        eval_data: samples ``{"image": (C, H, W) normalised, "mask": (H, W)}`` (e.g. finetune's
            evaluation dataset built by ``build_labelled_datasets``).
        num_classes: K (1 = binary).
        ignore_index: mask value left out of the metrics.
        train_crop: (H, W) of the crop latency and the GMACs.
        full_size: (H, W) of the full-image latency; default: the first evaluation image's size.
        eval_mode: ``"whole"`` or ``"slide"`` (window ``window`` or ``train_crop``, Gaussian blend).
        window: (H, W) of the sliding window (``eval_mode="slide"``); default ``train_crop``.
        runs: timed runs per latency figure (after ``warmup`` untimed ones).
        warmup: untimed runs before the timed ones.
        threads: CPU threads for PyTorch, onnxruntime, OpenVINO and ExecuTorch (whose thread pool is
            one per process: set to this for the rest of the process).
        class_names: for the per-class IoU in the JSON.
        max_eval_images: evaluate on the first N samples only.
        resize: evaluation scale ``[short_side, max_long_side]`` (``data.resize``): every model
            predicts each image rescaled to it, scores resized back to the mask; None: native.
        measure_memory: measure each model's peak memory of a full-image forward in a fresh process
            (:func:`peak_memory`, a few seconds per model); False: the figures are None.

    Returns:
        The report dict (also written to ``report.json``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = _eval_samples(eval_data, max_eval_images)
    crop = (int(train_crop[0]), int(train_crop[1]))
    first = as_array(samples[0]["image"])
    settings = _ReportSettings(
        crop=crop,
        full=tuple(int(s) for s in (full_size or first.shape[-2:])),
        in_chans=first.shape[0],
        window=cast("tuple[int, int]", tuple(window or crop)),
        eval_mode=eval_mode,
        runs=runs,
        warmup=warmup,
        threads=threads,
        resize=resize,
        measure_memory=measure_memory,
        num_classes=num_classes,
        ignore_index=ignore_index,
        class_names=class_names,
    )
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows = [_report_row(entry, samples, settings) for entry in entries]
    finally:
        torch.set_num_threads(previous_threads)
    report = {
        "eval": {
            "images": len(samples),
            "mode": eval_mode,
            "window": list(settings.window) if eval_mode == "slide" else None,
            "resize": list(resize) if resize else None,
        },
        "threads": threads,
        "cpu": cpu_name(),
        "cpu_features": cpu_features(),
        "entries": rows,
        "choice": choose_runtimes(rows),  # per model: the fastest runtime within 0.01 mIoU of fp32
    }
    _write_report(out_dir, report)
    return report


def _eval_samples(eval_data: Sequence[dict[str, Any]], max_eval_images: int | None) -> list[dict[str, Any]]:
    """The first ``max_eval_images`` samples (all if None), read by index: datasets need not stop."""
    count = len(eval_data) if max_eval_images is None else min(len(eval_data), max_eval_images)
    samples = [eval_data[i] for i in range(count)]
    if not samples:
        raise ValueError("deployment_report needs at least one evaluation sample")
    return samples


def _write_report(out_dir: Path, report: dict[str, Any]) -> None:
    """Write ``report.json``, ``report.md`` and ``report.png`` into ``out_dir``."""
    from ..io import write_json_atomic

    write_json_atomic(out_dir / "report.json", report)
    (out_dir / "report.md").write_text(_report_markdown(report))
    _report_png(report["entries"], out_dir / "report.png")


@dataclasses.dataclass(frozen=True)
class _ReportSettings:
    """What :func:`deployment_report` measures every entry with (its arguments, resolved)."""

    crop: tuple[int, int]  #: (H, W) of the crop latency and the GMACs
    full: tuple[int, ...]  #: (H, W) of the full-image latency and the peak memory
    in_chans: int  #: C of the model input
    window: tuple[int, int]  #: (H, W) of the sliding window (``eval_mode="slide"``)
    eval_mode: str  #: ``"whole"`` or ``"slide"``
    runs: int  #: timed runs per latency figure
    warmup: int  #: untimed runs before them
    threads: int  #: CPU threads for every runtime
    resize: Sequence[int] | None  #: evaluation scale ``[short_side, max_long_side]``; None: native
    measure_memory: bool  #: measure peak memory in a fresh process
    num_classes: int  #: K (1 = binary)
    ignore_index: int  #: mask value left out of the metrics
    class_names: Sequence[str] | None  #: for the per-class IoU


#: ``forward(x)`` (N, C, H, W) -> logits, and ``scores(x)`` (1, C, H, W) -> the runtime's scores
_Runner = tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]


def _report_row(
    entry: dict[str, Any], samples: Sequence[dict[str, Any]], settings: _ReportSettings
) -> dict[str, Any]:
    """One model's row of the report: size, GMACs, latency, peak memory and accuracy."""
    name = entry["name"]
    module = entry.get("model")
    exported = entry.get("onnx") or entry.get("openvino") or entry.get("executorch")
    bf16 = bool(entry.get("bf16", False))
    row: dict[str, Any] = {"name": name, "runtime": _runtime_name(entry)}
    if exported:
        forward, scores = _exported_runner(row, entry, exported, module, bf16, settings)
    else:
        if module is None:
            raise ValueError(f"report entry {name!r} needs 'model' or 'onnx'")
        module = unwrap_segmenter(module).eval().cpu()
        forward, scores = _eager_runner(row, module, settings)
    row["gmacs_train_crop"] = (
        count_gmacs(unwrap_segmenter(module), settings.in_chans, settings.crop)
        if module is not None
        else None
    )
    row.update(_latencies(forward, settings))
    target = exported or module  # the file, or the eager module
    assert target is not None  # one of them was given, checked above
    row.update(_peak_memory_figures(name, target, bf16, settings))
    row.update(_accuracy(scores, samples, settings))
    return row


def _exported_runner(
    row: dict[str, Any],
    entry: dict[str, Any],
    exported: str | os.PathLike,
    module: nn.Module | None,
    bf16: bool,
    settings: _ReportSettings,
) -> _Runner:
    """Load ``exported``, ``entry``'s ONNX, OpenVINO or ExecuTorch file; fill ``row``'s precision, size, params."""
    runner = load_segmenter(exported, threads=settings.threads, bf16=bf16)
    row["precision"] = "bf16" if bf16 else runner.metadata.get("precision", "fp32")
    row["file_mb"] = _file_mb(Path(exported))
    row["onnx_file_mb"] = row["file_mb"] if entry.get("onnx") else None  # before file_mb
    # the source model's count when given; else weights in the graph (BN folded into convs)
    row["params"] = (
        sum(p.numel() for p in unwrap_segmenter(module).parameters())
        if module is not None
        else _graph_params(Path(exported))
    )

    def forward(x: np.ndarray) -> np.ndarray:
        return forward_any_size(runner, x)  # windows beyond a fixed or largest input size

    def scores(x: np.ndarray) -> np.ndarray:
        if settings.eval_mode == "slide":
            return np_predict_sliding_window(forward, x, settings.window, blend="gaussian")
        return np_predict_whole(forward, x)

    return forward, scores


def _eager_runner(row: dict[str, Any], module: nn.Module, settings: _ReportSettings) -> _Runner:
    """Run ``module`` (PyTorch eager, CPU); fill ``row``'s precision, file size and params."""
    from ..inference import predict_sliding_window, predict_whole

    row["precision"] = "fp32"
    row["file_mb"] = row["onnx_file_mb"] = None
    row["params"] = sum(p.numel() for p in module.parameters())

    def forward(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()

    def scores(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(x)
        if settings.eval_mode == "slide":
            s = predict_sliding_window(module, t, settings.window, blend="gaussian", output="logits")
        else:
            s = predict_whole(module, t, output="logits")
        # the runtime's convention (what scores_at_scale expects): probabilities for
        # K >= 2 (torch's "logits" are their log), logits for K = 1
        return (s.exp() if s.shape[1] > 1 else s).numpy()

    return forward, scores


def _latencies(forward: Callable[[np.ndarray], np.ndarray], settings: _ReportSettings) -> dict[str, Any]:
    """Latency at batch 1 of the training crop and of a full image (standard-normal inputs)."""
    rng = np.random.default_rng(0)
    figures = {}
    for label, size in (("train_crop", settings.crop), ("full_image", settings.full)):
        x = rng.standard_normal((1, settings.in_chans, *size)).astype(np.float32)
        figures[f"latency_{label}"] = {
            "size": list(size),
            **_time(functools.partial(forward, x), settings.runs, settings.warmup),
        }
    return figures


def _peak_memory_figures(
    name: str, model: nn.Module | str | os.PathLike, bf16: bool, settings: _ReportSettings
) -> dict[str, float | None]:
    """Peak memory of one full-image forward, in a fresh process; None where not measured."""
    figures: dict[str, float | None] = {"peak_rss_mib": None, "peak_above_baseline_mib": None}
    if settings.measure_memory:
        try:
            shape = (1, settings.in_chans, *settings.full)
            mem = peak_memory(model, shape, settings.threads, bf16=bf16)
            figures["peak_rss_mib"] = mem["peak_rss_mib"]
            figures["peak_above_baseline_mib"] = mem["forward_mib"]
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            _logger.warning("%s: no peak-memory figure (%s)", name, exc)
    return figures


def _accuracy(
    scores: Callable[[np.ndarray], np.ndarray], samples: Sequence[dict[str, Any]], settings: _ReportSettings
) -> dict[str, Any]:
    """``miou`` and per-class ``iou`` (None for absent classes) of ``scores`` on ``samples``."""
    from ..metrics import ConfusionMatrix

    cm = ConfusionMatrix(settings.num_classes, settings.ignore_index, class_names=settings.class_names)
    for sample in samples:
        img = as_array(sample["image"]).astype(np.float32)
        s = scores_at_scale(scores, img, settings.resize)  # as the runtime's OnnxPredictor does
        cm.update(
            torch.from_numpy(labels_from_scores(s)),
            torch.as_tensor(np.array(as_array(sample["mask"]), dtype=np.int64))[None],
        )
    metrics = cm.compute()
    return {"miou": metrics["miou"], "iou": [None if v != v else v for v in metrics["iou"]]}


#: CPU flags that decide how fast int8 and bf16 run (``/proc/cpuinfo`` spelling): VNNI and AMX
#: int8 dot products, AVX-512 BF16 and AMX bf16 (where OpenVINO runs bf16 unless told f32)
CPU_FEATURES = (
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_bf16",
    "amx_int8",
)


def cpu_features() -> list[str]:
    """The :data:`CPU_FEATURES` this CPU has (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as fh:
            info = fh.read()
    except OSError:
        return []
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))
    return [f for f in CPU_FEATURES if f in flags]


def cpu_name() -> str:
    """CPU model, its :func:`cpu_features` and logical CPU count, e.g. for a report's header."""
    try:
        with open("/proc/cpuinfo") as fh:
            info = fh.read()
        name = next(
            (ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?"
        )
        return f"{name} ({', '.join(cpu_features()) or 'no avx2'}), {os.cpu_count()} logical CPUs"
    except OSError:
        return "unknown"


def _runtime_name(entry: dict[str, Any]) -> str:
    if entry.get("onnx"):
        return "onnxruntime-cpu"
    if entry.get("openvino"):
        return "openvino-cpu"
    if entry.get("executorch"):
        return "executorch-xnnpack"
    return "pytorch-eager"


def _file_mb(path: Path) -> float:
    """Size of an exported model: the ``.onnx`` or ``.pte``, or an OpenVINO IR's ``.xml`` + ``.bin``."""
    files = [path, path.with_suffix(".bin")] if path.suffix.lower() == ".xml" else [path]
    return sum(f.stat().st_size for f in files) / 2**20


def _graph_params(path: Path) -> int:
    """Weights in an exported graph (ONNX initializers; OpenVINO constants; ExecuTorch: counted at export)."""
    if path.suffix.lower() == ".pte":
        from ..deploy.executorch_runtime import read_pte_metadata

        return int(read_pte_metadata(path)["executorch"]["params"])
    if path.suffix.lower() != ".xml":
        return _onnx_params(path)
    from ..deploy.openvino_runtime import read_ir

    total = 0
    for node in read_ir(path).get_ordered_ops():
        if node.get_type_name() == "Constant" and len(node.get_output_shape(0)) >= 1:
            size = int(np.prod(list(node.get_output_shape(0))))
            weights = node.get_output_element_type(0).get_type_name() in ("f32", "f16", "bf16", "i8", "u8")
            total += size if size > 1 and weights else 0
    return total


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "—" if v is None else format(v, spec)


def _report_markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Deployment report",
        "",
        f"CPU: {report['cpu']}; {report['threads']} thread(s); batch 1; mIoU on {report['eval']['images']} "
        f"evaluation images ({report['eval']['mode']}).",
        "",
        f"CPU features: {', '.join(report.get('cpu_features') or []) or 'none of ' + ', '.join(CPU_FEATURES)}. "
        "int8 gains need VNNI or AMX int8; OpenVINO bf16 needs AVX-512 BF16 or AMX; figures travel only "
        "to CPUs with the same features.",
        "",
        "| model | runtime | precision | params (M) | GMACs (crop) | file (MB) | crop latency ms (p25-p75) "
        "| full-image latency ms (p25-p75) | peak memory of a full-image forward, MiB (forward's own) | mIoU |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["entries"]:
        c, f = r["latency_train_crop"], r["latency_full_image"]
        lines.append(
            f"| {r['name']} | {r['runtime']} | {r['precision']} | {r['params'] / 1e6:.2f} | "
            f"{_fmt(r['gmacs_train_crop'])} | {_fmt(r['file_mb'], '.2f')} | "
            f"{c['median_ms']:.2f} ({c['p25_ms']:.2f}-{c['p75_ms']:.2f}) @ {c['size'][0]}x{c['size'][1]} | "
            f"{f['median_ms']:.2f} ({f['p25_ms']:.2f}-{f['p75_ms']:.2f}) @ {f['size'][0]}x{f['size'][1]} | "
            f"{_fmt(r['peak_rss_mib'], '.0f')} (+{_fmt(r['peak_above_baseline_mib'], '.1f')}) | {r['miou']:.4f} |"
        )
    lines += ["", *choice_lines(report.get("choice") or {})]
    return "\n".join(lines) + "\n"


def _report_png(rows: Sequence[dict[str, Any]], path: Path, size: tuple[int, int] = (720, 480)) -> None:
    """Plot mIoU against full-image latency, one labelled point per model (Pillow only)."""
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

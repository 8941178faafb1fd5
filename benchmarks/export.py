"""Latency of every installed runtime (PyTorch, onnxruntime, OpenVINO, ExecuTorch; fp32/bf16/int8), in one run.

    python benchmarks/export.py                                   # zoo models, random weights
    python benchmarks/export.py --teacher runs/finetune/model --student runs/distill/model \\
        --calibration ../shared/data/camvid/images/train --size 360 480

Each model is exported (``hybridvision.export.export_onnx``) and statically quantized to int8
(onnxruntime: QDQ, per-channel weights; OpenVINO, when installed: the IR converted from that ONNX
file, bf16 where the CPU has it, and NNCF int8; ExecuTorch, when installed: XNNPACK fp32 and PT2E
int8), calibrated on ``--calibration`` images or, without
it, on random normal inputs (enough for timing, not for accuracy). Batch 1, ``--threads`` CPU
threads for every runtime, repetitions interleaved across the runtimes after warmup; prints
medians, the p25-p75 spread, the speed-up against PyTorch eager and against onnxruntime fp32, and
the fastest exported runtime. ``--extra`` adds models (default: timm's FastViT-T8, a hybrid with
released weights; random weights here). int8 pays on CPUs with VNNI (``avx512_vnni`` /
``avx_vnni``) or AMX; without them it can be slower than fp32.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hybridvision.deploy.reader import list_images, read_image  # noqa: E402
from hybridvision.deploy.runtime import OnnxSegmenter, normalization_spec, normalize_image  # noqa: E402
from hybridvision.export import cpu_name, export_onnx, quantize_int8  # noqa: E402
from hybridvision.models import create_segmenter, from_pretrained  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="hybrid_tiny", help="model directory or zoo name")
    p.add_argument("--student", default="hybrid_nano", help="model directory or zoo name")
    p.add_argument("--num-classes", type=int, default=11, help="classes of zoo-built models")
    p.add_argument("--in-chans", type=int, default=3, help="channels of zoo-built models")
    p.add_argument("--size", type=int, nargs=2, default=(256, 256), help="input H W")
    p.add_argument("--reps", type=int, default=20, help="timed repetitions per runtime")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calibration", default=None, help="folder of images for int8 calibration")
    p.add_argument("--calibration-count", type=int, default=16)
    p.add_argument(
        "--extra", nargs="*", default=["timm/fastvit_t8"], help="more models (zoo names, timm/...)"
    )
    p.add_argument(
        "--runtimes",
        nargs="+",
        default=["onnxruntime", "openvino", "executorch"],
        help="runtimes beside onnxruntime (each where installed)",
    )
    return p.parse_args(argv)


def build(spec: str, args: argparse.Namespace) -> tuple[torch.nn.Module, dict]:
    if Path(spec).is_dir():
        model = from_pretrained(spec)
        data = model.pretrained_config.get("extra", {}).get("run_config", {}).get("data", {})
        return model.eval(), data
    torch.manual_seed(0)
    return create_segmenter(spec, num_classes=args.num_classes, in_chans=args.in_chans).eval(), {}


def calibration_set(model: torch.nn.Module, data: dict, args: argparse.Namespace) -> list[np.ndarray]:
    in_chans = int(model.build_kwargs["in_chans"])
    if args.calibration:
        spec = normalization_spec(data, in_chans)
        files = list_images(Path(args.calibration))[: args.calibration_count]
        return [normalize_image(read_image(f, in_chans), spec) for f in files]
    rng = np.random.default_rng(0)
    return [
        rng.standard_normal((in_chans, *args.size)).astype(np.float32) for _ in range(args.calibration_count)
    ]


def runtimes(
    role: str, model: torch.nn.Module, data: dict, tmp: Path, args: argparse.Namespace
) -> dict[str, tuple[Callable[[np.ndarray], Any], Path | None]]:
    """Every runtime installed here for one model: name -> (callable on a batch, file or None)."""
    fp32_path = export_onnx(model, tmp / f"{role}.onnx", train_crop=tuple(args.size), data_cfg=data)
    calibration = calibration_set(model, data, args)
    int8_path = quantize_int8(fp32_path, tmp / f"{role}.int8.onnx", calibration)
    fp32, int8 = OnnxSegmenter(fp32_path, args.threads), OnnxSegmenter(int8_path, args.threads)

    def eager(x: np.ndarray) -> None:
        with torch.no_grad():
            model(torch.from_numpy(x))

    found: dict[str, tuple[Callable[[np.ndarray], Any], Path | None]] = {
        "pytorch eager": (eager, None),
        "onnxruntime fp32": (fp32, fp32_path),
        "onnxruntime int8": (int8, int8_path),
    }
    if importlib.util.find_spec("openvino") is not None and "openvino" in args.runtimes:
        from hybridvision.deploy.openvino_runtime import OpenVinoSegmenter, bf16_supported
        from hybridvision.export.openvino import export_openvino, quantize_openvino_int8

        xml = export_openvino(fp32_path, tmp / f"{role}.xml")
        xml8 = quantize_openvino_int8(xml, tmp / f"{role}.int8.xml", calibration)
        found["openvino fp32"] = (OpenVinoSegmenter(xml, args.threads), xml)
        if bf16_supported():
            found["openvino bf16"] = (OpenVinoSegmenter(xml, args.threads, bf16=True), xml)
        found["openvino int8"] = (OpenVinoSegmenter(xml8, args.threads), xml8)
    if importlib.util.find_spec("executorch") is not None and "executorch" in args.runtimes:
        from hybridvision.deploy.executorch_runtime import ExecuTorchSegmenter
        from hybridvision.export.executorch import export_executorch, quantize_executorch_int8

        pte = export_executorch(model, fp32_path, tmp / f"{role}.pte")
        pte8 = quantize_executorch_int8(model, pte, tmp / f"{role}.int8.pte", calibration)
        found["executorch fp32"] = (ExecuTorchSegmenter(pte, args.threads), pte)
        found["executorch int8"] = (ExecuTorchSegmenter(pte8, args.threads), pte8)
    return found


def _file_mb(path: Path | None) -> str:
    """Size on disk in MiB (an OpenVINO IR counts its .bin)."""
    if path is None:
        return "-"
    files = [path, path.with_suffix(".bin")] if path.suffix == ".xml" else [path]
    return f"{sum(f.stat().st_size for f in files if f.is_file()) / 2**20:.2f}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_name()}; threads {args.threads}; batch 1; input {args.size[0]}x{args.size[1]}")
    header = f"{'model':<30} {'runtime':<17} {'median ms':>10} {'p25-p75 ms':>16} {'vs eager':>9} {'vs ORT fp32':>11} {'MB':>7}"
    print(header)
    print("-" * len(header))
    models = [("teacher", args.teacher), ("student", args.student), *(("extra", m) for m in args.extra)]
    with tempfile.TemporaryDirectory() as tmp:
        for index, (role, spec) in enumerate(models):
            model, data = build(spec, args)
            in_chans = int(model.build_kwargs["in_chans"])
            found = runtimes(f"{role}{index}", model, data, Path(tmp), args)  # unique file names
            x = np.random.default_rng(1).standard_normal((1, in_chans, *args.size)).astype(np.float32)
            for fn, _ in found.values():
                for _ in range(args.warmup):
                    fn(x)
            times: dict[str, list[float]] = {k: [] for k in found}
            for _ in range(args.reps):  # interleaved, so drifting machine load hits every runtime alike
                for name, (fn, _) in found.items():
                    start = time.perf_counter()
                    fn(x)
                    times[name].append((time.perf_counter() - start) * 1e3)
            medians = {k: statistics.median(v) for k, v in times.items()}
            label = f"{role}: {spec}"
            for name, values in times.items():
                p25, p75 = np.percentile(values, [25, 75])
                print(
                    f"{label:<30} {name:<17} {medians[name]:>10.2f} {p25:>7.2f}-{p75:<8.2f} "
                    f"{medians['pytorch eager'] / medians[name]:>8.2f}x "
                    f"{medians['onnxruntime fp32'] / medians[name]:>10.2f}x {_file_mb(found[name][1]):>7}"
                )
                label = ""
            exported = {k: v for k, v in medians.items() if k != "pytorch eager"}
            fastest = min(exported, key=exported.__getitem__)
            print(
                f"{'':<30} fastest exported: {fastest}, {medians['onnxruntime fp32'] / exported[fastest]:.2f}x "
                "onnxruntime fp32 (latency only: the deployment report checks the mIoU)"
            )


if __name__ == "__main__":
    main()

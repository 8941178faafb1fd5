"""PyTorch eager vs onnxruntime fp32 vs onnxruntime int8 latency, for a teacher and a student, in one run.

    python benchmarks/export.py                                   # zoo models, random weights
    python benchmarks/export.py --teacher runs/finetune/model --student runs/distill/model \\
        --calibration ../shared/data/camvid/images/train --size 360 480

Each model is exported (``hybridvision.export.export_onnx``) and statically quantized to int8
(QDQ, per-channel weights; calibrated on ``--calibration`` images or, without it, on random
normal inputs, which is enough for timing but not for accuracy). Batch 1, ``--threads`` CPU threads
for both runtimes, repetitions interleaved across the three runtimes after warmup; prints medians,
the p25-p75 spread and the speed-up ratios against PyTorch eager. int8 pays on CPUs with VNNI
(``avx512_vnni`` / ``avx_vnni``) or AMX; without them it can be slower than fp32.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_name()}; threads {args.threads}; batch 1; input {args.size[0]}x{args.size[1]}")
    header = f"{'model':<10} {'runtime':<16} {'median ms':>10} {'p25-p75 ms':>16} {'vs eager':>9} {'MB':>7}"
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for role, spec in (("teacher", args.teacher), ("student", args.student)):
            model, data = build(spec, args)
            in_chans = int(model.build_kwargs["in_chans"])
            fp32_path = export_onnx(
                model, Path(tmp) / f"{role}.onnx", train_crop=tuple(args.size), data_cfg=data
            )
            int8_path = quantize_int8(
                fp32_path, Path(tmp) / f"{role}.int8.onnx", calibration_set(model, data, args)
            )
            fp32, int8 = OnnxSegmenter(fp32_path, args.threads), OnnxSegmenter(int8_path, args.threads)
            x = np.random.default_rng(1).standard_normal((1, in_chans, *args.size)).astype(np.float32)
            xt = torch.from_numpy(x)

            def eager(model=model, xt=xt) -> None:
                with torch.no_grad():
                    model(xt)

            runners = {
                "pytorch eager": eager,
                "onnxruntime fp32": lambda fp32=fp32, x=x: fp32(x),
                "onnxruntime int8": lambda int8=int8, x=x: int8(x),
            }
            for fn in runners.values():
                for _ in range(args.warmup):
                    fn()
            times: dict[str, list[float]] = {k: [] for k in runners}
            for _ in range(args.reps):  # interleaved, so drifting machine load hits all three alike
                for name, fn in runners.items():
                    start = time.perf_counter()
                    fn()
                    times[name].append((time.perf_counter() - start) * 1e3)
            base = statistics.median(times["pytorch eager"])
            sizes = {"pytorch eager": None, "onnxruntime fp32": fp32_path, "onnxruntime int8": int8_path}
            label = f"{role}"
            for name, values in times.items():
                med = statistics.median(values)
                p25, p75 = np.percentile(values, [25, 75])
                mb = f"{sizes[name].stat().st_size / 2**20:.2f}" if sizes[name] else "—"
                print(
                    f"{label:<10} {name:<16} {med:>10.2f} {p25:>7.2f}-{p75:<8.2f} {base / med:>8.2f}x {mb:>7}"
                )
                label = ""
            ratio = statistics.median(times["onnxruntime fp32"]) / statistics.median(
                times["onnxruntime int8"]
            )
            print(f"{'':<10} int8 vs fp32 (onnxruntime): {ratio:.2f}x")


if __name__ == "__main__":
    main()

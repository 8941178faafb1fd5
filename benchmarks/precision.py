"""Does bf16 autocast pay on this machine? fp32 vs bf16 for the GEMM and convolution shapes our
models run, side by side in one interleaved run (forward only, median of reps).

    OMP_NUM_THREADS=1 python benchmarks/precision.py [--threads 1] [--reps 7]

bf16 halves memory traffic everywhere, but its arithmetic is only faster where the CPU has a fast
bf16 dot product (AMX on Sapphire Rapids and later; GPUs). On a CPU with AVX512-BF16 and no AMX,
oneDNN's bf16 GEMM can run below fp32's rate, so ``train.mixed_precision=bf16`` slows GEMM-heavy
models (Swin, ViT, TransUNet) while still saving memory. The last column is the fp32 time over the
bf16 time: above 1 bf16 is faster.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

# (M, K, N) of nn.Linear calls in our encoders at 128-224 px, batch 8: Swin-T stage 1-4 qkv / MLP,
# ViT-B MLP
LINEARS = [
    (18432, 96, 288),
    (18432, 96, 384),
    (18432, 384, 96),
    (4608, 192, 576),
    (4608, 768, 192),
    (1152, 384, 1152),
    (1152, 1536, 384),
    (1568, 768, 3072),
]
# (channels, side) of 3x3 convolutions, batch 8: the U-Net / ResNet stages at 128 px
CONVS = [(32, 128), (64, 64), (128, 32), (256, 16)]


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Print the table; return ``{op: fp32 time / bf16 time}``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args(argv)
    ratios: dict[str, float] = {}
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"== fp32 vs bf16, forward, {args.threads} thread(s), median of {args.reps}; torch {torch.__version__} =="
    )
    print(
        f"{'op':34s} {'fp32 ms':>9s} {'bf16 ms':>9s} {'fp32 GFLOP/s':>13s} {'bf16 GFLOP/s':>13s} {'fp32/bf16':>10s}"
    )
    with torch.no_grad():
        for m, k, n in LINEARS:
            flops = 2 * m * k * n
            row = []
            for dtype in (torch.float32, torch.bfloat16):
                x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
                b = torch.randn(n, dtype=dtype)
                row.append(median_ms(lambda x=x, w=w, b=b: F.linear(x, w, b), args.reps))
            ratios[f"linear {m}x{k} -> {n}"] = _print(f"linear {m}x{k} -> {n}", row, flops)
        for c, side in CONVS:
            flops = 2 * 8 * c * c * 9 * side * side
            row = []
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(8, c, side, side, dtype=dtype)
                w = torch.randn(c, c, 3, 3, dtype=dtype)
                row.append(median_ms(lambda x=x, w=w: F.conv2d(x, w, padding=1), args.reps))
            ratios[f"conv3x3 8x{c}x{side}x{side}"] = _print(f"conv3x3 8x{c}x{side}x{side}", row, flops)
    return ratios


def _print(name: str, row: list[float], flops: int) -> float:
    fp32, bf16 = row
    print(
        f"{name:34s} {fp32:9.2f} {bf16:9.2f} {flops / fp32 / 1e6:13.1f} {flops / bf16 / 1e6:13.1f} {fp32 / bf16:9.2f}x"
    )
    return fp32 / bf16


if __name__ == "__main__":
    main()

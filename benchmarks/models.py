"""Model benchmarks: SegFormer-B0 training throughput vs transformers, and a params / GMACs table.

Usage::

    python benchmarks/models.py                      # CPU, fp32 + bf16 autocast, 5 reps
    python benchmarks/models.py --device cuda --reps 20
    python benchmarks/models.py --skip-table --reps 3

Throughput: one training step = forward + cross-entropy on logits upsampled to the input size
+ backward + AdamW step, batch 8 at 256 x 256, 19 classes, both models in train mode (same
drop-path and dropout rates). Ours and transformers' steps alternate within every repetition
(after warmup), so load from other processes hits both alike; the median step time is reported,
with the ratio of median process CPU times next to it (steadier on a shared machine).

Table: parameters and GMACs (``FlopCounterMode`` FLOPs / 2, one 224 x 224 image) of every
registered segmenter preset and encoder; a model whose module fails to import or build is listed
with the reason instead.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[dtype])


def _train_step(
    model: nn.Module,
    logits_fn: Callable[[Tensor], Tensor],
    opt: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    dtype: str,
) -> None:
    opt.zero_grad(set_to_none=True)
    with _autocast(x.device, dtype):
        logits = logits_fn(x)
    loss = F.cross_entropy(logits.float(), y, ignore_index=255)
    loss.backward()
    opt.step()


def _build_pair(num_classes: int, device: torch.device):
    """Our segformer_b0 and transformers' SegformerForSemanticSegmentation with the same B0 config."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    from hybridvision.models import create_segmenter

    ours = create_segmenter("segformer_b0", num_classes=num_classes).to(device).train()
    theirs = SegformerForSemanticSegmentation(SegformerConfig(num_labels=num_classes)).to(device).train()
    n_ours = sum(p.numel() for p in ours.parameters())
    n_theirs = sum(p.numel() for p in theirs.parameters())
    if n_ours != n_theirs:
        raise RuntimeError(f"parameter counts differ: ours {n_ours}, transformers {n_theirs}")

    def theirs_logits(x: Tensor) -> Tensor:
        logits = theirs(pixel_values=x).logits  # (B, K, H/4, W/4)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    return (ours, ours), (theirs, theirs_logits)


def bench_throughput(args: argparse.Namespace, device: torch.device) -> None:
    (ours, ours_fn), (theirs, theirs_fn) = _build_pair(args.num_classes, device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.size, args.size, generator=g).to(device)
    y = torch.randint(0, args.num_classes, (args.batch_size, args.size, args.size), generator=g).to(device)
    runs = {
        "ours": (ours, ours_fn, torch.optim.AdamW(ours.parameters(), lr=6e-5)),
        "transformers": (theirs, theirs_fn, torch.optim.AdamW(theirs.parameters(), lr=6e-5)),
    }
    print(
        f"\n== train step: segformer_b0, batch {args.batch_size}, {args.size}x{args.size}, {args.num_classes} classes, "
        f"device {device}, threads {torch.get_num_threads()}, {args.warmup} warmup + {args.reps} reps (interleaved) =="
    )
    print(
        f"{'dtype':<6} {'ours img/s':>11} {'transformers img/s':>19} {'ours/theirs':>12}"
        f"   {'CPU-time ratio':>14}"
    )
    for dtype in args.dtypes:
        wall: dict[str, list[float]] = {k: [] for k in runs}
        cpu: dict[str, list[float]] = {k: [] for k in runs}
        for rep in range(args.warmup + args.reps):
            order = list(runs) if rep % 2 == 0 else list(runs)[::-1]
            for key in order:
                model, fn, opt = runs[key]
                _sync(device)
                start, start_cpu = time.perf_counter(), time.process_time()
                _train_step(model, fn, opt, x, y, dtype)
                _sync(device)
                if rep >= args.warmup:
                    wall[key].append(time.perf_counter() - start)
                    cpu[key].append(time.process_time() - start_cpu)
        ips = {k: args.batch_size / statistics.median(v) for k, v in wall.items()}
        cpu_ratio = statistics.median(cpu["transformers"]) / statistics.median(cpu["ours"])
        print(
            f"{dtype:<6} {ips['ours']:>11.2f} {ips['transformers']:>19.2f} {ips['ours'] / ips['transformers']:>11.2f}x"
            f"   {cpu_ratio:>13.2f}x"
        )
    print(
        "(img/s from median wall time per step; CPU-time ratio = transformers' / ours' median process CPU "
        "seconds per step,\n less sensitive to other processes on a shared machine; on CUDA it only counts host time)"
    )


def _count_macs(model: nn.Module, x: Tensor) -> float:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops() / 2


def _measure(name: str, kind: str, size: int) -> tuple[int, float]:
    from hybridvision.models import create_encoder, create_segmenter

    def build() -> nn.Module:
        model = create_segmenter(name, num_classes=150) if kind == "segmenter" else create_encoder(name)
        return model.eval()

    try:  # shapes suffice for counting: the meta device skips the arithmetic
        with torch.device("meta"):
            model = build()
            x = torch.empty(1, 3, size, size)
        return sum(p.numel() for p in model.parameters()), _count_macs(model, x)
    except Exception:  # noqa: BLE001  (some op has no meta kernel): count on CPU instead
        model = build()
        return sum(p.numel() for p in model.parameters()), _count_macs(model, torch.zeros(1, 3, size, size))


def model_table(size: int) -> None:
    try:
        from hybridvision.models import list_models
        from hybridvision.models.registry import list_segmenters
    except Exception as exc:  # noqa: BLE001
        print(f"\nmodel table skipped: hybridvision.models does not import ({type(exc).__name__}: {exc})")
        return
    segmenters = set(list_segmenters())
    print(f"\n== params and GMACs (FLOPs / 2) at 1 x 3 x {size} x {size}; segmenters with 150 classes ==")
    print(f"{'model':<28} {'kind':<10} {'params (M)':>11} {'GMACs':>8}")
    for name in list_models():
        kind = "segmenter" if name in segmenters else "encoder"
        try:
            params, macs = _measure(name, kind, size)
        except Exception as exc:  # noqa: BLE001  (module still under construction, etc.)
            reason = str(exc).splitlines()[0][:70] if str(exc) else ""
            print(f"{name:<28} {kind:<10} {'skipped':>11}  ({type(exc).__name__}: {reason})")
            continue
        print(f"{name:<28} {kind:<10} {params / 1e6:>11.2f} {macs / 1e9:>8.2f}")
    print(
        "(segformer_mlp heads are counted as evaluated: the 1x1 fuse conv is folded into the per-scale\n"
        " projections, so the (n_scales x E)-channel concatenation at stride 4 is never formed; same\n"
        " parameters and function as the published head, which costs more MACs, see SegFormerHead)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--reps", type=int, default=5, help="timed steps per model and dtype")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model and dtype")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=256, help="training image side")
    parser.add_argument("--num-classes", type=int, default=19)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--table-size", type=int, default=224, help="image side for the GMACs table")
    parser.add_argument("--skip-speed", action="store_true", help="only print the params / GMACs table")
    parser.add_argument("--skip-table", action="store_true", help="only run the throughput comparison")
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if not args.skip_speed:
        bench_throughput(args, device)
    if not args.skip_table:
        model_table(args.table_size)


if __name__ == "__main__":
    main()

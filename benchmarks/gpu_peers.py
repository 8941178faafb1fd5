"""Helpers of ``benchmarks/gpu_check.sh``: training-step throughput and model FLOP utilisation (MFU)
of our models next to transformers' SegFormer-B0 and SimMIM, and an ONNX check on onnxruntime's
CUDA provider.

    python benchmarks/gpu_peers.py steps [--dtypes bf16 fp16] [--tiny]
    python benchmarks/gpu_peers.py onnx --onnx runs/distill/student.onnx --model runs/distill/student

``steps`` times whole training steps (forward, cross-entropy or the model's own loss, backward,
AdamW) of every row on one device, rows interleaved per dtype, with fp16 under a GradScaler as the
stage scripts run it. FLOPs per step (forward + backward, optimizer excluded) are counted by
``torch.utils.flop_counter.FlopCounterMode`` on one step; MFU is achieved FLOP/s over the device's
dense bf16 peak from the table below (by device name) and over a measured square-matmul peak.
Rows: ours ``segformer_b0`` and the fine-tuning default ``sequential_unet_tiny`` vs transformers
``SegformerForSemanticSegmentation`` (B0 config, random weights); ours ``swin_tiny`` MIM with
SimMIM's pixel-shuffle head vs transformers ``SwinForMaskedImageModeling`` (same window, the same
32 px block masks). ``--tiny``: small members of each family at 64 px (the CPU dry run).

``onnx`` runs an exported model on onnxruntime's CPU provider and, where onnxruntime has it, on its
CUDA provider, against the PyTorch model on one random batch: max |logit difference|, argmax
agreement and latency. An installed CUDA provider that does not load is an error (onnxruntime would
otherwise fall back to the CPU without a word).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: `pretrain` package

# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, from the vendors' data sheets (fp16 for GPUs
# without bf16); the first entry whose key is a substring of the lower-cased
# torch.cuda.get_device_name() wins, so specific names come first. None: no published figure (the
# measured matmul peak is the only reference then).
PEAK_BF16_TFLOPS: list[tuple[str, float | None]] = [
    ("gb200", 2500.0),
    ("b200", 2250.0),
    ("h200", 989.0),
    ("gh200", 989.0),
    ("h100 pcie", 756.0),
    ("h100 nvl", 835.0),
    ("h100", 989.0),  # SXM
    ("h800", 989.0),
    ("a100", 312.0),
    ("a800", 312.0),
    ("l40s", 362.0),
    ("l40", 181.0),
    ("l4", 121.0),
    ("a10g", None),
    ("a10", 125.0),
    ("rtx 6000 ada", 364.0),
    ("rtx 4090", 165.0),
    ("rtx 3090", 71.0),
    ("v100", 125.0),  # fp16 only (no bf16)
    ("t4", 65.0),  # fp16 only (no bf16)
]
DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def table_peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU named ``device_name`` from :data:`PEAK_BF16_TFLOPS`, or None."""
    name = device_name.lower()
    for key, peak in PEAK_BF16_TFLOPS:
        if key in name:
            return peak
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured_peak_tflops(device: torch.device, dtype: torch.dtype, side: int, reps: int) -> float:
    """TFLOP/s of a ``side``³ matmul in ``dtype``, the best of ``reps`` timed runs."""
    a = torch.randn(side, side, device=device, dtype=dtype)
    b = torch.randn(side, side, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * side**3 / best / 1e12


# ---------------------------------------------------------------------------------------------- rows


def _segmentation_rows(tiny: bool, num_classes: int) -> dict[str, Callable[[], tuple[nn.Module, Callable]]]:
    """Builders of (model, loss(model, batch)) for the segmentation rows."""

    def ours(name: str) -> Callable[[], tuple[nn.Module, Callable]]:
        def build() -> tuple[nn.Module, Callable]:
            from hybridvision.models import create_segmenter

            model = create_segmenter(name, num_classes=num_classes)
            return model, lambda m, b: F.cross_entropy(m(b["image"]).float(), b["label"])

        return build

    def hf() -> tuple[nn.Module, Callable]:
        from transformers import SegformerConfig, SegformerForSemanticSegmentation

        kwargs = {}
        if tiny:
            kwargs = dict(
                depths=[1, 1, 1, 1],
                hidden_sizes=[8, 16, 24, 32],
                num_attention_heads=[1, 1, 1, 2],
                decoder_hidden_size=16,
            )
        model = SegformerForSemanticSegmentation(SegformerConfig(num_labels=num_classes, **kwargs))
        # its own loss: logits upsampled to the label size, cross-entropy
        return model, lambda m, b: m(pixel_values=b["image"], labels=b["label"]).loss

    if tiny:
        return {
            "ours segformer_nano": ours("segformer_nano"),
            "ours unet_resnet_nano": ours("unet_resnet_nano"),
            "transformers SegFormer (tiny)": hf,
        }
    return {
        "ours segformer_b0": ours("segformer_b0"),
        "ours sequential_unet_tiny": ours("sequential_unet_tiny"),
        "transformers SegFormer-B0": hf,
    }


def _mim_rows(tiny: bool, size: int) -> dict[str, Callable[[], tuple[nn.Module, Callable]]]:
    """Builders of (model, loss(model, batch)) for the masked-image-modelling rows."""
    window = min(2 if tiny else 7, size // 32)

    def ours() -> tuple[nn.Module, Callable]:
        from hybridvision.models import create_encoder
        from pretrain.objectives import PretrainModel

        encoder = create_encoder("swin_nano" if tiny else "swin_tiny", window_size=window)
        model = PretrainModel(encoder, "mim", in_chans=3, mask_patch_size=32, decoder="pixel_shuffle")
        return model, lambda m, b: m({"image": b["image"], "mask": b["mask"]}).loss

    def hf() -> tuple[nn.Module, Callable]:
        from transformers import SwinConfig, SwinForMaskedImageModeling

        kwargs = dict(embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8]) if tiny else {}
        config = SwinConfig(image_size=size, window_size=window, encoder_stride=32, **kwargs)
        model = SwinForMaskedImageModeling(config)
        return model, lambda m, b: m(pixel_values=b["image"], bool_masked_pos=b["bool_masked_pos"]).loss

    tag = "swin_nano" if tiny else "swin_tiny"
    return {f"ours {tag} MIM (pixel-shuffle head)": ours, f"transformers SimMIM ({tag} config)": hf}


def _mim_batch(batch: int, size: int, device: torch.device) -> dict[str, Tensor]:
    from pretrain.masking import BlockMaskGenerator

    g = torch.Generator().manual_seed(2)
    image = torch.randn(batch, 3, size, size, generator=g)
    mask = BlockMaskGenerator(size, 32, 0.6)(batch, generator=g)  # (B, 1, S/32, S/32)
    cell = 32 // 4  # mask cells -> Swin's 4 px patches
    bool_masked_pos = mask.repeat_interleave(cell, 2).repeat_interleave(cell, 3).flatten(1).bool()
    return {"image": image.to(device), "mask": mask.to(device), "bool_masked_pos": bool_masked_pos.to(device)}


# -------------------------------------------------------------------------------------------- timing


class _Step:
    """One training step of ``model`` on a fixed batch: loss under autocast, backward, AdamW step."""

    def __init__(self, model: nn.Module, loss_fn: Callable, batch: dict[str, Tensor], device: torch.device):
        self.model = model.to(device).train()
        self.loss_fn = loss_fn
        self.batch = batch
        self.device = device
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
        self.scaler = torch.amp.GradScaler(device.type, enabled=False)

    def set_dtype(self, dtype: str) -> None:
        self.dtype = DTYPES[dtype]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=dtype == "fp16")

    def forward_backward(self) -> None:
        autocast = (
            torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else contextlib.nullcontext()
        )
        with autocast:
            loss = self.loss_fn(self.model, self.batch)
        self.scaler.scale(loss).backward()

    def __call__(self, steps: int) -> float:
        """Seconds ``steps`` training steps took (device synchronised at both ends)."""
        _sync(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.forward_backward()
            self.scaler.step(self.opt)
            self.scaler.update()
            self.opt.zero_grad(set_to_none=True)
        _sync(self.device)
        return time.perf_counter() - start

    def flops(self) -> int:
        """FLOPs of one forward + backward (optimizer excluded)."""
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            self.forward_backward()
        self.opt.zero_grad(set_to_none=True)
        return counter.get_total_flops()


def run_steps(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Print the table; return ``{"row|dtype": {"ms": , "img_s": , "tflops": , "mfu": }}``."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = table_peak_tflops(name)
        matmul = measured_peak_tflops(device, torch.bfloat16, args.matmul_side, 20)
        peak_note = f"spec bf16 peak {peak:.0f} TFLOP/s" if peak else "device not in the spec table"
    else:
        name, peak = "CPU", None
        matmul = measured_peak_tflops(device, torch.float32, args.matmul_side, 5)
        peak_note = "no spec peak for CPUs"
    print(
        f"training steps on {name}: {peak_note}; measured {args.matmul_side}^3 matmul "
        f"{matmul:.3f} TFLOP/s ({'bf16' if device.type == 'cuda' else 'fp32'})"
    )
    print(
        f"(torch {torch.__version__}, {args.warmup} warmup + {args.steps} timed steps per row, "
        f"FLOPs: forward + backward via FlopCounterMode, MFU = achieved / peak)"
    )
    groups = {
        f"segmentation, batch {args.seg_batch}, {args.seg_size}x{args.seg_size}, {args.classes} classes, "
        "cross-entropy": (
            _segmentation_rows(args.tiny, args.classes),
            args.seg_batch,
            lambda: _seg_batch(args.seg_batch, args.seg_size, args.classes, device),
        ),
        f"masked image modelling, batch {args.mim_batch}, {args.mim_size}x{args.mim_size}, 32 px masks, "
        "ratio 0.6, L1": (
            _mim_rows(args.tiny, args.mim_size),
            args.mim_batch,
            lambda: _mim_batch(args.mim_batch, args.mim_size, device),
        ),
    }
    results: dict[str, dict[str, float]] = {}
    header = (
        f"{'model':<44} {'dtype':<5} {'params M':>8} {'ms/step':>9} {'img/s':>9} {'GFLOP/img':>10} "
        f"{'TFLOP/s':>8} {'MFU spec':>9} {'MFU mm':>7}"
    )
    for title, (rows, batch_size, make_batch) in groups.items():
        print(f"-- {title}")
        print(header)
        batch = make_batch()
        for row, build in rows.items():
            torch.manual_seed(0)
            model, loss_fn = build()
            step = _Step(model, loss_fn, batch, device)
            params = sum(p.numel() for p in model.parameters()) / 1e6
            flops = None
            for dtype in args.dtypes:
                step.set_dtype(dtype)
                step(args.warmup)
                seconds = step(args.steps) / args.steps
                if flops is None:
                    flops = step.flops()
                achieved = flops / seconds / 1e12
                mfu = achieved / peak if peak else float("nan")
                results[f"{row}|{dtype}"] = {
                    "ms": 1e3 * seconds,
                    "img_s": batch_size / seconds,
                    "tflops": achieved,
                    "mfu": mfu,
                }
                print(
                    f"{row:<44} {dtype:<5} {params:>8.2f} {1e3 * seconds:>9.2f} {batch_size / seconds:>9.1f} "
                    f"{flops / batch_size / 1e9:>10.3f} {achieved:>8.3f} {_pct(mfu):>9} {_pct(achieved / matmul):>7}"
                )
            del model, step
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return results


def _pct(value: float) -> str:
    return "-" if value != value else f"{100 * value:.1f}%"


def _seg_batch(batch: int, size: int, classes: int, device: torch.device) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(1)
    image = torch.randn(batch, 3, size, size, generator=g)
    label = torch.randint(0, classes, (batch, size, size), generator=g)
    return {"image": image.to(device), "label": label.to(device)}


# ---------------------------------------------------------------------------------------------- ONNX


def _median_ms(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def run_onnx(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Compare the ONNX model on each available provider with the PyTorch model; raise on a mismatch."""
    import onnxruntime as ort

    from hybridvision.models import from_pretrained

    model = from_pretrained(args.model).eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(args.batch, model.build_kwargs["in_chans"], *args.size, generator=g)
    with torch.no_grad():
        reference = model(x).numpy()
    available = ort.get_available_providers()
    providers = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        providers.append("CUDAExecutionProvider")
    else:
        print(
            f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (available: {', '.join(available)}): "
            "install onnxruntime-gpu to run ONNX on the GPU; checked on the CPU provider only"
        )
    results: dict[str, dict[str, float]] = {}
    for provider in providers:
        session = ort.InferenceSession(args.onnx, providers=[provider])
        if session.get_providers()[0] != provider:
            raise SystemExit(
                f"error: onnxruntime did not load {provider} (session runs on {session.get_providers()}); "
                "check that onnxruntime-gpu matches the installed CUDA and cuDNN"
            )
        feed = {session.get_inputs()[0].name: x.numpy()}
        out = session.run(None, feed)[0]
        diff = float(abs(out - reference).max())
        if reference.shape[1] > 1:
            agree = float((out.argmax(1) == reference.argmax(1)).mean())
        else:
            agree = float(((out > 0) == (reference > 0)).mean())
        ms = _median_ms(lambda s=session, f=feed: s.run(None, f), args.reps)
        results[provider] = {"max_abs_diff": diff, "argmax_agreement": agree, "ms": ms}
        print(
            f"{provider:<24} output {tuple(out.shape)}  max |ONNX - PyTorch| {diff:.2e}  "
            f"argmax agreement {100 * agree:.3f}%  {ms:.2f} ms/batch of {args.batch}"
        )
        if not (diff == diff) or agree < args.min_agreement:
            raise SystemExit(
                f"error: {provider} disagrees with PyTorch (max diff {diff:.3g}, argmax agreement {agree:.4f} "
                f"< {args.min_agreement})"
            )
    return results


# ---------------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    steps = sub.add_parser("steps", help="training-step throughput and MFU, ours vs transformers")
    steps.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    steps.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"], choices=list(DTYPES))
    steps.add_argument("--tiny", action="store_true", help="small models at 64 px (CPU dry run)")
    steps.add_argument("--steps", type=int, default=20, help="timed steps per row and dtype")
    steps.add_argument(
        "--warmup", type=int, default=5, help="untimed steps before (cuDNN autotuning, caches)"
    )
    steps.add_argument("--classes", type=int, default=19, help="segmentation classes")
    steps.add_argument("--seg-batch", type=int, default=16)
    steps.add_argument("--seg-size", type=int, default=512)
    steps.add_argument("--mim-batch", type=int, default=64)
    steps.add_argument("--mim-size", type=int, default=224)
    steps.add_argument("--matmul-side", type=int, default=8192, help="side of the peak-measuring matmul")
    onnx = sub.add_parser("onnx", help="an exported model on onnxruntime's CPU and CUDA providers vs PyTorch")
    onnx.add_argument("--onnx", required=True, help=".onnx file")
    onnx.add_argument("--model", required=True, help="the PyTorch model directory it was exported from")
    onnx.add_argument("--size", type=int, nargs=2, default=[128, 128], metavar=("H", "W"))
    onnx.add_argument("--batch", type=int, default=2)
    onnx.add_argument("--reps", type=int, default=10, help="timed runs per provider")
    onnx.add_argument("--min-agreement", type=float, default=0.99, help="least argmax agreement accepted")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with torch.no_grad() if args.command == "onnx" else contextlib.nullcontext():
        return run_steps(args) if args.command == "steps" else run_onnx(args)


if __name__ == "__main__":
    main()

"""Encoder training-step speed against reference implementations, interleaved in one run.

Usage::

    python benchmarks/encoders.py                         # CPU, 1 thread, fp32 + bf16, every row
    python benchmarks/encoders.py --rows swin_tiny transunet_r50_vit_b16 --reps 7
    python benchmarks/encoders.py --device cuda --threads 0 --batch-size 32

A step is forward (``forward_features`` for ours, the reference's feature forward) + a loss that
reads every returned map (sum of their means, in fp32) + backward + AdamW step, in train mode,
fp32 or under bf16 autocast. Ours and the references of one row alternate inside every
repetition (the order rotates from one repetition to the next) after ``--warmup`` untimed ones;
the table gives median images/s and our ratio to each reference in wall time and in process CPU
time (steadier on a machine shared with other jobs).

Rows (ours vs reference, same architecture and parameter count unless noted):

* ``mit_b0`` vs transformers ``SegformerModel`` (B0 config), 224 x 224;
* ``resnet18`` vs torchvision ``resnet18`` (stem + ``layer1..4``), 224 x 224;
* ``swin_tiny`` (window 6) vs timm ``swin_tiny_patch4_window7_224`` (``window_size=6``) and
  transformers ``SwinModel``, 192 x 192, stochastic depth 0.2 in all three. Ours also applies the
  three extra per-stage output norms of the segmentation backbone;
* ``transunet_r50_vit_b16`` vs timm ``vit_base_r50_s16_224`` (BiT R50 root, 3 stages + ViT-B/16),
  224 x 224, dropout off in both (timm's default); timm's model has a class token and no stride-2
  skip output, otherwise the same layers;
* the hybrids (``hybrid_*``, ``parallel_*``, ``sequential_*``) vs a plain timm model of equal
  GMACs at 224 x 224 (:data:`GMACS_PEERS`; parameter counts differ).

Timings on a shared machine are noisy: compare figures from one run, not across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from hybridvision.models import create_encoder  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

#: hybrid encoder -> plain timm model of (nearly) the same GMACs at 224 x 224
#: (ours / timm: hybrid_tiny 1.37 / 1.37, hybrid_small 4.44 / 4.45, parallel_tiny 1.38 / 1.37,
#: parallel_small 3.56 / 3.66, sequential_tiny 0.60 / 0.55, sequential_small 2.39 / 2.44)
GMACS_PEERS = {
    "hybrid_tiny": "convnext_pico",
    "hybrid_small": "convnext_tiny",
    "parallel_tiny": "convnext_pico",
    "parallel_small": "resnet34",
    "sequential_tiny": "convnext_atto",
    "sequential_small": "convnext_nano",
}

Forward = Callable[[Tensor], Sequence[Tensor]]


class Row(NamedTuple):
    """One comparison: our encoder and its references (label -> builder of ``(module, forward)``)."""

    name: str
    size: int
    ours: Callable[[], tuple[nn.Module, Forward]]
    references: dict[str, Callable[[], tuple[nn.Module, Forward]]]


def _ours(name: str, **overrides: Any) -> Callable[[], tuple[nn.Module, Forward]]:
    def build() -> tuple[nn.Module, Forward]:
        enc = create_encoder(name, **overrides)
        return enc, enc.forward_features

    return build


def _hf_segformer(tiny: bool) -> Callable[[], tuple[nn.Module, Forward]]:
    def build() -> tuple[nn.Module, Forward]:
        from transformers import SegformerConfig, SegformerModel

        small = {"hidden_sizes": [8, 16, 32, 64], "depths": [1, 1, 1, 1], "num_attention_heads": [1, 1, 2, 4]}
        model = SegformerModel(SegformerConfig(**(small if tiny else {})))  # default: the B0 configuration
        return model, lambda x: model(pixel_values=x, output_hidden_states=True).hidden_states

    return build


def _torchvision_resnet(tiny: bool) -> Callable[[], tuple[nn.Module, Forward]]:
    def build() -> tuple[nn.Module, Forward]:
        import torchvision
        from torchvision.models.resnet import BasicBlock, ResNet

        m = ResNet(BasicBlock, [1, 1, 1, 1]) if tiny else torchvision.models.resnet18(weights=None)
        del m.fc  # not part of the encoder (keeps the AdamW work equal)

        def forward(x: Tensor) -> list[Tensor]:
            x = m.relu(m.bn1(m.conv1(x)))
            feats = [x]
            x = m.maxpool(x)
            for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
                x = layer(x)
                feats.append(x)
            return feats

        return m, forward

    return build


_SWIN_NANO = {"embed_dim": 16, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 4, 8)}  # = swin_nano


def _timm_swin(size: int, window: int, tiny: bool) -> Callable[[], tuple[nn.Module, Forward]]:
    def build() -> tuple[nn.Module, Forward]:
        import timm

        name, extra = "swin_tiny_patch4_window7_224", _SWIN_NANO if tiny else {}
        model = timm.create_model(
            name, window_size=window, img_size=size, drop_path_rate=0.2, features_only=True, **extra
        )
        return model, model

    return build


def _hf_swin(size: int, window: int, tiny: bool) -> Callable[[], tuple[nn.Module, Forward]]:
    def build() -> tuple[nn.Module, Forward]:
        from transformers import SwinConfig, SwinModel

        extra = {k: list(v) if isinstance(v, tuple) else v for k, v in _SWIN_NANO.items()} if tiny else {}
        config = SwinConfig(image_size=size, window_size=window, drop_path_rate=0.2, **extra)
        model = SwinModel(config, add_pooling_layer=False)
        return model, lambda x: model(pixel_values=x, output_hidden_states=True).reshaped_hidden_states[1:]

    return build


def _timm_vit_r50(size: int, tiny: bool) -> Callable[[], tuple[nn.Module, Forward]]:
    def build() -> tuple[nn.Module, Forward]:
        import timm

        # tiny: timm's smallest ResNet-stem hybrid ViT, for smoke tests only
        name = "vit_tiny_r_s16_p8_224" if tiny else "vit_base_r50_s16_224"
        model = timm.create_model(name, num_classes=0, img_size=size)
        return model, lambda x: [model.forward_features(x)]

    return build


def _timm_plain(name: str) -> Callable[[], tuple[nn.Module, Forward]]:
    def build() -> tuple[nn.Module, Forward]:
        import timm

        model = timm.create_model(name, num_classes=0)
        return model, lambda x: [model.forward_features(x)]

    return build


def build_rows(size_scale: float = 1.0, tiny: bool = False) -> dict[str, Row]:
    """Every comparison by row name.

    Args:
        size_scale: shrinks the image sides (smoke tests).
        tiny: replace every model of a row by a tiny one of the same family (ours: the ``*_nano``
            presets), so that a smoke test builds and steps every row in seconds; not for figures.
    """

    def side(s: int, multiple: int = 32) -> int:
        return max(multiple, round(s * size_scale / multiple) * multiple)

    def ours(name: str, nano: str, **overrides: Any) -> Callable[[], tuple[nn.Module, Forward]]:
        if tiny:
            overrides.pop("img_size", None)
            overrides.pop("dropout", None)
        return _ours(nano if tiny else name, **overrides)

    swin_size = side(192, 96)
    swin_window = min(6, swin_size // 32)  # every stage at least one window (transformers needs it)
    vit_size = 64 if tiny else side(224)  # transunet_nano is laid out for 64 x 64
    rows = [
        Row(
            "mit_b0",
            side(224),
            ours("mit_b0", "mit_nano"),
            {"transformers SegformerModel": _hf_segformer(tiny)},
        ),
        Row(
            "resnet18",
            side(224),
            ours("resnet18", "resnet_nano"),
            {"torchvision resnet18": _torchvision_resnet(tiny)},
        ),
        Row(
            "swin_tiny",
            swin_size,
            ours("swin_tiny", "swin_nano", window_size=swin_window),
            {
                f"timm swin_tiny (w{swin_window})": _timm_swin(swin_size, swin_window, tiny),
                "transformers SwinModel": _hf_swin(swin_size, swin_window, tiny),
            },
        ),
        Row(
            "transunet_r50_vit_b16",
            vit_size,
            ours("transunet_r50_vit_b16", "transunet_nano", dropout=0.0, img_size=vit_size),
            {"timm vit_base_r50_s16_224": _timm_vit_r50(vit_size, tiny)},
        ),
    ]
    for name, peer in GMACS_PEERS.items():
        nano = name.rsplit("_", 1)[0] + "_nano"
        peer_build = _timm_plain("convnext_atto" if tiny else peer)
        rows.append(Row(name, side(224), ours(name, nano), {f"timm {peer} (= GMACs)": peer_build}))
    return {row.name: row for row in rows}


def _autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    if DTYPES[dtype] is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[dtype])


def _clock(device: torch.device) -> tuple[float, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter(), time.process_time()


def make_step(model: nn.Module, forward: Forward, x: Tensor, dtype: str) -> Callable[[], tuple[float, float]]:
    """A train step of ``model`` on ``x``; returns its (wall, CPU) seconds."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    device = x.device

    def step() -> tuple[float, float]:
        wall, cpu = _clock(device)
        with _autocast(device, dtype):
            feats = forward(x)
        loss = sum(f.float().mean() for f in feats)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        end_wall, end_cpu = _clock(device)
        return end_wall - wall, end_cpu - cpu

    return step


def bench_row(row: Row, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Interleaved timing of one row; prints its lines and returns images/s and ratios per dtype."""
    torch.manual_seed(0)
    builders = {"ours": row.ours, **row.references}
    models = {}
    for label, build in builders.items():
        model, forward = build()
        models[label] = (model.to(device).train(), forward)
    params = {k: sum(p.numel() for p in m.parameters()) / 1e6 for k, (m, _) in models.items()}
    x = torch.randn(args.batch_size, 3, row.size, row.size, generator=torch.Generator().manual_seed(0))
    x = x.to(device)
    steps = {(k, d): make_step(m, f, x, d) for k, (m, f) in models.items() for d in args.dtypes}
    times: dict[tuple[str, str], list[tuple[float, float]]] = {k: [] for k in steps}
    keys = list(steps)
    for rep in range(args.warmup + args.reps):
        shift = rep % len(keys)
        for key in keys[shift:] + keys[:shift]:
            elapsed = steps[key]()
            if rep >= args.warmup:
                times[key].append(elapsed)
    out: dict[str, Any] = {"params_M": params}
    for dtype in args.dtypes:
        wall = {k: statistics.median(t[0] for t in times[(k, dtype)]) for k in models}
        cpu = {k: statistics.median(t[1] for t in times[(k, dtype)]) for k in models}
        ips = {k: args.batch_size / wall[k] for k in models}
        line = f"{row.name:<22} {dtype:<5} {ips['ours']:>9.2f} ({params['ours']:>5.1f}M)"
        out[dtype] = {"ours": ips["ours"]}
        for ref in row.references:
            ratio, cpu_ratio = wall[ref] / wall["ours"], cpu[ref] / cpu["ours"]
            out[dtype][ref] = {"img_s": ips[ref], "ratio": ratio, "cpu_ratio": cpu_ratio}
            line += f" | {ref:<28} {ips[ref]:>8.2f} ({params[ref]:>5.1f}M) {ratio:>6.2f}x {cpu_ratio:>6.2f}x"
        print(line, flush=True)
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", nargs="+", default=None, help="row names (default: all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads; 0 keeps the default")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument(
        "--size-scale", type=float, default=1.0, help="shrink image sides (smoke tests; not for figures)"
    )
    parser.add_argument(
        "--tiny", action="store_true", help="tiny models of every family (smoke tests; not for figures)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the selected rows; returns ``{row: {"params_M": ..., dtype: {...}}}``."""
    args = parse_args(argv)
    rows = build_rows(args.size_scale, args.tiny)
    selected = args.rows or list(rows)
    unknown = sorted(set(selected) - set(rows))
    if unknown:
        raise SystemExit(f"unknown --rows {unknown}; valid: {', '.join(rows)}")
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"== encoder train step (forward + mean-of-maps loss + backward + AdamW), batch {args.batch_size}, "
        f"device {device}, threads {torch.get_num_threads()}; {args.warmup} warmup + {args.reps} reps, "
        "ours and references interleaved; medians =="
    )
    print(
        f"{'encoder':<22} {'dtype':<5} {'ours img/s':>18} | reference img/s (params) ours/ref wall, CPU time"
    )
    results = {}
    try:
        for name in selected:
            results[name] = bench_row(rows[name], args, device)
    finally:
        torch.set_num_threads(threads)
    print("(ratio > 1: ours is faster; shared machine: compare within one run)")
    return results


if __name__ == "__main__":
    main()

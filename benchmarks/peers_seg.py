"""Segmentation quality against peer libraries' models, trained through OUR fine-tuning pipeline.

Usage::

    python benchmarks/peers_seg.py --config configs/finetune/isbi_scratch.yaml \\
        --models ours smp_unet_resnet18 hf_segformer_b0 --json benchmarks/results/isbi_peers.json \\
        [--output-root runs/peers] [key=value ...]
    python benchmarks/peers_seg.py --summarize benchmarks/results/isbi_*.json   # one Markdown table

For a fine-tuning config, every model in ``--models`` is trained from random initialisation (or,
for ``ours``, from whatever ``model.init`` says) by ``finetune.run.main(cfg, model=...)``: the same
data pipeline, augmentations, loss, optimizer, schedule, step budget, mixed precision and evaluation
(ISBI: sliding window on the held-out slices; CamVid: whole test images, 11 classes, ignore 255).
Each model gets its own ``train.output_dir`` (``<output-root>/<config stem>/<model>``).

Models:

* ``ours`` — the segmenter the config describes (``finetune.run.main(cfg)``, exactly what
  ``python finetune/run.py --config ...`` runs).
* ``smp_unet_resnet18`` — segmentation_models_pytorch ``Unet(encoder_name="resnet18",
  encoder_weights=None)``; Ronneberger et al., 2015 (U-Net) on a ResNet-18 (He et al., 2016).
* ``hf_segformer_b0`` — transformers ``SegformerForSemanticSegmentation`` with the B0 config
  (Xie et al., 2021), random init, wrapped to return logits at the input size.

Peers' inputs are zero-padded (bottom/right) to a multiple of 32, as our ``Segmenter`` pads to its
encoder's ``size_divisor``, and the logits are cropped back. ``--json`` gets, per model: parameter
count, training wall time (seconds around ``main``, including evaluation and checkpoints) and the
final metrics. Wall times on a shared CPU are noisy: compare figures from one run.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `finetune` package

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from finetune.config import FinetuneConfig  # noqa: E402
from finetune.run import main as finetune_main  # noqa: E402
from hybridvision.config import config_to_dict, load_config  # noqa: E402
from hybridvision.engine import pending_exit_code  # noqa: E402
from hybridvision.models.base import pad_to_multiple  # noqa: E402


class PaddedPeer(nn.Module):
    """Adapter: pads the input to ``multiple``, runs ``net``, returns logits at the input size.

    Args:
        net: a module ``(B, C, H', W') -> (B, K, h, w)`` (a tensor, or an object with ``.logits``
            as transformers returns) with ``H'``, ``W'`` multiples of ``multiple``.
        multiple: padding multiple of the input side lengths.
    """

    def __init__(self, net: nn.Module, multiple: int = 32) -> None:
        super().__init__()
        self.net = net
        self.multiple = multiple

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, K, H, W) for images (B, C, H, W)."""
        height, width = x.shape[-2:]
        padded = pad_to_multiple(x, self.multiple)  # (B, C, H', W')
        out = self.net(padded)
        logits = out.logits if hasattr(out, "logits") else out  # (B, K, h, w)
        if logits.shape[-2:] != padded.shape[-2:]:
            logits = F.interpolate(logits, size=padded.shape[-2:], mode="bilinear", align_corners=False)
        return logits[..., :height, :width]


def smp_unet_resnet18(in_chans: int, num_classes: int) -> nn.Module:
    """segmentation_models_pytorch U-Net with a randomly initialised ResNet-18 encoder."""
    import segmentation_models_pytorch as smp

    net = smp.Unet(encoder_name="resnet18", encoder_weights=None, in_channels=in_chans, classes=num_classes)
    return PaddedPeer(net, 32)


def hf_segformer_b0(in_chans: int, num_classes: int) -> nn.Module:
    """transformers SegFormer-B0 (default ``SegformerConfig`` is B0), random init."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    config = SegformerConfig(num_channels=in_chans, num_labels=num_classes)
    return PaddedPeer(SegformerForSemanticSegmentation(config), 32)


#: peer name -> builder ``(in_chans, num_classes) -> module``; ``ours`` is the config's own model
PEERS: dict[str, Callable[[int, int], nn.Module]] = {
    "smp_unet_resnet18": smp_unet_resnet18,
    "hf_segformer_b0": hf_segformer_b0,
}


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (DataLoader workers), all threads.

    Unlike wall time this hardly moves when other jobs share the cores, so "equal budget" can be
    read across runs made at different times.
    """
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _resolved_resize(cfg: FinetuneConfig) -> Any:
    """``data.resize`` as the stage resolved it (the run config it saved next to its outputs)."""
    saved = Path(cfg.train.output_dir) / "run_config.yaml"
    if not saved.is_file():
        return cfg.data.resize
    return (yaml.safe_load(saved.read_text()) or {}).get("data", {}).get("resize", cfg.data.resize)


def run_one(name: str, cfg: FinetuneConfig) -> dict[str, Any]:
    """Train and evaluate one model under ``cfg``; returns params, wall time and metrics."""
    torch.manual_seed(cfg.train.seed)  # peers are built before the engine seeds; make their init repeatable
    model = None if name == "ours" else PEERS[name](cfg.data.in_chans, cfg.data.num_classes)
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    metrics = finetune_main(cfg, model=model)
    wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
    if pending_exit_code():  # stopped by a signal: no model to score; the checkpoint resumes it
        print(
            f"{name}: interrupted; nothing scored. Run the same command again to resume from "
            f"{cfg.train.output_dir}/checkpoints",
            file=sys.stderr,
        )
        sys.exit(pending_exit_code())
    if model is None:
        from hybridvision.models import from_pretrained

        exported = Path(cfg.train.output_dir) / "model"
        model = from_pretrained(exported)
        arch = json.loads((exported / "config.json").read_text())["hybridvision"]["build"]["name"]
        decoder = f", {cfg.model.decoder} decoder" if cfg.model.decoder else ""
        if cfg.model.decoder_kwargs:
            decoder += " " + ",".join(f"{k}={v}" for k, v in sorted(cfg.model.decoder_kwargs.items()))
        label = f"ours ({arch}{decoder}, {'from ' + cfg.model.init if cfg.model.init else 'scratch'})"
    else:
        label = name
    resize = _resolved_resize(cfg)
    if resize != "native":  # resolved by the stage: a fixed scale for varying-size folders
        extra = f"data.resize={resize}"
        label = f"{label[:-1]}, {extra})" if label.endswith(")") else f"{label} ({extra})"
    return {
        "model": name,
        "label": label,
        "params": count_parameters(model),
        "train_wall_s": round(wall, 1),
        "train_cpu_s": round(cpu, 1),
        "steps": cfg.train.max_steps,
        "threads": torch.get_num_threads(),
        "output_dir": cfg.train.output_dir,
        "metrics": metrics,
    }


def _steps(row: dict[str, Any]) -> str:
    steps = row.get("steps", row.get("resolved_config", {}).get("train", {}).get("max_steps"))
    return "-" if steps is None else str(steps)


def _cpu(row: dict[str, Any]) -> str:
    return f"{row['train_cpu_s']:.0f}" if "train_cpu_s" in row else "-"  # older results: wall only


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _scores(row: dict[str, Any]) -> tuple[float, float | None, float | None, float]:
    """(mIoU, foreground IoU, foreground Dice, pixel accuracy); foreground = class 1 of a binary task."""
    m = row["metrics"]
    binary = len(m["iou"]) == 2
    return (
        m["miou"],
        m["iou"][1] if binary else None,
        m["dice"][1] if binary else None,
        m["pixel_accuracy"],
    )


def table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table, one line per run (binary tasks: membrane = class 1 IoU/Dice; multi-class: mIoU)."""
    lines = [
        "| config | model | seed | params | steps | train CPU (s) | train wall (s) | mIoU | foreground IoU | foreground Dice | pixel acc |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        seed = r.get("resolved_config", {}).get("train", {}).get("seed", "")
        cells = " | ".join(_fmt(v) for v in _scores(r))
        lines.append(
            f"| {r.get('config', '')} | {r['label']} | {seed} | {r['params']:,} | {_steps(r)} | {_cpu(r)} | "
            f"{r['train_wall_s']:.0f} | {cells} |"
        )
    return "\n".join(lines)


def mean_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of the mean (and min-max) over seeds of each (config, model)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r.get("config", ""), r["label"], _steps(r)), []).append(r)
    lines = [
        "| config | model | steps | runs | mean train CPU (s) | mean train wall (s) | mIoU | foreground IoU | foreground Dice |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (config, label, steps), group in groups.items():
        cells = []
        for i in range(3):
            values = [_scores(r)[i] for r in group]
            if values[0] is None:
                cells.append("-")
                continue
            mean = sum(values) / len(values)
            spread = f" ({min(values):.3f}-{max(values):.3f})" if len(values) > 1 else ""
            cells.append(f"{mean:.4f}{spread}")
        wall = sum(r["train_wall_s"] for r in group) / len(group)
        cpus = [r["train_cpu_s"] for r in group if "train_cpu_s" in r]
        cpu = f"{sum(cpus) / len(cpus):.0f}" if len(cpus) == len(group) else "-"
        lines.append(
            f"| {config} | {label} | {steps} | {len(group)} | {cpu} | {wall:.0f} | {' | '.join(cells)} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="fine-tuning YAML (configs/finetune/...)")
    parser.add_argument(
        "--models",
        nargs="+",
        default=["smp_unet_resnet18", "hf_segformer_b0"],
        choices=["ours", *PEERS],
        help="models to train (default: the two peers)",
    )
    parser.add_argument(
        "--output-root", default="runs/peers", help="train.output_dir = <root>/<config stem>/<model>"
    )
    parser.add_argument("--json", help="write the results (list of rows) to this file")
    parser.add_argument(
        "--summarize", nargs="+", metavar="JSON", help="only print one table of these result files"
    )
    return parser.parse_known_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    if args.summarize:
        rows = [row for path in args.summarize for row in json.loads(Path(path).read_text())]
        rows.sort(key=lambda r: (r.get("config", ""), r["label"]))
        print(table(rows) + "\n\nMean over seeds (min-max):\n\n" + mean_table(rows))
        return 0
    if not args.config:
        raise SystemExit("--config is required (or --summarize)")
    stem = Path(args.config).stem
    rows = []
    for name in args.models:
        out = Path(args.output_root) / stem / name
        cfg = load_config(FinetuneConfig, args.config, [*overrides, f"train.output_dir={out}"])
        row = {"config": stem, **run_one(name, cfg), "overrides": list(overrides)}
        row["resolved_config"] = config_to_dict(cfg)
        rows.append(row)
        if args.json:  # rewrite after every model so a long run leaves partial results
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

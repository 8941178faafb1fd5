"""Fine-tune a segmenter (from a pretrained encoder, a released checkpoint, or scratch) and evaluate it.

    accelerate launch finetune/run.py [--config configs/finetune/X.yaml] [key=value ...]
    python finetune/run.py        # built-in synthetic data; starts from runs/pretrain/encoder if present

Writes ``<train.output_dir>/model/`` (``from_pretrained``-loadable) and ``metrics.json``.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: `finetune` package

from typing import TYPE_CHECKING  # noqa: E402

from finetune.config import DEFAULT_PRETRAINED_ENCODER, FALLBACK_MODEL, FinetuneConfig  # noqa: E402
from hybridvision.config import cli_main, config_to_dict  # noqa: E402
from hybridvision.io import write_json_atomic  # noqa: E402

if TYPE_CHECKING:
    from torch import nn

# torch, accelerate, torchvision and the model zoo are imported inside the functions that use them,
# so `--help` and config errors answer at once


def resolve_init(cfg: FinetuneConfig) -> str:
    init = cfg.model.init
    if init == "auto":
        return (
            DEFAULT_PRETRAINED_ENCODER if (Path(DEFAULT_PRETRAINED_ENCODER) / "config.json").is_file() else ""
        )
    return init


def default_model_name(init: str) -> str:
    """``model.name`` when none is given: the default preset, also for an encoder of its kind in
    ``init`` (so it keeps the preset's decoder); '' where ``init`` names another architecture."""
    from hybridvision.models.hub import read_model_config
    from hybridvision.models.registry import segmenter_spec
    from hybridvision.models.transfer import _encoder_name_of

    if not init:
        return FALLBACK_MODEL
    if not (Path(init) / "config.json").is_file():
        return ""  # weights files, hub ids, missing paths: build_segmenter decides or names the problem
    try:
        encoder = _encoder_name_of(read_model_config(init))
    except (OSError, ValueError, KeyError):
        return ""  # build_segmenter names the unreadable file
    return FALLBACK_MODEL if encoder == segmenter_spec(FALLBACK_MODEL).encoder else ""


def scheduled_size(cfg: FinetuneConfig, step: int) -> int | None:
    """Side length of the progressive-resizing schedule at ``step`` (None: no schedule)."""
    side = None
    for start, value in cfg.augment.size_schedule:
        if step >= start:
            side = value
    return side


def main(cfg: FinetuneConfig, model: nn.Module | None = None) -> dict:
    """Fine-tune and evaluate; returns the final metrics.

    Args:
        cfg: the resolved config.
        model: a ready segmentation module ``(B, C, H, W) -> (B, K, H, W)`` to train instead of the one
            ``cfg.model`` describes (used by ``benchmarks/peers_seg.py`` for peer libraries' models,
            which are then not exported).
    """
    import torch
    import torch.nn.functional as F

    from hybridvision.data.from_config import resolve_resize
    from hybridvision.data.loader import collate_mixed_sizes
    from hybridvision.engine import Engine, StepOutput
    from hybridvision.losses import build_segmentation_loss
    from hybridvision.models import save_pretrained
    from hybridvision.models.profile import model_summary
    from hybridvision.models.transfer import build_segmenter
    from hybridvision.segmentation.data import build_data, labelled_line
    from hybridvision.segmentation.evaluate import evaluate_segmenter

    data, resize_line = resolve_resize(cfg.data)  # the one resolution of data.resize=auto
    cfg = dataclasses.replace(cfg, data=data)
    engine = Engine(cfg.train, cfg.optim, run_config=cfg, project_name="finetune")
    acc = engine.accelerator
    d = cfg.data
    init = resolve_init(cfg) if model is None else "external"
    exportable = model is None
    if model is None:
        name = cfg.model.name or default_model_name(init)
        model, report = build_segmenter(
            name,
            d.num_classes,
            d.in_chans,
            init=init,
            strict=cfg.model.init_strict,
            decoder=cfg.model.decoder or None,
            decoder_kwargs=cfg.model.decoder_kwargs or None,
            overrides=cfg.model.overrides,
            input_size=tuple(d.image_size),
        )
        if engine.resume_checkpoint is None:  # else the weights come from the checkpoint
            engine.print(report.summary())
    engine.print(model_summary(model))

    engine.print(resize_line)
    data = build_data(cfg)
    train_set, val_set = data.train_set, data.val_set
    labelled = {} if data.labelled_ids is None else {"labelled_ids": data.labelled_ids}
    if labelled:
        engine.print(labelled_line(d, data.labelled_ids, len(data.unlabelled_rest or ())))
    criterion = build_segmentation_loss(
        d.num_classes,
        d.ignore_index,
        cfg.loss.weights,
        cfg.loss.class_weights or None,
        cfg.loss.label_smoothing,
    )

    ema = None
    if cfg.model.ema_decay > 0:
        ema = engine.build_ema(model, cfg.model.ema_decay)  # on the training device, checkpointed

    def step_fn(m: nn.Module, batch: dict) -> StepOutput:
        images, masks = batch["image"], batch["mask"]
        side = scheduled_size(cfg, engine.state.step)
        if side is not None and side != images.shape[-1]:  # progressive resizing, per batch
            images = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False)
            masks = F.interpolate(masks[:, None].float(), size=(side, side), mode="nearest")[:, 0].long()
        out = criterion(m(images), masks)
        return StepOutput(loss=out.total, logs={f"loss_{k}": v for k, v in out.terms.items()})

    def on_step_end(eng: Engine) -> None:
        if ema is not None:
            ema.update_parameters(acc.unwrap_model(eng.model))

    def eval_model(m: nn.Module) -> nn.Module:
        return ema.module if ema is not None else acc.unwrap_model(m)

    eval_loader = None
    if val_set is not None:
        eval_loader = acc.prepare_data_loader(
            torch.utils.data.DataLoader(
                val_set, batch_size=cfg.eval.batch_size, collate_fn=collate_mixed_sizes
            )  # images of different sizes are evaluated at their own size
        )

    def eval_fn(eng: Engine, m: nn.Module) -> dict:
        metrics, grid = evaluate_segmenter(eval_model(m), eval_loader, cfg, acc)
        if grid is not None:
            eng.log_images({"eval/input|truth|prediction": grid})
        per_class = {f"iou/{n}": v for n, v in zip(metrics["class_names"], metrics["iou"]) if v is not None}
        eng.log(per_class)
        return metrics

    def export(m: nn.Module, directory: Path, metrics: dict | None = None) -> None:
        target = ema.module if ema is not None else m
        extra = {"stage": "finetune", "init": init, "run_config": config_to_dict(cfg), **labelled}
        save_pretrained(target, directory, extra={**extra, "metrics": metrics or {}})

    result = engine.fit(
        model,
        train_set,
        step_fn,
        eval_fn=eval_fn if eval_loader is not None else None,
        export_fn=export if exportable else None,
        on_step_end=on_step_end,
        num_workers=d.num_workers,
        persistent_workers=d.persistent_workers,
        pin_memory=d.pin_memory,
    )
    out = Path(cfg.train.output_dir)
    if result["interrupted"]:  # partial: no model/, metrics.json says so
        engine.close_interrupted(result)
        return {}
    if acc.is_main_process:
        metrics = result["final_metrics"]
        if exportable:
            export(acc.unwrap_model(engine.model), out / "model", metrics)
        write_json_atomic(
            out / "metrics.json", {"step": result["step"], "init": init or "scratch", **labelled, **metrics}
        )
    acc.wait_for_everyone()
    m = result["final_metrics"]
    if m:
        engine.print(
            f"mIoU={m['miou']:.4f} mean Dice={m['mean_dice']:.4f} pixel acc={m['pixel_accuracy']:.4f} "
            f"(per class IoU: {', '.join(f'{n}={v:.3f}' for n, v in zip(m['class_names'], m['iou']) if v is not None)})"
        )
    written = f"model written to {out / 'model'}; " if exportable else ""
    engine.print(f"{written}metrics in {out / 'metrics.json'}")
    engine.close()
    return m


if __name__ == "__main__":
    code = cli_main(FinetuneConfig, main)
    if "hybridvision.engine" in sys.modules:  # imported only if a run started (not for --help)
        sys.modules["hybridvision.engine"].shutdown_distributed()
    if "hybridvision.engine" in sys.modules:  # an interrupted run exits 130 (SIGINT) / 143 (SIGTERM)
        code = code or sys.modules["hybridvision.engine"].pending_exit_code()
    sys.exit(code)

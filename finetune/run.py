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

from finetune.build import build_model, resolve_init, scheduled_size  # noqa: E402
from finetune.config import FinetuneConfig  # noqa: E402
from hybridvision.config import cli_main, config_to_dict  # noqa: E402
from hybridvision.io import write_json_atomic  # noqa: E402

if TYPE_CHECKING:
    from torch import nn

# torch, accelerate, torchvision and the model zoo are imported inside the functions that use them,
# so `--help` and config errors answer at once


def main(cfg: FinetuneConfig, model: nn.Module | None = None) -> dict:
    """Fine-tune and evaluate; returns the final metrics.

    Args:
        cfg: the resolved config.
        model: a ready segmentation module ``(B, C, H, W) -> (B, K, H, W)`` to train instead of the one
            ``cfg.model`` describes (used by ``benchmarks/peers_seg.py`` for peer libraries' models,
            which are then not exported).
    """
    import torch.nn.functional as F

    from finetune.build import metrics_line
    from hybridvision.data.from_config import resolve_resize
    from hybridvision.engine import Engine, StepOutput
    from hybridvision.models import save_pretrained
    from hybridvision.models.profile import model_summary
    from hybridvision.segmentation.data import build_data, labelled_line
    from hybridvision.segmentation.evaluate import evaluate_segmenter
    from hybridvision.segmentation.training import build_eval_loader, build_task_loss

    data, resize_line = resolve_resize(cfg.data)  # the one resolution of data.resize=auto
    cfg = dataclasses.replace(cfg, data=data)
    engine = Engine(cfg.train, cfg.optim, run_config=cfg, project_name="finetune")
    cfg = dataclasses.replace(cfg, train=engine.cfg)  # train.mixed_precision=auto resolved
    acc = engine.accelerator
    d = cfg.data
    init = resolve_init(cfg) if model is None else "external"
    exportable = model is None
    if model is None:
        model = build_model(cfg, init, engine)
    engine.print(model_summary(model))

    engine.print(resize_line)
    data = build_data(cfg)
    train_set, val_set = data.train_set, data.val_set
    labelled = {} if data.labelled_ids is None else {"labelled_ids": data.labelled_ids}
    if labelled:
        engine.print(labelled_line(d, data.labelled_ids, len(data.unlabelled_rest or ())))
    eval_loader = build_eval_loader(val_set, cfg, acc)
    criterion = build_task_loss(cfg)

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
        engine.print(metrics_line(m))
    written = f"model written to {out / 'model'}; " if exportable else ""
    engine.print(f"{written}metrics in {out / 'metrics.json'}")
    engine.close()
    return m


if __name__ == "__main__":
    code = cli_main(FinetuneConfig, main)
    if "hybridvision.engine" in sys.modules:  # imported only if a run started (not for --help)
        engine_module = sys.modules["hybridvision.engine"]
        engine_module.shutdown_distributed()
        code = code or engine_module.pending_exit_code()  # interrupted: 130 (SIGINT) / 143 (SIGTERM)
    sys.exit(code)

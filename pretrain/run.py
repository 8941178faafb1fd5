"""Self-supervised pretraining of a hybrid encoder: NT-Xent, masked image modelling, or both.

    accelerate launch pretrain/run.py [--config configs/pretrain/X.yaml] [key=value ...]
    python pretrain/run.py                      # built-in synthetic data, a few CPU minutes

Writes ``<train.output_dir>/encoder/`` (``model.safetensors`` + ``config.json``), loadable with
``hybridvision.models.from_pretrained`` and by ``finetune/run.py model.init=<dir>``. With
``objective.mim_decoder=segmenter`` the whole segmenter named by ``model.name`` is pretrained and
``<train.output_dir>/segmenter/`` is written too: fine-tuning from it starts with the trained
decoder (all but its output layer, which reconstructed pixels).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: `pretrain` package

import torch  # noqa: E402
from torch import nn  # noqa: E402

from hybridvision.config import cli_main  # noqa: E402
from hybridvision.engine import (  # noqa: E402
    Engine,
    StepOutput,
    pending_exit_code,
    shutdown_distributed,
)
from hybridvision.probe import dense_linear_probe  # noqa: E402
from pretrain.build import (  # noqa: E402
    build_model,
    export_encoder,
    pretrain_dataset,
    probe_loaders,
    scale_lr,
)
from pretrain.config import PretrainConfig  # noqa: E402
from pretrain.monitors import make_mim_grid  # noqa: E402


def main(cfg: PretrainConfig) -> None:
    # DDP's find_unused_parameters is decided by the engine from the built model (one dry step): NT-Xent
    # reads only the last stage, a pixel-shuffle MIM decoder skips some stage norms
    cfg, lr_line = scale_lr(cfg)  # resolved once, before anything reads optim.lr
    engine = Engine(cfg.train, cfg.optim, run_config=cfg, project_name="pretrain")
    cfg = dataclasses.replace(cfg, train=engine.cfg)  # train.mixed_precision=auto resolved
    acc = engine.accelerator
    if lr_line:
        engine.print(lr_line)
    model, report = build_model(cfg)
    if engine.resume_checkpoint is None:  # else the weights come from the checkpoint
        engine.print(report.summary())
    if cfg.objective.sync_batchnorm and acc.num_processes > 1 and acc.device.type == "cuda":  # CUDA-only op
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)

    dataset = pretrain_dataset(cfg, rank=acc.process_index, world_size=acc.num_processes)
    probes = probe_loaders(cfg)

    def step_fn(m: nn.Module, batch: dict) -> StepOutput:
        out = m(batch)
        logs = {f"loss_{k}": v for k, v in out.terms.items()} | out.stats
        images = None
        every = cfg.train.log_images_every
        due = every and (engine.state.step + 1) % every == 0
        if due and out.images is not None and acc.is_main_process:
            im = out.images
            images = {
                "mim/masked|reconstruction|original": make_mim_grid(
                    im["masked"], im["reconstruction"], im["original"], mask=im.get("mask")
                )
            }
        return StepOutput(loss=out.loss, logs=logs, images=images)

    def eval_fn(eng: Engine, m: nn.Module) -> dict[str, float]:
        if probes is None:
            return {}
        encoder = acc.unwrap_model(m).encoder
        with acc.autocast():
            return dense_linear_probe(
                encoder,
                probes[0],
                probes[1],
                cfg.probe.num_classes,
                stages=cfg.probe.stages,
                ignore_index=cfg.data.ignore_index,
                seed=cfg.train.seed,
            )

    fresh = engine.resume_checkpoint is None
    if probes is not None and cfg.probe.at_start and fresh:
        with torch.no_grad():
            start = eval_fn(engine, model)
        engine.log({f"eval/{k}": v for k, v in start.items()}, step=0)
        engine.print("probe at init: " + ", ".join(f"{k}={v:.4f}" for k, v in start.items()))

    result = engine.fit(
        model,
        dataset,
        step_fn,
        eval_fn=eval_fn,
        export_fn=export_encoder(cfg),
        num_workers=cfg.data.num_workers,
        persistent_workers=cfg.data.persistent_workers,
        pin_memory=cfg.data.pin_memory,
    )
    if result["interrupted"]:  # partial: no encoder/; the engine printed the checkpoint and how to resume
        engine.close()
        return
    out_dir = Path(cfg.train.output_dir) / "encoder"
    if acc.is_main_process:
        export_encoder(cfg)(acc.unwrap_model(engine.model), out_dir)
    acc.wait_for_everyone()
    metrics = result["final_metrics"]
    if metrics:
        engine.print("probe after pretraining: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    if acc.unwrap_model(engine.model).segmenter_build is not None:
        out_dir = out_dir.parent / "segmenter"
        engine.print(f"encoder written to {out_dir.parent / 'encoder'}, encoder + decoder to {out_dir}")
    else:
        engine.print(f"encoder written to {out_dir}")
    engine.print(f"fine-tune with: python finetune/run.py model.init={out_dir}")
    engine.close()


if __name__ == "__main__":
    code = cli_main(PretrainConfig, main)
    shutdown_distributed()
    sys.exit(code or pending_exit_code())  # an interrupted run exits 130 (SIGINT) / 143 (SIGTERM)

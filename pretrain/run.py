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
from torch.utils.data import DataLoader, Subset  # noqa: E402

from hybridvision.config import ConfigError, DataConfig, cli_main, config_to_dict  # noqa: E402
from hybridvision.data.from_config import (
    build_labelled_datasets,  # noqa: E402
    build_unlabelled_dataset,  # noqa: E402
)
from hybridvision.data.transforms import build_seg_transforms  # noqa: E402
from hybridvision.engine import (  # noqa: E402
    Engine,
    StepOutput,
    pending_exit_code,
    shutdown_distributed,
)
from hybridvision.models import list_models, save_pretrained  # noqa: E402
from hybridvision.models.registry import segmenter_spec  # noqa: E402
from hybridvision.models.transfer import InitReport, build_encoder, build_segmenter  # noqa: E402
from hybridvision.probe import dense_linear_probe  # noqa: E402
from pretrain.config import PretrainConfig  # noqa: E402
from pretrain.heads import classifier_prefix  # noqa: E402
from pretrain.monitors import make_mim_grid  # noqa: E402
from pretrain.objectives import PretrainModel, scaled_lr  # noqa: E402
from pretrain.views import build_pretrain_transform  # noqa: E402

DEFAULT_ENCODER = "hybrid_nano"  # model.name when neither it nor model.init is given


def build_model(cfg: PretrainConfig) -> tuple[PretrainModel, InitReport]:
    """The encoder (or segmenter) and its objective's heads; the init report says where it started."""
    obj = cfg.objective
    options = dict(
        in_chans=cfg.data.in_chans,
        temperature=obj.temperature,
        projection_dim=obj.projection_dim,
        projection_hidden_dim=obj.projection_hidden_dim or None,
        projection_layers=obj.projection_layers,
        mask_patch_size=obj.mask_patch_size,
        mask_ratio=obj.mask_ratio,
        decoder=obj.mim_decoder,
        decoder_dim=obj.mim_decoder_dim,
        mim_loss=obj.mim_loss,
        norm_pix_loss=obj.norm_pix_loss,
        contrastive_weight=obj.contrastive_weight,
        mim_weight=obj.mim_weight,
        dense_points=obj.dense_points,
    )
    c = cfg.data.in_chans
    m = cfg.model
    name = m.name or ("" if m.init else DEFAULT_ENCODER)
    size = tuple(cfg.data.image_size)
    if obj.mim_decoder == "segmenter":  # the whole segmenter, reconstructing its C input channels
        segmenter, report = build_segmenter(
            name, c, c, init=m.init, strict=m.init_strict, overrides=m.overrides, input_size=size
        )
        return PretrainModel.from_segmenter(segmenter, obj.name, **options), report
    if name in list_models("segmenter"):
        raise ConfigError(
            f"model.name={name!r} is a segmenter preset (encoder "
            f"{segmenter_spec(name).encoder!r}): pretrain its encoder with model.name="
            f"{segmenter_spec(name).encoder}, or the whole segmenter with objective.mim_decoder=segmenter"
        )
    encoder, report = build_encoder(
        name, c, init=m.init, strict=m.init_strict, overrides=m.overrides, input_size=size
    )
    return PretrainModel(encoder, obj.name, **options), report


def probe_loaders(cfg: PretrainConfig) -> tuple[DataLoader, DataLoader] | None:
    """Labelled data of the dense linear probe (eval transforms only)."""
    p = cfg.probe
    if p.source == "none":
        return None
    size = cfg.data.image_size
    data = DataConfig(
        source=p.source,
        split=p.split,
        val_split=p.val_split,
        in_chans=cfg.data.in_chans,
        image_size=size,
        num_classes=p.num_classes,
        ignore_index=cfg.data.ignore_index,
        synthetic_samples=p.train_images,
        synthetic_val_samples=p.val_images,
        normalize=cfg.data.normalize,
        mean=cfg.data.mean,
        std=cfg.data.std,
        window=cfg.data.window,
    )
    tf = build_seg_transforms(
        False,
        size if p.source != "synthetic" else None,
        in_chans=data.in_chans,
        normalize=data.normalization,
        window=data.window,
        ignore_index=data.ignore_index,
    )
    train, val = build_labelled_datasets(data, tf, tf, seed=cfg.train.seed + 7, check="lazy")
    if val is None:
        raise ValueError("probe.val_split is empty: the probe needs a held-out split")
    train = Subset(train, range(min(p.train_images, len(train))))
    val = Subset(val, range(min(p.val_images, len(val))))
    bs = cfg.train.batch_size
    return DataLoader(train, batch_size=bs), DataLoader(val, batch_size=bs)


def export_encoder(cfg: PretrainConfig):
    """Writer of ``directory`` (the encoder) and, for a pretrained segmenter, its sibling
    ``segmenter/`` whose ``extra.reconstruction_head`` names the output layer fine-tuning drops."""
    extra = {"stage": "pretrain", "objective": cfg.objective.name, "run_config": config_to_dict(cfg)}

    def export(model: nn.Module, directory: Path) -> None:
        save_pretrained(model.encoder, directory, extra=extra)
        if model.segmenter_build is not None:
            seg = model.segmenter()
            head = "decoder." + classifier_prefix(seg.decoder, seg.num_classes)
            save_pretrained(
                seg, Path(directory).parent / "segmenter", extra={**extra, "reconstruction_head": head}
            )

    return export


def main(cfg: PretrainConfig) -> None:
    # DDP's find_unused_parameters is decided by the engine from the built model (one dry step): NT-Xent
    # reads only the last stage, a pixel-shuffle MIM decoder skips some stage norms
    lr_line = ""
    if cfg.objective.lr_scaling != "none":  # resolved once, before anything reads optim.lr
        from accelerate import PartialState

        global_batch = cfg.train.batch_size * cfg.train.grad_accum_steps * PartialState().num_processes
        lr = scaled_lr(cfg.optim.lr, global_batch, cfg.objective.lr_scaling)
        cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=lr))
        lr_line = f"optim.lr scaled ({cfg.objective.lr_scaling}, global batch {global_batch}) to {lr:.3g}"
    engine = Engine(cfg.train, cfg.optim, run_config=cfg, project_name="pretrain")
    acc = engine.accelerator
    if lr_line:
        engine.print(lr_line)
    model, report = build_model(cfg)
    if engine.resume_checkpoint is None:  # else the weights come from the checkpoint
        engine.print(report.summary())
    if cfg.objective.sync_batchnorm and acc.num_processes > 1 and acc.device.type == "cuda":  # CUDA-only op
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)

    size = cfg.data.image_size
    if size[0] != size[1]:
        raise ValueError(f"data.image_size={size}: pretraining crops are square, give equal sides")
    transform = build_pretrain_transform(
        cfg.objective.name,
        cfg.data.in_chans,
        size[0],
        preset=cfg.objective.augment_preset,
        normalize=cfg.data.normalization,
        min_scale=cfg.objective.min_crop_scale,
    )
    dataset = build_unlabelled_dataset(
        cfg.data, transform, seed=cfg.train.seed, rank=acc.process_index, world_size=acc.num_processes
    )
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

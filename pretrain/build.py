"""What ``pretrain/run.py`` builds: the model with its objective's heads, the training set, the
probe's loaders, and the writer of the pretrained encoder (and segmenter)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from hybridvision.config import ConfigError, DataConfig, config_to_dict
from hybridvision.data.from_config import build_labelled_datasets, build_unlabelled_dataset
from hybridvision.data.transforms import build_seg_transforms
from hybridvision.models import list_models, save_pretrained
from hybridvision.models.registry import segmenter_spec
from hybridvision.models.transfer import InitReport, build_encoder, build_segmenter
from pretrain.config import PretrainConfig
from pretrain.heads import classifier_prefix
from pretrain.objectives import PretrainModel, scaled_lr, visible_only_encoders
from pretrain.views import build_pretrain_transform

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
        visible_only=obj.visible_only,
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
    if obj.visible_only and not encoder.encodes_visible_only:
        raise ConfigError(
            f"objective.visible_only=true needs an encoder that encodes visible tokens only "
            f"({', '.join(visible_only_encoders())}); model {name or m.init} does not"
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


def scale_lr(cfg: PretrainConfig) -> tuple[PretrainConfig, str]:
    """``cfg`` with ``optim.lr`` scaled by the global batch (``objective.lr_scaling``), and the line
    that says so ('' when not scaled). Resolved once, before anything reads ``optim.lr``."""
    if cfg.objective.lr_scaling == "none":
        return cfg, ""
    from accelerate import PartialState

    global_batch = cfg.train.batch_size * cfg.train.grad_accum_steps * PartialState().num_processes
    lr = scaled_lr(cfg.optim.lr, global_batch, cfg.objective.lr_scaling)
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=lr))
    return cfg, f"optim.lr scaled ({cfg.objective.lr_scaling}, global batch {global_batch}) to {lr:.3g}"


def pretrain_dataset(cfg: PretrainConfig, rank: int, world_size: int) -> Dataset:
    """The unlabelled training images through the objective's views (square crops)."""
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
    return build_unlabelled_dataset(
        cfg.data, transform, seed=cfg.train.seed, rank=rank, world_size=world_size
    )

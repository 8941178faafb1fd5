"""The labelled data of fine-tuning and distillation, built one way from the config sections."""

from __future__ import annotations

from typing import Any, NamedTuple

from torch.utils.data import Dataset

from ..config import DataConfig
from ..data.from_config import build_labelled_datasets
from ..data.transforms import build_seg_transforms
from .config import AugmentConfig

__all__ = ["SegmentationData", "build_data"]


class SegmentationData(NamedTuple):
    """Training transform, training set and validation set (None when ``data.val_split`` is empty)."""

    train_transform: Any
    train_set: Dataset
    val_set: Dataset | None


def build_data(cfg: Any) -> SegmentationData:
    """Datasets from a stage config's ``data``, ``augment`` and ``train.seed``.

    Fine-tuning and distillation both call it, so teacher and student data pipelines cannot drift
    apart. ``data.resize`` must already be resolved (``resolve_resize``, where the stage starts).
    """
    d: DataConfig = cfg.data
    aug: AugmentConfig = cfg.augment
    train_tf = build_seg_transforms(
        True,
        d.image_size,
        in_chans=d.in_chans,
        scale=aug.scale,
        hflip=aug.hflip,
        vflip=aug.vflip,
        rot90=aug.rot90,
        color_jitter=aug.color_jitter,
        elastic=aug.elastic,
        normalize=d.normalization,
        window=d.window,
        ignore_index=d.ignore_index,
        resize=d.resize_scale,
    )
    eval_tf = build_seg_transforms(
        False,
        None,
        in_chans=d.in_chans,
        normalize=d.normalization,
        window=d.window,
        ignore_index=d.ignore_index,
    )
    train_set, val_set = build_labelled_datasets(d, train_tf, eval_tf, seed=cfg.train.seed)
    return SegmentationData(train_tf, train_set, val_set)

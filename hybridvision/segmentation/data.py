"""The labelled data of fine-tuning and distillation, built one way from the config sections."""

from __future__ import annotations

from typing import Any, NamedTuple

from torch.utils.data import Dataset, Subset

from ..config import DataConfig
from ..data.from_config import build_labelled_datasets, labelled_subset
from ..data.transforms import build_seg_transforms
from .config import AugmentConfig

__all__ = ["SegmentationData", "build_data", "eval_transform", "labelled_line"]


class SegmentationData(NamedTuple):
    """Training transform, training set and validation set (None when ``data.val_split`` is empty)."""

    train_transform: Any
    train_set: Dataset
    val_set: Dataset | None
    #: ids of the samples that keep their labels (``data.label_fraction`` / ``data.labelled_ids``);
    #: None when all do
    labelled_ids: list[str] | None = None
    #: the rest of the labelled split (labels unused), for distillation's unlabelled images
    unlabelled_rest: Dataset | None = None


def eval_transform(d: DataConfig) -> Any:
    """The evaluation transform: no augmentation, normalised, each image at its own size.

    The predictor applies the recorded scale. Evaluation and int8 calibration share it.
    """
    return build_seg_transforms(
        False,
        None,
        in_chans=d.in_chans,
        normalize=d.normalization,
        window=d.window,
        ignore_index=d.ignore_index,
    )


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
    eval_tf = eval_transform(d)
    full, val_set = build_labelled_datasets(d, train_tf, eval_tf, seed=cfg.train.seed)
    train_set, ids = labelled_subset(full, d, cfg.train.seed)
    rest = None
    if ids is not None:
        assert isinstance(train_set, Subset)  # labelled_subset returns ids with a Subset only
        kept = set(train_set.indices)
        n = len(full)  # type: ignore[arg-type]  # torch's Dataset declares no __len__
        rest = Subset(full, [i for i in range(n) if i not in kept]) if len(kept) < n else None
    return SegmentationData(train_tf, train_set, val_set, ids, rest)


def labelled_line(d: DataConfig, ids: list[str], rest: int) -> str:
    """The log line of a labelled subset: how many, which ids, what became of the rest."""
    few = ", ".join(ids[:8]) + (f", ... (+{len(ids) - 8})" if len(ids) > 8 else "")
    how = f"data.label_fraction={d.label_fraction}" if d.label_fraction < 1 else "data.labelled_ids"
    return (
        f"{how}: training on {len(ids)} of {len(ids) + rest} labelled images of split {d.split!r} ({few}); "
        "the ids are recorded in metrics.json and the model's config"
    )

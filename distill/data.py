"""Training data of the distillation stage: labelled samples, optionally mixed with unlabelled ones.

Every sample carries ``labelled`` (bool). Unlabelled images get an all-``ignore_index`` mask and go
through the same joint augmentation, so a batch can mix both; the task loss then sees no label on
them and the distillation terms count all their pixels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import ConcatDataset, Dataset, IterableDataset, Subset

from distill.config import DistillConfig, DistillDataConfig
from hybridvision.config import ConfigError
from hybridvision.data.from_config import build_unlabelled_dataset
from hybridvision.data.io import apply_transform
from hybridvision.segmentation.data import build_data, labelled_line

__all__ = [
    "Labelled",
    "LabelsDropped",
    "UnlabelledAsSegmentation",
    "build_distill_data",
    "build_distill_train_set",
]


class Labelled(Dataset):
    """Adds ``labelled=True`` to each sample of a labelled (map-style) dataset.

    Raises:
        ConfigError: For a stream (``data.streaming=true``): distillation indexes its training set.
    """

    def __init__(self, dataset: Dataset) -> None:
        if isinstance(dataset, IterableDataset):
            raise ConfigError(
                "data.streaming=true: distillation needs a map-style labelled set (it indexes its "
                "training set); set data.streaming=false"
            )
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.dataset[index], "labelled": True}


class UnlabelledAsSegmentation(Dataset):
    """Unlabelled images as segmentation samples: mask = ``ignore_index`` everywhere, ``labelled=False``.

    Args:
        dataset: yields ``{"image": (C, H, W), "id": str}`` untransformed.
        transform: the joint training transform of the labelled data.
        ignore_index: the mask value.
    """

    def __init__(self, dataset: Dataset, transform: Callable | None, ignore_index: int) -> None:
        self.dataset, self.transform, self.ignore_index = dataset, transform, ignore_index

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.dataset[index]
        image = sample["image"]
        mask = torch.full(image.shape[-2:], self.ignore_index, dtype=torch.int64)
        out = apply_transform(
            {"image": image, "mask": mask, "id": sample.get("id", str(index))}, self.transform
        )
        return {**out, "labelled": False}


class LabelsDropped(Dataset):
    """Samples of a labelled set whose labels are not to be used (``data.label_fraction < 1``):
    mask = ``ignore_index`` everywhere, ``labelled=False``, so only the distillation terms see them."""

    def __init__(self, dataset: Dataset, ignore_index: int) -> None:
        self.dataset, self.ignore_index = dataset, ignore_index

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.dataset[index]
        return {**sample, "mask": torch.full_like(sample["mask"], self.ignore_index), "labelled": False}


def build_distill_train_set(
    data: DistillDataConfig,
    labelled: Dataset,
    transform: Callable | None,
    seed: int,
    rest: Dataset | None = None,
) -> tuple[Dataset, int]:
    """The labelled training set, plus unlabelled images: ``rest`` (the part of the labelled split
    whose labels ``data.label_fraction`` leaves out) and ``data.unlabelled_source`` when given.

    Returns:
        (dataset, number of unlabelled samples in it).
    """
    out: Dataset = Labelled(labelled)
    parts: list[Dataset] = [out]
    if rest is not None and len(rest):
        parts.append(LabelsDropped(rest, data.ignore_index))
    if not data.unlabelled_source:
        return (ConcatDataset(parts), len(parts[-1])) if len(parts) > 1 else (out, 0)
    extra_cfg = dataclasses.replace(
        data, source=data.unlabelled_source, split=data.unlabelled_split, streaming=False
    )
    extra = build_unlabelled_dataset(extra_cfg, None, seed=seed)
    if isinstance(extra, IterableDataset):
        raise ConfigError(
            f"data.unlabelled_source={data.unlabelled_source!r}: streaming sets are not supported"
        )
    if data.unlabelled_max and len(extra) > data.unlabelled_max:
        extra = Subset(extra, range(data.unlabelled_max))
    parts.append(UnlabelledAsSegmentation(extra, transform, data.ignore_index))
    return ConcatDataset(parts), sum(len(p) for p in parts[1:])


def build_distill_data(cfg: DistillConfig, log: Callable[[str], None]) -> tuple[Dataset, Dataset | None]:
    """The training set (the labelled images, and unlabelled ones where configured) and the
    validation set (None without one); ``log`` is told which images are labelled and where the
    unlabelled ones come from."""
    d = cfg.data
    data = build_data(cfg)
    train_set, n_unlabelled = build_distill_train_set(
        d, data.train_set, data.train_transform, cfg.train.seed, rest=data.unlabelled_rest
    )
    if data.labelled_ids is not None:
        log(labelled_line(d, data.labelled_ids, len(data.unlabelled_rest or ())))
    if n_unlabelled:
        sources = [
            s for s in (data.unlabelled_rest and f"the rest of split {d.split!r}", d.unlabelled_source) if s
        ]
        log(f"{n_unlabelled} unlabelled images from {' and '.join(sources)} (distillation terms only)")
    return train_set, data.val_set

"""Labelled + unlabelled training samples for distillation."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from distill.config import DistillDataConfig
from distill.data import build_distill_train_set
from hybridvision.data.from_config import build_labelled_datasets
from hybridvision.data.transforms import build_seg_transforms


def test_unlabelled_images_join_with_ignore_masks_and_same_augmentation(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    for i, size in enumerate([(40, 50), (70, 33), (64, 64)]):  # any sizes: the crop makes them equal
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"u{i}.png")
    data = DistillDataConfig(
        num_classes=3,
        in_chans=3,
        normalize="imagenet",
        image_size=(32, 32),
        synthetic_samples=4,
        unlabelled_source=str(folder),
        unlabelled_max=2,
    )
    tf = build_seg_transforms(True, (32, 32), in_chans=3, normalize="imagenet")
    labelled, _ = build_labelled_datasets(data, tf, None)
    train, n_unlabelled = build_distill_train_set(data, labelled, tf, seed=0)
    assert n_unlabelled == 2 and len(train) == 4 + 2
    batch = next(iter(DataLoader(train, batch_size=6, shuffle=False)))
    assert batch["image"].shape == (6, 3, 32, 32)
    assert batch["labelled"].tolist() == [True] * 4 + [False] * 2
    assert (batch["mask"][4:] == 255).all()  # no label on unlabelled images
    assert (batch["mask"][:4] != 255).any()
    assert torch.isfinite(batch["image"]).all()


def test_without_unlabelled_source_every_sample_is_labelled():
    data = DistillDataConfig(num_classes=3, in_chans=3, normalize="imagenet", synthetic_samples=3)
    labelled, _ = build_labelled_datasets(data, None, None)
    train, n = build_distill_train_set(data, labelled, None, seed=0)
    assert n == 0 and all(train[i]["labelled"] for i in range(3))


def test_the_student_trains_at_the_teachers_scale_unless_told_otherwise(tmp_path):
    from distill.config import DistillConfig
    from distill.models import resolve_data
    from hybridvision.models import create_segmenter, from_pretrained, save_pretrained

    teacher_dir = save_pretrained(
        create_segmenter("unet_resnet_nano", num_classes=2),
        tmp_path / "teacher",
        extra={"run_config": {"data": {"resize": [48, 192], "normalize": "imagenet"}}},
    )
    teacher = from_pretrained(teacher_dir)
    cfg = DistillConfig(teacher=str(teacher_dir))
    assert resolve_data(cfg, teacher).resize == [48, 192]  # data.resize=auto -> the teacher's
    cfg.data.resize = "native"
    assert resolve_data(cfg, teacher).resize == "native"  # an explicit choice wins


def test_streaming_labelled_data_is_refused_not_ignored(tmp_path):
    """data.streaming=true in distillation used to finish as if it were false; distillation indexes
    its training set, so a stream is an error naming the key, at the data step and in Labelled."""
    import datasets
    import pytest

    from distill.data import Labelled
    from hybridvision.config import ConfigError
    from hybridvision.data import load_hf_dataset

    rng = np.random.default_rng(0)
    rows = {
        "image": [Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in range(3)],
        "label": [Image.fromarray(rng.integers(0, 3, (8, 8), dtype=np.uint8)) for _ in range(3)],
    }
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    path = tmp_path / "saved"
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(path))
    data = DistillDataConfig(
        source=str(path), val_split="", num_classes=3, in_chans=3, normalize="imagenet", streaming=True
    )
    with pytest.raises(ConfigError, match=r"data\.streaming=true .*data\.streaming=false"):
        build_labelled_datasets(data, None, None)
    stream = load_hf_dataset(path, mask_column="label", streaming=True)
    with pytest.raises(ConfigError, match=r"data\.streaming=true: distillation needs a map-style"):
        build_distill_train_set(data, stream, None, seed=0)
    with pytest.raises(ConfigError, match="map-style"):
        Labelled(stream)
    data.streaming = False
    labelled, _ = build_labelled_datasets(data, None, None)
    train, _ = build_distill_train_set(data, labelled, None, seed=0)
    assert len(train) == 3 and train[2]["labelled"] and train[2]["mask"].shape == (8, 8)

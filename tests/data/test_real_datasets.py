"""The two real datasets under shared/data load with check="full" and match their READMEs.

Data root: ``$HYBRIDVISION_DATA`` or ``<repo>/../shared/data``; tests skip when it is absent.
"""

from __future__ import annotations

import pytest
import torch
from data_helpers import real_data_root
from torch.utils.data import default_collate

from hybridvision.data import (
    ImageFolderDataset,
    SegmentationFolderDataset,
    build_seg_transforms,
    split_by_ids,
)

ISBI = real_data_root() / "isbi2012_em"
CAMVID = real_data_root() / "camvid"

needs_isbi = pytest.mark.skipif(not ISBI.is_dir(), reason=f"ISBI 2012 EM data not found at {ISBI}")
needs_camvid = pytest.mark.skipif(not CAMVID.is_dir(), reason=f"CamVid data not found at {CAMVID}")

# CamVid README: per-split pixel percentages for classes 0..10, then void (255).
CAMVID_PERCENT = {
    "train": [16.98, 23.28, 0.98, 31.60, 4.49, 9.74, 1.17, 1.13, 5.87, 0.64, 0.29, 3.83],
    "val": [9.20, 26.02, 0.57, 28.90, 8.72, 16.35, 0.89, 3.07, 1.74, 0.66, 2.23, 1.65],
    "test": [17.19, 24.64, 1.18, 25.77, 9.26, 11.26, 1.01, 1.18, 3.97, 0.64, 0.19, 3.70],
}
CAMVID_COUNT = {"train": 367, "val": 101, "test": 233}


@needs_isbi
def test_isbi_full_check_classes_and_membrane_fraction():
    ds = SegmentationFolderDataset(ISBI, "train", num_classes=2, ignore_index=None, in_chans=1, check="full")
    assert len(ds) == 30 and ds.ids[0] == "00" and ds.ids[-1] == "29"
    assert ds.ignored_pixel_count == 0
    counts = ds.class_pixel_counts
    assert counts.sum() == 30 * 512 * 512 and (counts > 0).all()  # both classes {0, 1} present
    assert 0.18 < float(counts[1]) / float(counts.sum()) < 0.26  # README: membrane ~22%
    sample = ds[0]
    assert sample["image"].shape == (1, 512, 512) and sample["mask"].shape == (512, 512)
    assert set(sample["mask"].unique().tolist()) == {0, 1}


@needs_isbi
def test_isbi_holdout_block_and_unlabelled_test_split():
    holdout = [str(i) for i in range(25, 30)]
    rest, val = split_by_ids(
        ISBI,
        "train",
        holdout,
        num_classes=2,
        ignore_index=None,
        in_chans=1,
        check="lazy",
        train_transform=build_seg_transforms(True, (64, 64), in_chans=1, rot90=True),
    )
    assert len(rest) == 25 and val.ids == holdout and not set(rest.ids) & set(val.ids)
    batch = default_collate([rest[0], rest[1]])
    assert batch["image"].shape == (2, 1, 64, 64) and batch["mask"].shape == (2, 64, 64)
    with pytest.raises(FileNotFoundError, match="masks/test does not exist"):
        SegmentationFolderDataset(ISBI, "test", num_classes=2, ignore_index=None)
    test_images = ImageFolderDataset(ISBI / "images" / "test", in_chans=1)
    assert len(test_images) == 30 and test_images[0]["image"].shape == (1, 512, 512)


@needs_camvid
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_camvid_full_check_matches_readme(split):
    ds = SegmentationFolderDataset(CAMVID, split, num_classes=11, ignore_index=255, check="full")
    assert len(ds) == CAMVID_COUNT[split]
    counts = torch.cat([ds.class_pixel_counts, torch.tensor([ds.ignored_pixel_count])]).double()
    assert counts.sum() == CAMVID_COUNT[split] * 240 * 180
    percent = (100 * counts / counts.sum()).tolist()
    # Every class 0..10 and void occur, with the README's shares (rounded to 0.01 %).
    assert all(p > 0 for p in percent)
    assert percent == pytest.approx(CAMVID_PERCENT[split], abs=0.011)
    sample = ds[0]
    assert sample["image"].shape == (3, 180, 240) and sample["mask"].shape == (180, 240)

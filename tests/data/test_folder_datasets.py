"""ImageFolderDataset and SegmentationFolderDataset: listing, skipping, and one test per bad input."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from data_helpers import save, save_with_orientation, write_corrupt, write_truncated
from torch.utils.data import default_collate

from hybridvision.data import ImageFolderDataset, SegmentationFolderDataset, split_by_ids
from hybridvision.data.transforms import build_seg_transforms


@pytest.fixture
def image_tree(tmp_path):
    """7 image files (5 good, 1 corrupt, 1 truncated) in nested folders, plus a .txt file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "unlabelled"
    save(root / "a_gray.png", rng.integers(0, 256, (8, 8), dtype=np.uint8))
    save(root / "b_rgb.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    write_corrupt(root / "c_corrupt.png")
    save(root / "sub" / "d_rgba.png", rng.integers(0, 256, (8, 8, 4), dtype=np.uint8))
    write_truncated(root / "sub" / "e_truncated.png")
    save(root / "sub" / "f_16bit.png", rng.integers(0, 65536, (8, 8), dtype=np.uint16))
    save(root / "g.TIF", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    (root / "notes.txt").write_text("not an image")
    return root


def test_image_folder_lists_recursively_sorted_and_ignores_txt(image_tree):
    ds = ImageFolderDataset(image_tree)
    assert ds.ids == ["a_gray", "b_rgb", "c_corrupt", "g", "sub/d_rgba", "sub/e_truncated", "sub/f_16bit"]
    sample = ds[0]
    assert set(sample) == {"image", "id"} and sample["image"].shape == (3, 8, 8)


def test_image_folder_skips_bad_files_once_each(image_tree, caplog):
    ds = ImageFolderDataset(image_tree, in_chans=3)
    with caplog.at_level(logging.WARNING, logger="hybridvision.data.folder"):
        first = [ds[i]["id"] for i in range(len(ds))]
        second = [ds[i]["id"] for i in range(len(ds))]
    # The corrupt file (index 2) is replaced by the next valid one; the truncated one (5) too.
    assert first == ["a_gray", "b_rgb", "g", "g", "sub/d_rgba", "sub/f_16bit", "sub/f_16bit"]
    assert second == first
    assert ds.num_skipped == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "c_corrupt.png" in warnings[0] and "e_truncated.png" in warnings[1]
    batch = default_collate([ds[i] for i in range(len(ds))])
    assert batch["image"].shape == (7, 3, 8, 8)


def test_image_folder_wraps_around_and_all_bad_is_an_error(tmp_path):
    root = tmp_path / "bad"
    save(root / "a.png", np.zeros((4, 4), np.uint8))
    write_corrupt(root / "b.png")
    assert ImageFolderDataset(root, in_chans=1)[1]["id"] == "a"  # last file bad -> wraps to first
    only_bad = tmp_path / "only_bad"
    write_corrupt(only_bad / "x.png")
    with pytest.raises(RuntimeError, match="no readable image left in .*only_bad"):
        ImageFolderDataset(only_bad)[0]


def test_image_folder_empty_is_an_error_naming_it(tmp_path):
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="empty_dir contains no image files"):
        ImageFolderDataset(empty)
    with pytest.raises(FileNotFoundError, match="missing_dir does not exist"):
        ImageFolderDataset(tmp_path / "missing_dir")


def test_image_folder_channel_mismatch_is_skipped_with_reason(tmp_path, caplog):
    root = tmp_path / "mixed"
    save(root / "a_rgb.png", np.zeros((4, 4, 3), np.uint8))
    save(root / "b_gray.png", np.zeros((4, 4), np.uint8))
    ds = ImageFolderDataset(root, in_chans=4)
    with caplog.at_level(logging.WARNING, logger="hybridvision.data.folder"):
        with pytest.raises(RuntimeError):
            ds[0]
    assert ds.num_skipped == 2 and "in_chans=4" in caplog.text


# --------------------------------------------------------------------------- segmentation


def make_seg_root(tmp_path, n=4, size=(6, 8), num_classes=3, suffix=".png"):
    """images/train/<id><suffix> + masks/train/<id>.png with values in [0, num_classes) and 255."""
    rng = np.random.default_rng(1)
    root = tmp_path / "seg"
    masks = {}
    for i in range(n):
        sid = f"{i:02d}"
        save(root / "images" / "train" / f"{sid}{suffix}", rng.integers(0, 256, (*size, 3), dtype=np.uint8))
        mask = rng.integers(0, num_classes, size, dtype=np.uint8)
        mask[0, 0] = 255
        save(root / "masks" / "train" / f"{sid}.png", mask)
        masks[sid] = mask
    return root, masks


def test_segmentation_folder_loads_pairs_and_counts(tmp_path):
    root, masks = make_seg_root(tmp_path)
    ds = SegmentationFolderDataset(root, "train", num_classes=3)
    assert ds.ids == ["00", "01", "02", "03"] and len(ds) == 4
    sample = ds[2]
    assert sample["image"].shape == (3, 6, 8) and sample["image"].dtype == torch.float32
    assert sample["mask"].dtype == torch.int64 and sample["mask"].tolist() == masks["02"].tolist()
    assert sample["id"] == "02"
    stacked = np.stack(list(masks.values()))
    expected = [int((stacked == k).sum()) for k in range(3)]
    assert ds.class_pixel_counts.tolist() == expected
    assert ds.ignored_pixel_count == 4


def test_segmentation_folder_image_without_mask(tmp_path):
    root, _ = make_seg_root(tmp_path)
    save(root / "images" / "train" / "99_orphan.jpg", np.zeros((6, 8, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match=r"99_orphan\.jpg has no mask: expected .*99_orphan\.png"):
        SegmentationFolderDataset(root, "train", num_classes=3)


def test_segmentation_folder_missing_mask_folder_points_to_image_folder(tmp_path):
    root, _ = make_seg_root(tmp_path)
    save(root / "images" / "test" / "t.png", np.zeros((6, 8, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match=r"masks/test does not exist.*ImageFolderDataset"):
        SegmentationFolderDataset(root, "test", num_classes=3)


@pytest.mark.parametrize("check", ["full", "lazy"])
def test_segmentation_folder_size_mismatch(tmp_path, check):
    root, _ = make_seg_root(tmp_path)
    save(root / "masks" / "train" / "01.png", np.zeros((5, 8), np.uint8))
    pattern = r"mask .*01\.png is 8x5 \(WxH\) but its image .*01\.png is 8x6"
    if check == "full":
        with pytest.raises(ValueError, match=pattern):
            SegmentationFolderDataset(root, "train", num_classes=3, check="full")
    else:
        ds = SegmentationFolderDataset(root, "train", num_classes=3, check="lazy")
        assert ds.class_pixel_counts is None
        ds[0]
        with pytest.raises(ValueError, match=pattern):
            ds[1]


@pytest.mark.parametrize("check", ["full", "lazy"])
def test_segmentation_folder_out_of_range_values(tmp_path, check):
    root, _ = make_seg_root(tmp_path)
    bad = np.zeros((6, 8), np.uint8)
    bad[1, 1], bad[2, 2] = 3, 17
    save(root / "masks" / "train" / "03.png", bad)
    pattern = r"03\.png has values \[3, 17\] outside \[0, 3\)"
    if check == "full":
        with pytest.raises(ValueError, match=pattern):
            SegmentationFolderDataset(root, "train", num_classes=3)
    else:
        ds = SegmentationFolderDataset(root, "train", num_classes=3, check="lazy")
        with pytest.raises(ValueError, match=pattern):
            ds[3]


def test_segmentation_folder_ignore_index_none_rejects_255(tmp_path):
    root, _ = make_seg_root(tmp_path)
    with pytest.raises(ValueError, match=r"00\.png has values \[255\]"):
        SegmentationFolderDataset(root, "train", num_classes=3, ignore_index=None)


def test_segmentation_folder_rgb_mask(tmp_path):
    root, _ = make_seg_root(tmp_path)
    save(root / "masks" / "train" / "02.png", np.zeros((6, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"02\.png has mode 'RGB'"):
        SegmentationFolderDataset(root, "train", num_classes=3)


def test_segmentation_folder_duplicate_stem(tmp_path):
    root, _ = make_seg_root(tmp_path)
    save(root / "images" / "train" / "01.jpg", np.zeros((6, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"two images share the id '01'"):
        SegmentationFolderDataset(root, "train", num_classes=3)


def test_ids_subset_and_split_by_ids(tmp_path):
    root, masks = make_seg_root(tmp_path, n=5)
    sub = SegmentationFolderDataset(root, "train", num_classes=3, ids=["03", "01"])
    assert sub.ids == ["03", "01"] and sub[0]["mask"].tolist() == masks["03"].tolist()
    with pytest.raises(FileNotFoundError, match=r"ids \['7'\] not found.*available: 00, 01"):
        SegmentationFolderDataset(root, "train", num_classes=3, ids=["7"])
    rest, holdout = split_by_ids(
        root,
        "train",
        ["03", "04"],
        num_classes=3,
        train_transform=build_seg_transforms(True, (4, 4), normalize="none"),
    )
    assert rest.ids == ["00", "01", "02"] and holdout.ids == ["03", "04"]
    assert rest[0]["image"].shape == (3, 4, 4) and holdout[0]["image"].shape == (3, 6, 8)
    with pytest.raises(FileNotFoundError, match=r"holdout ids \['99'\] not found"):
        split_by_ids(root, "train", ["99"], num_classes=3)


def test_segmentation_folder_transform_output_collates(tmp_path):
    root, _ = make_seg_root(tmp_path, suffix=".tif")
    transform = build_seg_transforms(True, (4, 4), scale=(0.8, 1.2))
    ds = SegmentationFolderDataset(root, "train", num_classes=3, transform=transform)
    batch = default_collate([ds[i] for i in range(len(ds))])
    assert type(batch["image"]) is torch.Tensor and type(batch["mask"]) is torch.Tensor
    assert batch["image"].shape == (4, 3, 4, 4) and batch["mask"].shape == (4, 4, 4)
    assert batch["mask"].dtype == torch.int64 and batch["id"] == ["00", "01", "02", "03"]


def test_folder_datasets_stop_iteration_at_their_length(tmp_path, image_tree):
    """Out-of-range indices raise IndexError, so list(ds) / for x in ds end (they looped forever and
    took all memory in the deployment report, which listed an evaluation split)."""
    root, _ = make_seg_root(tmp_path)
    ds = SegmentationFolderDataset(root, "train", num_classes=3)
    assert [s["id"] for s in ds] == ["00", "01", "02", "03"]
    assert ds[-1]["id"] == "03"
    with pytest.raises(IndexError):
        ds[4]
    images = ImageFolderDataset(image_tree)
    assert len(list(images)) == len(images)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_phone_photos_train_and_evaluate_upright_against_their_masks(tmp_path, orientation):
    """A photo stored turned with an EXIF orientation tag, its mask drawn on the upright picture:
    the training and evaluation datasets give the upright image, aligned with the mask."""
    upright = np.zeros((24, 40), dtype=np.uint8)
    upright[4:12, 8:30] = 1  # class 1: a bar in the upper half
    save_with_orientation(
        tmp_path / "images" / "train" / "photo.jpg",
        np.repeat(upright[:, :, None] * 200, 3, axis=2),
        orientation,
        quality=100,
    )
    save(tmp_path / "masks" / "train" / "photo.png", upright)  # no tag: drawn upright
    for transform in (None, build_seg_transforms(False, None, normalize="none")):
        sample = SegmentationFolderDataset(tmp_path, "train", num_classes=2, transform=transform)[0]
        assert sample["image"].shape == (3, 24, 40) and sample["mask"].shape == (24, 40)
        assert torch.equal((sample["image"][0] > 0.5).long(), sample["mask"])
        assert sample["mask"].tolist() == upright.tolist()


def test_a_mask_in_the_stored_orientation_is_an_error_that_says_why(tmp_path):
    """A mask made by a tool that ignored the photo's EXIF tag matches the stored pixels, not the
    displayed picture: the size error names the orientation tag instead of silently training."""
    upright = np.zeros((24, 40, 3), dtype=np.uint8)
    save_with_orientation(tmp_path / "images" / "train" / "photo.jpg", upright, 6)
    save(tmp_path / "masks" / "train" / "photo.png", np.zeros((40, 24), dtype=np.uint8))  # stored size
    with pytest.raises(
        ValueError, match=r"is 24x40 \(WxH\) .* is 40x24 as displayed: its EXIF orientation tag \(6\)"
    ):
        SegmentationFolderDataset(tmp_path, "train", num_classes=2)

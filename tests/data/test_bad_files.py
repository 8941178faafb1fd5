"""Real-world data folders: 0/255 masks, absent classes, mistyped sources, unreadable files.

Issue 12, classes 1 (silent wrong results) and 2 (unreadable files lose the run), at the data layer.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
import torch
from data_helpers import save, write_truncated

from hybridvision.config import ConfigError, DataConfig
from hybridvision.data import ImageFolderDataset, SegmentationFolderDataset
from hybridvision.data.from_config import build_labelled_datasets, source_kind
from hybridvision.data.io import remap_mask


def make_folder(root, n=3, size=(8, 8), values=(0, 1), splits=("train", "val"), seed=0):
    """images/<split>/<i>.png (RGB) + masks/<split>/<i>.png cycling through ``values`` row by row."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for i in range(n):
            save(root / "images" / split / f"{i}.png", rng.integers(0, 256, (*size, 3), dtype=np.uint8))
            mask = np.array(values, dtype=np.uint8)[np.arange(size[0] * size[1]) % len(values)]
            save(root / "masks" / split / f"{i}.png", mask.reshape(size))
    return root


# ------------------------------------------------------------------ class 1: silent wrong results


def test_binary_0_255_masks_are_refused_with_the_setting_to_use(tmp_path):
    root = make_folder(tmp_path, values=(0, 255))
    with pytest.raises(ValueError, match=r"data\.mask_values=\[0, 255\]") as exc:
        SegmentationFolderDataset(root, "train", num_classes=2, ignore_index=255)
    assert str(root / "masks" / "train") in str(exc.value)


def test_mask_values_map_0_255_to_classes(tmp_path):
    root = make_folder(tmp_path, values=(0, 255, 255, 0))
    ds = SegmentationFolderDataset(root, "train", num_classes=2, ignore_index=255, mask_values=[0, 255])
    assert ds.class_pixel_counts.tolist() == [3 * 32, 3 * 32] and ds.ignored_pixel_count == 0
    mask = ds[0]["mask"]
    assert mask.dtype == torch.int64 and mask.unique().tolist() == [0, 1] and int(mask.sum()) == 32


def test_build_labelled_datasets_passes_mask_values_from_config(tmp_path):
    root = make_folder(tmp_path, values=(0, 255))
    cfg = DataConfig(source=str(root), num_classes=1, mask_values=[0, 255])
    train, val = build_labelled_datasets(cfg, None, None)
    assert train.class_pixel_counts.tolist() == [96, 96] and val.class_pixel_counts.tolist() == [96, 96]


def test_remap_mask_keeps_unlisted_ignore_and_names_unknown_values():
    mask = torch.tensor([[0, 128, 255], [7, 0, 128]])
    with pytest.raises(ValueError, match=r"m\.png has values \[7\]"):
        remap_mask(mask, [0, 128], 255, "m.png")
    out = remap_mask(mask[:1], [0, 128], 255, "m.png")
    assert out.tolist() == [[0, 1, 255]]


def test_absent_class_and_mostly_ignored_split_warn(tmp_path, caplog):
    root = make_folder(tmp_path, values=(0, 255, 255, 1))  # class 2 absent, 50 % ignored
    with caplog.at_level(logging.WARNING, logger="hybridvision.data.folder"):
        SegmentationFolderDataset(root, "train", num_classes=3, ignore_index=255)
    text = caplog.text
    assert "class(es) [2] never occur" in text and "% of the pixels" not in text  # exactly half: no warning
    caplog.clear()
    root2 = make_folder(tmp_path / "b", values=(255, 255, 255, 1, 0, 2))  # 33 of 64 pixels ignored
    with caplog.at_level(logging.WARNING, logger="hybridvision.data.folder"):
        SegmentationFolderDataset(root2, "train", num_classes=3, ignore_index=255)
    assert "51.6% of the pixels" in caplog.text and "never occur" not in caplog.text


@pytest.mark.parametrize("typo", ["mydata/isbi2O12", "./nowhere", "a/b/c", "mydata\\isbi"])
def test_local_looking_missing_source_is_no_such_folder_at_once(tmp_path, monkeypatch, typo):
    (tmp_path / "mydata" / "isbi2012").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="no such folder") as exc:
        source_kind(typo)
    assert time.perf_counter() - start < 1.0
    if typo.startswith("mydata/"):
        assert "did you mean mydata/isbi2012" in str(exc.value)


def test_hub_id_offline_is_one_line_without_retries(tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    from hybridvision.data.hf import load_hf_dataset

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # the libraries read the variable at import time, which may have happened earlier in this session
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert source_kind("someone/isbi") == "hub"
    start = time.perf_counter()
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE=1") as exc:
        load_hf_dataset("someone/isbi", split="train", cache_dir=tmp_path / "cache")
    assert time.perf_counter() - start < 15 and "\n" not in str(exc.value)
    assert "'someone/isbi' is not a local folder" in str(exc.value)


# ------------------------------------------------------------------ class 2: unreadable files


def test_truncated_training_image_is_named_at_construction(tmp_path):
    root = make_folder(tmp_path)
    bad = write_truncated(root / "images" / "train" / "1.png", shape=(8, 8))
    with pytest.raises(ValueError, match="data.on_bad_file=skip") as exc:
        SegmentationFolderDataset(root, "train", num_classes=2, ignore_index=255)
    assert str(bad) in str(exc.value) and "cannot be read" in str(exc.value)


def test_skip_policy_drops_and_counts_bad_pairs(tmp_path, caplog):
    root = make_folder(tmp_path, n=4)
    write_truncated(root / "images" / "train" / "1.png", shape=(8, 8))
    (root / "masks" / "train" / "3.png").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="hybridvision.data.folder"):
        ds = SegmentationFolderDataset(root, "train", num_classes=2, ignore_index=255, on_bad_file="skip")
    assert ds.ids == ["0", "2"] and ds.num_skipped == 2 and len(ds) == 2
    assert "skipped 2 unreadable of 4" in caplog.text and "3.png (0 bytes)" in caplog.text
    assert ds.class_pixel_counts.tolist() == [64, 64]


def test_zero_byte_file_in_lazy_mode_error_and_skip(tmp_path):
    root = make_folder(tmp_path, n=3)
    (root / "images" / "val" / "1.png").write_bytes(b"")
    lazy = SegmentationFolderDataset(root, "val", num_classes=2, check="lazy")
    with pytest.raises(ValueError, match=r"1\.png \(0 bytes\) cannot be read"):
        lazy[1]
    skipping = SegmentationFolderDataset(root, "val", num_classes=2, check="lazy", on_bad_file="skip")
    assert skipping[1]["id"] == "2" and skipping.num_skipped == 1
    assert skipping[0]["id"] == "0"


def test_image_folder_error_policy_names_the_file(tmp_path):
    root = tmp_path / "unlabelled"
    save(root / "a.png", np.zeros((8, 8, 3), dtype=np.uint8))
    bad = write_truncated(root / "b.png", shape=(8, 8))
    with pytest.raises(ValueError, match="data.on_bad_file=skip") as exc:
        ImageFolderDataset(root, on_bad_file="error")
    assert str(bad) in str(exc.value)
    assert len(ImageFolderDataset(root)) == 2  # the class default still skips at access time

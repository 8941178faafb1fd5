"""Hugging Face sources on local files: save_to_disk, imagefolder, streaming shard disjointness."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from data_helpers import save, save_with_orientation, write_png16

from hybridvision.data import HFSegmentationDataset, HFStreamingDataset, build_dataloader, load_hf_dataset

datasets = pytest.importorskip("datasets")


def make_rows(n: int, size=(6, 5), num_classes=3, seed=0) -> dict[str, list]:
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n)]
    masks = [rng.integers(0, num_classes, size, dtype=np.uint8) for _ in range(n)]
    return {"id": [f"s{i:03d}" for i in range(n)], "images": images, "masks": masks}


def save_to_disk(path, rows, *, dict_splits=False, class_label=False):
    from PIL import Image

    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "pixels": datasets.Image(),
            "label": datasets.ClassLabel(names=["a", "b"]) if class_label else datasets.Image(),
        }
    )
    data = {
        "id": rows["id"],
        "pixels": [Image.fromarray(a) for a in rows["images"]],
        "label": [i % 2 for i in range(len(rows["id"]))]
        if class_label
        else [Image.fromarray(m) for m in rows["masks"]],
    }
    ds = datasets.Dataset.from_dict(data, features=features)
    if dict_splits:
        ds = datasets.DatasetDict({"train": ds, "validation": ds.select(range(2))})
    ds.save_to_disk(str(path))
    return path


def test_load_from_disk_map_style(tmp_path):
    rows = make_rows(5)
    path = save_to_disk(tmp_path / "saved", rows)
    ds = load_hf_dataset(path, image_column="pixels", mask_column="label", num_classes=3)
    assert isinstance(ds, HFSegmentationDataset) and len(ds) == 5
    sample = ds[3]
    assert sample["id"] == "s003"
    torch.testing.assert_close(sample["image"], torch.from_numpy(rows["images"][3]).permute(2, 0, 1) / 255)
    assert sample["mask"].dtype == torch.int64 and sample["mask"].tolist() == rows["masks"][3].tolist()
    gray = load_hf_dataset(path, image_column="pixels", in_chans=1)
    assert set(gray[0]) == {"image", "id"} and gray[0]["image"].shape == (1, 6, 5)


def test_dataset_dict_split_selection_and_missing_split(tmp_path):
    path = save_to_disk(tmp_path / "dd", make_rows(4), dict_splits=True)
    assert len(load_hf_dataset(path, split="validation", image_column="pixels")) == 2
    with pytest.raises(
        ValueError, match=r"split 'test' not found.*available splits: \['train', 'validation'\]"
    ):
        load_hf_dataset(path, split="test", image_column="pixels")


def test_missing_column_names_it_and_the_available_ones(tmp_path):
    path = save_to_disk(tmp_path / "saved", make_rows(2))
    with pytest.raises(ValueError, match=r"column 'image' not found.*\['id', 'pixels', 'label'\]"):
        load_hf_dataset(path)  # default image_column="image"
    with pytest.raises(ValueError, match=r"column 'segmentation' not found"):
        load_hf_dataset(path, image_column="pixels", mask_column="segmentation")


def test_classification_label_is_not_a_mask(tmp_path):
    path = save_to_disk(tmp_path / "cls", make_rows(2), class_label=True)
    ds = load_hf_dataset(path, image_column="pixels", mask_column="label")
    with pytest.raises(ValueError, match=r"row 's000' column 'label' holds int values, not per-pixel masks"):
        ds[0]


def test_mask_values_checked(tmp_path):
    rows = make_rows(2, num_classes=5)
    path = save_to_disk(tmp_path / "saved", rows)
    ds = load_hf_dataset(path, image_column="pixels", mask_column="label", num_classes=2, ignore_index=255)
    with pytest.raises(
        ValueError, match=r"row 's000' column 'label' has values \[2, 3, 4\] outside \[0, 2\)"
    ):
        ds[0]


def test_imagefolder_with_mask_metadata_and_unlabelled(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "folder"
    lines = []
    expected = {}
    for i in range(3):
        image = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
        mask = rng.integers(0, 2, (4, 6), dtype=np.uint8)
        save(root / f"img{i}.png", image)
        save(root / "masks" / f"img{i}.png", mask)
        lines.append(
            json.dumps({"file_name": f"img{i}.png", "mask_file_name": f"masks/img{i}.png", "id": f"n{i}"})
        )
        expected[f"n{i}"] = (image, mask)
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    ds = load_hf_dataset(root, mask_column="mask", num_classes=2, cache_dir=tmp_path / "cache")
    assert len(ds) == 3
    for sample in (ds[i] for i in range(3)):
        image, mask = expected[sample["id"]]
        torch.testing.assert_close(sample["image"], torch.from_numpy(image).permute(2, 0, 1) / 255)
        assert sample["mask"].tolist() == mask.tolist()

    plain = tmp_path / "plain"
    for i in range(2):
        save(plain / f"p{i}.png", rng.integers(0, 256, (4, 6), dtype=np.uint8))
    unlabelled = load_hf_dataset(plain, cache_dir=tmp_path / "cache")
    assert len(unlabelled) == 2 and unlabelled[1]["image"].shape == (3, 4, 6) and unlabelled[1]["id"] == "1"


def collect_ids(source, world_size: int, num_workers: int, **kwargs) -> list[list[str]]:
    """Ids seen by each (rank, worker) pair; a rank's workers are told apart by the id prefix."""
    per_rank = []
    for rank in range(world_size):
        ds = load_hf_dataset(source, streaming=True, rank=rank, world_size=world_size, **kwargs)
        assert isinstance(ds, HFStreamingDataset) and ds.shards_itself is True
        loader = build_dataloader(ds, batch_size=2, shuffle=True, num_workers=num_workers)
        per_rank.append([i for batch in loader for i in batch["id"]])
    return per_rank


@pytest.mark.parametrize("num_shards", [8, 3])  # 3: not divisible by world_size -> per-example split
def test_streaming_shards_are_disjoint_and_complete(tmp_path, num_shards):
    rows = make_rows(22)
    path = save_to_disk(tmp_path / "saved", rows)
    per_rank = collect_ids(path, world_size=2, num_workers=2, image_column="pixels", num_shards=num_shards)
    seen = [i for ids in per_rank for i in ids]
    assert len(seen) == len(set(seen)) == 22  # no duplicate across 2 ranks x 2 workers
    assert set(seen) == set(rows["id"])
    assert all(len(ids) >= 5 for ids in per_rank)  # both ranks got a fair share


def test_streaming_imagefolder_and_sample_content(tmp_path):
    rng = np.random.default_rng(4)
    root = tmp_path / "stream"
    images = {}
    for i in range(7):
        images[f"f{i}"] = rng.integers(0, 256, (3, 4), dtype=np.uint8)
        save(root / f"f{i}.png", images[f"f{i}"])
    lines = [json.dumps({"file_name": f"f{i}.png", "id": f"f{i}"}) for i in range(7)]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    per_rank = collect_ids(root, world_size=2, num_workers=2, in_chans=1, cache_dir=tmp_path / "cache")
    seen = [i for ids in per_rank for i in ids]
    assert sorted(seen) == sorted(images)
    stream = load_hf_dataset(root, streaming=True, in_chans=1, cache_dir=tmp_path / "cache")
    for sample in stream:
        torch.testing.assert_close(sample["image"][0], torch.from_numpy(images[sample["id"]]).float() / 255)


def test_streaming_rank_validation(tmp_path):
    path = save_to_disk(tmp_path / "saved", make_rows(2))
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        load_hf_dataset(path, image_column="pixels", streaming=True, rank=2, world_size=2)


def test_auto_resize_reads_the_image_sizes_of_a_saved_dataset(tmp_path):
    from hybridvision.config import DataConfig
    from hybridvision.data.from_config import image_sizes, resolve_resize

    rows = make_rows(2, size=(20, 30))
    big = make_rows(1, size=(200, 150), seed=1)
    for key in rows:
        rows[key] += big[key]
    rows["id"][-1] = "big"
    path = save_to_disk(tmp_path / "saved", rows)
    cfg = DataConfig(source=str(path), image_column="pixels", image_size=(16, 16))
    assert sorted(image_sizes(cfg)) == [(20, 30), (20, 30), (200, 150)]
    assert resolve_resize(cfg)[0].resize == [16, 64]


@pytest.mark.parametrize("streaming", [False, True])
def test_hf_cells_use_the_project_reader_orientation_and_16_bits(tmp_path, streaming):
    """Image cells go through the same reader as files: EXIF orientation applied to image and mask
    alike, 48-bit PNGs at full depth (datasets' own decoding would give 8 bits)."""
    upright = np.array([[0, 1, 2], [3, 4, 5]], dtype=np.uint8)
    photo = save_with_orientation(tmp_path / "photo.png", np.repeat(upright[:, :, None] * 40, 3, 2), 6)
    mask = save_with_orientation(tmp_path / "mask.png", upright, 6)
    words = np.full((2, 3, 3), 1007, dtype=np.uint16)
    deep = write_png16(tmp_path / "deep.png", words)
    features = datasets.Features(
        {"id": datasets.Value("string"), "image": datasets.Image(), "label": datasets.Image()}
    )
    rows = {
        "id": ["photo", "deep"],
        "image": [{"bytes": photo.read_bytes(), "path": None}, {"bytes": deep.read_bytes(), "path": None}],
        "label": [{"bytes": mask.read_bytes(), "path": None}, {"bytes": mask.read_bytes(), "path": None}],
    }
    path = tmp_path / "saved"
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(path))
    ds = load_hf_dataset(path, mask_column="label", num_classes=6, streaming=streaming)
    samples = {s["id"]: s for s in (ds if streaming else [ds[0], ds[1]])}
    assert samples["photo"]["image"][0].mul(255 / 40).round().tolist() == upright.tolist()
    assert samples["photo"]["mask"].tolist() == upright.tolist()
    assert samples["deep"]["image"].mul(65535).round().unique().tolist() == [1007.0]


def test_streaming_is_refused_for_labelled_data_not_ignored(tmp_path):
    """data.streaming=true used to be dropped silently for labelled data (fine-tuning then read the
    whole set map-style); labelled data is map-style, so the setting is an error naming itself."""
    from finetune.config import FinetuneConfig
    from hybridvision.config import ConfigError, DataConfig
    from hybridvision.data.from_config import build_labelled_datasets
    from hybridvision.segmentation.data import build_data

    path = save_to_disk(tmp_path / "saved", make_rows(4), dict_splits=True)
    common = dict(source=str(path), image_column="pixels", val_split="validation", num_classes=3)
    labelled, val = build_labelled_datasets(DataConfig(**common), None, None)
    assert isinstance(labelled, HFSegmentationDataset) and len(labelled) == 4 and len(val) == 2
    with pytest.raises(
        ConfigError, match=r"^data\.streaming=true applies to unlabelled .*data\.streaming=false"
    ):
        build_labelled_datasets(DataConfig(**common, streaming=True), None, None)
    cfg = FinetuneConfig()
    cfg.data = DataConfig(**common, streaming=True, resize="native")
    with pytest.raises(ConfigError, match=r"data\.streaming=true"):
        build_data(cfg)  # the fine-tuning stage's (and distillation's) data entry point


def test_streaming_pretraining_data_streams_hf_sources_and_refuses_others(tmp_path):
    from hybridvision.config import ConfigError, DataConfig
    from hybridvision.data.from_config import build_unlabelled_dataset

    path = save_to_disk(tmp_path / "saved", make_rows(4))
    stream = build_unlabelled_dataset(
        DataConfig(source=str(path), image_column="pixels", streaming=True), None
    )
    assert isinstance(stream, HFStreamingDataset) and len(list(stream)) == 4
    folder = tmp_path / "folder"
    save(folder / "a.png", np.zeros((4, 4, 3), np.uint8))
    for source, what in ((str(folder), "a folder of image files"), ("synthetic", "the synthetic set")):
        with pytest.raises(ConfigError, match=f"Hugging Face datasets sources only.*is {what}"):
            build_unlabelled_dataset(DataConfig(source=source, streaming=True), None)

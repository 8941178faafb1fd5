"""Training on a fixed, seeded part of the labels (data.label_fraction / data.labelled_ids)."""

from __future__ import annotations

import json

import pytest

from finetune.config import FinetuneConfig
from hybridvision.config import ConfigError, DataConfig, load_config
from hybridvision.data.from_config import labelled_subset
from hybridvision.segmentation.data import build_data
from tests.data.test_bad_files import make_folder
from tests.stages._util import run_stage, tiny_finetune_args


def _cfg(**data):
    return load_config(
        FinetuneConfig, None, [f"data.{k}={v}" for k, v in data.items()] + ["data.resize=native"]
    )


def test_fraction_is_a_seeded_subset_and_the_rest_stays_available():
    cfg = _cfg(synthetic_samples=40, label_fraction=0.25)
    data = build_data(cfg)
    assert len(data.train_set) == 10 and len(data.labelled_ids) == 10 and len(data.unlabelled_rest) == 30
    assert sorted(data.train_set.indices + data.unlabelled_rest.indices) == list(range(40))
    assert build_data(cfg).labelled_ids == data.labelled_ids  # the same seed, the same subset
    other = build_data(
        load_config(
            FinetuneConfig,
            None,
            ["data.synthetic_samples=40", "data.label_fraction=0.25", "data.resize=native", "train.seed=1"],
        )
    )
    assert other.labelled_ids != data.labelled_ids
    assert data.labelled_ids == sorted(data.labelled_ids, key=int)  # split order
    full = build_data(_cfg(synthetic_samples=40))
    assert full.labelled_ids is None and full.unlabelled_rest is None and len(full.train_set) == 40


def test_at_least_one_image_and_exact_ids(tmp_path):
    root = make_folder(tmp_path / "d", n=5)
    d = DataConfig(source=str(root), num_classes=2, label_fraction=0.01)
    from hybridvision.data.from_config import build_labelled_datasets

    train, _ = build_labelled_datasets(d, None, None)
    sub, ids = labelled_subset(train, d, seed=0)
    assert len(sub) == 1 and ids[0] in train.ids
    d = DataConfig(source=str(root), num_classes=2, labelled_ids=["3", "1"])
    sub, ids = labelled_subset(train, d, seed=0)
    assert ids == ["1", "3"] and [sub[i]["id"] for i in range(2)] == ["1", "3"]
    with pytest.raises(ConfigError, match=r"data\.labelled_ids: \['7'\] not in split 'train'"):
        labelled_subset(train, DataConfig(source=str(root), num_classes=2, labelled_ids=["1", "7"]), seed=0)


@pytest.mark.parametrize("bad", ["data.label_fraction=0", "data.label_fraction=1.5"])
def test_fraction_outside_0_1_is_refused(bad):
    with pytest.raises(ConfigError, match=r"data\.label_fraction must be in \(0, 1\]"):
        load_config(FinetuneConfig, None, [bad])
    with pytest.raises(ConfigError, match="exclude each other"):
        load_config(FinetuneConfig, None, ["data.label_fraction=0.5", "data.labelled_ids=[a]"])


def test_finetune_records_the_subset(tmp_path):
    out = tmp_path / "f"
    res = run_stage("finetune/run.py", *tiny_finetune_args(out), "model.init=", "data.label_fraction=0.25")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "data.label_fraction=0.25: training on 4 of 16 labelled images" in res.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "model" / "config.json").read_text())
    assert len(metrics["labelled_ids"]) == 4 and config["extra"]["labelled_ids"] == metrics["labelled_ids"]
    assert config["extra"]["run_config"]["data"]["label_fraction"] == 0.25


def test_distillation_sees_the_rest_of_the_split_without_its_labels():
    from distill.config import DistillConfig
    from distill.data import build_distill_train_set

    cfg = load_config(
        DistillConfig,
        None,
        [
            "data.synthetic_samples=20",
            "data.label_fraction=0.25",
            "data.resize=native",
            "data.normalize=imagenet",
            "data.in_chans=3",
            "data.num_classes=4",
        ],
    )
    data = build_data(cfg)
    train, n_unlabelled = build_distill_train_set(
        cfg.data, data.train_set, data.train_transform, 0, rest=data.unlabelled_rest
    )
    assert len(train) == 20 and n_unlabelled == 15
    labelled = [train[i] for i in range(len(train))]
    assert sum(s["labelled"] for s in labelled) == 5
    for sample in labelled:
        if not sample["labelled"]:
            assert (sample["mask"] == cfg.data.ignore_index).all()
        else:
            assert (sample["mask"] != cfg.data.ignore_index).any()

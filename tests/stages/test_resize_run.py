"""A folder of images of widely varying size through the stage scripts with no size option given:
``data.resize=auto`` picks the crop's scale, the model records it, and predict.py (PyTorch and
ONNX) predicts at that scale and writes masks at each image's own size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ._util import QUIET, run_stage

SIZES = [(24, 36), (160, 120), (48, 48), (90, 200), (300, 240), (33, 70)]


def _disk_folder(root: Path) -> Path:
    """Photos of one kind of scene (a bright disk on noise) at many resolutions, content scaled."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i, (h, w) in enumerate(SIZES):
            y, x = np.mgrid[0:h, 0:w]
            disk = ((y / h - 0.5) ** 2 + (x / w - 0.5) ** 2) < 0.08
            img = rng.integers(0, 90, (h, w, 3)).astype(np.uint8)
            img[disk] = 220
            Image.fromarray(img).save(root / "images" / split / f"{i}.jpg", quality=95)
            Image.fromarray(disk.astype(np.uint8)).save(root / "masks" / split / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, str]:
    tmp = tmp_path_factory.mktemp("resize")
    data = _disk_folder(tmp / "data")
    out = tmp / "run"
    res = run_stage(
        "finetune/run.py",
        f"train.output_dir={out}",
        f"data.source={data}",
        "data.num_classes=2",
        "data.image_size=[32, 32]",
        "model.name=unet_resnet_nano",
        "model.init=",
        "train.max_steps=3",
        "train.batch_size=4",
        *QUIET,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return data, out, res.stdout + res.stderr


def test_auto_scale_is_chosen_logged_and_recorded(trained):
    _, out, log = trained
    assert "data.resize=auto -> [32, 128]" in log and "short sides 24-240" in log
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["extra"]["run_config"]["data"]["resize"] == [32, 128]
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["miou"] <= 1.0


def _predict(model: Path, src: Path, out: Path, *options: str) -> Path:
    res = run_stage(
        "finetune/predict.py", "--model", str(model), "--input", str(src), "--output", str(out), *options
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def _masks(out: Path) -> list[np.ndarray]:
    return [np.array(Image.open(out / f"{i}_mask.png")) for i in range(len(SIZES))]


def test_predict_uses_the_recorded_scale_and_writes_original_sizes(trained, tmp_path):
    from hybridvision.data.io import read_image
    from hybridvision.data.transforms import build_seg_transforms
    from hybridvision.inference import Predictor
    from hybridvision.models import from_pretrained

    data, out, _ = trained
    src = data / "images" / "val"
    model = from_pretrained(out / "model").eval()
    tf = build_seg_transforms(False, None, in_chans=3)
    # default: the recorded scale; --resize native: each image's own size
    for options, resize in (((), [32, 128]), (("--resize", "native"), None)):
        written = _masks(_predict(out / "model", src, tmp_path / str(resize), *options))
        predictor = Predictor(
            model, mode="slide", window=(32, 32), blend="gaussian", output="logits", resize=resize
        )
        for i, (h, w) in enumerate(SIZES):
            assert written[i].shape == (h, w)
            x = tf({"image": read_image(src / f"{i}.jpg", 3)})["image"]
            with torch.no_grad():
                expected = predictor.predict_labels(x.as_subclass(torch.Tensor)[None])[0].numpy()
            assert (written[i] == expected).mean() > 0.999


def test_onnx_runtime_honours_the_recorded_scale(trained, tmp_path):
    pytest.importorskip("onnxruntime")
    data, out, _ = trained
    res = run_stage("distill/export.py", "--model", str(out / "model"), "--output", str(tmp_path / "m.onnx"))
    assert res.returncode == 0, res.stderr[-3000:]
    src = data / "images" / "val"
    ort = _masks(_predict(tmp_path / "m.onnx", src, tmp_path / "ort"))
    pt = _masks(_predict(out / "model", src, tmp_path / "pt"))
    for i, (h, w) in enumerate(SIZES):
        assert ort[i].shape == (h, w) and (ort[i] == pt[i]).mean() > 0.995

"""The PyTorch-free ONNX predictor: runs with ``torch`` unimportable and writes finetune/predict.py's masks."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distill.export import export_from_dir
from finetune import predict as predict_cli
from hybridvision import geometry
from hybridvision.deploy import reader, runtime
from hybridvision.models import create_segmenter, save_pretrained

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random ``hybrid_nano`` (window attention inside) saved, exported, and four odd images."""
    tmp = tmp_path_factory.mktemp("runtime")
    torch.manual_seed(0)
    model = create_segmenter("hybrid_nano", num_classes=3)
    data = {"image_size": [32, 32], "normalize": "imagenet", "ignore_index": 255}
    save_pretrained(model, tmp / "model", extra={"run_config": {"data": data}})
    export_from_dir(str(tmp / "model"), tmp / "model.onnx")
    rng = np.random.default_rng(0)
    images = tmp / "images"
    (images / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (45, 70, 3), dtype=np.uint8)).save(images / "a.png")
    Image.fromarray(rng.integers(0, 256, (40, 33), dtype=np.uint8)).save(images / "sub" / "b.jpg")  # gray
    Image.fromarray(rng.integers(0, 256, (64, 64, 4), dtype=np.uint8), "RGBA").save(images / "c.png")
    Image.fromarray(rng.integers(0, 256, (20, 90, 3), dtype=np.uint8)).save(images / "d.webp")  # < window
    return tmp


def _masks(folder: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(folder)): np.asarray(Image.open(p)) for p in sorted(folder.rglob("*_mask.png"))}


def test_runtime_runs_without_torch_and_matches_predict_py(setup):
    out_onnx, out_torch = setup / "out_onnx", setup / "out_torch"
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        sys.path.insert(0, {str(ROOT)!r})
        from hybridvision.deploy.cli import main
        rc = main(["--model", {str(setup / "model.onnx")!r}, "--input", {str(setup / "images")!r},
                   "--output", {str(out_onnx)!r}, "--threads", "1"])
        assert sys.modules["torch"] is None and not any(m.startswith("torch.") for m in sys.modules)
        sys.exit(rc)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 4 masks" in proc.stdout
    assert (
        predict_cli.main(
            [
                "--model",
                str(setup / "model"),
                "--input",
                str(setup / "images"),
                "--output",
                str(out_torch),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    onnx_masks, torch_masks = _masks(out_onnx), _masks(out_torch)
    assert sorted(onnx_masks) == ["a_mask.png", "c_mask.png", "d_mask.png", "sub/b_mask.png"]
    assert sorted(torch_masks) == sorted(onnx_masks)
    for name, mask in onnx_masks.items():
        ref = torch_masks[name]
        assert mask.shape == ref.shape and mask.dtype == np.uint8
        assert (mask == ref).mean() >= 0.999, name
        assert len(np.unique(ref)) > 1  # a random model still predicts several classes: not a trivial match
    assert Image.open(out_onnx / "a_overlay.png").size == (70, 45)


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_predict_py_with_onnx_model_equals_torch_model(setup, tmp_path, mode):
    args = ["--input", str(setup / "images"), "--mode", mode, "--window", "24", "40", "--tta", "h"]
    assert (
        predict_cli.main(["--model", str(setup / "model.onnx"), *args, "--output", str(tmp_path / "o")]) == 0
    )
    assert (
        predict_cli.main(
            ["--model", str(setup / "model"), *args, "--output", str(tmp_path / "t"), "--device", "cpu"]
        )
        == 0
    )
    onnx_masks, torch_masks = _masks(tmp_path / "o"), _masks(tmp_path / "t")
    assert len(onnx_masks) == 4
    for name, mask in onnx_masks.items():
        assert (mask == torch_masks[name]).mean() >= 0.999, name


def test_numpy_blending_equals_torch_inference():
    """The numpy port of sliding-window inference reproduces hybridvision.inference on the same model."""
    from hybridvision.inference import gaussian_window, predict_sliding_window

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 3, 3, padding=1)
    x = torch.randn(2, 2, 37, 50)
    for blend in ("uniform", "gaussian"):
        ref = predict_sliding_window(
            conv, x, (16, 24), overlap=0.4, blend=blend, batch_size=3, tta_flips=("v",)
        )

        def model(a):
            with torch.no_grad():
                return conv(torch.from_numpy(a)).numpy()

        got = runtime.predict_sliding_window(model, x.numpy(), (16, 24), 0.4, blend, 3, ("v",))
        np.testing.assert_allclose(got, ref.numpy(), atol=1e-5)
    np.testing.assert_allclose(geometry.gaussian_window((7, 12)), gaussian_window((7, 12)).numpy(), atol=1e-7)
    logits = np.random.default_rng(0).standard_normal((1, 3, 5, 6)).astype(np.float32)
    resized = runtime._resize_bilinear(logits, (11, 13))
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(logits), size=(11, 13), mode="bilinear", align_corners=False
    )
    np.testing.assert_allclose(resized, ref.numpy(), atol=1e-6)


def test_read_image_matches_the_torch_reader(setup):
    from hybridvision.data.io import read_image

    for path in sorted((setup / "images").rglob("*.*")):
        for chans in (1, 3):
            np.testing.assert_array_equal(reader.read_image(path, chans), read_image(path, chans).numpy())


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_predictions_are_written_in_the_displayed_orientation(setup, tmp_path, orientation):
    """A phone photo stored turned with an EXIF orientation tag: both predictors write its mask and
    overlay at the size viewers show, equal to the prediction for the same picture saved upright."""
    from PIL import ImageOps

    images = tmp_path / "in"
    images.mkdir()
    stored = np.random.default_rng(orientation).integers(0, 256, (30, 52, 3), dtype=np.uint8)
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = orientation
    img.save(images / "photo.jpg", exif=exif.tobytes(), quality=95)
    with Image.open(images / "photo.jpg") as photo:
        upright = ImageOps.exif_transpose(photo)  # the displayed pixels, saved losslessly
        upright.save(images / "upright.png")
    height, width = upright.height, upright.width
    assert (height, width) == ((30, 52) if orientation == 3 else (52, 30))
    runtime.OnnxPredictor(setup / "model.onnx", threads=1).predict_files(
        reader.list_images(images), images, tmp_path / "o"
    )
    args = ["--input", str(images), "--output", str(tmp_path / "t"), "--device", "cpu"]
    assert predict_cli.main(["--model", str(setup / "model"), *args]) == 0
    for out in (tmp_path / "o", tmp_path / "t"):
        masks = _masks(out)
        assert masks["photo_mask.png"].shape == (height, width)
        np.testing.assert_array_equal(masks["photo_mask.png"], masks["upright_mask.png"])
        assert Image.open(out / "photo_overlay.png").size == (width, height)

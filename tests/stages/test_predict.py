"""finetune/predict.py as a user meets it: clashing names, unreadable images, one-line user errors."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from finetune import predict as predict_cli
from hybridvision.deploy.errors import UserError
from hybridvision.models import create_segmenter, save_pretrained


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("predict") / "model"
    model = create_segmenter("unet_resnet_nano", num_classes=2)
    save_pretrained(model, path, extra={"run_config": {"data": {"image_size": [32, 32]}}})
    return path


def _image(path, size=(20, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size[::-1], (120, 30, 200)).save(path)
    return path


def _run(capsys, *args):
    rc = predict_cli.main([*map(str, args), "--device", "cpu"])
    out, err = capsys.readouterr()
    return rc, out, err


def test_clashing_names_keep_relative_path_and_extension(model_dir, tmp_path, capsys):
    for name in ("x.png", "x.jpg", "sub/x.png", "y.png"):
        _image(tmp_path / "in" / name)
    rc, out, _ = _run(capsys, "--model", model_dir, "--input", tmp_path / "in", "--output", tmp_path / "out")
    assert rc == 0 and "wrote 4 masks" in out
    written = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*_mask.png"))
    assert written == ["sub/x_mask.png", "x_jpg_mask.png", "x_png_mask.png", "y_mask.png"]


def test_names_that_still_clash_stop_before_writing(model_dir, tmp_path, capsys):
    for name in ("x.png", "x.jpg", "x_jpg.png"):
        _image(tmp_path / "in" / name)
    rc, _, err = _run(capsys, "--model", model_dir, "--input", tmp_path / "in", "--output", tmp_path / "out")
    assert rc == 2 and "x_jpg_mask.png" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_unreadable_image_is_reported_and_the_rest_written(model_dir, tmp_path, capsys):
    _image(tmp_path / "in" / "a.png")
    good = _image(tmp_path / "in" / "c.png").read_bytes()
    (tmp_path / "in" / "b.png").write_bytes(good[: len(good) // 2])  # truncated
    (tmp_path / "in" / "d.jpg").write_text("not an image")
    rc, out, err = _run(
        capsys, "--model", model_dir, "--input", tmp_path / "in", "--output", tmp_path / "out"
    )
    assert rc == 1
    assert "wrote 2 masks" in out
    assert sorted(p.name for p in (tmp_path / "out").glob("*_mask.png")) == ["a_mask.png", "c_mask.png"]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: 2 image(s) could not be read") and "b.png" in last and "d.jpg" in last
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"--window": ["0", "0"]}, "--window must be two positive sizes"),
        ({"--overlap": ["1.5"]}, "--overlap must be in [0, 1)"),
        ({"--batch-size": ["0"]}, "--batch-size must be >= 1"),
        ({"--model": ["{tmp}/missing"]}, "missing"),
        ({"--model": ["{tmp}/truncated"]}, "model.safetensors"),
        ({"--model": ["{tmp}/missing.onnx"]}, "missing.onnx not found"),
        ({"--model": ["{tmp}/broken.onnx"]}, "cannot load ONNX model"),
        ({"--input": ["{tmp}/nothing"]}, "--input"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(model_dir, tmp_path, capsys, change, expected):
    _image(tmp_path / "in" / "a.png")
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    (truncated / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes()[:1000])
    (tmp_path / "broken.onnx").write_bytes(b"\x08\x07garbage")
    args = {
        "--model": [str(model_dir)],
        "--input": [str(tmp_path / "in")],
        "--output": [str(tmp_path / "out")],
    }
    args.update({k: [v.format(tmp=tmp_path) for v in vals] for k, vals in change.items()})
    rc, _, err = _run(capsys, *[x for k, vals in args.items() for x in (k, *vals)])
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert expected in err and "Traceback" not in err


def test_debug_env_raises_with_the_traceback(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDVISION_DEBUG", "1")
    with pytest.raises(UserError, match="--window"):
        predict_cli.main(
            [
                "--model",
                str(model_dir),
                "--input",
                str(tmp_path),
                "--output",
                str(tmp_path / "o"),
                "--window",
                "0",
                "0",
            ]
        )

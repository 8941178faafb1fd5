"""What the stage logs say when written to a file: the model a run built (name, encoder, decoder,
parameters) and ``finetune/predict.py``'s progress as plain lines instead of a bar's frames."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from finetune import predict as predict_cli
from hybridvision.deploy import cli as deploy_cli
from hybridvision.models import create_segmenter, save_pretrained
from hybridvision.models.profile import model_summary


def _params(model: nn.Module) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.3f} M parameters"


@pytest.mark.parametrize(
    "name, decoder, expected",
    [
        ("unet_resnet_nano", None, "model unet_resnet_nano (encoder resnet_nano, decoder unet)"),
        ("resnet_nano", None, "model resnet_nano (encoder resnet_nano, decoder segformer_mlp)"),
        ("resnet_nano", "unet", "model resnet_nano (encoder resnet_nano, decoder unet)"),
    ],
)
def test_model_summary_names_encoder_decoder_and_parameters(name: str, decoder: str | None, expected: str):
    model = create_segmenter(name, num_classes=3, decoder=decoder)
    assert model_summary(model) == f"{expected}: {_params(model)}"


def test_model_summary_of_an_outside_module():
    model = nn.Conv2d(3, 2, 3)
    assert model_summary(model) == f"model Conv2d: {_params(model)}"
    assert _params(model) == "0.000 M parameters"  # 56 parameters, rounded


def _files(tmp_path: Path, count: int) -> list[Path]:
    return [tmp_path / f"{i}.png" for i in range(count)]


def test_progress_prints_plain_lines_when_stderr_is_no_terminal(monkeypatch: pytest.MonkeyPatch, tmp_path):
    err = io.StringIO()  # a log file: isatty() is False
    monkeypatch.setattr("sys.stderr", err)
    files = _files(tmp_path, 25)
    assert list(deploy_cli.progress(files)) == files
    lines = err.getvalue().splitlines()
    assert "\r" not in err.getvalue()
    # every ceil(25 / 10) = 3 images, and the last
    assert [line.split(" images")[0] for line in lines] == [
        f"predict {n}/25" for n in (3, 6, 9, 12, 15, 18, 21, 24, 25)
    ]
    assert lines[-1].endswith("ETA 0 s")


def test_progress_keeps_the_bar_on_a_terminal(monkeypatch: pytest.MonkeyPatch, tmp_path):
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    monkeypatch.setattr(deploy_cli, "_stderr_is_terminal", lambda: True)
    files = _files(tmp_path, 3)
    assert list(deploy_cli.progress(files)) == files
    assert "\r" in err.getvalue() and "predict: 100%" in err.getvalue()


def test_predict_cli_log_has_no_carriage_returns(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    torch.manual_seed(0)
    model = create_segmenter("unet_resnet_nano", num_classes=2)
    save_pretrained(model, tmp_path / "model", extra={"run_config": {"data": {"image_size": [32, 32]}}})
    for name in ("a.png", "b.png"):
        Image.new("RGB", (30, 20), (120, 30, 200)).save(tmp_path / name)
    rc = predict_cli.main(
        [
            "--model",
            str(tmp_path / "model"),
            "--input",
            str(tmp_path),
            "--output",
            str(tmp_path / "out"),
            "--device",
            "cpu",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0 and "wrote 2 masks" in out
    assert "\r" not in out + err
    assert [line.split(" images")[0] for line in err.splitlines()] == ["predict 1/2", "predict 2/2"]

"""finetune/run.py and finetune/predict.py end to end, and their errors on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ._util import run_stage, tiny_finetune_args, tiny_pretrain_args

pytestmark = pytest.mark.slow  # each test starts the stage script in a fresh interpreter


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pre")
    res = run_stage("pretrain/run.py", *tiny_pretrain_args(out), "probe.source=none")
    assert res.returncode == 0, res.stderr[-3000:]
    return out / "encoder"


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, encoder_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("ft")
    res = run_stage("finetune/run.py", *tiny_finetune_args(out), f"model.init={encoder_dir}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "tensors loaded" in res.stdout
    return out


def test_finetune_from_encoder_writes_model_and_metrics(finetuned: Path):
    from hybridvision.models import Segmenter, from_pretrained

    model = from_pretrained(finetuned / "model")
    assert isinstance(model, Segmenter) and model.num_classes == 4
    metrics = json.loads((finetuned / "metrics.json").read_text())
    assert 0.0 <= metrics["miou"] <= 1.0 and len(metrics["iou"]) == 4
    assert metrics["class_names"][0] == "background"


def test_predict_writes_masks_at_original_size(finetuned: Path, tmp_path: Path):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    sizes = {"a": (37, 53), "b": (130, 90)}
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(src / f"{name}.png")
    res = run_stage(
        "finetune/predict.py",
        "--model",
        str(finetuned / "model"),
        "--input",
        str(src),
        "--output",
        str(tmp_path / "out"),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    for name, (h, w) in sizes.items():
        mask = np.array(Image.open(tmp_path / "out" / f"{name}_mask.png"))
        assert mask.shape == (h, w) and mask.max() < 4
        assert np.array(Image.open(tmp_path / "out" / f"{name}_overlay.png")).shape == (h, w, 3)


def _folder(
    root: Path, n: int = 4, values=(0, 1), size=(32, 32), drop_mask: int | None = None, mask_size=None
) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "masks" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(
                root / "images" / split / f"{i}.png"
            )
            if drop_mask == i:
                continue
            mask = rng.choice(np.array(values, dtype=np.uint8), size=mask_size or size)
            Image.fromarray(mask).save(root / "masks" / split / f"{i}.png")
    return root


def _finetune(tmp_path: Path, *extra: str):
    return run_stage(
        "finetune/run.py",
        f"train.output_dir={tmp_path / 'out'}",
        "train.max_steps=1",
        "train.batch_size=2",
        "model.init=",
        "model.name=hybrid_nano",
        "data.image_size=[32,32]",
        "train.progress_bar=false",
        "train.trackers=[]",
        *extra,
    )


def test_wrong_num_classes_names_file_and_value(tmp_path: Path):
    root = _folder(tmp_path / "d", values=(0, 1, 2, 3))
    res = _finetune(tmp_path, f"data.source={root}", "data.num_classes=2")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert ".png" in res.stderr and ("3" in res.stderr or "2" in res.stderr)


def test_mask_value_out_of_range_names_value(tmp_path: Path):
    root = _folder(tmp_path / "d", values=(0, 1, 77))
    res = _finetune(tmp_path, f"data.source={root}", "data.num_classes=3")
    assert res.returncode == 2 and "77" in res.stderr and ".png" in res.stderr


def test_image_without_mask_names_file(tmp_path: Path):
    root = _folder(tmp_path / "d", drop_mask=2)
    res = _finetune(tmp_path, f"data.source={root}", "data.num_classes=2")
    assert res.returncode == 2 and "2.png" in res.stderr


def test_folder_without_masks_is_clear(tmp_path: Path):
    root = tmp_path / "plain"
    root.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "x.png")
    res = _finetune(tmp_path, f"data.source={root}")
    assert res.returncode == 2 and "masks" in res.stderr


def test_checkpoint_of_other_architecture_is_an_error(tmp_path: Path, encoder_dir: Path):
    res = _finetune(tmp_path, f"model.init={encoder_dir}", "model.name=swin_nano")
    assert res.returncode == 2
    assert "hybrid_nano" in res.stderr and "swin_nano" in res.stderr


def test_shape_mismatch_names_parameter_and_shapes(encoder_dir: Path):
    """A 3-channel encoder checkpoint into a 4-channel model: strict errors, relaxed skips and lists."""
    from hybridvision.models import create_segmenter, from_pretrained
    from hybridvision.models.transfer import InitReport, load_matching

    target = create_segmenter("hybrid_nano", num_classes=2, in_chans=4)
    state = from_pretrained(encoder_dir).state_dict()
    with pytest.raises(
        ValueError,
        match=r"shape mismatch for parameter encoder\.\S+: checkpoint \(.*3.*\) vs model \(.*4.*\)",
    ):
        load_matching(target.encoder, state, strict=True, report=InitReport(), prefix="encoder.")
    relaxed = InitReport(source=str(encoder_dir))
    load_matching(target.encoder, state, strict=False, report=relaxed, prefix="encoder.")
    assert len(relaxed.skipped) == 1 and len(relaxed.loaded) == len(state) - 1
    assert "skipped for shape mismatch: 1" in relaxed.summary()


def test_ema_progressive_resizing_and_sliding_eval(tmp_path: Path):
    out = tmp_path / "ema"
    res = run_stage(
        "finetune/run.py",
        *tiny_finetune_args(out),
        "model.init=",
        "model.ema_decay=0.5",
        "augment.size_schedule=[[0,32],[1,64]]",
        "eval.mode=slide",
        "eval.window=[32,32]",
        "eval.tta_flips=[h]",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    from safetensors.torch import load_file

    exported = load_file(str(out / "model" / "model.safetensors"))
    raw = load_file(str(out / "checkpoints" / "step_00000002" / "model.safetensors"))
    # the export holds the EMA weights, which differ from the raw weights after two updates
    assert any(not torch.equal(exported[k], raw[k]) for k in raw if k in exported)
    assert json.loads((out / "metrics.json").read_text())["num_pixels"] == 5 * 64 * 64


def test_scheduled_size():
    from finetune.build import scheduled_size
    from finetune.config import FinetuneConfig
    from hybridvision.config import apply_overrides

    cfg = apply_overrides(FinetuneConfig(), ["augment.size_schedule=[[0,48],[100,64]]"])
    assert [scheduled_size(cfg, s) for s in (0, 99, 100, 500)] == [48, 48, 64, 64]
    assert scheduled_size(FinetuneConfig(), 10) is None


def test_sigterm_to_the_process_group_exits_143_with_partial_outputs(tmp_path: Path):
    """SIGTERM to the whole group (as SLURM / Kubernetes send it), with DataLoader workers."""
    import os
    import signal
    import subprocess
    import sys

    from ._util import ROOT

    out = tmp_path / "term"
    args = [*tiny_finetune_args(out), "train.max_steps=2000", "train.log_every=1", "data.num_workers=2"]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "finetune/run.py"), *args, "data.image_size=[32,32]"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True,
    )
    lines = []
    for line in proc.stdout:  # plain progress lines: stdout is not a terminal
        lines.append(line)
        if line.startswith("finetune step 3/2000 loss"):
            break
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    stdout = "".join(lines) + stdout
    assert proc.returncode == 143, stderr[-3000:]
    assert "killed by signal" not in stderr and "stopped by SIGTERM" in stdout
    assert "model written to" not in stdout and not (out / "model").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["partial"] is True and Path(metrics["checkpoint"]).is_dir()
    command = stdout.split("resume with: ")[1].splitlines()[0]
    assert "finetune/run.py" in command and f"train.output_dir={out}" in command

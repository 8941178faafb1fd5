"""A released-checkpoint backbone through every stage script, as a user would run them.

LeViT (timm) has strides 16-64 and an input size fixed at creation; EfficientViT-MSRA likewise:
pretrain continues from a timm release in the Hugging Face cache layout (offline), fine-tuning
reports every encoder tensor loaded, distillation trains a timm student and exports ONNX, and the
PyTorch-free predictor slides windows of the fixed size over larger images.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.hub_cache import add_to_hub_cache
from tests.stages._util import QUIET, run_stage, tiny_finetune_args, tiny_pretrain_args

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    """A LeViT release with random weights in the Hugging Face cache layout (timm/levit_128s.test)."""
    import torch
    from timm.models import save_for_hf

    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    save_for_hf(timm.create_model("levit_128s", img_size=64), str(root / "release"), safe_serialization=True)
    add_to_hub_cache(
        root / "cache", "timm/levit_128s.test", root / "release", ("config.json", "model.safetensors")
    )
    return root / "cache"


def test_fixed_size_16_to_64_backbone_through_the_whole_chain(hub_cache: Path, tmp_path: Path):
    env = {"HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    pre = run_stage(
        "pretrain/run.py",
        *tiny_pretrain_args(tmp_path / "pre"),
        "model.init=timm/levit_128s.test",
        "objective.name=mim",
        "probe.source=none",
        env=env,
    )
    assert pre.returncode == 0, pre.stderr[-3000:]
    assert "initialised from timm/levit_128s.test" in pre.stdout
    loaded = int(pre.stdout.split("timm/levit_128s weights): ")[1].split()[0])
    config = json.loads((tmp_path / "pre" / "encoder" / "config.json").read_text())
    assert config["hybridvision"]["build"]["name"] == "timm/levit_128s"
    assert (tmp_path / "pre" / "encoder" / "README.md").is_file()

    fine = run_stage(
        "finetune/run.py",
        *tiny_finetune_args(tmp_path / "fine"),
        f"model.init={tmp_path / 'pre' / 'encoder'}",
    )
    assert fine.returncode == 0, fine.stderr[-3000:]
    assert f"{loaded} tensors loaded" in fine.stdout  # every encoder tensor of the continued run
    assert "missing (kept random init)" in fine.stdout and "missing (kept random init): 0" not in fine.stdout
    assert all(
        "encoder." not in line for line in fine.stdout.splitlines() if line.strip().startswith("missing")
    )

    dist = run_stage(
        "distill/run.py",
        f"teacher={tmp_path / 'fine' / 'model'}",
        f"train.output_dir={tmp_path / 'dist'}",
        "student.name=timm/efficientvit_m0",
        "train.max_steps=2",
        "train.batch_size=2",
        "data.synthetic_samples=8",
        "data.synthetic_val_samples=3",
        "train.eval_every=0",
        "optim.warmup_steps=0",
        "export.report_runs=1",
        *QUIET,
    )
    assert dist.returncode == 0, dist.stderr[-3000:]
    onnx_path = tmp_path / "dist" / "student.onnx"
    assert onnx_path.is_file()

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (100, 130, 3), dtype=np.uint8)).save(images / "big.png")
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(images / "small.png")
    pred = run_stage(
        "finetune/predict.py",
        "--model",
        str(onnx_path),
        "--input",
        str(images),
        "--output",
        str(tmp_path / "pred"),
    )
    assert pred.returncode == 0, pred.stderr[-3000:]
    assert Image.open(tmp_path / "pred" / "big_mask.png").size == (130, 100)
    assert Image.open(tmp_path / "pred" / "small_mask.png").size == (50, 40)

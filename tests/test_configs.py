"""Every YAML in configs/ loads, validates and builds its model at tiny scale, offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune.config import FinetuneConfig
from hybridvision.config import load_config
from hybridvision.models.transfer import build_segmenter
from pretrain.build import build_model as build_pretrain_model
from pretrain.config import PretrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRETRAIN = sorted((CONFIGS / "pretrain").glob("*.yaml"))
FINETUNE = sorted((CONFIGS / "finetune").glob("*.yaml"))


def test_there_are_configs():
    assert len(PRETRAIN) >= 5 and len(FINETUNE) >= 5


@pytest.mark.parametrize("path", PRETRAIN, ids=lambda p: p.stem)
def test_pretrain_config_builds_and_steps(path: Path):
    cfg = load_config(PretrainConfig, path, ["data.image_size=[64,64]"])
    if cfg.objective.mask_patch_size > 32:
        pytest.fail(f"{path}: mask patch {cfg.objective.mask_patch_size} does not tile small inputs")
    torch.manual_seed(0)
    model, _ = build_pretrain_model(cfg)
    c = cfg.data.in_chans
    batch = {
        "view0": torch.randn(2, c, 64, 64),
        "view1": torch.randn(2, c, 64, 64),
        "image": torch.randn(2, c, 64, 64),
    }
    out = model(batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()


def _transformers_segformer_dir(tmp_path: Path) -> Path:
    transformers = pytest.importorskip("transformers")
    config = transformers.SegformerConfig(num_labels=150)  # the B0 defaults, ADE20K-sized head
    model = transformers.SegformerForSemanticSegmentation(config)
    model.save_pretrained(tmp_path / "segformer")
    return tmp_path / "segformer"


@pytest.mark.parametrize("path", FINETUNE, ids=lambda p: p.stem)
def test_finetune_config_builds(path: Path, tmp_path: Path):
    cfg = load_config(FinetuneConfig, path)
    init = cfg.model.init
    if init.startswith("runs/"):
        # produced by the matching pretrain config; stand in an encoder of the architecture it names
        from hybridvision.models import create_encoder, save_pretrained

        pre = load_config(
            PretrainConfig, CONFIGS / "pretrain" / ("isbi_em.yaml" if "isbi" in path.stem else "camvid.yaml")
        )
        assert init == f"{pre.train.output_dir}/encoder", (
            f"{path}: init does not match the pretrain config's output"
        )
        save_pretrained(create_encoder(pre.model.name, in_chans=pre.data.in_chans), tmp_path / "enc")
        init = str(tmp_path / "enc")
    elif "/" in init and not Path(init).exists():  # a hub id: a local transformers checkpoint instead
        init = str(_transformers_segformer_dir(tmp_path))
    model, report = build_segmenter(
        cfg.model.name,
        cfg.data.num_classes,
        cfg.data.in_chans,
        init=init,
        strict=cfg.model.init_strict,
        decoder=cfg.model.decoder or None,
        overrides=cfg.model.overrides,
    )
    if init:
        assert report.loaded, report.summary()
    x = torch.randn(1, cfg.data.in_chans, 64, 64)
    assert model(x).shape == (1, cfg.data.num_classes, 64, 64)

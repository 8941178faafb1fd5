"""``objective.visible_only``: MIM whose attention stages encode the visible tokens only."""

from __future__ import annotations

import pytest
import torch
from test_objectives import assert_masked_input_cannot_leak

from hybridvision.config import ConfigError
from hybridvision.config.cli import parse_cli
from hybridvision.models import create_encoder
from pretrain.build import build_model
from pretrain.config import ObjectiveConfig, PretrainConfig
from pretrain.masking import BlockMaskGenerator
from pretrain.objectives import PretrainModel, visible_only_encoders

ENCODERS = ["swin_nano", "hybrid_nano", "sequential_nano"]


def _model(name: str, objective: str = "mim", **kwargs) -> PretrainModel:
    torch.manual_seed(0)
    options = {"mask_patch_size": 32, "mask_ratio": 0.5, "decoder_dim": 16, "projection_dim": 16} | kwargs
    return PretrainModel(create_encoder(name), objective, visible_only=True, **options)


def test_the_registered_families_are_listed():
    names = visible_only_encoders()
    assert {"swin_tiny", "hybrid_nano", "sequential_tiny"} <= set(names)
    assert not {"mit_b0", "resnet18", "transunet_nano", "parallel_nano"} & set(names)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("objective", ["mim", "contrastive_mim"])
@pytest.mark.parametrize("name", ENCODERS)
def test_every_weight_trains(name, objective, autocast):
    model = _model(name, objective)
    g = torch.Generator().manual_seed(0)
    batch = {k: torch.rand(2, 3, 64, 96, generator=g) for k in ("image", "view0", "view1")}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(batch)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    # Swin never encodes a masked token, so it has no mask token; the hybrids' conv stems read it
    assert (model.mask_token is not None) == model.encoder.visible_only_mask_token
    assert model.no_weight_decay() <= dict(model.named_parameters()).keys()


@pytest.mark.parametrize("name", ENCODERS)
def test_masked_pixels_cannot_reach_the_reconstruction(name):
    model = _model(name)
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    mask = BlockMaskGenerator(128, 32, 0.6)(2, generator=torch.Generator().manual_seed(2))
    assert_masked_input_cannot_leak(model, x, mask)


def test_visible_only_and_full_share_weights_and_differ_only_in_what_the_encoder_sees():
    """Same weights, same batch: the two paths give different reconstructions (the option is not a no-op),
    and the visible-only encoder's features are zero at masked positions, as the decoder expects."""
    torch.manual_seed(0)
    full = PretrainModel(create_encoder("swin_nano"), "mim", mask_patch_size=32, decoder_dim=16)
    visible = PretrainModel(full.encoder, "mim", mask_patch_size=32, decoder_dim=16, visible_only=True)
    visible.objective.decoder.load_state_dict(full.objective.decoder.state_dict())
    x = torch.rand(2, 3, 64, 64)
    mask = torch.tensor([[[[1, 0], [0, 1]]], [[[0, 1], [1, 1]]]], dtype=torch.bool)
    with torch.no_grad():
        a = full.eval()({"image": x, "mask": mask}).images["reconstruction"]
        b = visible.eval()({"image": x, "mask": mask}).images["reconstruction"]
        feats = full.encoder.forward_visible(x, mask)
    assert not torch.allclose(a, b)
    assert (feats[-1] * mask).abs().sum() == 0 and (feats[-1] * ~mask).abs().sum() > 0  # stride 32 = cells


def test_objective_errors_name_the_key():
    with pytest.raises(ValueError, match=r"objective\.visible_only=true needs an encoder .*swin_tiny"):
        PretrainModel(create_encoder("mit_nano"), "mim", visible_only=True)
    with pytest.raises(ValueError, match=r"objective\.mim_decoder=multiscale"):
        PretrainModel(create_encoder("swin_nano"), "mim", decoder="pixel_shuffle", visible_only=True)
    with pytest.raises(ValueError, match="option of MIM"):
        PretrainModel(create_encoder("swin_nano"), "contrastive", visible_only=True)


def test_config_validation_and_the_encoder_check():
    with pytest.raises(ConfigError, match="option of MIM"):
        ObjectiveConfig(name="contrastive", visible_only=True)
    with pytest.raises(ConfigError, match="mim_decoder=multiscale"):
        ObjectiveConfig(name="mim", mim_decoder="pixel_shuffle", visible_only=True)
    with pytest.raises(ConfigError, match="mim_decoder=multiscale"):
        ObjectiveConfig(name="mim", mim_decoder="segmenter", visible_only=True)
    cfg = parse_cli(
        PretrainConfig, ["objective.name=mim", "objective.visible_only=true", "model.name=mit_nano"]
    )
    with pytest.raises(ConfigError) as err:
        build_model(cfg)
    message = str(err.value)
    assert "\n" not in message and "objective.visible_only" in message and "mit_nano" in message
    assert all(name in message for name in ("swin_tiny", "hybrid_nano", "sequential_tiny"))
    cfg = parse_cli(
        PretrainConfig, ["objective.name=mim", "objective.visible_only=true", "model.name=swin_nano"]
    )
    model, _ = build_model(cfg)
    assert model.objective.visible_only and model.mask_token is None

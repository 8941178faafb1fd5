"""Optimizer groups and LR schedules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hybridvision.config import ConfigError, OptimConfig
from hybridvision.optim import build_optimizer, build_scheduler, lr_factor, param_groups


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.pos_embed = nn.Parameter(torch.zeros(1, 4))
        self.decoder = nn.Linear(4, 2)

    def no_weight_decay(self):
        return {"pos_embed"}


def test_warmup_then_cosine_and_poly():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, cfg, 110) == 0.0
    assert lr_factor(5, cfg, 110) == pytest.approx(0.5)
    assert lr_factor(10, cfg, 110) == pytest.approx(1.0)
    assert lr_factor(60, cfg, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(110, cfg, 110) == pytest.approx(0.1)
    poly = OptimConfig(lr=1.0, warmup_steps=0, schedule="poly", poly_power=0.9)
    assert lr_factor(50, poly, 100) == pytest.approx(0.5**0.9)


def test_no_decay_on_norms_biases_and_tokens_and_lr_mult():
    groups = param_groups(Tiny(), weight_decay=0.05, lr_mult={"decoder": 10.0})
    by_name = {n: (g["weight_decay"], g["lr_scale"]) for g in groups for n in g["names"]}
    assert by_name["encoder.0.weight"] == (0.05, 1.0)
    assert by_name["encoder.0.bias"] == (0.0, 1.0)
    assert by_name["encoder.1.weight"] == (0.0, 1.0)  # BatchNorm
    assert by_name["pos_embed"] == (0.0, 1.0)
    assert by_name["decoder.weight"] == (0.05, 10.0)
    assert by_name["decoder.bias"] == (0.0, 10.0)


def test_unknown_lr_mult_prefix_is_named():
    with pytest.raises(ConfigError, match="'head'.*decoder"):
        param_groups(Tiny(), 0.05, lr_mult={"head": 10.0})


def test_scheduler_applies_group_scales():
    model = Tiny()
    cfg = OptimConfig(lr=0.1, warmup_steps=0, schedule="constant", lr_mult={"decoder": 10.0})
    opt = build_optimizer(model, cfg)
    build_scheduler(opt, cfg, 10)
    lrs = sorted({g["lr"] for g in opt.param_groups})
    assert lrs == pytest.approx([0.1, 1.0])


def test_fused_adamw_matches_reference():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 2))
    b = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 2))
    b.load_state_dict(a.state_dict())
    cfg = OptimConfig(lr=1e-2, weight_decay=0.05)
    fused = build_optimizer(a, cfg)
    assert fused.defaults["fused"]
    groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(b, 0.05)]
    ref = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.05, foreach=False)
    x, y = torch.randn(16, 6), torch.randn(16, 2)
    for _ in range(5):
        for m, opt in ((a, fused), (b, ref)):
            opt.zero_grad()
            (m(x) - y).square().mean().backward()
            opt.step()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=n)


def test_layer_decay_follows_depth_for_every_family():
    from hybridvision.models import create_segmenter

    for name in ("mit_nano", "swin_nano", "resnet_nano", "transunet_nano", "hybrid_nano"):
        model = create_segmenter(name, num_classes=2)
        groups = param_groups(model, 0.05, layer_decay=0.5)
        scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
        dec = [v for n, v in scale.items() if n.startswith("decoder.")]
        assert set(dec) == {1.0}, name
        enc = [v for n, v in scale.items() if n.startswith("encoder.")]
        assert max(enc) == 0.5 and min(enc) == 0.5**model.num_layers, name
        # the first group to run gets the smallest LR, the last encoder group the largest
        order = model._layer_groups()
        first = next(n for n in scale if n.startswith(order[0] + "."))
        last = next(n for n in scale if n.startswith(order[-1] + "."))
        assert scale[first] < scale[last], name


def test_layer_decay_needs_support():
    with pytest.raises(ConfigError, match="layer_id"):
        param_groups(Tiny(), 0.05, layer_decay=0.5)

"""Every registered model honours the contract: shapes, gradients, in_chans, odd sizes, save/load."""

from __future__ import annotations

import pytest
import torch

from hybridvision.models import (
    UnknownModelError,
    create_encoder,
    create_segmenter,
    from_pretrained,
    list_models,
    save_pretrained,
)

ENCODERS = list_models("encoder")
SEGMENTERS = list_models("segmenter")
NANO_ENCODERS = [n for n in ENCODERS if n.endswith("_nano")]
NANO_SEGMENTERS = [n for n in SEGMENTERS if n.endswith("_nano")]
# presets that take a long time at 64 px on 2 CPU cores are still covered, in the slow group
FAMILIES = ("mit", "swin", "resnet", "transunet", "hybrid", "parallel", "sequential")


def test_every_family_has_a_nano_preset():
    for family in FAMILIES:
        assert f"{family}_nano" in ENCODERS, f"no {family}_nano encoder"


def test_unknown_name_lists_valid_ones():
    with pytest.raises(UnknownModelError) as exc:
        create_encoder("mit_b9")
    msg = str(exc.value)
    assert "mit_b9" in msg and "mit_b0" in msg and "swin_tiny" in msg


def _check_grads(model: torch.nn.Module, allow_unused: tuple[str, ...] = ()) -> None:
    missing = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and p.grad is None and not n.endswith(allow_unused)
    ]
    assert not missing, f"parameters without gradient: {missing[:10]}"
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad[:10]}"


@pytest.mark.parametrize("name", NANO_ENCODERS)
@pytest.mark.parametrize("in_chans", [1, 3, 4])
def test_nano_encoder_contract(name: str, in_chans: int):
    torch.manual_seed(0)
    enc = create_encoder(name, in_chans=in_chans)
    assert len(enc.out_channels) == len(enc.reductions)
    x = torch.randn(2, in_chans, 72, 100)  # not a multiple of 32
    feats = enc.forward_features(x)
    assert len(feats) == len(enc.out_channels)
    div = enc.size_divisor
    hp, wp = -(-72 // div) * div, -(-100 // div) * div
    for f, c, r in zip(feats, enc.out_channels, enc.reductions):
        assert f.shape == (2, c, hp // r, wp // r)
        assert torch.isfinite(f).all()
    sum(f.float().mean() for f in feats).backward()
    _check_grads(enc)


@pytest.mark.parametrize("name", NANO_ENCODERS + NANO_SEGMENTERS)
def test_nano_segmenter_shapes_grads_and_round_trip(name: str, tmp_path):
    torch.manual_seed(0)
    model = create_segmenter(name, num_classes=5, in_chans=3)
    x = torch.randn(2, 3, 50, 70)
    logits = model(x)
    assert logits.shape == (2, 5, 50, 70)
    assert torch.isfinite(logits).all()
    logits.logsumexp(1).mean().backward()
    _check_grads(model, allow_unused=("mask_token",))
    model.eval()
    save_pretrained(model, tmp_path / "m")
    loaded = from_pretrained(tmp_path / "m").eval()
    saved, restored = model.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys(), (
        f"missing {saved.keys() - restored.keys()}, extra {restored.keys() - saved.keys()}"
    )
    for key, value in saved.items():
        assert torch.equal(value, restored[key]), key
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ENCODERS if n not in NANO_ENCODERS])
def test_full_size_encoders_run(name: str):
    torch.manual_seed(0)
    enc = create_encoder(name)
    feats = enc.forward_features(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == list(enc.out_channels)
    assert all(torch.isfinite(f).all() for f in feats)
    sum(f.mean() for f in feats).backward()
    _check_grads(enc)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in SEGMENTERS if n not in NANO_SEGMENTERS])
def test_full_size_segmenters_run(name: str):
    torch.manual_seed(0)
    model = create_segmenter(name, num_classes=3)
    logits = model(torch.randn(1, 3, 64, 64))
    assert logits.shape == (1, 3, 64, 64) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", NANO_ENCODERS)
def test_masked_content_cannot_reach_any_feature(name: str):
    """MIM cannot cheat in any family: pixels under the mask change no feature map.

    Unlike the objective tests, the input is *not* zeroed first, so this fails for an encoder that
    does not (re-)mask after its convolutional stages, whose receptive fields would carry masked
    content into the features.
    """
    from hybridvision.models.base import mask_to

    torch.manual_seed(0)
    enc = create_encoder(name).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 64, 96, generator=gen)
    mask = torch.zeros(2, 1, 2, 3)  # 32 px patches
    mask[:, :, 0, 1] = mask[:, :, 1, 2] = mask[1, :, 0, 0] = 1.0
    under = mask_to(mask, x.shape[-2:]).bool().expand_as(x)
    token = torch.randn(enc.mask_token_dim, generator=gen)
    with torch.no_grad():
        a = enc.forward_features(x, mask, token)
        b = enc.forward_features(torch.where(under, 5 * torch.randn(x.shape, generator=gen), x), mask, token)
        c = enc.forward_features(torch.where(under, x, x + 1.0), mask, token)  # visible content changed
    for i, (fa, fb) in enumerate(zip(a, b, strict=True)):
        assert torch.equal(fa, fb), f"{name}: masked pixels reach feature {i}"
    assert not torch.equal(a[-1], c[-1]), f"{name}: visible pixels must reach the deepest feature"


def test_unet_image_skips_that_no_block_would_read_are_an_error():
    from hybridvision.models import create_segmenter

    with pytest.raises(ValueError, match="would never be used.*decoder_channels 5 entries"):
        create_segmenter("unet_resnet_nano", num_classes=2, decoder_kwargs={"image_skip_channels": (8,)})
    kw = {"image_skip_channels": (8,), "decoder_channels": (64, 32, 16, 16, 8)}
    assert create_segmenter("unet_resnet_nano", num_classes=2, decoder_kwargs=kw).decoder.uses_image

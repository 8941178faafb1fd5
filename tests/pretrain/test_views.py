"""Pretraining views: keys per objective, shapes for RGB / grayscale / multi-band, augmentation ops."""

from __future__ import annotations

import pytest
import torch
from ssl_toy_encoders import make_toy
from torch.utils.data import default_collate

from pretrain.objectives import PretrainModel
from pretrain.views import (
    IMAGENET_MEAN,
    RandomBrightnessContrast,
    RandomRot90,
    build_pretrain_transform,
    normalization,
)


@pytest.mark.parametrize(
    "objective, keys",
    [
        ("contrastive", {"view0", "view1"}),
        ("mim", {"image"}),
        ("contrastive_mim", {"view0", "view1", "image"}),
        ("dense_contrastive", {"image"}),
    ],
)
@pytest.mark.parametrize("in_chans", [1, 3, 4])
def test_keys_and_shapes(objective, keys, in_chans):
    torch.manual_seed(0)
    normalize = "per_image" if in_chans == 4 else "imagenet"
    transform = build_pretrain_transform(objective, in_chans, size=32, normalize=normalize)
    out = transform({"image": torch.rand(in_chans, 48, 40), "id": "x"})
    assert set(out) == keys
    for value in out.values():
        assert value.shape == (in_chans, 32, 32) and value.dtype == torch.float32
        assert torch.isfinite(value).all()


def test_views_are_random_and_mim_image_has_no_photometric_change():
    torch.manual_seed(0)
    transform = build_pretrain_transform("contrastive_mim", 3, size=32, normalize="none")
    constant = torch.full((3, 40, 40), 0.3)
    outs = [transform({"image": constant}) for _ in range(10)]
    for out in outs:  # crop + flip of a flat image is the same flat image
        torch.testing.assert_close(out["image"], torch.full((3, 32, 32), 0.3), atol=1e-6, rtol=0)
    jittered = sum(not torch.allclose(o["view0"], torch.full_like(o["view0"], 0.3), atol=0.01) for o in outs)
    assert jittered >= 5  # colour jitter has p=0.8
    picture = torch.rand(3, 64, 64)
    out = transform({"image": picture})
    assert not torch.allclose(out["view0"], out["view1"])


def test_rgb_normalisation_uses_imagenet_statistics():
    torch.manual_seed(0)
    transform = build_pretrain_transform("mim", 3, size=16)
    out = transform({"image": torch.zeros(3, 16, 16)})["image"]
    expected = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, (0.229, 0.224, 0.225))])
    torch.testing.assert_close(out[:, 0, 0], expected)


def test_normalization_options():
    assert normalization("none", 3) is None
    assert normalization(([0.1, 0.2], [1.0, 2.0]), 2) == ((0.1, 0.2), (1.0, 2.0))
    for bad in [("imagenet", 4), (([0.1], [1.0]), 2), ("zscore", 3)]:
        with pytest.raises(ValueError):
            normalization(*bad)


@pytest.mark.parametrize("normalize, in_chans", [("imagenet", 3), ("imagenet", 1), ("per_image", 4)])
def test_normalisation_matches_the_finetuning_transforms(normalize, in_chans):
    """Pretraining and fine-tuning must feed the encoder identically normalised images."""
    from torchvision import tv_tensors

    from hybridvision.data.transforms import build_seg_transforms

    x = torch.rand(in_chans, 16, 16)
    finetune = build_seg_transforms(False, None, in_chans=in_chans, normalize=normalize)
    expected = finetune({"image": tv_tensors.Image(x)})["image"].as_subclass(torch.Tensor)
    pretrain = build_pretrain_transform("mim", in_chans, 16, normalize=normalize, mim_min_scale=1.0)
    out = pretrain({"image": x})["image"]  # full-image crop: only a possible flip remains
    assert torch.allclose(out, expected, atol=1e-5) or torch.allclose(out, expected.flip(-1), atol=1e-5)


def test_invalid_presets_raise():
    with pytest.raises(ValueError, match="does not fit"):
        build_pretrain_transform("contrastive", 1, 32, preset="rgb")
    with pytest.raises(ValueError, match="unknown objective"):
        build_pretrain_transform("simclr", 3, 32)
    transform = build_pretrain_transform("mim", 3, 32)
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        transform({"image": torch.rand(1, 32, 32)})


def test_uint8_images_are_rescaled():
    torch.manual_seed(0)
    transform = build_pretrain_transform("mim", 1, 16, normalize="none")
    out = transform({"image": torch.full((1, 16, 16), 255, dtype=torch.uint8)})["image"]
    torch.testing.assert_close(out, torch.ones(1, 16, 16))


def test_brightness_contrast_shares_factors_across_bands():
    torch.manual_seed(0)
    x = torch.rand(5, 8, 8) * 0.2 + 0.1
    out = RandomBrightnessContrast(brightness=0.4, contrast=0.0)(x)
    ratio = out / x
    assert ratio.std().item() < 1e-5 and abs(ratio.mean().item() - 1) > 1e-3
    out = RandomBrightnessContrast(brightness=0.0, contrast=0.5)(x)
    centred_ratio = (out - out.mean()) / (x - x.mean())
    assert centred_ratio.std().item() < 1e-4


def test_rot90_draws_all_four_rotations():
    torch.manual_seed(0)
    x = torch.arange(4.0).view(1, 2, 2)
    seen = {tuple(RandomRot90()(x).flatten().tolist()) for _ in range(50)}
    assert len(seen) == 4


@pytest.mark.parametrize("in_chans", [1, 3])
def test_transform_collate_model_round_trip(in_chans):
    torch.manual_seed(0)
    transform = build_pretrain_transform("contrastive_mim", in_chans, size=32)
    batch = default_collate([transform({"image": torch.rand(in_chans, 40, 40)}) for _ in range(4)])
    model = PretrainModel(
        make_toy("toy_cnn", in_chans=in_chans),
        "contrastive_mim",
        in_chans=in_chans,
        mask_patch_size=16,
        decoder_dim=8,
    )
    out = model(batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)

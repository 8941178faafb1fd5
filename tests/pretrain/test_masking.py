"""BlockMaskGenerator: exact masked count per image, ratio, layout, determinism."""

from __future__ import annotations

import pytest
import torch

from pretrain.masking import BlockMaskGenerator


@pytest.mark.parametrize(
    "size, patch, ratio",
    [(64, 16, 0.75), (64, 16, 0.6), (96, 32, 0.6), ((64, 128), 32, 0.5), (192, 32, 0.6)],
)
def test_exact_count_and_ratio(size, patch, ratio):
    gen = BlockMaskGenerator(size, mask_patch_size=patch, mask_ratio=ratio)
    mask = gen(16, generator=torch.Generator().manual_seed(0))
    h, w = (size, size) if isinstance(size, int) else size
    assert mask.shape == (16, 1, h // patch, w // patch) and mask.dtype == torch.bool
    n = (h // patch) * (w // patch)
    per_image = mask.flatten(1).sum(dim=1)
    assert torch.all(per_image == round(ratio * n))
    achieved = per_image.float().mean().item() / n
    assert achieved == pytest.approx(gen.achieved_ratio)
    assert abs(achieved - ratio) <= 0.5 / n + 1e-9  # rounding to whole patches only


def test_ratio_is_exact_when_representable():
    gen = BlockMaskGenerator(64, mask_patch_size=16, mask_ratio=0.75)
    assert gen(4).float().mean().item() == 0.75


def test_model_patch_grid_repeats_blocks():
    gen = BlockMaskGenerator(64, mask_patch_size=32, mask_ratio=0.5, model_patch_size=8)
    mask = gen(3, generator=torch.Generator().manual_seed(1))
    assert mask.shape == (3, 1, 8, 8)
    coarse = mask[:, :, ::4, ::4]
    assert torch.equal(mask, coarse.repeat_interleave(4, 2).repeat_interleave(4, 3))
    assert torch.all(coarse.flatten(1).sum(1) == 2)


def test_deterministic_with_generator_and_random_otherwise():
    gen = BlockMaskGenerator(128, mask_patch_size=16, mask_ratio=0.6)
    a = gen(8, generator=torch.Generator().manual_seed(7))
    b = gen(8, generator=torch.Generator().manual_seed(7))
    c = gen(8, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # images of a batch get different masks


def test_every_position_is_masked_uniformly():
    gen = BlockMaskGenerator(64, mask_patch_size=16, mask_ratio=0.25)
    freq = gen(4000, generator=torch.Generator().manual_seed(0)).float().mean(dim=0)
    assert torch.allclose(freq, torch.full_like(freq, 0.25), atol=0.04)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"input_size": 60, "mask_patch_size": 32},
        {"input_size": 64, "mask_ratio": 0.0},
        {"input_size": 64, "mask_ratio": 1.0},
        {"input_size": 64, "mask_patch_size": 32, "model_patch_size": 5},
        {"input_size": 32, "mask_patch_size": 32},
    ],
)
def test_invalid_settings_raise(kwargs):
    with pytest.raises(ValueError):
        BlockMaskGenerator(**kwargs)

"""The student's strong augmentation (distill/augment.py): photometric only, the teacher's input
untouched, geometry kept, cutout reported, deterministic per key."""

from __future__ import annotations

import pytest
import torch

from distill.augment import StrongAugment, augment_generator, build_student_augment
from distill.config import KDConfig
from hybridvision.config import ConfigError

ALWAYS = {"jitter_prob": 1.0, "blur_prob": 1.0, "noise_prob": 1.0, "cutout_prob": 1.0}


def _regions(batch: int = 3, channels: int = 3, size: int = 24) -> torch.Tensor:
    """(B, C, size, size) images of four constant quadrants, other values per sample and channel."""
    torch.manual_seed(0)
    values = torch.randn(batch, channels, 2, 2) * 2  # (B, C, 2, 2): one value per quadrant
    return values.repeat_interleave(size // 2, dim=2).repeat_interleave(size // 2, dim=3)


def test_teacher_input_unchanged_student_input_differs():
    images = _regions()
    before = images.clone()
    view = StrongAugment(**ALWAYS)(images, augment_generator("cpu", 0, 0, 1, 0))
    assert torch.equal(images, before)  # the teacher's batch is not modified in place
    assert view.images.shape == images.shape and view.images.dtype == images.dtype
    assert view.kept.shape == (3, 24, 24) and view.kept.dtype == torch.bool
    for b in range(3):  # every sample is changed, on its kept pixels too
        kept = view.kept[b]
        assert (view.images[b][:, kept] - images[b][:, kept]).abs().mean() > 1e-2
    assert torch.isfinite(view.images).all()


@pytest.mark.parametrize("blur", [False, True])
def test_geometry_is_kept_constant_regions_keep_their_boundaries(blur):
    """Jitter is a per-sample pointwise map: every quadrant stays exactly constant and distinct. With
    blur, pixels farther than the kernel radius from a boundary stay constant, and the largest step
    of every row and column is still at the boundary."""
    images, half = _regions(), 12
    aug = StrongAugment(jitter_prob=1.0, blur_prob=float(blur), noise_prob=0.0, cutout_prob=0.0)
    out = aug(images, augment_generator("cpu", 3, 1, 2, 0)).images
    margin = 5 if blur else 0  # blur radius: ceil(3 * 1.5)
    for b in range(3):
        means = []
        for top in (0, half):
            for left in (0, half):
                rows = slice(top + margin * (top > 0), top + half - margin * (top == 0))
                cols = slice(left + margin * (left > 0), left + half - margin * (left == 0))
                block = out[b, :, rows, cols]  # (C, h, w) interior of one quadrant
                assert (block - block[:, :1, :1]).abs().max() < 1e-4
                means.append(block[:, 0, 0])
        assert min((means[i] - means[j]).abs().max() for i in range(4) for j in range(i)) > 1e-3
        step_x = (out[b, :, :, 1:] - out[b, :, :, :-1]).abs().sum(0)  # (H, W - 1)
        step_y = (out[b, :, 1:, :] - out[b, :, :-1, :]).abs().sum(0)  # (H - 1, W)
        edge_x = (images[b, :, :, half] - images[b, :, :, half - 1]).abs().sum(0) > 1e-3  # rows with a step
        edge_y = (images[b, :, half, :] - images[b, :, half - 1, :]).abs().sum(0) > 1e-3
        assert (step_x.argmax(dim=1)[edge_x] == half - 1).all()
        assert (step_y.argmax(dim=0)[edge_y] == half - 1).all()
    assert not torch.allclose(out, images)


def test_cutout_erases_one_rectangle_and_reports_it():
    images = torch.randn(8, 3, 20, 30, generator=torch.Generator().manual_seed(1))
    key = (5, 0, 7, 0)
    plain = StrongAugment(cutout_prob=0.0)(images, augment_generator("cpu", *key))
    cut = StrongAugment(cutout_prob=1.0)(images, augment_generator("cpu", *key))
    assert plain.kept.all()
    for b in range(8):
        erased = ~cut.kept[b]
        rows, cols = erased.any(1).nonzero()[:, 0], erased.any(0).nonzero()[:, 0]
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert int(erased.sum()) == int(box) > 0  # one filled rectangle
        assert 0.01 <= erased.float().mean() <= 0.25  # cutout_area (0.02, 0.2), rounded
        # the same random draw: unerased pixels are exactly the cutout-free view
        assert torch.equal(cut.images[b][:, ~erased], plain.images[b][:, ~erased])
        fill = cut.images[b][:, erased]  # (C, n): one constant per channel
        assert (fill - fill[:, :1]).abs().max() < 1e-6


def test_probability_zero_is_the_identity():
    images = torch.randn(2, 3, 16, 16)
    off = StrongAugment(jitter_prob=0.0, blur_prob=0.0, noise_prob=0.0, cutout_prob=0.0)
    view = off(images, augment_generator("cpu", 0))
    assert torch.allclose(view.images, images, atol=1e-6) and view.kept.all()


def test_one_channel_images_and_dtype():
    images = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    view = StrongAugment(**ALWAYS)(images, augment_generator("cpu", 0))
    assert view.images.dtype == torch.float64 and view.images.shape == images.shape
    assert torch.isfinite(view.images).all()


def test_deterministic_per_key_and_leaves_the_global_rng_alone():
    images = _regions()
    aug = StrongAugment(**ALWAYS)
    state = torch.get_rng_state()
    a = aug(images, augment_generator("cpu", 42, 1, 3, 0))
    b = aug(images, augment_generator("cpu", 42, 1, 3, 0))
    assert torch.equal(torch.get_rng_state(), state)  # the engine's RNG stream is not consumed
    assert torch.equal(a.images, b.images) and torch.equal(a.kept, b.kept)
    for other in ((42, 1, 4, 0), (42, 2, 3, 0), (42, 1, 3, 1), (43, 1, 3, 0)):  # batch, epoch, rank, seed
        c = aug(images, augment_generator("cpu", *other))
        assert not torch.allclose(a.images, c.images)
    # each sample of a batch gets its own draw (not only its own noise): two copies of one image
    # come out with other colours and other rectangles
    no_noise = StrongAugment(**{**ALWAYS, "noise_prob": 0.0})
    twins = no_noise(images[:1].repeat(2, 1, 1, 1), augment_generator("cpu", 0))
    both = twins.kept[0] & twins.kept[1]
    assert not torch.allclose(twins.images[0][:, both], twins.images[1][:, both])
    assert not torch.equal(twins.kept[0], twins.kept[1])


def test_generator_must_be_on_the_images_device():
    if not torch.cuda.is_available():
        pytest.skip("needs a second device type")
    with pytest.raises(ValueError, match="generator on"):
        StrongAugment()(torch.zeros(1, 3, 8, 8), augment_generator("cuda", 0))


def test_config_spellings():
    assert build_student_augment("none") is None
    assert isinstance(build_student_augment("strong"), StrongAugment)
    with pytest.raises(ValueError, match="valid values"):
        build_student_augment("randaugment")
    assert KDConfig().student_augment == "none" and KDConfig().confidence_threshold == 0.0
    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError, match="confidence_threshold"):
            KDConfig(confidence_threshold=bad)

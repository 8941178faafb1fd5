"""SyntheticShapesDataset: determinism, exact masks, and that colour alone does not solve it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hybridvision.data import SHAPE_CLASSES, SyntheticShapesDataset, build_dataloader


def test_same_seed_identical_bytes_in_any_order():
    a = SyntheticShapesDataset(num_samples=6, image_size=32, seed=3)
    b = SyntheticShapesDataset(num_samples=6, image_size=32, seed=3)
    forward = [a[i] for i in range(6)]
    backward = {i: b[i] for i in reversed(range(6))}
    for i in range(6):
        assert forward[i]["image"].numpy().tobytes() == backward[i]["image"].numpy().tobytes()
        assert forward[i]["mask"].numpy().tobytes() == backward[i]["mask"].numpy().tobytes()
        assert forward[i]["id"] == f"3-{i}"
    assert not torch.equal(forward[0]["image"], forward[1]["image"])


def test_different_seed_different_images():
    a = SyntheticShapesDataset(num_samples=4, image_size=32, seed=0)
    b = SyntheticShapesDataset(num_samples=4, image_size=32, seed=1)
    for i in range(4):
        assert not torch.equal(a[i]["image"], b[i]["image"])
        assert not torch.equal(a[i]["mask"], b[i]["mask"])


def test_workers_give_the_same_bytes():
    ds = SyntheticShapesDataset(num_samples=8, image_size=16, seed=5)
    loader = build_dataloader(ds, batch_size=2, shuffle=False, num_workers=2)
    images = torch.cat([batch["image"] for batch in loader])
    direct = torch.stack([ds[i]["image"] for i in range(8)])
    assert images.numpy().tobytes() == direct.numpy().tobytes()


def test_sample_format_and_label_range():
    ds = SyntheticShapesDataset(num_samples=40, image_size=(24, 40), num_classes=5, in_chans=3)
    masks = torch.stack([ds[i]["mask"] for i in range(40)])
    sample = ds[0]
    assert sample["image"].shape == (3, 24, 40) and sample["image"].dtype == torch.float32
    assert 0.0 <= float(sample["image"].min()) and float(sample["image"].max()) <= 1.0
    assert masks.dtype == torch.int64 and masks.shape == (40, 24, 40)
    assert sorted(masks.unique().tolist()) == [0, 1, 2, 3, 4]  # every class shows up


@pytest.mark.parametrize("in_chans", [1, 4])
def test_other_channel_counts_and_unlabelled(in_chans):
    ds = SyntheticShapesDataset(num_samples=2, image_size=16, in_chans=in_chans, labelled=False)
    sample = ds[1]
    assert set(sample) == {"image", "id"} and sample["image"].shape == (in_chans, 16, 16)


def test_masks_match_drawn_pixels_exactly():
    """Without noise every shape pixel is a blend of *its owner's* two colours and carries its label.

    The instance map is checked against the image colours, so a mask that let an earlier shape
    keep an overlapped pixel (or missed a pixel) would fail: the colours would belong to another
    shape's colour segment.
    """
    ds = SyntheticShapesDataset(num_samples=30, image_size=48, num_classes=7, noise_std=0.0, seed=9)
    overlaps = 0
    for index in range(30):
        drawn = ds.render(index)
        sample = ds[index]
        np.testing.assert_array_equal(sample["mask"].numpy(), drawn.mask)
        np.testing.assert_array_equal(sample["image"].numpy(), drawn.image.transpose(2, 0, 1))
        assert (drawn.mask[drawn.instances == -1] == 0).all()  # background or speckled bars
        for i, ((low, high), label) in enumerate(zip(drawn.colors, drawn.labels)):
            owned = drawn.instances == i
            assert (drawn.mask[owned] == label).all()
            pixels = drawn.image[owned]  # (n, C)
            direction = high - low
            t = (pixels - low) @ direction / (direction @ direction)  # (n,) blend position
            residual = pixels - (low + t[:, None] * direction)
            assert np.abs(residual).max() < 1e-5
            assert t.min() > -1e-5 and t.max() < 1 + 1e-5
        # Shapes overlap and distractors (label 0) are drawn: the test exercises occlusion.
        overlaps += int(len(drawn.labels) > 1)
    assert overlaps > 10


def test_rendering_with_wrong_owner_would_fail():
    """The colour check above is sensitive: attributing pixels to another shape breaks it."""
    drawn = SyntheticShapesDataset(num_samples=1, image_size=48, noise_std=0.0, max_shapes=5, seed=2).render(
        0
    )
    assert len(drawn.colors) >= 2
    owned = drawn.instances == 0
    low, high = drawn.colors[1]
    direction = high - low
    pixels = drawn.image[owned]
    t = (pixels - low) @ direction / (direction @ direction)
    assert np.abs(pixels - (low + t[:, None] * direction)).max() > 1e-3


def test_colour_baseline_is_poor():
    """Nearest-class-mean colour per pixel, fitted on one seed and tested on another: mIoU < 0.5."""
    num_classes = 4
    fit = SyntheticShapesDataset(num_samples=64, num_classes=num_classes, seed=11)
    test = SyntheticShapesDataset(num_samples=64, num_classes=num_classes, seed=12)
    images = torch.stack([fit[i]["image"] for i in range(64)]).permute(0, 2, 3, 1)  # (N, H, W, C)
    masks = torch.stack([fit[i]["mask"] for i in range(64)])
    means = torch.stack([images[masks == k].mean(0) for k in range(num_classes)])  # (K, C)
    test_images = torch.stack([test[i]["image"] for i in range(64)]).permute(0, 2, 3, 1)
    test_masks = torch.stack([test[i]["mask"] for i in range(64)])
    pred = torch.cdist(test_images.reshape(-1, 3), means).argmin(1)
    conf = torch.bincount(test_masks.flatten() * num_classes + pred, minlength=num_classes**2)
    conf = conf.reshape(num_classes, num_classes).double()
    iou = conf.diag() / (conf.sum(0) + conf.sum(1) - conf.diag())
    assert float(iou.mean()) < 0.5
    # Sanity of the metric itself: predicting with the true mask scores 1.
    perfect = torch.bincount(test_masks.flatten() * (num_classes + 1), minlength=num_classes**2)
    assert perfect.reshape(num_classes, num_classes).diag().sum() == test_masks.numel()


def test_invalid_arguments():
    with pytest.raises(ValueError, match=r"num_classes must be in \[2, 7\]"):
        SyntheticShapesDataset(num_classes=len(SHAPE_CLASSES) + 2)
    with pytest.raises(IndexError):
        SyntheticShapesDataset(num_samples=3)[3]

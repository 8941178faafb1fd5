"""build_seg_transforms: image/mask alignment, padding, interpolation, normalisation, windowing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate
from torchvision.transforms import v2

from hybridvision.data import SyntheticShapesDataset, apply_transform, build_seg_transforms
from hybridvision.data.transforms import IMAGENET_MEAN, IMAGENET_STD

NUM_CLASSES = 5


def encoded_sample(height: int = 24, width: int = 32, block: int = 8, seed: int = 0) -> dict:
    """A blocky mask and an image whose 3 channels all equal mask / NUM_CLASSES."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, NUM_CLASSES, (height // block, width // block), generator=g)
    mask = coarse.repeat_interleave(block, 0).repeat_interleave(block, 1)  # (H, W)
    image = (mask.float() / NUM_CLASSES).expand(3, -1, -1).clone()  # (3, H, W)
    return {"image": image, "mask": mask, "id": "x"}


def decode(image: torch.Tensor) -> torch.Tensor:
    return torch.round(image[0] * NUM_CLASSES).long()


@pytest.mark.parametrize("seed", range(6))
def test_geometric_ops_keep_alignment_exactly(seed):
    """Flips, 90-degree rotations and crops (scale 1: no resampling) move image and mask identically."""
    torch.manual_seed(seed)
    transform = build_seg_transforms(
        True, (16, 16), scale=(1.0, 1.0), hflip=True, vflip=True, rot90=True, normalize="none"
    )
    out = apply_transform(encoded_sample(seed=seed), transform)
    assert out["image"].shape == (3, 16, 16) and out["mask"].shape == (16, 16)
    assert torch.equal(decode(out["image"]), out["mask"])


def test_alignment_check_detects_a_mask_only_flip():
    """Control for the test above: flipping the mask alone breaks the decoded agreement."""
    sample = encoded_sample()
    flipped = torch.flip(sample["mask"], dims=(-1,))
    assert (decode(sample["image"]) == flipped).float().mean() < 0.9


def near_boundary(mask: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """(H, W) bool: pixels within ``radius`` of a label change or of the image border."""
    padded = F.pad(mask.float()[None, None], (radius,) * 4, value=-1.0)  # (1, 1, H+2r, W+2r)
    high = F.max_pool2d(padded, 2 * radius + 1, stride=1)
    low = -F.max_pool2d(-padded, 2 * radius + 1, stride=1)
    return (high != low)[0, 0]


@pytest.mark.parametrize(
    ("seed", "elastic", "crop"), [(0, 0.0, 20), (1, 0.0, 20), (2, 8.0, 32), (3, 20.0, 40)]
)
def test_resampling_ops_keep_alignment(seed, elastic, crop):
    """Random scale + crop + rot90 + flips + elastic: image and mask agree everywhere except
    where bilinear image interpolation mixes neighbouring labels (within 2 px of a label edge)."""
    torch.manual_seed(seed)
    transform = build_seg_transforms(
        True, (crop, crop), scale=(0.6, 1.8), rot90=True, vflip=True, elastic=elastic, normalize="none"
    )
    sample = encoded_sample(height=48, width=48, block=12, seed=seed)
    out = apply_transform(sample, transform)
    valid = out["mask"] != 255
    assert valid.sum() > crop * crop // 2
    disagree = (decode(out["image"]) != out["mask"]) & valid
    assert int((disagree & ~near_boundary(out["mask"])).sum()) == 0
    assert float(disagree.sum() / valid.sum()) < 0.15
    # Nearest-neighbour for masks: no value that was not in the input appears.
    assert set(out["mask"].unique().tolist()) <= set(sample["mask"].unique().tolist()) | {255}
    assert out["mask"].dtype == torch.int64


def test_resize_keeps_masks_on_the_bilinear_grid():
    """Masks are resized with centre-aligned nearest: a thresholded bilinear image agrees with them
    far better than with torch's legacy ``nearest`` (floor) grid, shifted by up to half a pixel."""
    mask = torch.zeros(16, 16, dtype=torch.long)
    mask[4:10, 5:13] = 1
    sample = {"image": mask.float().expand(3, -1, -1).clone(), "mask": mask, "id": "r"}
    aligned = legacy = 0
    for size in [(37, 29), (23, 11), (50, 45)]:
        out = apply_transform(sample, build_seg_transforms(False, size, normalize="none"))
        edge = (out["image"][0] >= 0.5).long()  # where the bilinear image crosses the edge
        old = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()
        aligned += int((edge != out["mask"]).sum())
        legacy += int((edge != old).sum())
    assert aligned * 5 < legacy


def test_padding_uses_ignore_index_and_zero():
    transform = build_seg_transforms(True, (16, 16), scale=(1.0, 1.0), hflip=False, normalize="none")
    sample = {"image": torch.ones(3, 8, 8), "mask": torch.ones(8, 8, dtype=torch.int64), "id": "p"}
    out = apply_transform(sample, transform)
    assert int((out["mask"] == 77).sum()) == 0  # default ignore_index is 255
    padded = out["mask"] == 255
    assert int(padded.sum()) == 16 * 16 - 64 and int((out["mask"] == 1).sum()) == 64
    assert torch.equal(out["image"][:, padded], torch.zeros(3, int(padded.sum())))
    custom = build_seg_transforms(True, (10, 10), scale=(1.0, 1.0), normalize="none", ignore_index=77)
    assert int((apply_transform(sample, custom)["mask"] == 77).sum()) == 100 - 64


def test_eval_resize_and_identity():
    sample = encoded_sample()
    out = apply_transform(sample, build_seg_transforms(False, (12, 16), normalize="none"))
    assert out["image"].shape == (3, 12, 16) and out["mask"].shape == (12, 16)
    disagree = decode(out["image"]) != out["mask"]  # antialiasing blends only at block edges
    assert int((disagree & ~near_boundary(out["mask"], radius=1)).sum()) == 0
    same = apply_transform(sample, build_seg_transforms(False, None, normalize="none"))
    assert torch.equal(same["image"], sample["image"]) and torch.equal(same["mask"], sample["mask"])
    assert type(same["image"]) is torch.Tensor and type(same["mask"]) is torch.Tensor


def test_normalisations():
    image = torch.full((3, 4, 4), 0.5)
    sample = {"image": image, "id": "n"}
    out = apply_transform(sample, build_seg_transforms(False, normalize="imagenet"))["image"]
    expected = (0.5 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out[:, 0, 0], expected)
    gray = apply_transform({"image": torch.full((1, 2, 2), 0.5)}, build_seg_transforms(False, in_chans=1))
    torch.testing.assert_close(gray["image"][0, 0, 0], torch.tensor((0.5 - 0.449) / 0.226))
    ramp = torch.arange(48.0).reshape(3, 4, 4)
    per_image = apply_transform({"image": ramp}, build_seg_transforms(False, normalize="per_image"))["image"]
    torch.testing.assert_close(per_image.mean(dim=(1, 2)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(per_image.std(dim=(1, 2), unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    explicit = build_seg_transforms(False, in_chans=2, normalize=((0.5, 0.0), (0.25, 2.0)))
    out2 = apply_transform({"image": torch.full((2, 1, 1), 1.0)}, explicit)["image"]
    assert out2.flatten().tolist() == [2.0, 0.5]


def test_normalisation_errors():
    with pytest.raises(ValueError, match="lengths 3 and 3, expected in_chans=4"):
        build_seg_transforms(False, in_chans=4, normalize=(IMAGENET_MEAN, IMAGENET_STD))
    with pytest.raises(ValueError, match="needs in_chans 1 or 3, got 4"):
        build_seg_transforms(False, in_chans=4, normalize="imagenet")
    with pytest.raises(ValueError, match="got 'zscore'"):
        build_seg_transforms(False, normalize="zscore")


def test_window_maps_raw_values_before_normalisation():
    hu = torch.tensor([[[-1000.0, -160.0, 40.0, 240.0, 3000.0]]])  # (1, 1, 5)
    out = apply_transform(
        {"image": hu}, build_seg_transforms(False, in_chans=1, window=(40, 400), normalize="none")
    )
    assert out["image"].flatten().tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    normed = build_seg_transforms(False, in_chans=1, window=(40, 400), normalize=((0.5,), (0.5,)))
    assert apply_transform({"image": hu}, normed)["image"].flatten().tolist() == [-1.0, -1.0, 0.0, 1.0, 1.0]


def test_color_jitter_per_channel_count():
    def has_jitter(transform: v2.Compose) -> bool:
        return any(isinstance(t, v2.ColorJitter) for t in transform.transforms)

    assert has_jitter(build_seg_transforms(True, (8, 8), color_jitter=0.4))
    assert has_jitter(build_seg_transforms(True, (8, 8), in_chans=1, color_jitter=0.4, normalize="none"))
    four = build_seg_transforms(True, (8, 8), in_chans=4, color_jitter=0.4, normalize="none")
    assert not has_jitter(four)
    out = apply_transform({"image": torch.rand(4, 8, 8), "mask": torch.zeros(8, 8, dtype=torch.long)}, four)
    assert out["image"].shape == (4, 8, 8)
    torch.manual_seed(0)
    gray = build_seg_transforms(True, (8, 8), in_chans=1, color_jitter=0.4, hflip=False, normalize="none")
    image = torch.rand(1, 8, 8)
    assert not torch.equal(apply_transform({"image": image}, gray)["image"], image)


def test_dataset_with_transforms_collates_plain_tensors():
    ds = SyntheticShapesDataset(num_samples=4, image_size=24, transform=build_seg_transforms(True, (16, 16)))
    batch = default_collate([ds[i] for i in range(4)])
    assert type(batch["image"]) is torch.Tensor and batch["image"].shape == (4, 3, 16, 16)
    assert type(batch["mask"]) is torch.Tensor and batch["mask"].dtype == torch.int64

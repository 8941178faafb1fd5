"""Pretraining views: SimCLR's two augmented views and SimMIM's lightly augmented image.

A pretraining transform maps a sample ``{"image": (C, H, W) float in [0, 1], ...}`` to

* ``"view0"``, ``"view1"`` — two independent SimCLR augmentations (contrastive objectives),
* ``"image"`` — a random resized crop (scale 0.67–1) with a horizontal flip and no photometric
  change, SimMIM's input and reconstruction target (MIM objectives),

each (C, size, size) and normalised; only the keys the objective reads are produced.

Presets:

* ``"rgb"`` — lightly's ``SimCLRViewTransform`` (Chen et al., 2020): random resized crop,
  horizontal flip, colour jitter (p=0.8, strength 0.8/0.8/0.8/0.2), grayscale (p=0.2),
  Gaussian blur (p=0.5, sigma 0.1–2). Its blur goes through an 8-bit PIL image, so RGB views
  are quantised to 1/255 (as for JPEG-decoded inputs).
* ``"grayscale"`` (EM, CT) and ``"multiband"`` (RGB+NIR, multispectral) — torchvision v2 on
  tensors, for any channel count: random resized crop, horizontal and vertical flips, random
  90° rotations (these images have no canonical orientation), brightness/contrast jitter shared
  by all bands (no hue, saturation or grayscale, which are RGB notions), Gaussian blur. No
  elastic deformation.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightly.transforms.simclr_transform import SimCLRViewTransform
from torch import Tensor, nn
from torchvision.transforms import v2

from hybridvision.data.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PretrainTransform",
    "RandomBrightnessContrast",
    "RandomRot90",
    "build_pretrain_transform",
    "normalization",
]

#: ImageNet statistics averaged over RGB, for grayscale images (as ``hybridvision.data.transforms``)
GREY_MEAN, GREY_STD = sum(IMAGENET_MEAN) / 3, sum(IMAGENET_STD) / 3

OBJECTIVES = ("contrastive", "mim", "contrastive_mim", "dense_contrastive")
PRESETS = ("auto", "rgb", "grayscale", "multiband")

Normalize = str | tuple[Sequence[float], Sequence[float]] | None


class RandomBrightnessContrast(nn.Module):
    """Brightness then contrast jitter for any number of bands, with one factor for all bands.

    ``x <- b * x`` then ``x <- c * (x - mean(x)) + mean(x)``, clamped to [0, 1], with
    ``b ~ U(1 - brightness, 1 + brightness)`` and ``c ~ U(1 - contrast, 1 + contrast)``
    (torchvision's definitions, which accept only 1 or 3 channels).

    Args:
        brightness: brightness jitter strength.
        contrast: contrast jitter strength.
    """

    def __init__(self, brightness: float = 0.4, contrast: float = 0.4):
        super().__init__()
        self.brightness = brightness
        self.contrast = contrast

    def forward(self, x: Tensor) -> Tensor:
        """Jitter ``x`` (C, H, W), float in [0, 1]; returns (C, H, W)."""
        b = 1.0 + (2 * torch.rand(()).item() - 1) * self.brightness
        c = 1.0 + (2 * torch.rand(()).item() - 1) * self.contrast
        x = x * b
        mean = x.mean()
        return ((x - mean) * c + mean).clamp(0.0, 1.0)


class RandomRot90(nn.Module):
    """Rotate by a uniformly drawn multiple of 90 degrees."""

    def forward(self, x: Tensor) -> Tensor:
        """Rotate ``x`` (C, H, W); returns (C, H, W), or (C, W, H) for an odd multiple of 90 degrees."""
        k = int(torch.randint(0, 4, ()).item())
        return torch.rot90(x, k, dims=(-2, -1))


class _PerImageStandardize(nn.Module):
    """Per-image, per-channel ``(x - mean) / (std + 1e-6)``, population std (as the data layer)."""

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(dim=(-2, -1), keepdim=True)
        std = x.std(dim=(-2, -1), keepdim=True, unbiased=False)
        return (x - mean) / (std + 1e-6)


def normalization(
    normalize: Normalize, in_chans: int
) -> tuple[tuple[float, ...], tuple[float, ...]] | str | None:
    """Resolve ``normalize`` to ``(mean, std)``, ``"per_image"`` or None.

    Same statistics as the fine-tuning transforms (``hybridvision.data.transforms``), so a
    pretrained encoder sees the same input distribution when it is fine-tuned.

    Args:
        normalize: ``"imagenet"`` (RGB: ImageNet statistics; 1 band: their channel average),
            ``"per_image"`` (each view's own channel mean/std), ``"none"`` / None, or an
            explicit ``(mean, std)``.
        in_chans: number of bands.
    """
    if normalize is None or normalize == "none":
        return None
    if normalize == "per_image":
        return "per_image"
    if normalize == "imagenet":
        if in_chans == 3:
            return IMAGENET_MEAN, IMAGENET_STD
        if in_chans == 1:
            return (GREY_MEAN,), (GREY_STD,)
        raise ValueError(
            f"normalize='imagenet' needs in_chans 1 or 3, got {in_chans}; pass (mean, std) or 'per_image'"
        )
    if isinstance(normalize, str):
        raise ValueError(f"normalize must be imagenet, per_image, none or (mean, std); got {normalize!r}")
    mean, std = (tuple(float(v) for v in s) for s in normalize)
    if len(mean) != in_chans or len(std) != in_chans:
        raise ValueError(f"normalize mean/std need {in_chans} values each, got {len(mean)} and {len(std)}")
    return mean, std


def _normalize_op(norm: Any) -> nn.Module:
    if norm is None:
        return nn.Identity()
    if norm == "per_image":
        return _PerImageStandardize()
    return v2.Normalize(mean=list(norm[0]), std=list(norm[1]))


class _LightlyRGBView:
    """lightly's SimCLR view on a float tensor, without its ``to_tensor`` deprecation warning."""

    def __init__(self, size: int, min_scale: float, norm: Any):
        self.view = SimCLRViewTransform(input_size=size, min_scale=min_scale, normalize=None)
        self.normalize = _normalize_op(norm)

    def __call__(self, image: Tensor) -> Tensor:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*to_tensor.*")
            view = self.view(image)
        return self.normalize(view)


def _tensor_view(
    size: int, min_scale: float, brightness: float, contrast: float, sigmas: tuple[float, float], norm: Any
) -> Callable[[Tensor], Tensor]:
    kernel = 2 * math.ceil(3 * sigmas[1]) + 1
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(min_scale, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            RandomRot90(),
            v2.RandomApply([RandomBrightnessContrast(brightness, contrast)], p=0.8),
            v2.RandomApply([v2.GaussianBlur(kernel, sigma=sigmas)], p=0.5),
            _normalize_op(norm),
        ]
    )


class PretrainTransform:
    """Sample dict -> pretraining views (see the module docstring).

    Args:
        in_chans: expected channels of ``sample["image"]``.
        view: callable producing one augmented view (C, H, W) -> (C, size, size), or None.
        mim: callable producing the MIM image, or None.
    """

    def __init__(
        self,
        in_chans: int,
        view: Callable[[Tensor], Tensor] | None,
        mim: Callable[[Tensor], Tensor] | None,
    ):
        self.in_chans = in_chans
        self.view = view
        self.mim = mim

    def __call__(self, sample: dict[str, Any]) -> dict[str, Tensor]:
        """Make the views of one sample.

        Args:
            sample: dict with ``"image"`` (C, H, W), float in [0, 1] (uint8 is rescaled).

        Returns:
            ``{"view0", "view1"}`` and/or ``{"image"}``, each (C, size, size) float32.
        """
        image = sample["image"]
        if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] != self.in_chans:
            shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise ValueError(f"sample['image'] must be a ({self.in_chans}, H, W) tensor, got {shape}")
        image = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
        out: dict[str, Tensor] = {}
        if self.view is not None:
            out["view0"] = self.view(image)
            out["view1"] = self.view(image)
        if self.mim is not None:
            out["image"] = self.mim(image)
        return out


def build_pretrain_transform(
    objective: str,
    in_chans: int,
    size: int,
    preset: str = "auto",
    normalize: Normalize = "imagenet",
    min_scale: float = 0.08,
    mim_min_scale: float = 0.67,
    brightness: float = 0.4,
    contrast: float = 0.4,
    sigmas: tuple[float, float] = (0.1, 2.0),
) -> PretrainTransform:
    """Build the per-sample transform of a pretraining objective.

    Args:
        objective: ``"contrastive"`` (views only), ``"mim"`` or ``"dense_contrastive"`` (image only;
            the dense views are made per batch) or ``"contrastive_mim"``.
        in_chans: image channels.
        size: output side in pixels (square crops).
        preset: ``"auto"`` (``rgb`` for 3 channels, ``grayscale`` for 1, ``multiband`` otherwise),
            ``"rgb"``, ``"grayscale"`` or ``"multiband"``.
        normalize: ``"imagenet"``, ``"per_image"``, ``"none"``/None or an explicit ``(mean, std)``;
            the same choice as ``data.normalize`` for fine-tuning.
        min_scale: smallest area fraction of the contrastive random resized crop (SimCLR: 0.08).
        mim_min_scale: smallest area fraction of the MIM crop (SimMIM: 0.67).
        brightness: brightness jitter of the grayscale/multiband views.
        contrast: contrast jitter of the grayscale/multiband views.
        sigmas: Gaussian blur sigma range of the grayscale/multiband views.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid: {', '.join(PRESETS)}")
    if preset == "auto":
        preset = {3: "rgb", 1: "grayscale"}.get(in_chans, "multiband")
    if (preset == "rgb" and in_chans != 3) or (preset == "grayscale" and in_chans != 1):
        raise ValueError(f"preset {preset!r} does not fit in_chans={in_chans}")
    norm = normalization(normalize, in_chans)
    view = None
    if objective in ("contrastive", "contrastive_mim"):
        if preset == "rgb":
            view = _LightlyRGBView(size, min_scale, norm)
        else:
            view = _tensor_view(size, min_scale, brightness, contrast, sigmas, norm)
    mim = None
    if objective in ("mim", "contrastive_mim", "dense_contrastive"):  # dense: views are made per batch
        mim = v2.Compose(
            [
                v2.RandomResizedCrop(size, scale=(mim_min_scale, 1.0), antialias=True),
                v2.RandomHorizontalFlip(),
                _normalize_op(norm),
            ]
        )
    return PretrainTransform(in_chans, view, mim)

"""Strong augmentation of the student's input for self-training (``kd.student_augment=strong``).

Noisy Student (Xie et al., "Self-training with Noisy Student improves ImageNet classification",
CVPR 2020) and FixMatch (Sohn et al., "FixMatch: Simplifying Semi-Supervised Learning with
Consistency and Confidence", NeurIPS 2020) let the teacher label a weakly augmented view while the
student learns from a strongly augmented view of the same image. For segmentation the teacher's
per-pixel labels must still apply to the student's pixels, so the strong view here is *photometric
only*: the teacher sees the training batch as the data pipeline made it (the weak view) and the
student sees the same crop, same geometry, with colour jitter, Gaussian blur, Gaussian noise and
cutout. Cutout erases a rectangle; its pixels are returned as not ``kept`` and leave every loss term,
so the teacher's labels are used only where the student can see the image.

It runs on the batch, on the batch's device, in the step function (after the data loader), and its
randomness comes from a ``torch.Generator`` seeded by the run's counters (:func:`augment_generator`),
so a resumed run draws exactly what the uninterrupted run drew.

Magnitudes are relative to each image's own statistics (its mean and standard deviation over all
channels and pixels), because the batch is already normalised (``data.normalize``: ImageNet
statistics, per image, or none): a brightness shift of 0.5 means half the image's standard deviation
whatever the normalisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from hybridvision.engine.seeding import sample_seed

__all__ = ["StrongAugment", "StrongView", "augment_generator", "build_student_augment"]

#: stream tag mixed into the seed, so the student's noise never reuses another stream's numbers
_STREAM = 0x5EED_57A6


class StrongView(NamedTuple):
    """The student's strongly augmented batch.

    Attributes:
        images: (B, C, H, W) augmented images, same dtype and device as the input.
        kept: (B, H, W) bool, False where cutout erased the pixel (the losses skip those pixels).
    """

    images: Tensor
    kept: Tensor


@dataclass(frozen=True)
class StrongAugment:
    """Photometric strong augmentation of a batch, each sample with its own random draw.

    In order: colour jitter (brightness, contrast, saturation; with probability ``jitter_prob``),
    Gaussian blur (``blur_prob``), additive Gaussian noise (``noise_prob``) and cutout
    (``cutout_prob``). No operation moves a pixel: blur and noise are local, and cutout fills its
    rectangle with the image's per-channel mean and reports it in :attr:`StrongView.kept`.
    """

    jitter_prob: float = 0.8  # probability of colour jitter
    brightness: float = 0.5  # shift by U(-b, b) image standard deviations
    contrast: float = 0.4  # scale about the image mean by U(1 - c, 1 + c)
    saturation: float = 0.4  # blend with the channel mean by U(1 - s, 1 + s) (no-op for 1 channel)
    blur_prob: float = 0.5  # probability of Gaussian blur
    blur_sigma: tuple[float, float] = (0.1, 1.5)  # blur σ in pixels, uniform in this range
    noise_prob: float = 0.5  # probability of additive Gaussian noise
    noise_std: float = 0.2  # noise σ: U(0, noise_std) image standard deviations
    cutout_prob: float = 0.5  # probability of erasing one rectangle
    cutout_area: tuple[float, float] = (0.02, 0.2)  # erased fraction of the image, uniform
    cutout_ratio: tuple[float, float] = (0.3, 3.3)  # rectangle height / width, log-uniform

    #: columns of the per-sample random table (one draw per batch, whatever is enabled)
    _COLUMNS = 13

    def __call__(self, images: Tensor, generator: torch.Generator) -> StrongView:
        """Augment a batch.

        Args:
            images: (B, C, H, W) normalised images (the teacher's input; not modified).
            generator: a generator on ``images.device`` (see :func:`augment_generator`); the only
                source of randomness.

        Returns:
            :class:`StrongView` with the (B, C, H, W) augmented images and the (B, H, W) kept mask.
        """
        device = images.device
        if generator.device.type != device.type:
            raise ValueError(f"generator on {generator.device} but images on {device}")
        with torch.autocast(device.type, enabled=False):
            x = images.float()
            b, c, h, w = x.shape
            u = torch.rand(b, self._COLUMNS, generator=generator, device=device)  # (B, 13) in [0, 1)
            noise = torch.randn(x.shape, generator=generator, device=device)
            mean = x.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
            std = x.std(dim=(1, 2, 3), keepdim=True, unbiased=False)
            x = self._jitter(x, u, mean, std)
            x = self._blur(x, u)
            applied = (u[:, 6] < self.noise_prob).float().view(b, 1, 1, 1)
            x = x + applied * (u[:, 7] * self.noise_std).view(b, 1, 1, 1) * std * noise
            kept = self._cutout_kept(u, h, w)
            fill = x.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
            x = torch.where(kept[:, None], x, fill)
        return StrongView(x.to(images.dtype), kept)

    def _jitter(self, x: Tensor, u: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        b = x.shape[0]
        on = (u[:, 0] < self.jitter_prob).float()  # (B,)

        def factor(col: int, spread: float) -> Tensor:  # U(-spread, spread), 0 where jitter is off
            return (on * (2 * u[:, col] - 1) * spread).view(b, 1, 1, 1)

        x = x + factor(1, self.brightness) * std
        x = mean + (1 + factor(2, self.contrast)) * (x - mean)
        grey = x.mean(dim=1, keepdim=True)  # (B, 1, H, W)
        return grey + (1 + factor(3, self.saturation)) * (x - grey)

    def _blur(self, x: Tensor, u: Tensor) -> Tensor:
        b, c, h, w = x.shape
        lo, hi = self.blur_sigma
        radius = max(1, math.ceil(3 * hi))
        sigma = (lo + (hi - lo) * u[:, 5]).view(b, 1)  # (B, 1)
        offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)  # (k,)
        kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
        kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (B·C, k)
        flat = x.reshape(1, b * c, h, w)  # every (sample, channel) its own group
        flat = F.pad(flat, (radius, radius, radius, radius), mode="replicate")
        flat = F.conv2d(flat, kernel[:, None, None, :], groups=b * c)  # along W
        flat = F.conv2d(flat, kernel[:, None, :, None], groups=b * c)  # along H
        blurred = flat.reshape(b, c, h, w)
        return torch.where((u[:, 4] < self.blur_prob).view(b, 1, 1, 1), blurred, x)

    def _cutout_kept(self, u: Tensor, h: int, w: int) -> Tensor:
        """(B, H, W) bool: False inside each sample's erased rectangle."""
        b = u.shape[0]
        area = h * w * (self.cutout_area[0] + (self.cutout_area[1] - self.cutout_area[0]) * u[:, 9])
        log_lo, log_hi = math.log(self.cutout_ratio[0]), math.log(self.cutout_ratio[1])
        ratio = torch.exp(log_lo + (log_hi - log_lo) * u[:, 10])  # height / width
        box_h = torch.sqrt(area * ratio).round().clamp(1, h)
        box_w = torch.sqrt(area / ratio).round().clamp(1, w)
        top = torch.floor(u[:, 11] * (h - box_h + 1))
        left = torch.floor(u[:, 12] * (w - box_w + 1))
        rows = torch.arange(h, device=u.device, dtype=u.dtype).view(1, h, 1)
        cols = torch.arange(w, device=u.device, dtype=u.dtype).view(1, 1, w)
        inside = (
            (rows >= top.view(b, 1, 1))
            & (rows < (top + box_h).view(b, 1, 1))
            & (cols >= left.view(b, 1, 1))
            & (cols < (left + box_w).view(b, 1, 1))
        )  # (B, H, W)
        return ~(inside & (u[:, 8] < self.cutout_prob).view(b, 1, 1))


def augment_generator(device: torch.device | str, *key: int) -> torch.Generator:
    """A generator on ``device`` seeded by ``key`` (non-negative ints).

    ``distill/run.py`` keys it by ``(train.seed, epoch, micro-batch of the epoch, process)``, the
    counters a checkpoint saves, so a resumed run draws the same augmentation for the same batch.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(sample_seed(_STREAM, *key))
    return generator


def build_student_augment(kind: str) -> StrongAugment | None:
    """``kd.student_augment`` -> the augmentation (``"none"``: None, the student sees the teacher's batch)."""
    if kind == "none":
        return None
    if kind == "strong":
        return StrongAugment()
    raise ValueError(f"kd.student_augment={kind!r}: valid values are ['none', 'strong']")
